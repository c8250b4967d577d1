"""Semantic clustering order (Sparse VideoGen 2): a per-head token permutation from k-means of the
head's queries and keys, with the block table chosen over cluster pairs by centroid scores.

PARO's axis orders (vsopt.core.orders) make a head's attention block-concentrated when it follows
the video's geometry; many heads attend by content instead (the same object wherever it is). SVG2
clusters each head's queries and keys separately by k-means, so that semantically similar tokens
become contiguous after a sort by cluster; a query cluster a then attends to the key clusters b
ranked by their centroid score, the softmax over b of |b| * exp(scale * cq_a . ck_b) (|b| tokens
of score s carry |b| * exp(s) of mass), keeping the fewest whose mass reaches top_p. The kept
cluster pairs become dense blocks of related tokens. Clusters change slowly over the denoising
steps, so they are refreshed every `refresh` steps, the k-means warm-started from the previous
centroids (few iterations), and the permutation and table reused in between.

Here, per (batch, head), over the clustered span (the video tokens of a joint site; text tokens
keep their places and are global: their rows and columns are kept, as in every sparsity kind):

    labels_q, cq = kmeans(q, q_clusters)     fixed iteration count, init: tokens at evenly spaced
    labels_k, ck = kmeans(k, k_clusters)     positions (deterministic), or the previous centroids
    perm_q = stable argsort(labels_q)        reordered = x[perm]: vsopt.permute_tokens' convention
    keep (Cq, Ck) = top-p of softmax_b(scale cq . ck + log |b|)
    mask (QB, KB) over the permuted sequence in kernel blocks: block (i, j) kept when some query
      cluster in block i and key cluster in block j are a kept pair (clusters have any size, so
      a block may hold several clusters; a block holding a text token is kept along its row/col)

Every step is a fixed-shape tensor op (argmax, one-hot matmul, sort, scatter): no .item(), no
nonzero, no host sync, so the op is safe inside a CUDA graph. Distances are materialized per chunk
of heads ((chunk, N, C) floats), not in a fused k-means kernel (SVG2 has one; not written here).
With top_p = 1 every pair is kept: the result is dense attention exactly (after unpermuting).

The op vsopt::cluster_layout runs this on the device and keeps each site's last layout and
centroids on the device (CLUSTER_STATE), keyed per compiled graph and head group, refreshing by the
step vsopt.set_denoising_step announces.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from .dynamic import current_denoising_step

CHUNK_ELEMENTS = 1 << 26  # distances materialized per chunk of (batch*head): chunk * N * C <= this


@dataclass(frozen=True)
class ClusterSpec:
    """A clustering head (HeadPlan.cluster): q_clusters / k_clusters k-means clusters of its queries
    and keys, top_p the centroid-score mass of key clusters each query cluster keeps (in (0, 1]),
    refresh the denoising steps one clustering serves (1: recomputed at every step, warm-started
    from the previous step's centroids), iterations the k-means iterations of a cold start,
    warm_iterations those of a warm start; warm_start False: every refresh starts cold (and with
    refresh 1 the op keeps no state at all: what runs under CUDA graphs)."""

    q_clusters: int = 32
    k_clusters: int = 64
    top_p: float = 0.9
    refresh: int = 1
    iterations: int = 8
    warm_iterations: int = 2
    warm_start: bool = True

    def __post_init__(self):
        for name, low in (("q_clusters", 1), ("k_clusters", 1), ("refresh", 1), ("iterations", 0),
                          ("warm_iterations", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"ClusterSpec.{name} must be an integer >= {low}, got {v!r}")
        if not isinstance(self.top_p, (int, float)) or isinstance(self.top_p, bool) \
                or not 0.0 < float(self.top_p) <= 1.0:
            raise ValueError(f"ClusterSpec.top_p must be in (0, 1], got {self.top_p!r}")
        object.__setattr__(self, "top_p", float(self.top_p))
        if not isinstance(self.warm_start, bool):
            raise ValueError(f"ClusterSpec.warm_start must be true or false, got {self.warm_start!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"q_clusters": self.q_clusters, "k_clusters": self.k_clusters, "top_p": self.top_p,
                "refresh": self.refresh, "iterations": self.iterations, "warm_iterations": self.warm_iterations,
                "warm_start": self.warm_start}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ClusterSpec":
        if not isinstance(d, Mapping):
            raise ValueError(f"cluster: must be an object, got {d!r}")
        unknown = sorted(set(d) - set(cls().to_dict()))
        if unknown:
            raise ValueError(f"cluster: unknown field(s) {unknown}")
        return cls(**dict(d))


@dataclass(frozen=True)
class ClusterLayout:
    """One clustering of a head group: perm_q (B, H, Nq), perm_k (B, H, Nk) int64 (reordered[i] =
    x[perm[i]]), masks bool (B, H, QB, KB) over the permuted sequences, centroids_q (B, H, Cq, D),
    centroids_k (B, H, Ck, D) float32 (the next refresh's warm start)."""

    perm_q: torch.Tensor
    perm_k: torch.Tensor
    masks: torch.Tensor
    centroids_q: torch.Tensor
    centroids_k: torch.Tensor


def initial_centroids(x: torch.Tensor, clusters: int) -> torch.Tensor:
    """Deterministic k-means init: the tokens at `clusters` evenly spaced positions of x (G, N, D)
    (repeated positions when clusters > N: duplicate centroids, of which argmax picks the first)."""
    n = x.shape[1]
    idx = torch.arange(clusters, device=x.device, dtype=torch.int64) * max(n - 1, 0) // max(clusters - 1, 1)
    return x[:, idx].clone()


def _assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest centroid of every token: argmin |x - c|^2 = argmax 2 x.c - |c|^2; x (G, N, D),
    centroids (G, C, D) -> int64 (G, N). Chunked over G to bound the (G, N, C) distances."""
    G, N, _ = x.shape
    C = centroids.shape[1]
    step = max(1, CHUNK_ELEMENTS // max(1, N * C))
    out = []
    for s in range(0, G, step):
        c = centroids[s:s + step]
        score = 2 * torch.bmm(x[s:s + step], c.transpose(1, 2)) - c.pow(2).sum(-1)[:, None, :]
        out.append(score.argmax(-1))
    return out[0] if len(out) == 1 else torch.cat(out)


def _one_hot(labels: torch.Tensor, clusters: int) -> torch.Tensor:
    """float32 (G, N, C): 1 at each token's cluster."""
    G, N = labels.shape
    return torch.zeros(G, N, clusters, dtype=torch.float32, device=labels.device).scatter_(2, labels[..., None], 1.0)


def _update(x: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Means of the tokens of each cluster (an empty cluster keeps its centroid), and the counts.
    Sums as a one-hot matmul, chunked over G like _assign: deterministic on the GPU too (an
    index_add's float atomics are not, and contend on few clusters)."""
    G, N, D = x.shape
    C = centroids.shape[1]
    step = max(1, CHUNK_ELEMENTS // max(1, N * C))
    sums, counts = [], []
    for s in range(0, G, step):
        hot = _one_hot(labels[s:s + step], C)
        sums.append(torch.bmm(hot.transpose(1, 2), x[s:s + step]))
        counts.append(hot.sum(1))
    sums = sums[0] if len(sums) == 1 else torch.cat(sums)
    counts = counts[0] if len(counts) == 1 else torch.cat(counts)
    means = sums / counts.clamp_min(1)[..., None]
    return torch.where(counts[..., None] > 0, means, centroids), counts


def _counts(labels: torch.Tensor, clusters: int) -> torch.Tensor:
    """float32 (G, C): tokens per cluster (exact integers: a scatter of ones per row, no atomics
    over rows of other samples)."""
    G = labels.shape[0]
    return torch.zeros(G, clusters, dtype=torch.float32, device=labels.device).scatter_add_(
        1, labels, torch.ones(labels.shape, dtype=torch.float32, device=labels.device))


def kmeans(x: torch.Tensor, clusters: int, iterations: int,
           init: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with a fixed iteration count on x (G, N, D) (float32): `iterations` rounds of
    assign + update from `init` (G, C, D) or initial_centroids, then a final assignment. Returns
    (labels int64 (G, N), centroids float32 (G, C, D), counts float32 (G, C) of the final labels)."""
    x = x.float()
    c = initial_centroids(x, clusters) if init is None else init.float()
    if c.shape != (x.shape[0], clusters, x.shape[2]):
        raise ValueError(f"kmeans: init centroids {tuple(c.shape)} do not fit ({x.shape[0]}, {clusters}, {x.shape[2]})")
    for _ in range(iterations):
        c, _ = _update(x, _assign(x, c), c)
    labels = _assign(x, c)
    return labels, c, _counts(labels, clusters)


def cluster_keep(cq: torch.Tensor, ck: torch.Tensor, counts_k: torch.Tensor, scale: float,
                 top_p: float) -> torch.Tensor:
    """Kept cluster pairs bool (G, Cq, Ck): per query cluster the fewest key clusters whose share of
    softmax_b(scale cq . ck_b + log |b|) reaches top_p (at least the best one; empty key clusters
    have no mass; top_p 1: every pair)."""
    logits = scale * torch.bmm(cq, ck.transpose(1, 2)) + counts_k.clamp_min(1e-30).log()[:, None, :]
    logits = logits.masked_fill(counts_k[:, None, :] == 0, float("-inf"))
    if top_p >= 1.0:
        return torch.ones(logits.shape, dtype=torch.bool, device=logits.device)
    p = torch.softmax(logits, -1)
    vals, idx = p.sort(-1, descending=True)
    before = vals.cumsum(-1) - vals  # the mass of the clusters ranked before each one
    take = before < top_p - 1e-7
    return torch.zeros_like(take).scatter_(-1, idx, take)


def _membership(labels_sorted: torch.Tensor, clusters: int, block: int) -> torch.Tensor:
    """float (G, NB, clusters + 1): 1 where block i of the permuted sequence holds a token of
    cluster c (the last column: a text token, label == clusters)."""
    G, N = labels_sorted.shape
    nb = -(-N // block)
    pos = torch.arange(N, device=labels_sorted.device) // block
    flat = pos[None, :] * (clusters + 1) + labels_sorted
    out = torch.zeros(G, nb * (clusters + 1), dtype=torch.float32, device=labels_sorted.device)
    return out.scatter_(1, flat, 1.0).view(G, nb, clusters + 1)


def _span_labels(x: torch.Tensor, span: tuple[int, int], clusters: int, iterations: int,
                 init: torch.Tensor | None):
    """k-means over x[:, span] (G, N, D); labels over the whole sequence (text: `clusters`)."""
    s, e = span
    labels, cent, counts = kmeans(x[:, s:e], clusters, iterations, init)
    full = torch.full(x.shape[:2], clusters, dtype=torch.int64, device=x.device)
    full[:, s:e] = labels
    return full, cent, counts


def _sort_order(labels: torch.Tensor, span: tuple[int, int]) -> torch.Tensor:
    """The permutation that sorts the clustered span by cluster (stable: by position within a
    cluster) and leaves the tokens before and after the span in their places."""
    key = labels.clone()
    key[:, :span[0]] = -1  # before every cluster; the tokens after the span have the largest label
    return torch.sort(key, dim=-1, stable=True).indices


def cluster_layout(q: torch.Tensor, k: torch.Tensor, spec: ClusterSpec, scale: float, block_m: int, block_n: int,
                   q_span: tuple[int, int] | None = None, k_span: tuple[int, int] | None = None,
                   init: tuple[torch.Tensor, torch.Tensor] | None = None) -> ClusterLayout:
    """The clustering of q (B, H, Nq, D) and k (B, H, Nk, D) (one key head per query head) under
    `spec` (module doc). q_span / k_span: [start, stop) of the clustered tokens (default all; the
    others keep their places and are global). init: (centroids_q, centroids_k) of a previous
    layout: a warm start of spec.warm_iterations iterations; None: a cold start of spec.iterations."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    if k.shape[:2] != (B, H):
        raise ValueError(f"cluster_layout: k {tuple(k.shape)} needs one key head per query head of q {tuple(q.shape)}")
    q_span, k_span = q_span or (0, Nq), k_span or (0, Nk)
    iters = spec.iterations if init is None else spec.warm_iterations
    iq = ik = None
    if init is not None:
        iq, ik = (c.reshape(B * H, *c.shape[2:]) for c in init)
    cq_n, ck_n = spec.q_clusters, spec.k_clusters
    lq, cq, _ = _span_labels(q.reshape(B * H, Nq, D), q_span, cq_n, iters, iq)
    lk, ck, nk = _span_labels(k.reshape(B * H, Nk, D), k_span, ck_n, iters, ik)
    keep = cluster_keep(cq, ck, nk, scale, spec.top_p)
    # the text label (last row and column) is global: its rows and columns are kept
    full = torch.ones(B * H, cq_n + 1, ck_n + 1, dtype=torch.float32, device=q.device)
    full[:, :cq_n, :ck_n] = keep.float()
    perm_q, perm_k = _sort_order(lq, q_span), _sort_order(lk, k_span)
    mq = _membership(torch.gather(lq, 1, perm_q), cq_n, block_m)
    mk = _membership(torch.gather(lk, 1, perm_k), ck_n, block_n)
    masks = torch.bmm(torch.bmm(mq, full), mk.transpose(1, 2)) > 0.5
    return ClusterLayout(perm_q.view(B, H, Nq), perm_k.view(B, H, Nk), masks.view(B, H, *masks.shape[1:]),
                         cq.view(B, H, cq_n, D), ck.view(B, H, ck_n, D))


def clustered_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: ClusterLayout, scale: float,
                        quant: str, block_m: int, block_n: int) -> torch.Tensor:
    """Block-sparse attention of q/k/v (B, H, N, D; one kv head per query head) in the layout's
    orders, through vsopt's ops (permute_tokens, mask_to_table, block_sparse_attention,
    unpermute_tokens): what the lowered graph runs. Output in q's token order, the kernel's dtype."""
    p = torch.ops.vsopt.permute_tokens
    qp, kp, vp = p(q, layout.perm_q), p(k, layout.perm_k), p(v, layout.perm_k)
    idx, counts = torch.ops.vsopt.mask_to_table(layout.masks)
    out = torch.ops.vsopt.block_sparse_attention(qp, kp, vp, idx, counts, float(scale), block_m, block_n, quant)
    return torch.ops.vsopt.unpermute_tokens(out, layout.perm_q)


def reference_clustered_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: ClusterLayout,
                                  scale: float, block_m: int, block_n: int) -> torch.Tensor:
    """The same in float64 written out (tests): each query token attends to the key tokens of the
    kept blocks of the permuted sequences, as a token-level mask in the model's order."""
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    m = layout.masks.repeat_interleave(block_m, 2)[:, :, :Nq].repeat_interleave(block_n, 3)[..., :Nk]
    inv_q = torch.argsort(layout.perm_q, -1)
    inv_k = torch.argsort(layout.perm_k, -1)
    # token mask in the model's order: allowed[t, u] = m[pos_q(t), pos_k(u)]
    m = torch.gather(m, 2, inv_q[..., None].expand(-1, -1, -1, Nk))
    m = torch.gather(m, 3, inv_k[:, :, None, :].expand(-1, -1, Nq, -1))
    s = scale * q.double() @ k.double().transpose(-1, -2)
    w = torch.softmax(s.masked_fill(~m, float("-inf")), -1).nan_to_num(0.0)
    return w @ v.double()


# ----------------------------------------------------------------------------- state across steps


class ClusterState:
    """Each clustering site's last layout, on the device, refreshed by the denoising step.

    At a call at step s (vsopt.set_denoising_step; without one each call of a key counts as a
    step), a layout computed at step a is reused while a <= s < a + refresh; otherwise the
    clustering is recomputed, warm-started from the kept centroids when a < s (the same sampler
    run) and the shapes agree, cold otherwise (a step below a: a new generation). Thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[int, ClusterLayout]] = {}
        self._calls: dict[str, int] = {}

    def reset(self) -> None:
        with self._lock:
            self._entries, self._calls = {}, {}

    def layout(self, key: str, refresh: int, fits, compute) -> ClusterLayout:
        """The kept layout of `key` or compute(init) (init: the kept centroids, or None), kept.
        fits(layout): whether a kept layout has this call's shapes."""
        step = current_denoising_step()
        with self._lock:
            if step is None:
                step = self._calls.get(key, -1) + 1
                self._calls[key] = step
            entry = self._entries.get(key)
        init = None
        if entry is not None and fits(entry[1]):
            at, kept = entry
            if at <= step < at + refresh:
                return kept
            if at < step:
                init = (kept.centroids_q, kept.centroids_k)
        lay = compute(init)
        with self._lock:
            self._entries[key] = (step, lay)
        return lay


CLUSTER_STATE = ClusterState()  # the process-wide state of the vsopt::cluster_layout op


@torch.library.custom_op("vsopt::cluster_layout", mutates_args=())
def cluster_layout_op(q: torch.Tensor, k: torch.Tensor, scale: float, block_m: int, block_n: int, q_clusters: int,
                      k_clusters: int, top_p: float, refresh: int, iterations: int, warm_iterations: int,
                      warm_start: bool, q_start: int, q_stop: int, k_start: int, k_stop: int,
                      cache_key: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(perm_q (B, H, Nq) int64, perm_k (B, H, Nk) int64, masks bool (B, H, QB, KB)) of the
    clustering of q (B, H, Nq, D) and k (B, H, Nk, D) (cluster_layout), kept in CLUSTER_STATE under
    cache_key across denoising steps (refresh, warm start). Deliberately stateful, like
    vsopt::dynamic_block_mask with reuse: opaque to the compiler, the state lives at run time."""
    spec = ClusterSpec(q_clusters, k_clusters, top_p, refresh, iterations, warm_iterations, warm_start)
    spans = ((q_start, q_stop), (k_start, k_stop))
    if refresh == 1 and not warm_start:   # stateless: a cold clustering of this call's q and k
        lay = cluster_layout(q, k, spec, scale, block_m, block_n, *spans)
        return lay.perm_q, lay.perm_k, lay.masks

    def fits(lay: ClusterLayout) -> bool:
        return (lay.perm_q.shape == q.shape[:3] and lay.perm_k.shape == k.shape[:3]
                and lay.centroids_q.shape[-1] == q.shape[-1] and lay.perm_q.device == q.device)

    def compute(init):
        return cluster_layout(q, k, spec, scale, block_m, block_n, *spans, init if warm_start else None)

    lay = CLUSTER_STATE.layout(cache_key, refresh, fits, compute)
    return lay.perm_q.clone(), lay.perm_k.clone(), lay.masks.clone()


@cluster_layout_op.register_fake
def _(q, k, scale, block_m, block_n, q_clusters, k_clusters, top_p, refresh, iterations, warm_iterations,
      warm_start, q_start, q_stop, k_start, k_stop, cache_key):
    B, H, Nq = q.shape[:3]
    Nk = k.shape[2]
    qb, kb = (Nq + block_m - 1) // block_m, (Nk + block_n - 1) // block_n
    return (q.new_empty((B, H, Nq), dtype=torch.int64), q.new_empty((B, H, Nk), dtype=torch.int64),
            q.new_empty((B, H, qb, kb), dtype=torch.bool))


def cluster_cost_pairs(spec: ClusterSpec, q_len: int, kv_len: int) -> float:
    """Token-centroid dot products one head's clustering costs per step, averaged over a refresh
    period (a cold start at the first refresh of a run is not in the mean: its warm refreshes are;
    without warm starts every refresh is cold). Each iteration assigns (and a final one)."""
    iters = (spec.warm_iterations if spec.warm_start else spec.iterations) + 1
    return (q_len * spec.q_clusters + kv_len * spec.k_clusters) * iters / spec.refresh + \
        spec.q_clusters * spec.k_clusters / spec.refresh


__all__ = ["CLUSTER_STATE", "ClusterLayout", "ClusterSpec", "ClusterState", "cluster_cost_pairs", "cluster_keep",
           "cluster_layout", "clustered_attention", "initial_centroids", "kmeans", "reference_clustered_attention"]
