"""The one meaning of a plan: what a site computes under its plan entry.

Given a site (its shapes and grid) and the head plans it runs at one step (SitePlan.heads_at), this
module says, once for the whole project:

    launch_groups(heads)                      which heads share one kernel launch (LaunchKey)
    permutations(site, heads)                 the per-head token orders as gather indices
    head_masks(site, heads, q, k, scale)      the block masks (B or 1, H, QB, KB), in each head's order
    head_densities(site, heads, q, k, scale)  the fraction of blocks each head visits
    site_output(site, heads, q, k, v, scale)  the output, through the same ops the lowered graph runs
    site_work(site, heads, densities)         the launches and extra work, priced by
    predicted_us(site, heads, cost, ...)      the cost model
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
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from vsopt.core import ops as _ops  # noqa: F401  (registers torch.ops.vsopt.*)
from vsopt.core.costmodel import CostModel, Launch, SiteWork
from vsopt.core.dynamic import DynamicMethod, DynamicSpec, pooled_block_scores, select_blocks
from vsopt.core.errors import ConfigError
from vsopt.core.ir import TokenGrid
from vsopt.core.orders import TokenOrder, head_permutations
from vsopt.core.patterns import diagonal_blocks, num_blocks
from vsopt.core.plan import HeadPlan, Quant, SitePlan, Sparsity, StepPlan


class SiteShape(Protocol):
    """What the meaning of a plan depends on: an AttentionSite or a SitePlan both have it."""

    site_id: str
    batch: int
    heads: int
    head_dim: int
    q_len: int
    kv_len: int
    grid: TokenGrid | None
    dtype: torch.dtype


@dataclass(frozen=True)
class LaunchKey:
    """Heads that share one block-sparse kernel launch: same precision, blocks and dynamic rule."""

    quant: Quant
    block_m: int
    block_n: int
    dynamic: DynamicSpec | None


def launch_groups(heads: Sequence[HeadPlan]) -> dict[LaunchKey, list[int]]:
    """Head indices per launch, launches in order of their first head."""
    groups: dict[LaunchKey, list[int]] = {}
    for h, hp in enumerate(heads):
        groups.setdefault(LaunchKey(hp.quant, hp.block_m, hp.block_n, hp.dynamic), []).append(h)
    return groups


def reorders(heads: Sequence[HeadPlan]) -> bool:
    """Whether any head runs in a token order other than the model's (the site is permuted)."""
    return any(hp.order is not TokenOrder.FHW for hp in heads)


def permutations(grid: TokenGrid | None, heads: Sequence[HeadPlan]) -> torch.Tensor | None:
    """Gather indices (H, N) of the heads' token orders ((1, N) when all heads share one), or None
    when every head runs in the model's order."""
    if not reorders(heads):
        return None
    if grid is None:
        raise ConfigError("token orders need the site's video grid")
    orders = [hp.order for hp in heads]
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
                  block_n: int) -> torch.Tensor:
    """The masks (B, H, QB, KB) a dynamic head predicts online from pooled scores of these
    (already permuted) q and k; the diagonal blocks are always kept."""
    scores = pooled_block_scores(qp, kp, scale, block_m, block_n)
    diag = diagonal_blocks(qp.shape[2], kp.shape[2], block_m, block_n).to(qp.device)
    return select_blocks(scores, spec, diag)


def static_mask(site: SiteShape, hp: HeadPlan) -> torch.Tensor | None:
    """A head's static block mask (QB, KB) in its order, None for a dynamic head. A pattern the
    site's grid cannot hold raises ConfigError naming the site."""
    try:
        return hp.block_mask(site.q_len, site.kv_len, site.grid)
    except ValueError as e:
        raise ConfigError(f"site {site.site_id!r}: {e}") from None


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
    out = []
    for h, (hp, m) in enumerate(zip(heads, static)):
        if m is None:
            m = dynamic_masks(qp[:, h:h + 1], kp[:, h:h + 1], hp.dynamic, scale, block_m, block_n)[:, 0]
        out.append(m.to(q.device).expand(q.shape[0], -1, -1))
    return torch.stack(out, dim=1)


def head_densities(site: SiteShape, heads: Sequence[HeadPlan], q: torch.Tensor | None = None,
                   k: torch.Tensor | None = None, scale: float | None = None) -> list[float]:
    """Fraction of key blocks each head visits (skip 0, dense 1). A dynamic head's density comes
    from the mask it selects on q/k (mean over the batch); without q/k a top-k head is its
    fraction, and a cumulative-mass head raises (its density depends on the input)."""
    if q is None and any(hp.sparsity is Sparsity.DYNAMIC for hp in heads):
        out = []
        for h, hp in enumerate(heads):
            if hp.sparsity is not Sparsity.DYNAMIC:
                out.append(float(static_mask(site, hp).float().mean()))
            elif hp.dynamic.method is DynamicMethod.TOP_K:
                out.append(float(hp.dynamic.value))
            else:
                raise ConfigError(f"{site.site_id} head {h}: a cumulative-mass head's density needs q/k")
        return out
    masks = head_masks(site, heads, q, k, scale)
    return [float(d) for d in masks.float().mean((0, 2, 3))]


def common_blocks(site: SiteShape, heads: Sequence[HeadPlan]) -> tuple[int, int]:
    """The (block_m, block_n) every head of the site uses (one table per site)."""
    blocks = {(hp.block_m, hp.block_n) for hp in heads}
    if len(blocks) != 1:
        raise ConfigError(f"site {site.site_id!r}: heads with different block sizes {sorted(blocks)}")
    return blocks.pop()


def site_output(site: SiteShape, heads: Sequence[HeadPlan], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                scale: float) -> torch.Tensor:
    """What the site computes under `heads` (one HeadPlan per query head): the per-head
    permutation, one block-sparse attention per precision over the heads' masks, the inverse
    permutation; the math the lowered graph runs, through the same ops. (B, Hq, Nq, Dv) float32."""
    block_m, block_n = common_blocks(site, heads)
    masks = head_masks(site, heads, q, k, scale).to(q.device)
    perm, qp, kp, vp = permuted_qkv(site.grid, heads, q, k, v)
    out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=torch.float32, device=q.device)
    for quant in sorted({hp.quant for hp in heads}, key=lambda m: m.value):
        group = torch.tensor([hp.quant is quant for hp in heads], device=q.device)[None, :, None, None]
        part = masked_attention(qp, kp, vp, masks & group, scale, quant, block_m, block_n)
        out += part.float() * group
    return out if perm is None else torch.ops.vsopt.unpermute_tokens(out, perm)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masks: torch.Tensor, scale: float,
                     quant: Quant, block_m: int, block_n: int) -> torch.Tensor:
    """Block-sparse attention of q/k/v (B, H, N, D), one kv head per query head, under masks
    (Bt, H, QB, KB) through vsopt's ops (the Triton kernel on a GPU, its reference on the CPU)."""
    idx, counts = torch.ops.vsopt.mask_to_table(masks.to(q.device))
    return torch.ops.vsopt.block_sparse_attention(q, k, v, idx, counts, scale, block_m, block_n, Quant(quant).value)


def permuted_heads(heads: Sequence[HeadPlan]) -> int:
    """Heads that compute something in an order other than the model's: when there is one, the
    lowering permutes the site (every head of q, k, v and the output)."""
    return sum(1 for hp in heads if hp.order is not TokenOrder.FHW and hp.sparsity is not Sparsity.SKIP)


def permuted_mib(site: SiteShape, heads_permuted: int) -> float:
    """MiB moved by token permutations of `heads_permuted` heads: q, k, v in and the output back."""
    return 4 * max(1, site.batch) * site.q_len * site.head_dim * site.dtype.itemsize * heads_permuted / 2**20


def site_work(site: SiteShape, heads: Sequence[HeadPlan], densities: Sequence[float]) -> SiteWork:
    """The work of the site as lowered: one Launch per launch group (query blocks and visited
    blocks of its computing heads; a group of skipped heads only costs nothing), the permuted data,
    and the blocks dynamic heads score online. `densities`: per head, as head_densities gives."""
    batch = max(1, site.batch)
    launches = []
    for key, idx in launch_groups(heads).items():
        live = [h for h in idx if heads[h].sparsity is not Sparsity.SKIP]
        if not live:
            continue
        qb, kb = num_blocks(site.q_len, key.block_m), num_blocks(site.kv_len, key.block_n)
        launches.append(Launch(key.quant.value, site.head_dim, key.block_m, key.block_n, batch * qb * len(live),
                               sum(round(batch * densities[h] * qb * kb) for h in live)))
    scored = sum(batch * num_blocks(site.q_len, hp.block_m) * num_blocks(site.kv_len, hp.block_n)
                 for hp in heads if hp.sparsity is Sparsity.DYNAMIC)
    # the lowering gathers every head of q, k, v and the output once any head reorders
    moved = permuted_mib(site, site.heads) if permuted_heads(heads) else 0.0
    return SiteWork(tuple(launches), moved, scored)


def predicted_us(site: SiteShape, heads: Sequence[HeadPlan], cost: CostModel,
                 densities: Sequence[float] | None = None) -> float:
    """The cost model's time of the site under `heads` (densities from head_densities without q/k
    when not given)."""
    if densities is None:
        densities = head_densities(site, heads)
    return cost.predict_us(site_work(site, heads, densities))


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
    """The cost model's time of the site's exact dense attention (every head, every block, bf16)."""
    heads = [HeadPlan(block_m=block_m, block_n=block_n)] * site.heads
    return predicted_us(site, heads, cost, [1.0] * site.heads)
