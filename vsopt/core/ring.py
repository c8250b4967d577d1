"""What a site computes under ring (sequence-parallel) attention: the plan's block table split into
(query shard x key shard) sub-tables, each run by the block-sparse kernel with its log-sum-exp, and
the partial results merged through it.

Under ring_degree R a site of N tokens is cut into R equal contiguous shards (diffusers'
equipartition): rank r holds the queries of shard r, [r*S, (r+1)*S) with S = N / R, and sees the
keys and values of every shard j (diffusers all-gathers them; a true ring passes them on). Rank r's
output rows equal rows [r*S, (r+1)*S) of semantics.site_output, computed as

    for each launch group (semantics.launch_groups) and each key piece P of each shard j:
        sub-table = the group's block mask, rows of shard r's query blocks x columns of P's key blocks
        skipped if empty (static masks), else (o_P, lse_P) = vsopt.block_sparse_attention_lse(q_r, k_P, v_P, ...)
    out_r = sum_P exp(lse_P - lse) o_P  with  lse = logsumexp_P lse_P          (merge_partials)

Block boundaries need not fall on shard boundaries: q_r is padded in front to its first query
block (the padding rows are dropped), and a key shard is cut into pieces at key-block boundaries
(a block that straddles two shards is computed as two pieces and merged), so the result is exact
for any S. Token orders (PARO) are applied per shard: an order must keep every token in its shard
(e.g. frame-major orders when S holds whole frames); one that moves tokens across shards is refused
with an error naming the site, the head and the order, because the engine shards the sequence
before the attention and per-head orders cannot be applied to the hidden states all heads share.
Dynamic heads need S to be a multiple of their blocks (their pooled query blocks must not straddle
shards: the engine never sends another rank's queries); their mask is predicted on this rank's
queries against all key shards. Quantized heads smooth K per piece (the kernels subtract the mean
of a strided sample of the keys they see, quant_ref.smoothing_mean), so lse_P gets the smoothing's
row shift back (scale * q . smoothing_mean(k_P), lse.smoothing_shift) before the merge; their rounding then differs slightly from one device's (quantization tolerance).

The computation is written once against an Emitter (vsopt/core/lse.py, with merge_partials):
EagerEmitter runs it (tests, GPU checks), passes.ring_attention emits it into the graph as nodes of
the same ops.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from vsopt.core import ops as _ops  # noqa: F401  (registers torch.ops.vsopt.*)
from vsopt.core.errors import ConfigError
from vsopt.core.lse import NEG_INF, EagerEmitter, Emitter, gather_heads, merge_partials, smoothing_shift, \
    sparse_partial  # noqa: F401  (re-exported)
from vsopt.core.patterns import diagonal_blocks, num_blocks
from vsopt.core.plan import HeadPlan, Sparsity
from vsopt.core.semantics import SiteShape, launch_groups, permutations, static_mask, text_blocks

aten = torch.ops.aten
vsopt = torch.ops.vsopt


@dataclass(frozen=True)
class Shards:
    """R equal contiguous shards of n tokens (rank j holds [j*size, (j+1)*size))."""

    n: int
    degree: int

    def __post_init__(self):
        if self.degree < 1 or self.n % self.degree:
            raise ConfigError(f"ring attention needs the sequence ({self.n} tokens) to split into {self.degree} "
                              "equal shards")

    @property
    def size(self) -> int:
        return self.n // self.degree

    def bounds(self, j: int) -> tuple[int, int]:
        return j * self.size, (j + 1) * self.size


def key_pieces(start: int, stop: int, block_n: int) -> list[tuple[int, int, int]]:
    """[start, stop) cut at key-block boundaries into pieces (piece_start, piece_stop, first_block)
    whose first local block is global block first_block: a partial block first when start is not on
    a boundary, then the rest (its last block may be partial, which the kernel masks)."""
    cut = min(stop, -(-start // block_n) * block_n)
    pieces = [(start, cut, start // block_n)] if cut > start else []
    if cut < stop:
        pieces.append((cut, stop, cut // block_n))
    return pieces


def local_permutations(site_id: str, heads: Sequence[HeadPlan], perm: torch.Tensor, shards: Shards) -> list[torch.Tensor]:
    """Per shard j, the heads' orders as gather indices within the shard ((H or 1, S), local
    positions); raises ConfigError when some head's order moves tokens across shards."""
    out = []
    for j in range(shards.degree):
        s, e = shards.bounds(j)
        part = perm[:, s:e]
        inside = (part >= s) & (part < e)
        if not bool(inside.all()):
            row = int((~inside).any(1).nonzero()[0])
            h = row if perm.shape[0] > 1 else 0  # one row: every head runs the same order
            raise ConfigError(f"site {site_id!r}: head {h} runs token order {heads[h].order.value!r}, which moves "
                              f"tokens across the ring shards of {shards.size} tokens (shard {j} = tokens {s}..{e - 1}); "
                              "ring attention takes only orders that keep every shard's tokens in it (e.g. "
                              "frame-major orders when a shard holds whole frames): recalibrate with those "
                              "orders or use Ulysses (heads are whole on each rank)")
        out.append(part - s)
    return out


def check_ring_plan(site: SiteShape, heads: Sequence[HeadPlan], shards: Shards) -> None:
    """Raise ConfigError naming the site when its plan cannot run under these shards."""
    if site.q_len != shards.n or site.kv_len != shards.n:
        raise ConfigError(f"site {site.site_id!r}: ring attention needs self-attention over the sharded sequence "
                          f"({shards.n} tokens), got q_len {site.q_len}, kv_len {site.kv_len}")
    for h, hp in enumerate(heads):
        if hp.sparsity is Sparsity.CLUSTER:
            raise ConfigError(f"site {site.site_id!r}: head {h} is a cluster head (k-means order over the whole "
                              "sequence), which ring attention does not run (single-device and Ulysses only)")
        if hp.remainder.value != "drop":
            raise ConfigError(f"site {site.site_id!r}: head {h} has a pooled remainder, which ring attention does "
                              "not run (single-device and Ulysses only)")
        if hp.renorm is not None:
            raise ConfigError(f"site {site.site_id!r}: head {h} has a softmax-mass correction (renorm), which ring "
                              "attention does not run (single-device and Ulysses only)")
        if hp.sparsity is Sparsity.DYNAMIC and (shards.size % hp.block_m or shards.size % hp.block_n):
            raise ConfigError(f"site {site.site_id!r}: dynamic head {h} with blocks {hp.block_m}x{hp.block_n} "
                              f"needs ring shards of a multiple of its blocks, got {shards.size} tokens per shard "
                              "(its pooled query blocks would straddle ranks)")
    perm = permutations(site.grid, heads)
    if perm is not None:
        local_permutations(site.site_id, heads, perm, shards)


def ring_attention(site: SiteShape, heads: Sequence[HeadPlan], rank: int, shards: Shards, q, ks: Sequence[Any],
                   vs: Sequence[Any], scale: float, em: Emitter, cache_key: str = "") -> tuple[Any, Any]:
    """Rank `rank`'s part of the site under `heads` (one HeadPlan per query head of q).

    q (B, H, S, D): this rank's queries, model order; ks, vs: per shard j (B, Hkv, S, D), ks[rank]
    this rank's own. Returns (out (B, H, S, D) in q's dtype, lse float32 (B, H, S), -inf for rows
    that attend to nothing). `cache_key`: prefix of the dynamic heads' mask-reuse keys."""
    check_ring_plan(site, heads, shards)
    H = len(heads)
    rep = H // _shape(ks[0])[1]
    if rep > 1:  # one key/value head per query head (orders and launch groups are per query head)
        ks = [em.op(aten.repeat_interleave.self_int, k, rep, 1) for k in ks]
        vs = [em.op(aten.repeat_interleave.self_int, v, rep, 1) for v in vs]
    perm = permutations(site.grid, heads)
    local = None
    if perm is not None:
        local = [em.const(f"ring_perm{j}", p) for j, p in enumerate(local_permutations(site.site_id, heads, perm, shards))]
        q = em.op(vsopt.permute_tokens.default, q, local[rank])
        ks = [em.op(vsopt.permute_tokens.default, k, local[j]) for j, k in enumerate(ks)]
        vs = [em.op(vsopt.permute_tokens.default, v, local[j]) for j, v in enumerate(vs)]
    groups = launch_groups(heads)
    outs, lses, order = [], [], []
    for key, idx in groups.items():
        if len(groups) > 1:
            sel = em.const("ring_heads", torch.tensor(idx, dtype=torch.int64))
            qg = em.op(aten.index_select.default, q, 1, sel)
            kg = [em.op(aten.index_select.default, k, 1, sel) for k in ks]
            vg = [em.op(aten.index_select.default, v, 1, sel) for v in vs]
        else:
            qg, kg, vg = q, ks, vs
        o, l = _group(site, [heads[h] for h in idx], key, rank, shards, qg, kg, vg, scale, em,
                      f"{cache_key}/heads{idx[0]}")
        outs.append(o)
        lses.append(l)
        order += idx
    out, lse = gather_heads(em, outs, lses, order, None if local is None else local[rank], "ring_head_order")
    return em.op(aten._to_copy.default, out, dtype=site.dtype), lse


def _shape(x) -> tuple[int, ...]:
    """x's shape, from a tensor or a graph node's fake value."""
    val = x.meta["val"] if hasattr(x, "meta") else x
    return tuple(val.shape)


def _group(site: SiteShape, heads: list[HeadPlan], key, rank: int, shards: Shards, q, ks, vs, scale: float,
           em: Emitter, cache_key: str):
    """One launch group: its sub-tables over every key piece, run and merged; (out, lse) float32."""
    bm, bn = key.block_m, key.block_n
    start, stop = shards.bounds(rank)
    pad = start % bm
    qb0, qbs = (start - pad) // bm, num_blocks(shards.size + pad, bm)
    if pad:
        q = em.op(aten.constant_pad_nd.default, q, [0, 0, pad, 0])
    if key.dynamic is None:
        rows = torch.stack([static_mask(site, hp) for hp in heads])[None, :, qb0:qb0 + qbs]
        full = None
    else:
        spec = key.dynamic
        k_all = em.op(aten.cat.default, list(ks), 2)
        mask = em.op(vsopt.dynamic_block_mask.default, q, k_all, float(scale), bm, bn, spec.method.value, spec.value,
                     spec.reuse_steps, cache_key)
        diag = diagonal_blocks(shards.n, shards.n, bm, bn)
        text = text_blocks(site.grid, shards.n, shards.n, bm, bn)
        if text is not None:   # text rows and columns global, as semantics.dynamic_masks keeps them
            diag = diag | text
        full = em.op(aten.bitwise_or.Tensor, mask, em.const("ring_diag", diag[qb0:qb0 + qbs]))   # as on one device
        rows = None
    parts = []
    for j in range(shards.degree):
        s_j, e_j = shards.bounds(j)
        for ps, pe, kb0 in key_pieces(s_j, e_j, bn):
            kbs = num_blocks(pe - ps, bn)
            kp = em.op(aten.slice.Tensor, ks[j], 2, ps - s_j, pe - s_j)
            vp = em.op(aten.slice.Tensor, vs[j], 2, ps - s_j, pe - s_j)
            if rows is not None:
                sub = rows[..., kb0:kb0 + kbs]
                if not bool(sub.any()):
                    continue   # nothing of this piece is visited: no launch
                idx, counts = vsopt.mask_to_table(sub.contiguous())
                width = max(1, int(counts.max()))
                idx, counts = em.const("ring_kv_indices", idx[..., :width].contiguous()), em.const("ring_kv_counts", counts)
            else:
                sub = em.op(aten.clone.default, em.op(aten.slice.Tensor, full, 3, kb0, kb0 + kbs),
                            memory_format=torch.contiguous_format)
                table = em.op(vsopt.mask_to_table.default, sub)
                idx, counts = em.op(operator.getitem, table, 0), em.op(operator.getitem, table, 1)
            parts.append(sparse_partial(em, q, kp, vp, idx, counts, scale, bm, bn, key.quant))
    if not parts:   # every head of the group skipped: zero output, empty rows
        shape = list(_shape(q))
        zero = em.op(aten.new_zeros.default, q, shape, dtype=torch.float32)
        parts.append((zero, em.op(aten.new_full.default, q, shape[:3], NEG_INF, dtype=torch.float32)))
    out, lse = merge_partials(em, parts)
    if pad:
        out, lse = em.op(aten.slice.Tensor, out, 2, pad, pad + shards.size), em.op(aten.slice.Tensor, lse, 2, pad,
                                                                                   pad + shards.size)
    return out, lse


def shard_rows(x: torch.Tensor, shards: Shards, rank: int, dim: int = 2) -> torch.Tensor:
    """Rank `rank`'s rows of a full-sequence tensor (tests and checks compare against these)."""
    s, e = shards.bounds(rank)
    return x.narrow(dim, s, e - s)


__all__ = ["EagerEmitter", "Emitter", "Shards", "check_ring_plan", "key_pieces", "local_permutations",
           "merge_partials", "ring_attention", "shard_rows"]
