"""What a bench run sweeps (Method, BenchSettings) and what it records per configuration (BenchPoint).
Light at import (no torch; ConfigError is imported where it is raised): `vsopt bench --help` takes
its defaults from BenchSettings."""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from vsopt.kernels.spec import QuantMode as Quant  # vsopt.core.plan's Quant, without importing torch


class Method(str, enum.Enum):
    DENSE = "dense"
    VSOPT = "vsopt"
    TOPK = "topk"
    WINDOW = "window"
    RADIAL = "radial"
    SAGE = "sage"
    WARMUP = "warmup"  # top-k after `warmup_steps` dense steps, at the same mean density (Sparse VideoGen)
    REUSE = "reuse"  # top-k masks computed every `mask_refresh` steps and reused between (AdaSpa)
    PSA = "psa"  # top-k with the dropped key blocks attended mean-pooled (Pyramid Sparse Attention)
    # top-k whose dropped blocks are measured exactly every `renorm_every` steps (at full cost; the
    # kept fraction lowered so that the mean density is the target) and restored between (Re-ttention)
    RETTENTION = "rettention"
    # the same measured with the pooled remainder (at the kept density; the pooled keys' work, as
    # PSA's, not counted in the density)
    RETTENTION_POOLED = "rettention_pooled"
    # top-k run exactly every `renorm_every` steps (at full cost, the kept fraction lowered as for
    # rettention), its error there added to the sparse steps between (DiTFastAttn's residual sharing)
    RESIDUAL = "residual"
    CLUSTER = "cluster"  # k-means token orders, cluster-pair blocks by centroid top-p (Sparse VideoGen 2)


# vsopt's dynamic candidates in the bench: cumulative-mass shares and top-k fractions spanning the
# swept densities (CalibrationOptions' defaults offer only near-lossless mass shares)
DYNAMIC_MASS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
DYNAMIC_TOP_K = (0.1, 0.2, 0.3, 0.4, 0.5)

# how a GPU run measures speed (BenchSettings.timing, `vsopt bench --timing`; sweep.sampling_ms)
TIMINGS = ("eager", "compiled", "cudagraphs")


@dataclass(frozen=True)
class BenchSettings:
    """What one bench run sweeps and how it samples.

    block: kernel block size of every plan. steps / clips / seed: the sampler run the video scores
    come from (the same noise and descriptions for every method). calibration_clips /
    calibration_steps: the sampler inputs vsopt's calibration measures (other seeds than the
    scored clips; None: the scored run's `steps`, so that each step plan is calibrated on the
    step it runs: a shorter calibration run's last plan would run every later step, at other noise
    levels than it was measured at, and be priced as one step). site_step: the denoising step
    whose inputs the per-site errors are taken at.
    step_plans: vsopt calibrates each denoising step separately (a plan with one step range per
    step; the density budget is then shared across steps as well as sites). sensitivity: vsopt's
    density search weighs each site's and step's error by the final output's measured sensitivity
    to it (vsopt.calibration.sensitivity), on the calibration clips. vsopt_speedups / vsopt_match: vsopt is
    calibrated under a time budget instead (calibrate.SpeedupBudget: the cost model's predicted
    attention time, fixed per-site costs included) at these predicted speedups of the whole
    model's attention, and with vsopt_match also at each baseline point's predicted speedup; its
    density points are then not run. warmup_steps / mask_refresh: the first steps the "warmup"
    method runs dense, the refresh interval of the "reuse" method. vsopt_warmup / vsopt_refresh:
    the dense warm-ups and mask refresh intervals vsopt's calibration may choose
    (CalibrationOptions.dense_warmup, with step_plans only / mask_refresh). vsopt_pooled: vsopt's
    calibration may also give heads a pooled remainder (CalibrationOptions.pooled_remainder).
    renorm_every: the measuring interval of the "rettention" methods. vsopt_renorm: the intervals
    of the softmax-mass correction vsopt's calibration may choose (CalibrationOptions.renorm_every;
    3 by default, () for none);
    with step_plans its step ranges are then step 0 and ranges of the longest interval from step 1
    (a correction needs its measuring step in the same range; scorer.calibration_step_ranges), not
    one per step. vsopt_residual: the intervals of residual sharing (DiTFastAttn) vsopt's
    calibration may choose (CalibrationOptions.residual_every; () by default); with step_plans
    they shape the step ranges as vsopt_renorm's do (the longest of both).
    cluster_clusters: (query, key) k-means clusters of the "cluster" method (0: one per kernel
    block of the video tokens), cluster_refresh its refresh period in steps; vsopt_clusters: vsopt's
    calibration may also give heads that clustering (CalibrationOptions.clusters), at the top-p
    values vsopt_cluster_top_p.
    time_limit_s: no configuration is started after this many seconds of the run (the ones left
    are recorded as not run); None: no limit. timing: how a GPU run measures speed (sweep.sampling_ms):
    "eager" (the rewritten graphs, no compilation per plan), "compiled" (torch.compile, backend
    vsopt, Inductor) or "cudagraphs" (the same with options cudagraphs=True, the dense run included:
    Inductor's CUDA graphs, vsopt/cudagraphs.py; two untimed runs, so that no graph is recorded in
    a timed one); on the CPU the speed is predicted and timing is not used. vsopt_top_k: the top-k fractions of vsopt's dynamic candidates.
    vsopt_held_out: vsopt's calibration measures its candidates' errors on a second calibration
    sampler run, not on the one its masks are made from (CalibrationOptions.held_out_errors).
    vsopt_probe: the sensitivity weights are measured with a probe of the error kind vsopt's plans
    make (block top-k at the calibration's lowest density with the pooled remainder) instead of
    plain top-k 0.5 (BENCH.md sessions 8 and 9)."""

    methods: tuple[Method, ...] = (Method.VSOPT, Method.TOPK, Method.WINDOW, Method.RADIAL, Method.SAGE, Method.WARMUP,
                                   Method.REUSE, Method.PSA)
    densities: tuple[float, ...] = (0.2, 0.3, 0.5)
    quant: Quant = Quant.NONE
    block: int = 64
    steps: int = 10
    clips: int = 1
    seed: int = 0
    calibration_clips: int = 1
    calibration_steps: int | None = None  # None: steps
    site_step: int | None = None  # None: the middle step
    timing_iters: int = 10
    clip: tuple[int, int, int] | None = None  # latent (frames, height, width); None: the model's own
    step_plans: bool = True
    sensitivity: bool = True
    vsopt_speedups: tuple[float, ...] = ()
    vsopt_match: bool = False
    warmup_steps: int = 1
    mask_refresh: int = 2
    vsopt_warmup: tuple[int, ...] = (1,)
    vsopt_refresh: tuple[int, ...] = ()
    vsopt_pooled: bool = True
    renorm_every: int = 4
    vsopt_renorm: tuple[int, ...] = (3,)  # with the pooled remainder +0.12 / +1.23 dB at 0.2 / 0.3 (BENCH.md)
    vsopt_residual: tuple[int, ...] = ()
    cluster_clusters: tuple[int, int] = (0, 0)
    cluster_refresh: int = 1
    vsopt_clusters: bool = False
    vsopt_cluster_top_p: tuple[float, ...] = (0.5, 0.7, 0.9)
    time_limit_s: float | None = None
    timing: str = "eager"
    vsopt_top_k: tuple[float, ...] = DYNAMIC_TOP_K
    vsopt_held_out: bool = False
    vsopt_probe: bool = False

    def __post_init__(self):
        from vsopt.core.errors import ConfigError

        object.__setattr__(self, "methods", tuple(Method(m) for m in self.methods))
        object.__setattr__(self, "quant", Quant(self.quant))
        if not all(0.0 < d <= 1.0 for d in self.densities):
            raise ConfigError(f"densities must lie in (0, 1], got {self.densities}")
        object.__setattr__(self, "vsopt_speedups", tuple(float(x) for x in self.vsopt_speedups))
        object.__setattr__(self, "vsopt_warmup", tuple(self.vsopt_warmup))
        object.__setattr__(self, "vsopt_refresh", tuple(self.vsopt_refresh))
        object.__setattr__(self, "vsopt_renorm", tuple(self.vsopt_renorm))
        object.__setattr__(self, "vsopt_residual", tuple(self.vsopt_residual))
        if not (isinstance(self.renorm_every, int) and not isinstance(self.renorm_every, bool)
                and self.renorm_every >= 2):
            raise ConfigError(f"renorm_every must be an integer >= 2, got {self.renorm_every!r}")
        if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 2 for r in self.vsopt_renorm):
            raise ConfigError(f"vsopt_renorm: intervals must be integers >= 2, got {self.vsopt_renorm}")
        if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 2 for r in self.vsopt_residual):
            raise ConfigError(f"vsopt_residual: intervals must be integers >= 2, got {self.vsopt_residual}")
        if not all(x > 0 and math.isfinite(x) for x in self.vsopt_speedups):
            raise ConfigError(f"vsopt_speedups must be finite and > 0, got {self.vsopt_speedups}")
        if not (isinstance(self.warmup_steps, int) and 0 <= self.warmup_steps < self.steps):
            raise ConfigError(f"warmup_steps must be an integer in [0, steps), got {self.warmup_steps!r}")
        if not (isinstance(self.mask_refresh, int) and self.mask_refresh >= 1):
            raise ConfigError(f"mask_refresh must be an integer >= 1, got {self.mask_refresh!r}")
        object.__setattr__(self, "cluster_clusters", tuple(self.cluster_clusters))
        if len(self.cluster_clusters) != 2 or not all(isinstance(c, int) and c >= 0 for c in self.cluster_clusters):
            raise ConfigError(f"cluster_clusters must be two integers >= 0 (query, key), got {self.cluster_clusters!r}")
        if not (isinstance(self.cluster_refresh, int) and self.cluster_refresh >= 1):
            raise ConfigError(f"cluster_refresh must be an integer >= 1, got {self.cluster_refresh!r}")
        object.__setattr__(self, "vsopt_cluster_top_p", tuple(float(p) for p in self.vsopt_cluster_top_p))
        if not all(0.0 < p <= 1.0 for p in self.vsopt_cluster_top_p):
            raise ConfigError(f"vsopt_cluster_top_p must lie in (0, 1], got {self.vsopt_cluster_top_p}")
        if self.time_limit_s is not None and not (math.isfinite(self.time_limit_s) and self.time_limit_s > 0):
            raise ConfigError(f"time_limit_s must be a finite number of seconds > 0, got {self.time_limit_s!r}")
        object.__setattr__(self, "vsopt_top_k", tuple(float(x) for x in self.vsopt_top_k))
        if not all(0.0 < x <= 1.0 for x in self.vsopt_top_k):
            raise ConfigError(f"vsopt_top_k must lie in (0, 1], got {self.vsopt_top_k}")
        if self.timing not in TIMINGS:
            raise ConfigError(f"timing must be one of {', '.join(TIMINGS)}, got {self.timing!r}")
        if self.calibration_steps is None:
            object.__setattr__(self, "calibration_steps", self.steps)
        if not (isinstance(self.calibration_steps, int) and self.calibration_steps >= 1):
            raise ConfigError(f"calibration_steps must be an integer >= 1, got {self.calibration_steps!r}")
        if self.steps < 1 or self.clips < 1:
            raise ConfigError(f"steps and clips must be >= 1, got {self.steps}, {self.clips}")


@dataclass
class BenchPoint:
    method: str
    target_density: float | None  # None: vsopt calibrated under a time budget (target_speedup)
    density: float  # block density actually run (mean over planned self-attention heads)
    quant: str
    psnr: float
    ssim: float
    rel_l2: float
    site_cosine_min: float
    site_rel_l2_max: float
    sites: dict[str, dict[str, float]]
    speedup: float
    speedup_source: str  # "measured-gpu" or "predicted-cost-model"
    ms: float | None = None  # measured on a GPU: one whole sampler run (every step), median
    notes: list[str] = field(default_factory=list)
    target_speedup: float | None = None  # vsopt under a time budget: the whole-model predicted speedup asked
