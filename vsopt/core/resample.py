"""Plans that follow the resolution: a SitePlan made at one clip size, fitted to a site of another.

A plan is calibrated at one clip size (frames x height x width video tokens, plus text), and the
same model is then run at others. fit_site_plan(site_plan, site) gives the entry at the site's
sizes, or the one-line reason it cannot:

    fit = fit_site_plan(sp, site)       sp made for grid 2x4x4, site has grid 3x6x4 (+ 7 text)
    fit.plan                            the SitePlan at the site's q_len / kv_len / grid (None: no fit)
    fit.reason                          why not (None when it fits)
    fit.line()                          "plan for 2x4x4 fitted to 3x6x4+7: ... density 0.41 -> 0.38"

What each head kind becomes at the new grid:
- dense, skip, dynamic: unchanged (their meaning does not depend on the size; a dynamic head
  selects its blocks online, a top-k head keeps its fraction);
- pattern: unchanged; the pattern is stated in (frame, height, width) coordinates and its block
  mask is evaluated on the site's grid (HeadPlan.block_mask), i.e. re-derived at the new grid;
- token order: unchanged (an order of the axes, valid at any size);
- calibrated mask: resampled in grid coordinates (resample_mask): each token of the new grid
  stands for the old tokens at its place (frame, height and width scaled separately, in
  normalized coordinates: axis_cover), a new block pair is kept when any pair of old tokens it
  stands for was in a kept old block pair, text rows and columns are global (text tokens
  have no grid position; issue 14 item 4), and every row keeps its diagonal block.
  Block sizes are kept.

It cannot fit (a reason, no plan) when the head count differs, when the plan's entry or the site
has no grid while the sizes differ and some head needs one (masks, patterns, orders), or for
masks of a cross-attention site (its keys have no grid to resample along).

The density change is reported by the caller (passes/lower_plan.py records fit.line() in its
report; the backend logs it): densities are SitePlan.density (static heads) and, for the
resampled masks alone, their mean.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from .ir import TokenGrid
from .orders import TokenOrder, inverse_permutation, is_model_order, order_permutation
from .patterns import diagonal_blocks, num_blocks
from .plan import HeadPlan, SitePlan, Sparsity, StepPlan

#: The start of every line fit.line() returns (how the backend finds them in lower_plan's notes).
NOTE_PREFIX = "plan fitted to the site's size"


@dataclass(frozen=True)
class SiteFit:
    """A SitePlan fitted to a site: plan (None when it cannot be fitted: reason says why);
    resampled: whether anything had to change; densities before (at the plan's grid) and after
    (at the site's), None where a head's density depends on the input (dynamic heads);
    mask_densities: the mean density of the calibrated masks before and after resampling."""

    site_id: str
    plan: SitePlan | None
    reason: str | None = None
    resampled: bool = False
    before: str = ""
    after: str = ""
    density: tuple[float | None, float | None] = (None, None)
    mask_density: tuple[float | None, float | None] = (None, None)

    def line(self) -> str:
        """One line for the report and the log."""
        if self.plan is None:
            return f"site {self.site_id!r}: the plan cannot be fitted to the site: {self.reason}"
        if not self.resampled:
            return f"site {self.site_id!r}: the plan entry fits the site's size ({self.after}) as it is"
        parts = [f"{NOTE_PREFIX}: site {self.site_id!r}: plan for {self.before} fitted to {self.after}"]
        if self.mask_density[0] is not None:
            parts.append(f"calibrated masks resampled, density {self.mask_density[0]:.3f} -> {self.mask_density[1]:.3f}")
        d0, d1 = self.density
        parts.append(f"site density {d0:.3f} -> {d1:.3f}" if d0 is not None and d1 is not None
                     else "site density depends on the input (dynamic heads)")
        return "; ".join(parts)


def _describe(q_len: int, kv_len: int, grid: TokenGrid | None) -> str:
    if grid is not None and grid.num_tokens == q_len == kv_len:
        return f"grid {grid}"
    return f"q_len {q_len}, kv_len {kv_len}" + (f", grid {grid}" if grid is not None else "")


def fit_site_plan(sp: SitePlan, site) -> SiteFit:
    """`sp` at the sizes of `site` (an AttentionSite: heads, q_len, kv_len, grid). Unchanged when
    it already fits; otherwise every head plan at every step adapted as the module doc says, or
    the reason it cannot be."""
    before, after = _describe(sp.q_len, sp.kv_len, sp.grid), _describe(site.q_len, site.kv_len, site.grid)
    if sp.num_heads != site.heads:
        return SiteFit(sp.site_id, None, f"the plan has {sp.num_heads} heads, the site {site.heads}: a plan follows "
                                         "the resolution, not the head count", before=before, after=after)
    same_sizes = (sp.q_len, sp.kv_len) == (site.q_len, site.kv_len)
    heads = list(sp.all_heads())
    needs_grid = [h for h in heads if h.sparsity in (Sparsity.PATTERN, Sparsity.MASK)
                  or not is_model_order(h.order, sp.grid) or not is_model_order(h.order, site.grid)]
    if same_sizes and sp.grid == site.grid:
        return SiteFit(sp.site_id, sp, before=before, after=after)
    if same_sizes and not needs_grid:  # only the recorded grid differs, and no head reads it
        return SiteFit(sp.site_id, dataclasses.replace(sp, grid=site.grid), before=before, after=after)
    if needs_grid:
        if site.q_len != site.kv_len or sp.q_len != sp.kv_len:
            return SiteFit(sp.site_id, None, "calibrated masks of a cross-attention site cannot be resampled (its "
                                             "keys have no grid)", before=before, after=after)
        for who, grid, n in (("the plan's entry", sp.grid, sp.q_len), ("the site", site.grid, site.q_len)):
            if grid is None or grid.num_tokens != n:
                return SiteFit(sp.site_id, None, f"{who} has no video grid of its {n} tokens (grid {grid}), so its "
                                                 f"masks, patterns and orders cannot be mapped from {before} to {after} "
                                                 "(give the grid: options grid=... or grids={site_id: ...})",
                               before=before, after=after)
    try:
        fitted = _with_heads(sp, site, lambda hp: _fit_head(hp, sp.grid, site.grid, site.q_len, site.kv_len))
    except ValueError as e:
        return SiteFit(sp.site_id, None, str(e), before=before, after=after)
    masks = [(h, f) for h, f in zip(sp.all_heads(), fitted.all_heads()) if h.sparsity is Sparsity.MASK]
    mask_density = (None, None)
    if masks:
        mask_density = (sum(float(h.mask.float().mean()) for h, _ in masks) / len(masks),
                        sum(float(f.mask.float().mean()) for _, f in masks) / len(masks))
    return SiteFit(sp.site_id, fitted, resampled=True, before=before, after=after,
                   density=(sp.density(), fitted.density()), mask_density=mask_density)


def _with_heads(sp: SitePlan, site, fit) -> SitePlan:
    return SitePlan(sp.site_id, sp.num_heads, site.q_len, site.kv_len, site.grid, tuple(fit(h) for h in sp.heads),
                    tuple(StepPlan(st.start, st.stop, tuple(fit(h) for h in st.heads)) for st in sp.steps))


def _fit_head(hp: HeadPlan, old: TokenGrid | None, new: TokenGrid | None, q_len: int, kv_len: int) -> HeadPlan:
    if hp.sparsity is not Sparsity.MASK:
        return hp  # dense, skip, dynamic: size-free; pattern: evaluated on the new grid
    qb, kb = num_blocks(old.num_tokens, hp.block_m), num_blocks(old.num_tokens, hp.block_n)
    if tuple(hp.mask.shape) != (qb, kb):
        raise ValueError(f"a calibrated mask of shape {tuple(hp.mask.shape)} does not match blocks "
                         f"{hp.block_m}x{hp.block_n} of its grid {old} ({qb}x{kb} expected)")
    return dataclasses.replace(hp, mask=resample_mask(hp.mask, old, new, hp.order, hp.block_m, hp.block_n))


def axis_cover(n_old: int, n_new: int) -> torch.Tensor:
    """Bool (n_new, n_old): the old cells new cell c stands for, along one axis, in normalized
    coordinates (cell c spans [c, c+1) / n_new): every old cell whose centre lies in c's span
    (shrinking: the old cells are shared out, none twice), and the old cell holding c's centre
    (growing: each new cell has one). The identity when n_old == n_new; no dilation at any ratio,
    so a mask keeps its density up to block rounding."""
    c = torch.arange(n_new, dtype=torch.int64)[:, None]
    o = torch.arange(n_old, dtype=torch.int64)[None, :]
    centre_of_old_in_c = ((2 * o + 1) * n_new) // (2 * n_old) == c
    old_at_centre_of_c = ((2 * c + 1) * n_old) // (2 * n_new) == o
    return centre_of_old_in_c | old_at_centre_of_c


def _block_members(grid: TokenGrid, order: TokenOrder, block: int) -> torch.Tensor:
    """Float (NB, F, H, W): which video tokens (by their (f, h, w)) fall in each block of `block`
    tokens of the sequence in `order`."""
    position = inverse_permutation(order_permutation(grid, order))  # token -> place in the order
    blocks = position[grid.text_before:grid.text_before + grid.video_tokens] // block
    member = torch.zeros(num_blocks(grid.num_tokens, block), grid.video_tokens)
    member[blocks, torch.arange(grid.video_tokens)] = 1.0
    return member.view(-1, grid.frames, grid.height, grid.width)


@functools.lru_cache(maxsize=64)
def _block_cover(old: TokenGrid, new: TokenGrid, order: TokenOrder, block: int) -> torch.Tensor:
    """Bool (NB_new, NB_old): new block I stands for old block i when a video token of I covers a
    video token of i (axis_cover on each axis). Cached: every mask head of a model with one order
    and block size shares it (do not modify the result)."""
    cf, ch, cw = (axis_cover(o, n).float() for o, n in ((old.frames, new.frames), (old.height, new.height),
                                                         (old.width, new.width)))
    r = torch.einsum("ifhw,fg->ighw", _block_members(new, order, block), cf)
    r = torch.einsum("ighw,hk->igkw", r, ch)
    r = torch.einsum("igkw,wl->igkl", r, cw)
    return (r.flatten(1) @ _block_members(old, order, block).flatten(1).T) > 0.5


def _text_blocks(grid: TokenGrid, block: int) -> torch.Tensor:
    """Indices of the blocks holding text tokens (text never moves under a token order)."""
    text = torch.cat([torch.arange(grid.text_before),
                      torch.arange(grid.text_before + grid.video_tokens, grid.num_tokens)])
    return torch.unique(text // block)


def resample_mask(mask: torch.Tensor, old: TokenGrid, new: TokenGrid, order: TokenOrder | str, block_m: int,
                  block_n: int) -> torch.Tensor:
    """A calibrated block mask (QB, KB) of self-attention over `old` in `order`, at grid `new`:
    bool (QB', KB') over the new sequence in the same order and block sizes. Block pair (I, J) is
    kept when some query token of I and key token of J stand for (axis_cover) old tokens in a kept
    old block pair; blocks holding text are kept whole (rows and columns); the diagonal is kept."""
    order = TokenOrder(order)
    a_q = _block_cover(old, new, order, block_m).float()  # (QB', QB)
    a_k = _block_cover(old, new, order, block_n).float()  # (KB', KB)
    out = (a_q @ mask.float() @ a_k.T) > 0.5
    out[_text_blocks(new, block_m), :] = True
    out[:, _text_blocks(new, block_n)] = True
    return out | diagonal_blocks(new.num_tokens, new.num_tokens, block_m, block_n)

