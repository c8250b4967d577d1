"""Cluster heads as calibration candidates (Sparse VideoGen 2, vsopt.core.clustering): each
ClusterSpec of CalibrationOptions.clusters is offered to every head, its error measured as it runs.

A cluster head's token order and blocks come from k-means of its own queries and keys at run
time, so the candidate has no static mask and ignores the order pass 1 chose: it runs on the
site's q/k/v in the model's order (one key head per query head). Across pass 2's inputs its
clustering follows the rule of the runtime's state (vsopt.core.clustering.ClusterState): with the
inputs' denoising steps known, a layout computed at step a is reused while a <= s < a + refresh,
and recomputed warm-started from its centroids at a later step of the same sampler run (a step that
does not grow starts a new run: cold). Without steps every input is clustered cold (what a first
step runs). Its density is that of the blocks its layout keeps; its time is priced by
semantics.site_work (the k-means as QK^T-equivalent attention tiles, the extra permutation).
"""
from __future__ import annotations

from typing import Sequence

import torch

from vsopt.calibration.inputs import KeptPerRun
from vsopt.core import semantics
from vsopt.core.clustering import ClusterLayout, ClusterSpec, cluster_layout
from vsopt.core.errors import ConfigError
from vsopt.core.plan import Sparsity


def check_clusters(specs: Sequence[ClusterSpec], where: str = "CalibrationOptions.clusters") -> tuple[ClusterSpec, ...]:
    """The cluster candidates' specs as a tuple; a ConfigError naming the bad one."""
    out = []
    for s in specs:
        if isinstance(s, dict):
            try:
                s = ClusterSpec.from_dict(s)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{where}: {e}") from None
        if not isinstance(s, ClusterSpec):
            raise ConfigError(f"{where}: each entry must be a ClusterSpec (or its dict), got {s!r}")
        out.append(s)
    return tuple(out)


def cluster_specs(sites: Sequence, block: int, top_p: float, clusters: tuple[int, int] = (0, 0),
                  refresh: int = 1) -> dict[str, ClusterSpec]:
    """Per site (AttentionSite) its ClusterSpec at `top_p`: `clusters` (query, key) k-means
    cluster counts, 0 meaning one cluster per `block` tokens of the site's video tokens (all its
    queries without a grid; at least 2), recomputed every `refresh` steps. Shared by the bench's
    "cluster" method and the calibration's cluster candidates (cluster_candidates)."""
    out = {}
    for s in sites:
        n = s.grid.video_tokens if s.grid is not None else s.q_len
        cq, ck = (c or max(2, -(-n // block)) for c in clusters)
        out[s.site_id] = ClusterSpec(cq, ck, top_p, refresh=refresh)
    return out


def cluster_candidates(sites: Sequence, block: int, top_ps: Sequence[float], clusters: tuple[int, int] = (0, 0),
                       refresh: int = 1) -> tuple[ClusterSpec, ...]:
    """CalibrationOptions.clusters at each of `top_ps`: one spec for every site (a spec is
    offered to every head), with the cluster counts of the smallest of `sites` (cluster_specs);
    () without sites. Used by `vsopt calibrate --clusters` and the bench's --vsopt-clusters."""
    if not sites:
        return ()
    return tuple(min(cluster_specs(sites, block, p, clusters, refresh).values(), key=lambda c: c.k_clusters)
                 for p in top_ps)


def cluster_label(spec: ClusterSpec) -> str:
    """Short text of a cluster candidate, e.g. "cluster(32x64,p0.9,every1)"."""
    return f"cluster({spec.q_clusters}x{spec.k_clusters},p{spec.top_p:g},every{spec.refresh})"


class ClusterRuns(KeptPerRun):
    """The layout each cluster candidate of one site state kept, across pass 2's inputs (a call
    of unknown step starts cold)."""

    kept: dict[int, tuple[int, ClusterLayout]]  # candidate -> (step, layout)

    def layout(self, candidate: int, spec: ClusterSpec, step: int | None, q: torch.Tensor, k: torch.Tensor,
               scale: float, block_m: int, block_n: int, spans) -> ClusterLayout:
        entry = self.kept.get(candidate) if step is not None else None
        init = None
        if entry is not None and entry[1].perm_q.shape == q.shape[:3] and entry[1].perm_k.shape == k.shape[:3]:
            at, kept = entry
            if at <= step < at + spec.refresh:
                return kept
            init = (kept.centroids_q, kept.centroids_k) if spec.warm_start else None
        lay = cluster_layout(q, k, spec, scale, block_m, block_n, *spans, init=init)
        if step is not None:
            self.kept[candidate] = (step, lay)
        return lay


def measure_cluster(state, c: int, cand, call, step: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(output float32 (B, H, Nq, Dv) in the model's order, masks (B, H, QB, KB)) of cluster
    candidate `c` on this call, every head clustered (state.clusters: its ClusterRuns)."""
    if cand.sparsity is not Sparsity.CLUSTER or cand.cluster is None:
        raise ConfigError(f"calibration candidate {cand.label}: not a cluster candidate")
    site, opt = state.site, state.opt
    H = call.q.shape[1]
    k, v = semantics.kv_to_heads(call.k, H), semantics.kv_to_heads(call.v, H)
    spans = (semantics.cluster_span(site, call.q.shape[2]), semantics.cluster_span(site, k.shape[2]))
    lay = state.clusters.layout(c, cand.cluster, step, call.q, k, call.scale, opt.block_m, opt.block_n, spans)
    from vsopt.core.clustering import clustered_attention

    out = clustered_attention(call.q, k, v, lay, call.scale, "none", opt.block_m, opt.block_n)
    return out.float(), lay.masks
