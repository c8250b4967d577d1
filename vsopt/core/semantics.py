"""The one meaning of a plan: what a site computes under its plan entry.

Given a site (its shapes and grid) and the head plans it runs at one step (SitePlan.heads_at), this
module says, once for the whole project:

    launch_groups(heads)                      which heads share one kernel launch (LaunchKey)
    permutations(site, heads)                 the per-head token orders as gather indices
    head_masks(site, heads, q, k, scale)      the block masks (B or 1, H, QB, KB), in each head's order
    head_densities(site, heads, q, k, scale)  the fraction of blocks each head visits
    site_output(site, heads, q, k, v, scale)  the output, through the same ops the lowered graph runs
    site_output(..., mask=m) / joint=True     a joint site split into video x video (the plan) and
                                              text (dense, under the model's mask): joint_plan
    text_blocks(grid, ...)                    the blocks holding text rows or columns (global in
                                              every sparsity kind: masks, patterns, dynamic)
    mask_refresh_step(spec, step, start)      the step a reused dynamic mask was computed at
    site_output(..., renorm_from=(q, k, v))   renormalized heads (Re-ttention) corrected with the
                                              statistics of their measuring step's q/k/v
    renorm_statistics / renorm_corrected      a measuring step's output and statistics, a
                                              correcting step's output (vsopt.core.rettention; the
                                              residual sharing kind: vsopt.core.residual)
    site_work(site, heads, densities)         the launches and extra work, priced by
    predicted_us(site, heads, cost, ...)      the cost model (dense_us for a site left alone:
                                              left_alone(heads))
    lowering_overhead_us(site, heads, cost)   what the lowered site costs a compiled model beyond
                                              its GPU work (per site, launch group, permutation)
    select_heads(site_plan, heads)            the plan of a subset / reordering of a site's heads
                                              (what one rank computes under head parallelism)

passes/lower_plan.py emits exactly these launches, calibration measures candidates with
site_output and prices them with site_work, the bench reports head_densities and predicted_us, and
the debugger shows head_densities: none of them computes a plan's meaning itself, so what
calibration predicts is what the compiled model runs.

Shapes: q (B, Hq, Nq, D), k and v (B, Hkv, Nk, D) in the model's token order; masks are bool over
blocks of block_m query and block_n key tokens, QB = ceil(Nq / block_m), KB = ceil(Nk / block_n).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from vsopt.core import ops as _ops  # noqa: F401  (registers torch.ops.vsopt.*)
from vsopt.core.clustering import ClusterLayout, ClusterSpec, cluster_cost_pairs, cluster_layout, clustered_attention
from vsopt.core.costmodel import CostModel, Launch, SiteWork
from vsopt.core.dynamic import DynamicMethod, DynamicSpec, pooled_block_scores, select_blocks
from vsopt.core.errors import ConfigError
from vsopt.core.ir import TokenGrid
from vsopt.core.joint import JointGroup, JointPlan, joint_attention
from vsopt.core.lse import EagerEmitter, sparse_partial
from vsopt.core.orders import head_permutations, is_model_order
from vsopt.core.patterns import block_mask, diagonal_blocks, num_blocks
from vsopt.core.plan import HeadPlan, Quant, SitePlan, Sparsity, StepPlan
from vsopt.core.pooled import Remainder
from vsopt.core import residual as _residual
from vsopt.core.rettention import Correction, Phase, correct, measure


@dataclass(frozen=True)
class SiteShape:
    """What the meaning of a plan depends on. The functions here take a SiteShape or anything
    with these fields: an AttentionSite has them all; a SitePlan has site_id, q_len, kv_len and
    grid, all that the masks and outputs read (the costs also read batch, heads, head_dim, dtype:
    SiteShape.of_plan adds them)."""

    site_id: str
    batch: int
    heads: int
    head_dim: int
    q_len: int
    kv_len: int
    grid: TokenGrid | None
    dtype: torch.dtype

    @classmethod
    def of_plan(cls, sp: SitePlan, batch: int, head_dim: int, dtype: torch.dtype,
                heads: int | None = None) -> "SiteShape":
        """The shape of a plan's site at this batch, head dim and dtype; heads: those one rank
        computes (default: all of the plan's)."""
        return cls(sp.site_id, batch, sp.num_heads if heads is None else heads, head_dim, sp.q_len, sp.kv_len,
                   sp.grid, dtype)


@dataclass(frozen=True)
class LaunchKey:
    """Heads that share one block-sparse kernel launch: same precision, blocks and dynamic rule."""

    quant: Quant
    block_m: int
    block_n: int
    dynamic: DynamicSpec | None
    remainder: Remainder = Remainder.DROP  # pooled: the launch adds the pooled remainder (core.pooled)
    cluster: ClusterSpec | None = None  # clustering heads: their own orders and blocks (core.clustering)
    renorm: Phase | None = None  # renormalized heads (core.rettention): their phase at this step
    correction: Correction | None = None  # and what they correct with (mass, or residual sharing)


def launch_groups(heads: Sequence[HeadPlan]) -> dict[LaunchKey, list[int]]:
    """Head indices per launch, launches in order of their first head."""
    groups: dict[LaunchKey, list[int]] = {}
    for h, hp in enumerate(heads):
        renorm = hp.renorm.phase if hp.renorm is not None else None
        kind = hp.renorm.kind if hp.renorm is not None else None
        groups.setdefault(LaunchKey(hp.quant, hp.block_m, hp.block_n, hp.dynamic, hp.remainder, hp.cluster, renorm,
                                    kind), []).append(h)
    return groups


def reorders(heads: Sequence[HeadPlan], grid: TokenGrid | None = None) -> bool:
    """Whether any head runs in a token order other than the model's (orders.model_order(grid):
    FHW without a grid), so the site is permuted."""
    return any(not is_model_order(hp.order, grid) for hp in heads)


def permutations(grid: TokenGrid | None, heads: Sequence[HeadPlan]) -> torch.Tensor | None:
    """Gather indices (H, N) of the heads' token orders ((1, N) when all heads share one), or None
    when every head runs in the model's order (grid.axes: "fhw" unless the model lays its tokens
    out otherwise; without a grid, frame-major is assumed and any other order needs the grid)."""
    orders = [hp.order for hp in heads]
    if grid is None:
        if not reorders(heads):
            return None
        raise ConfigError("token orders need the site's video grid: give it with the option 'grid', e.g. "
                          "options={'grid': (frames, height, width)} (or {'grids': {site_id: ...}})")
    if all(o.value == grid.axes for o in orders):
        return None
    perms = head_permutations(grid, orders)
    return perms[:1] if len(set(orders)) == 1 else perms


def kv_to_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """k or v (B, Hkv, N, D) with one head per query head (GQA's repeat_interleave)."""
    return x.repeat_interleave(heads // x.shape[1], dim=1) if x.shape[1] != heads else x


def permuted_qkv(grid: TokenGrid | None, heads: Sequence[HeadPlan], q, k, v=None):
    """(perm, q, k, v) with k/v expanded to one head per query head and all three in each head's
    order (perm None and the inputs unchanged when no head reorders)."""
    H = q.shape[1]
    k = kv_to_heads(k, H)
    v = kv_to_heads(v, H) if v is not None else None
    perm = permutations(grid, heads)
    if perm is None:
        return None, q, k, v
    perm = perm.to(q.device)
    p = torch.ops.vsopt.permute_tokens
    return perm, p(q, perm), p(k, perm), (p(v, perm) if v is not None else None)


def dynamic_masks(qp: torch.Tensor, kp: torch.Tensor, spec: DynamicSpec, scale: float, block_m: int,
                  block_n: int, grid: TokenGrid | None = None) -> torch.Tensor:
    """The masks (B, H, QB, KB) a dynamic head predicts online from pooled scores of these
    (already permuted) q and k; the diagonal blocks are always kept, and with the site's grid the
    text blocks too (text_blocks: text rows and columns are global)."""
    scores = pooled_block_scores(qp, kp, scale, block_m, block_n)
    diag = diagonal_blocks(qp.shape[2], kp.shape[2], block_m, block_n).to(qp.device)
    text = text_blocks(grid, qp.shape[2], kp.shape[2], block_m, block_n)
    if text is not None:
        diag = diag | text.to(qp.device)
    return select_blocks(scores, spec, diag)


def text_blocks(grid: TokenGrid | None, q_len: int, kv_len: int, block_m: int, block_n: int) -> torch.Tensor | None:
    """bool (QB, KB): the blocks holding a text query row or a text key column of a joint
    self-attention over `grid` (text tokens keep their places in every token order), None when the
    site has no text (or is not self-attention over the grid). Text rows and columns are global in
    every sparsity kind: calibrated masks and dynamic masks are OR-ed with this, patterns keep them
    through their text_global flag (True by default)."""
    if grid is None or grid.num_tokens == grid.video_tokens or not q_len == kv_len == grid.num_tokens:
        return None
    return _text_blocks_cached(grid, block_m, block_n).clone()


@functools.lru_cache(maxsize=256)
def _text_blocks_cached(grid: TokenGrid, block_m: int, block_n: int) -> torch.Tensor:
    n = grid.num_tokens
    is_text = torch.ones(n, dtype=torch.bool)
    is_text[grid.text_before:grid.text_before + grid.video_tokens] = False
    pos = torch.nonzero(is_text).squeeze(1)
    out = torch.zeros(num_blocks(n, block_m), num_blocks(n, block_n), dtype=torch.bool)
    out[pos // block_m, :] = True
    out[:, pos // block_n] = True
    return out


def static_mask(site: SiteShape, hp: HeadPlan) -> torch.Tensor | None:
    """A head's static block mask (QB, KB) in its order, None for a dynamic head. A pattern the
    site's grid cannot hold raises ConfigError naming the site."""
    try:
        mask = hp.block_mask(site.q_len, site.kv_len, site.grid)
    except ValueError as e:
        raise ConfigError(f"site {site.site_id!r}: {e}") from None
    if hp.sparsity is Sparsity.MASK:   # a calibrated mask keeps the text rows and columns (global)
        text = text_blocks(site.grid, site.q_len, site.kv_len, hp.block_m, hp.block_n)
        if text is not None:
            mask |= text
    return mask


def head_masks(site: SiteShape, heads: Sequence[HeadPlan], q: torch.Tensor | None = None,
               k: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Block masks of every head, (B, H, QB, KB) when a dynamic head needs this input's q/k (model
    order), else (1, H, QB, KB). All heads must share one block size."""
    block_m, block_n = common_blocks(site, heads)
    static = [static_mask(site, hp) for hp in heads]
    if all(m is not None for m in static):
        return torch.stack(static)[None]
    if q is None or k is None or scale is None:
        raise ConfigError(f"site {site.site_id!r}: dynamic heads need q, k and scale to give their masks")
    _, qp, kp, _ = permuted_qkv(site.grid, heads, q, k)
    layouts = cluster_layouts(site, heads, qp, kp, scale)
    out = []
    for h, (hp, m) in enumerate(zip(heads, static)):
        if h in layouts:   # in the head's own clustering order (per sample)
            m = layouts[h].masks[:, 0]
        elif m is None:
            m = dynamic_masks(qp[:, h:h + 1], kp[:, h:h + 1], hp.dynamic, scale, block_m, block_n, site.grid)[:, 0]
        out.append(m.to(q.device).expand(q.shape[0], -1, -1))
    return torch.stack(out, dim=1)


def head_densities(site: SiteShape, heads: Sequence[HeadPlan], q: torch.Tensor | None = None,
                   k: torch.Tensor | None = None, scale: float | None = None) -> list[float]:
    """Fraction of key blocks each head visits (skip 0, dense 1). A dynamic head's density comes
    from the mask it selects on q/k (mean over the batch); without q/k a top-k head is its
    fraction, and a cumulative-mass head raises (its density depends on the input)."""
    if q is None and any(hp.sparsity in (Sparsity.DYNAMIC, Sparsity.CLUSTER) for hp in heads):
        out = []
        for h, hp in enumerate(heads):
            if hp.sparsity not in (Sparsity.DYNAMIC, Sparsity.CLUSTER):
                out.append(float(static_mask(site, hp).float().mean()))
            elif hp.dynamic is not None and hp.dynamic.method is DynamicMethod.TOP_K:
                out.append(float(hp.dynamic.value))
            elif hp.sparsity is Sparsity.CLUSTER:
                raise ConfigError(f"{site.site_id} head {h}: a cluster head's density needs q/k")
            else:
                raise ConfigError(f"{site.site_id} head {h}: a cumulative-mass head's density needs q/k")
        return renorm_densities(heads, out)
    masks = head_masks(site, heads, q, k, scale)
    return renorm_densities(heads, [float(d) for d in masks.float().mean((0, 2, 3))])


def renorm_densities(heads: Sequence[HeadPlan], kept: Sequence[float]) -> list[float]:
    """The fraction of key blocks each head computes, from its kept fraction: a renormalized
    head measuring with the dropped blocks through the kernel computes every block (1.0), one
    whose phase is not resolved (AUTO, a plan file) the mean over its period, d + (1 - d) / every;
    with the pooled remainder (mass correction), and when correcting, it computes its kept blocks.
    Residual sharing measures exactly with or without a pooled remainder: every block."""
    out = []
    for hp, d in zip(heads, kept):
        r = hp.renorm
        exact = r is not None and (hp.remainder is Remainder.DROP or r.residual)
        if exact and r.phase is Phase.MEASURE:
            d = 1.0
        elif exact and r.phase is Phase.AUTO:
            d = d + (1.0 - d) / r.every
        out.append(d)
    return out


def common_blocks(site: SiteShape, heads: Sequence[HeadPlan]) -> tuple[int, int]:
    """The (block_m, block_n) every head of the site uses (one table per site)."""
    blocks = {(hp.block_m, hp.block_n) for hp in heads}
    if len(blocks) != 1:
        raise ConfigError(f"site {site.site_id!r}: heads with different block sizes {sorted(blocks)}")
    return blocks.pop()


def mask_refresh_step(spec: DynamicSpec, step: int, segment_start: int = 0) -> int:
    """The denoising step whose q/k a dynamic head's mask at `step` was predicted from (AdaSpa's
    mask reuse): masks are computed at the first step of the plan's segment and every
    reuse_steps + 1 steps after it, and reused in between (what MaskReuseCache does when the
    sampler announces every step; each segment of a step-ranged plan is its own graph, so its
    first step computes afresh)."""
    if step < segment_start:
        raise ConfigError(f"step {step} is before its segment's first step {segment_start}")
    period = spec.reuse_steps + 1
    return segment_start + (step - segment_start) // period * period


def site_output(site: SiteShape, heads: Sequence[HeadPlan], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                scale: float, mask: torch.Tensor | None = None, joint: bool = False,
                masks_from: tuple[torch.Tensor, torch.Tensor] | None = None,
                renorm_from: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                softcap: float = 0.0) -> torch.Tensor:
    """What the site computes under `heads` (one HeadPlan per query head): the per-head
    permutation, one block-sparse attention per precision over the heads' masks, the inverse
    permutation; the math the lowered graph runs, through the same ops. (B, Hq, Nq, Dv) float32.

    A site with the model's attention `mask` (boolean True = keep, or additive; broadcastable to
    (B, H, Nq, Nk)), or any site with joint=True (a data-dependent text length), is split
    (joint_plan, vsopt.core.joint): video rows x video keys run the plan over the video tokens,
    text keys and text rows are dense under the mask, merged by log-sum-exp. The mask's video x
    video part must be all-true (additive: all zero): check_video_mask raises otherwise.

    masks_from: (q, k) whose head h is head h's q and k at the step its mask was computed at,
    when dynamic masks are reused (mask_refresh_step: heads may refresh at different steps);
    None: this call's q and k.

    renorm_from: (q, k, v) of the step at which the correcting renormalized heads (HeadPlan.renorm
    at phase CORRECT, Re-ttention) measured their statistics (and a dynamic one its mask): the
    head's output is rho o_K + r (vsopt.core.rettention), or with residual sharing S + R
    (vsopt.core.residual); a measuring head (phase MEASURE, or AUTO: the step unknown) outputs
    the merged kept and dropped parts. Needed when some head corrects.

    softcap > 0: the site's logit cap (AttentionSite.softcap), applied before the softmax as the
    kernel does; the joint split, the pooled remainder, clustering and the softmax-mass correction
    do not take one (lower_plan leaves such sites dense), so they raise ConfigError here."""
    if softcap and (mask is not None or joint or any(hp.remainder is Remainder.POOLED or hp.cluster is not None
                                                     or hp.renorm is not None for hp in heads)):
        raise ConfigError(f"site {site.site_id!r}: soft-capped logits with a joint split, the pooled remainder, "
                          "clustering or the softmax-mass correction are not lowered (the site stays dense)")
    if mask is not None or joint:
        if masks_from is not None:
            raise ConfigError(f"site {site.site_id!r}: reused dynamic masks at a joint site are not modelled")
        if any(hp.renorm is not None for hp in heads):
            raise ConfigError(f"site {site.site_id!r}: renormalized heads at a split joint site are not modelled")
        check_video_mask(site, mask)
        out = joint_attention(joint_plan(site, heads), q, k, v, mask, scale, EagerEmitter(q.device), reuse=False)
        return out.float()
    block_m, block_n = common_blocks(site, heads)
    mq, mk = (q, k) if masks_from is None else masks_from
    masks = head_masks(site, heads, mq, mk, scale).to(q.device)
    perm, qp, kp, vp = permuted_qkv(site.grid, heads, q, k, v)
    out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=torch.float32, device=q.device)
    layouts = cluster_layouts(site, heads, qp, kp, scale)
    for h, lay in layouts.items():   # clustering heads: their own orders and blocks (core.clustering)
        sl = slice(h, h + 1)
        out[:, sl] = clustered_attention(qp[:, sl], kp[:, sl], vp[:, sl], lay, scale, heads[h].quant.value,
                                         block_m, block_n).float()
    for quant in sorted({hp.quant for hp in heads if hp.cluster is None}, key=lambda m: m.value):
        group = torch.tensor([hp.quant is quant and hp.cluster is None for hp in heads],
                             device=q.device)[None, :, None, None]
        part = masked_attention(qp, kp, vp, masks & group, scale, quant, block_m, block_n, softcap)
        pooled = torch.tensor([hp.quant is quant and hp.remainder is Remainder.POOLED for hp in heads],
                              device=q.device)[None, :, None, None]
        if bool(pooled.any()):  # PSA heads: the kept blocks plus the pooled remainder (core.pooled)
            part = torch.where(pooled, pooled_masked_attention(qp, kp, vp, masks, scale, quant, block_m, block_n),
                               part.float())
        if any(hp.renorm is not None and hp.quant is quant for hp in heads):
            part = _renorm_part(site, heads, quant, part, (qp, kp, vp), masks, scale, renorm_from)
        out += part.float() * group
    return out if perm is None else torch.ops.vsopt.unpermute_tokens(out, perm)


def _renorm_part(site: SiteShape, heads: Sequence[HeadPlan], quant: Quant, part: torch.Tensor, current, masks,
                 scale: float, renorm_from) -> torch.Tensor:
    """`part` (one precision's output) with its renormalized heads' outputs put in: measuring
    heads their merged kept and dropped parts on this step's q/k/v; correcting heads their kept
    blocks (under the measuring step's masks) corrected with the measuring step's statistics."""
    block_m, block_n = common_blocks(site, heads)
    dev = current[0].device
    part = part.float()
    phases = [hp.renorm.effective_phase() if hp.renorm is not None and hp.quant is quant else None for hp in heads]
    measured = None
    if Phase.CORRECT in phases:
        if renorm_from is None:
            raise ConfigError(f"site {site.site_id!r}: correcting renormalized heads need renorm_from, the q/k/v of "
                              "their measuring step")
        fq, fk, fv = renorm_from
        measured = permuted_qkv(site.grid, heads, fq, fk, fv)[1:], head_masks(site, heads, fq, fk, scale).to(dev)
    for kind in Correction:
        for remainder in Remainder:
            for phase in (Phase.MEASURE, Phase.CORRECT):
                sel = [p is phase and hp.remainder is remainder and hp.renorm.kind is kind
                       for p, hp in zip(phases, heads)]
                if not any(sel):
                    continue
                where = torch.tensor(sel, device=dev)[None, :, None, None]
                if phase is Phase.MEASURE:
                    value = renorm_statistics(*current, masks, scale, quant, block_m, block_n, remainder, kind)[0]
                else:
                    (mq, mk, mv), mmasks = measured
                    _, rho, resid = renorm_statistics(mq, mk, mv, mmasks, scale, quant, block_m, block_n, remainder,
                                                      kind)
                    value = renorm_corrected(*current, mmasks, scale, quant, block_m, block_n, rho, resid, kind,
                                             remainder)
                part = torch.where(where, value, part)
    return part


def renorm_statistics(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masks: torch.Tensor, scale: float,
                      quant: Quant, block_m: int, block_n: int, remainder: Remainder = Remainder.DROP,
                      kind: Correction = Correction.MASS
                      ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """A measuring step of renormalized heads (vsopt.core.rettention), run eagerly through the
    ops the lowered graph emits: (out float32 (B, H, N, D), rho float32 (B, H, N), r float32
    (B, H, N, D)). q/k/v (B, H, N, D) in the heads' orders, one kv head per query head; masks
    (Bt, H, QB, KB) the kept blocks. The dropped part: the complement blocks through the kernel
    (DROP: out is exact attention), or the pooled remainder (POOLED: out is PSA's).
    kind RESIDUAL (residual sharing, vsopt.core.residual): (exact out, None, R = exact - the
    sparse output, PSA's with POOLED), the dropped blocks through the kernel either way."""
    from vsopt.core.pooled import pooled_remainder

    em = EagerEmitter(q.device)
    masks = masks.to(q.device)
    qv = Quant(quant).value
    idx, counts = torch.ops.vsopt.mask_to_table(masks)
    kept = sparse_partial(em, q, k, v, idx, counts, scale, block_m, block_n, qv)
    if Correction(kind) is Correction.RESIDUAL:
        didx, dcounts = torch.ops.vsopt.mask_to_table(~masks)
        dropped = sparse_partial(em, q, k, v, didx, dcounts, scale, block_m, block_n, qv)
        pooled = pooled_remainder(em, q, k, v, masks, scale, block_m, block_n) \
            if remainder is Remainder.POOLED else None
        out, resid = _residual.measure(em, kept, dropped, pooled)
        return out, None, resid
    if remainder is Remainder.POOLED:
        dropped = pooled_remainder(em, q, k, v, masks, scale, block_m, block_n)
    else:
        didx, dcounts = torch.ops.vsopt.mask_to_table(~masks)
        dropped = sparse_partial(em, q, k, v, didx, dcounts, scale, block_m, block_n, qv)
    return measure(em, kept, dropped)


def renorm_corrected(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masks: torch.Tensor, scale: float,
                     quant: Quant, block_m: int, block_n: int, rho: torch.Tensor | None, resid: torch.Tensor,
                     kind: Correction = Correction.MASS, remainder: Remainder = Remainder.DROP) -> torch.Tensor:
    """A correcting step: the kept blocks `masks` of q/k/v through the kernel, rescaled by rho and
    plus r (a measuring step's statistics, renorm_statistics). float32 (B, H, N, D). kind
    RESIDUAL: the sparse output (with the pooled remainder when POOLED) plus the residual R."""
    if Correction(kind) is Correction.RESIDUAL:
        attend = pooled_masked_attention if remainder is Remainder.POOLED else masked_attention
        return _residual.correct(EagerEmitter(q.device), attend(q, k, v, masks, scale, quant, block_m, block_n), resid)
    o = masked_attention(q, k, v, masks, scale, quant, block_m, block_n)
    return correct(EagerEmitter(q.device), o, rho, resid)


def cluster_span(site: SiteShape, n: int) -> tuple[int, int]:
    """[start, stop) of the tokens a clustering head clusters in a sequence of n tokens: the video
    tokens of a site with a grid of n tokens (text keeps its places, global), else all n."""
    g = site.grid
    if g is not None and g.num_tokens == n and g.video_tokens != n:
        return g.text_before, g.text_before + g.video_tokens
    return 0, n


def cluster_layouts(site: SiteShape, heads: Sequence[HeadPlan], qp: torch.Tensor, kp: torch.Tensor,
                    scale: float) -> dict[int, ClusterLayout]:
    """Head index -> the clustering (a cold start, core.clustering.cluster_layout) of every cluster
    head, on q (B, H, Nq, D) and k (B, H, Nk, D) as permuted_qkv gives them (one key head per
    query head). The compiled graph warm-starts and reuses these across steps (CLUSTER_STATE); this
    is one step's clustering from scratch."""
    out = {}
    for h, hp in enumerate(heads):
        if hp.cluster is not None:
            sl = slice(h, h + 1)
            out[h] = cluster_layout(qp[:, sl], kp[:, sl], hp.cluster, scale, hp.block_m, hp.block_n,
                                    cluster_span(site, qp.shape[2]), cluster_span(site, kp.shape[2]))
    return out


def video_range(site: SiteShape) -> tuple[int, int]:
    """[start, stop) of the video tokens in the site's sequence (its grid's text_before, video)."""
    if site.grid is None:
        raise ConfigError(f"site {site.site_id!r}: a split joint site needs its video grid")
    return site.grid.text_before, site.grid.text_before + site.grid.video_tokens


def check_video_mask(site: SiteShape, mask: torch.Tensor | None) -> None:
    """Raise ConfigError naming the site unless the model's mask is all-true (boolean) or all zero
    (additive) over video rows x video keys: the split runs the kernel there, which takes no mask."""
    if mask is None:
        return
    s, e = video_range(site)
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    part = m[:, :, s:e] if m.shape[2] != 1 else m
    part = part[..., s:e] if part.shape[3] != 1 else part
    ok = bool(part.all()) if part.dtype == torch.bool else bool((part == 0).all())
    if not ok:
        raise ConfigError(f"site {site.site_id!r}: the attention mask is not all-true over video x video tokens "
                          f"[{s}, {e}); a split joint site applies the mask to text rows and keys only")


def joint_plan(site: SiteShape, heads: Sequence[HeadPlan]) -> JointPlan:
    """The meaning of `heads` on a split joint site, over its video tokens (the video-only grid,
    TokenGrid(frames, height, width)): per launch group its video x video block masks in the heads'
    orders (a pattern's mask on the video grid; a calibrated mask given over the video blocks, or
    over the whole site when text_before falls on block boundaries, then cut to the video blocks;
    dense all; skip none, and a skipped head outputs 0 in every row), or its dynamic rule (predicted
    on the video tokens). Text rows and columns are global in every kind, patterns' text_global
    included. Raises ConfigError naming the site and head when a mask does not fit."""
    clustered = [h for h, hp in enumerate(heads) if hp.sparsity is Sparsity.CLUSTER]
    if clustered:  # the split has no clustering path: refuse rather than run it dense
        raise ConfigError(f"site {site.site_id!r}: heads {clustered} are cluster heads, which a split joint site "
                          "does not run")
    pooled = [h for h, hp in enumerate(heads) if hp.remainder is Remainder.POOLED]
    if pooled:  # the split has no pooled-remainder path: refuse rather than drop it
        raise ConfigError(f"site {site.site_id!r}: heads {pooled} ask for the pooled remainder, which a split "
                          "joint site does not run")
    renorm = [h for h, hp in enumerate(heads) if hp.renorm is not None]
    if renorm:  # nor a softmax-mass correction
        raise ConfigError(f"site {site.site_id!r}: heads {renorm} ask for a softmax-mass correction (renorm), which a "
                          "split joint site does not run")
    tb, stop = video_range(site)
    nv = stop - tb
    grid = site.grid
    video = TokenGrid(grid.frames, grid.height, grid.width, axes=grid.axes)  # the video tokens, in their order
    groups = []
    for key, idx in launch_groups(heads).items():
        masks = None
        if key.dynamic is None:
            masks = torch.stack([_video_mask(site, h, heads[h], video, tb) for h in idx])
        groups.append(JointGroup(tuple(idx), key.quant, key.block_m, key.block_n, masks, key.dynamic))
    skipped = tuple(h for h, hp in enumerate(heads) if hp.sparsity is Sparsity.SKIP)
    return JointPlan(site.site_id, tb, nv, len(heads), tuple(groups), permutations(video, heads), skipped)


def _video_mask(site: SiteShape, h: int, hp: HeadPlan, video: TokenGrid, tb: int) -> torch.Tensor:
    nv = video.video_tokens
    qb, kb = num_blocks(nv, hp.block_m), num_blocks(nv, hp.block_n)
    if hp.sparsity is Sparsity.MASK:
        shape = tuple(hp.mask.shape)
        if shape == (qb, kb):
            return hp.mask.clone()
        whole = (num_blocks(site.q_len, hp.block_m), num_blocks(site.kv_len, hp.block_n)) \
            if isinstance(site.q_len, int) and isinstance(site.kv_len, int) else None
        if shape == whole and tb % hp.block_m == 0 and tb % hp.block_n == 0:
            r, c = tb // hp.block_m, tb // hp.block_n
            return hp.mask[r:r + qb, c:c + kb].clone()
        raise ConfigError(f"site {site.site_id!r} head {h}: calibrated mask of shape {shape} fits neither the "
                          f"video blocks ({qb}, {kb}) nor the whole site {whole} with text_before {tb} on block "
                          "boundaries")
    if hp.sparsity is Sparsity.PATTERN:
        return block_mask(hp.pattern, video, hp.order, hp.block_m, hp.block_n)
    if hp.sparsity is Sparsity.SKIP:
        return torch.zeros(qb, kb, dtype=torch.bool)
    return torch.ones(qb, kb, dtype=torch.bool)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masks: torch.Tensor, scale: float,
                     quant: Quant, block_m: int, block_n: int, softcap: float = 0.0) -> torch.Tensor:
    """Block-sparse attention of q/k/v (B, H, N, D), one kv head per query head, under masks
    (Bt, H, QB, KB) through vsopt's ops (the Triton kernel on a GPU, its reference on the CPU).
    softcap > 0: the site's logit cap, applied by the kernel as the lowered graph passes it."""
    idx, counts = torch.ops.vsopt.mask_to_table(masks.to(q.device))
    cap = (float(softcap),) if softcap else ()   # uncapped: the call lower_plan emits for uncapped sites
    return torch.ops.vsopt.block_sparse_attention(q, k, v, idx, counts, scale, block_m, block_n, Quant(quant).value,
                                                  *cap)


def pooled_masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masks: torch.Tensor, scale: float,
                            quant: Quant, block_m: int, block_n: int) -> torch.Tensor:
    """masked_attention plus the pooled remainder of the blocks `masks` leaves out (PSA,
    vsopt.core.pooled), run eagerly through the same ops the lowered graph emits. float32."""
    from vsopt.core.pooled import pooled_attention

    masks = masks.to(q.device)
    idx, counts = torch.ops.vsopt.mask_to_table(masks)
    return pooled_attention(EagerEmitter(q.device), q, k, v, masks, idx, counts, scale, block_m, block_n,
                            Quant(quant).value)


def permuted_heads(heads: Sequence[HeadPlan], grid: TokenGrid | None = None) -> int:
    """Heads that compute something in an order other than the model's (orders.model_order(grid)):
    when there is one, the lowering permutes the site (every head of q, k, v and the output)."""
    return sum(1 for hp in heads if not is_model_order(hp.order, grid) and hp.sparsity is not Sparsity.SKIP)


def permuted_mib(site: SiteShape, heads_permuted: int) -> float:
    """MiB moved by token permutations of `heads_permuted` heads: q, k, v in and the output back."""
    return 4 * max(1, site.batch) * site.q_len * site.head_dim * site.dtype.itemsize * heads_permuted / 2**20


def site_work(site: SiteShape, heads: Sequence[HeadPlan], densities: Sequence[float]) -> SiteWork:
    """The work of the site as lowered: one Launch per launch group (query blocks and visited
    blocks of its computing heads; a group of skipped heads only costs nothing), the permuted data,
    and the blocks dynamic heads score online. `densities`: per head, as head_densities gives."""
    batch = max(1, site.batch)
    launches, pooled, extra_mib = [], [], 0.0
    for key, idx in launch_groups(heads).items():
        live = [h for h in idx if heads[h].sparsity is not Sparsity.SKIP]
        if not live:
            continue
        qb, kb = num_blocks(site.q_len, key.block_m), num_blocks(site.kv_len, key.block_n)
        launches.append(Launch(key.quant.value, site.head_dim, key.block_m, key.block_n, batch * qb * len(live),
                               sum(round(batch * densities[h] * qb * kb) for h in live),
                               max(_longest_row(heads[h], densities[h], kb) for h in live)))
        if key.cluster is not None:
            # the k-means, priced as attention tiles of the same kernel: its token-centroid dot
            # products are a GEMM like QK^T, half a tile's work (no PV) per block_m x block_n pairs,
            # plus one launch's fixed cost (an equivalence, not a fitted term: gpu_check_cluster
            # measures the layout's time)
            pairs = cluster_cost_pairs(key.cluster, site.q_len, site.kv_len)
            launches.append(Launch(key.quant.value, site.head_dim, key.block_m, key.block_n, 0,
                                   math.ceil(batch * len(live) * pairs / (2 * key.block_m * key.block_n))))
        pooled_heads = sum(_pooled_share(heads[h]) for h in live)
        if key.remainder is Remainder.POOLED and pooled_heads:
            # the pooled remainder: an attention of these heads over KB pooled keys, and the merge of
            # its partial with the kept one (two float32 outputs read, one written; CostModel prices)
            pooled.append((batch * pooled_heads, site.q_len, kb, site.head_dim))
            extra_mib += 3 * batch * pooled_heads * site.q_len * site.head_dim * 4 / 2**20
    # a mask reused for reuse_steps more steps is scored once per reuse_steps + 1 steps (the mean)
    # a renormalized dynamic head scores when it measures only (correcting, it reuses that mask)
    scored = sum(batch * num_blocks(site.q_len, hp.block_m) * num_blocks(site.kv_len, hp.block_n)
                 / (hp.dynamic.reuse_steps + 1) * _measure_share(hp) for hp in heads if hp.sparsity is Sparsity.DYNAMIC)
    # the lowering gathers every head of q, k, v and the output once any head reorders; a cluster
    # launch gathers its own heads again, in their clustering orders
    moved = permuted_mib(site, site.heads) if permuted_heads(heads, site.grid) else 0.0
    moved += permuted_mib(site, sum(1 for hp in heads if hp.sparsity is Sparsity.CLUSTER))
    extra_mib += renorm_mib(site, heads)
    return SiteWork(tuple(launches), moved, scored, tuple(pooled), extra_mib, extra_ops(heads))


class _CountingEmitter(EagerEmitter):
    """Runs the ops on tiny CPU tensors and counts them (what the lowering emits, op for op)."""

    def __init__(self):
        super().__init__("cpu")
        self.ops = 0

    def op(self, target, *args, **kwargs):
        self.ops += 1
        return target(*args, **kwargs)


@functools.cache
def _op_counts() -> dict[str, int]:
    """ATen ops of each piece of the pooled remainder and the corrections, counted by running the
    same functions the lowering emits (core.pooled, core.lse, core.rettention, core.residual)."""
    from vsopt.core import residual as _res, rettention as _rett
    from vsopt.core.lse import merge_partials
    from vsopt.core.pooled import pooled_remainder

    q = torch.randn(1, 1, 4, 2)
    part = (q, q[..., 0])
    masks = torch.tensor([[[[True, False], [False, True]]]])

    def count(fn):
        em = _CountingEmitter()
        fn(em)
        return em.ops

    return {"pooled": count(lambda em: pooled_remainder(em, q, q, q, masks, 1.0, 2, 2)),
            "merge": count(lambda em: merge_partials(em, [part, part])),
            "mass_measure": count(lambda em: _rett.measure(em, part, part)),
            "mass_correct": count(lambda em: _rett.correct(em, q, q[..., 0], q)),
            "resid_measure": count(lambda em: _res.measure(em, part, part)),
            "resid_measure_pooled": count(lambda em: _res.measure(em, part, part, part)),
            "resid_correct": count(lambda em: _res.correct(em, q, q))}


def extra_ops(heads: Sequence[HeadPlan]) -> float:
    """ATen ops a site runs beyond its kernel launches, per step (the mean over a renormalized
    head's period), as passes/lower_plan emits them per launch group: a PSA group's pooled
    remainder and merge; a renormalized group's epilogue, state reads (index_select) and writes
    (_to_copy + index_copy_), and its pooled remainder when it runs one."""
    c, total = _op_counts(), 0.0
    for key, idx in launch_groups(heads).items():
        live = [h for h in idx if heads[h].sparsity is not Sparsity.SKIP]
        if not live:
            continue
        hp = heads[live[0]]
        pooled = key.remainder is Remainder.POOLED
        dyn = 1 if hp.sparsity is Sparsity.DYNAMIC else 0   # its mask is stored / read too
        r = hp.renorm
        if r is None:
            total += (c["pooled"] + c["merge"]) if pooled else 0
            continue
        if r.residual:
            measure = (c["resid_measure_pooled"] + c["pooled"] if pooled else c["resid_measure"]) + 2 + dyn
            correct = c["resid_correct"] + 1 + dyn + ((c["pooled"] + c["merge"]) if pooled else 0)
        else:
            measure = c["mass_measure"] + (c["pooled"] if pooled else 0) + 3 + dyn
            correct = c["mass_correct"] + 2 + dyn
        share = _measure_share(hp)
        total += share * measure + (1.0 - share) * correct + 1   # + the output's cast back
    return total


def _longest_row(hp: HeadPlan, density: float, kb: int) -> int:
    """Key blocks of a head's longest query-block row (the launch lasts at least that long): a
    calibrated mask's own, a dense head's every block, else its mean row (patterns and dynamic
    heads: not derived here, to keep pricing cheap)."""
    if hp.sparsity is Sparsity.DENSE:
        return kb
    if hp.sparsity is Sparsity.MASK and hp.mask is not None and hp.mask.shape[-1] == kb:
        return int(hp.mask.sum(-1).max())
    return max(1, round(density * kb))


def _measure_share(hp: HeadPlan) -> float:
    """How often a head runs what only a measuring renormalized head runs (a pooled remainder, a
    dynamic mask's scoring): always without a renorm, else when measuring (1 / every of its steps
    while its phase is unresolved)."""
    r = hp.renorm
    if r is None or r.phase is Phase.MEASURE:
        return 1.0
    return 0.0 if r.phase is Phase.CORRECT else 1.0 / r.every


def _pooled_share(hp: HeadPlan) -> float:
    """How often a PSA head runs its pooled remainder: a mass-corrected one when measuring only
    (correcting restores it from r), a residual-sharing one at every step (S is PSA's output)."""
    return 1.0 if hp.renorm is not None and hp.renorm.residual else _measure_share(hp)


def renorm_mib(site: SiteShape, heads: Sequence[HeadPlan]) -> float:
    """MiB the renormalized heads' epilogues move (SiteWork.extra_mib: priced as memory traffic at
    the permutation's rate; not a fitted term): correcting, the kept output and r read and the output written; measuring,
    r and rho written besides the merge; unresolved (AUTO), the mean over the period."""
    per_head = max(1, site.batch) * site.q_len * site.head_dim * site.dtype.itemsize / 2**20
    total = 0.0
    for hp in heads:
        r = hp.renorm
        if r is None or hp.sparsity is Sparsity.SKIP:
            continue
        passes = {Phase.CORRECT: 3.0, Phase.MEASURE: 4.0}.get(r.phase, (4.0 + 3.0 * (r.every - 1)) / r.every)
        total += passes * per_head
    return total


def left_alone(heads: Sequence[HeadPlan]) -> bool:
    """Whether lower_plan leaves a site with these head plans the model's own attention (every head
    dense and unquantized): it then runs what a site without a plan runs (vsopt.attention: SDPA)."""
    return all(hp.sparsity is Sparsity.DENSE and hp.quant is Quant.NONE for hp in heads)


def predicted_us(site: SiteShape, heads: Sequence[HeadPlan], cost: CostModel,
                 densities: Sequence[float] | None = None) -> float:
    """The cost model's time of the site under `heads` (densities from head_densities without q/k
    when not given); a site left alone costs its dense attention (dense_us), not vsopt's kernel
    over every block."""
    if left_alone(heads):
        return dense_us(site, cost, heads[0].block_m, heads[0].block_n)
    if densities is None:
        densities = head_densities(site, heads)
    return cost.predict_us(site_work(site, heads, densities))


def lowering_overhead_us(site: SiteShape, heads: Sequence[HeadPlan], cost: CostModel, cudagraphs: bool) -> float:
    """The cost model's overhead of the site as lowered (CostModel.lowering_overhead_us), without or
    with CUDA graphs: its launch groups (one block-sparse launch each, as lower_plan emits them) and
    whether it is permuted. 0 for a site whose plan is all dense (it stays vsopt.attention)."""
    if left_alone(heads):
        return 0.0   # the model's own attention in any order: lower_plan leaves it alone
    return cost.lowering_overhead_us(cudagraphs, len(launch_groups(heads)), reorders(heads, site.grid)) + \
        extra_ops(heads) * cost.op_cost_us(cudagraphs)


def select_heads(sp: SitePlan, heads: Sequence[int]) -> SitePlan:
    """The plan of the site as computed by `heads` (global head indices, in the order they are
    computed): head i of the result is head heads[i] of `sp`, at every step range. Under Ulysses
    rank r of U computes heads [r*H/U, (r+1)*H/U) of every site; a head permutation (head
    balancing) reorders them. The site's sizes and grid are unchanged (the rank sees the whole
    sequence of its heads)."""
    heads = [int(h) for h in heads]
    bad = [h for h in heads if not 0 <= h < sp.num_heads]
    if bad or len(set(heads)) != len(heads):
        raise ConfigError(f"site {sp.site_id!r}: head selection {heads} must be distinct heads of 0..{sp.num_heads - 1}")
    pick = lambda hs: tuple(hs[h] for h in heads)  # noqa: E731
    return dataclasses.replace(sp, num_heads=len(heads), heads=pick(sp.heads),
                               steps=tuple(StepPlan(st.start, st.stop, pick(st.heads)) for st in sp.steps))


def dense_us(site: SiteShape, cost: CostModel, block_m: int = 64, block_n: int = 64) -> float:
    """The cost model's time of the site's exact dense attention: SDPA (what a site left dense runs,
    vsopt.attention) where the cost model measured it, else vsopt's kernel with every block (bf16)."""
    sdpa = cost.dense_us(max(1, site.batch), site.heads, site.q_len, site.kv_len, site.head_dim)
    if sdpa is not None:
        return sdpa
    heads = [HeadPlan(block_m=block_m, block_n=block_n)] * site.heads
    return cost.predict_us(site_work(site, heads, [1.0] * site.heads))
