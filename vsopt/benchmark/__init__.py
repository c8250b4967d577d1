"""vsopt bench: the accuracy-vs-speed trade-off of sparse-attention methods on one model.

Every method turns (the model's attention sites, a target density, a precision) into a Plan, so all
of them run through the same rewrite, the same kernels and the same inputs:

  dense    the exact model (the reference every score is taken against)
  vsopt    vsopt's calibrated plan: per head the best token order (PARO), then per head the
           cheapest of calibrated mask / static pattern / dynamic / skip under a density budget,
           calibrated per denoising step, the budget shared over sites and steps where the final
           output is measured to be most sensitive (vsopt.calibration.sensitivity); density is averaged over
           sites, heads and steps
  topk     block top-k of pooled q/k scores in the model's own token order, recomputed at every
           step (the SpargeAttn / XAttention family: keep ceil(d * KB) key blocks per query row
           plus the diagonal; simplification: SpargeAttn's cumulative-mass and similarity filters
           are not modelled, top-k stands for the family)
  window   a fixed 3D local window (sliding tile / NATTEN), radii chosen so that the block
           density is closest to the target
  radial   Radial Attention's static mask (spatial window halving with each doubling of temporal
           distance), parameters chosen for the closest block density
  sage     dense attention with INT8 Q K^T, per-block scales and K smoothing (SageAttention's
           scheme), density 1
  warmup   the first warmup_steps denoising steps dense (Sparse VideoGen, Radial Attention), the
           rest block top-k at the lower density that gives the target mean density over steps
  reuse    block top-k whose masks are computed every mask_refresh steps and reused in between
           (AdaSpa): the scoring of pooled q/k is paid once per refresh
  psa      block top-k, the key blocks a query block drops attended mean-pooled in the same
           softmax (PSA's pooled remainder, one level; separate ATen ops beside the kernel)
  cluster  per head k-means of queries and keys (Sparse VideoGen 2): tokens permuted by cluster,
           key clusters kept per query cluster by centroid-score top-p (bisected on the scored
           step's q/k to the target density), refreshed every cluster_refresh steps, warm-started

For each (method, density) it records: per site, cosine and relative L2 of the attention output
against exact attention on the same q/k/v (isolated: only that site changed), measured at one
denoising step; per sampled clip over the whole trajectory, PSNR, SSIM and relative L2 of the final
latents against the dense sample from the same noise; and speed. Speed is measured on a GPU (the
transformer forward compiled with backend="vsopt" and the plan, against the dense model compiled
the same way); on a machine without one, the speedup shown is the cost model's predicted attention
speedup (dynamic heads at the density they select on the scored clip), and the JSON says so
("speedup_source").

    vsopt bench --methods vsopt,topk,window --densities 0.2,0.3,0.5 --out bench/
writes bench/bench.json and bench/pareto.png (quality against speedup, one curve per method).

Modules, one idea each: settings (what a run sweeps, what it records), methods (each method's
plan), aggregate (a plan's density and predicted speedup over a model's sites and steps), scorer
(PlanScorer: a plan against the dense model), sweep (bench()), report (Pareto front, plot, JSON,
table), cli (`vsopt bench`). The public names below are loaded on first use.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "Method": "settings", "BenchSettings": "settings", "BenchPoint": "settings",
    "method_plan": "methods", "window_pattern": "methods", "radial_pattern": "methods",
    "plan_density": "aggregate", "predicted_attention_speedup": "aggregate",
    "PlanScorer": "scorer",
    "bench": "sweep",
    "pareto_front": "report", "plot_pareto": "report", "write_json": "report", "summary_table": "report",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
