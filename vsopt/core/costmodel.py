"""The hardware cost model: predicted time of one attention site under a plan, fitted to kernel
timings measured on the machine (not FLOP counts).

Model (all times in microseconds), for one site run as one launch per distinct kernel config:

    time = sum over launches of  launch_us[key]                               (fixed: launches, quantize)
                               + query_blocks * per_query_block_us[key]      (load Q, store O)
                               + visited_blocks * per_block_us[key]            (one QK^T + PV tile)
                               + span_blocks * per_span_block_us[key]          (latency, small grids)
         + [permuted] permute_fixed_us + permuted_mib * permute_us_per_mib     (PARO reorder in/out)
         + [dynamic]  score_fixed_us + scored_blocks * score_us_per_block      (dynamic masks)

span_blocks = max(longest row, visited_blocks / slots): the blocks the busiest of `slots`
concurrent programs runs in sequence (fitted per kernel key, key_slots, else `slots`: the count
that fits best), at least the longest
query-block row (Launch.max_row_blocks; unknown: the mean row). At small N (512 rows at 4096
tokens, batch 2, 4 heads) a launch lasts as long as its longest row, not its total work over the
GPU's throughput: a site with one dense head costs what a dense launch costs; with many rows the
term is proportional to the visited blocks like per_block_us.

dense_us(...) prices the exact dense attention a site left dense runs (vsopt.attention: SDPA), by
the same four terms per head dim (sdpa_us["d<head_dim>"], counted in 64x64 block pairs), where
the GPU's SDPA was measured; else None (the caller prices vsopt's own kernel at density 1).
overhead_us["eager" | "cudagraphs"]: what one lowered site costs a compiled model beyond these GPU
times (its extra launches, the host's work per op; measured through torch.compile without and with
CUDA graphs), 0 where not measured. Measured per site and launch group (benchmarks/host_overhead.py
--gpu, then --apply), it has two more terms per mode: "<mode>_per_launch", each launch group after
the first (a precision's quantization kernels and its launch), and "<mode>_permuted", a site whose
heads are permuted (its gathers in and out); the base is then a one-group, unpermuted site:

    overhead = base + (launch_groups - 1) * per_launch + [permuted] * permuted

The pooled remainder and the corrections' epilogues (schema version 2; docs/CALIBRATION.md has
the table of what each option runs): SiteWork.pooled, each an attention over KB pooled keys,
priced by pooled_attention_us (pooled_us, fitted like sdpa_us on real pooled calls; default SDPA
at kv_len = KB plus its unfused score passes); SiteWork.extra_mib, the merge's and the epilogues'
traffic at permute_us_per_mib; SiteWork.extra_ops, their ATen ops, each op_cost_us(mode) in the
lowering overhead (op_us; default the per-launch-group overhead). defaulted_prices says which
of these are defaults.

where key = "<quant>/d<head_dim>/<block_m>x<block_n>". A query block counts once per head (B*H*QB
per launch); a visited block is one (query block, key block) pair of one head. Quantizing q/k/v
(per-block scales and casts) is linear in the tokens, like the per-query-block work, so the two
cannot be told apart by timings and per_query_block_us holds both. Coefficients are
fitted by non-negative least squares (fit) to measured timings and saved as JSON with the GPU's
name (save / load); vsopt/costmodels/ ships fitted ones (default()).
"""
from __future__ import annotations

import datetime
import json
import math
import os
from dataclasses import dataclass, field
from importlib import resources
from typing import Mapping, Sequence

import numpy as np

from vsopt.core.errors import ConfigError
from vsopt.core.io import atomic_write_text
from vsopt.kernels.spec import QUANT_MODES, kernel_key as spec_kernel_key

SCHEMA_VERSION = 2  # 2: pooled_us, op_us (version-1 files load without them: defaults)
READABLE_VERSIONS = (1, 2)  # the schema versions from_dict loads
#: overhead_us's terms: per lowered site, per further launch group, for a permuted site; by mode
OVERHEAD_KEYS = tuple(f"{mode}{part}" for mode in ("eager", "cudagraphs") for part in ("", "_per_launch", "_permuted"))


def kernel_key(quant: str, head_dim: int, block_m: int, block_n: int) -> str:
    """The name under which per-block costs of one kernel configuration are stored (the kernel
    spec's key, vsopt.kernels.spec.kernel_key)."""
    if quant not in QUANT_MODES:
        raise ConfigError(f"unknown quant mode {quant!r}; valid modes are {QUANT_MODES}")
    return spec_kernel_key(quant, head_dim, block_m, block_n)


def _parse_key(key: str) -> tuple[str, int, int, int]:
    quant, d, blocks = key.split("/")
    bm, bn = blocks.split("x")
    return quant, int(d[1:]), int(bm), int(bn)


@dataclass(frozen=True)
class Launch:
    """One kernel launch of a site: the heads of one kernel configuration.

    query_blocks: batch * heads * ceil(N / block_m) summed over the heads of this launch;
    visited_blocks: the (query block, key block) pairs those heads compute (density * QB * KB each);
    max_row_blocks: the key blocks of the longest query-block row (0: unknown, the mean row is used).
    """

    quant: str
    head_dim: int
    block_m: int
    block_n: int
    query_blocks: int
    visited_blocks: int
    max_row_blocks: int = 0

    @property
    def key(self) -> str:
        return kernel_key(self.quant, self.head_dim, self.block_m, self.block_n)


@dataclass(frozen=True)
class SiteWork:
    """Everything the cost model needs to price one site.

    permuted_mib: data moved by token permutations (q, k, v in, output back), in MiB.
    scored_blocks: block pairs scored online for dynamic masks (B * heads * QB * KB).
    """

    launches: tuple[Launch, ...]
    permuted_mib: float = 0.0
    scored_blocks: int = 0
    # the pooled remainder (core.pooled): its attentions, (batch*heads*share, q_len, KB pooled keys,
    # head_dim) each; extra_mib: the data its merge and the corrections' epilogues move (MiB, at
    # permute_us_per_mib, no fixed cost: theirs is their ops); extra_ops: the ATen ops beyond the
    # kernel launches (pooled remainder, merge, correction epilogue, state index_copy_), per step,
    # the mean over a renormalized head's period (priced by CostModel.op_cost_us, with the lowering)
    pooled: tuple[tuple[float, int, int, int], ...] = ()
    extra_mib: float = 0.0
    extra_ops: float = 0.0


@dataclass
class CostModel:
    """Fitted coefficients (microseconds per unit). See the module docstring for the model."""

    gpu: str
    launch_us: dict[str, float]
    per_block_us: dict[str, float]
    per_query_block_us: dict[str, float]
    permute_fixed_us: float = 0.0
    permute_us_per_mib: float = 0.0
    score_fixed_us: float = 0.0
    score_us_per_block: float = 0.0
    meta: dict = field(default_factory=dict)  # where it came from: torch/triton versions, date, fit error
    per_span_block_us: dict[str, float] = field(default_factory=dict)
    slots: int = 0  # concurrent programs the span term assumes (0: no span term) where key_slots has no entry
    key_slots: dict[str, int] = field(default_factory=dict)  # per kernel key (occupancy differs by tile)
    sdpa_us: dict[str, dict[str, float]] = field(default_factory=dict)  # "d64" -> {launch, qblock, block, span}
    overhead_us: dict[str, float] = field(default_factory=dict)  # OVERHEAD_KEYS -> us per lowered site
    pooled_us: dict[str, dict[str, float]] = field(default_factory=dict)  # "d64" -> {launch, qblock, block, span}
    op_us: dict[str, float] = field(default_factory=dict)  # "eager" | "cudagraphs" -> fixed us per extra ATen op

    # ------------------------------------------------------------------ prediction

    def _per_block(self, table: Mapping[str, float], launch: Launch, what: str) -> float:
        """Coefficient for launch's key; an unmeasured head_dim is scaled linearly from the nearest
        measured one of the same quant and block size (tile cost grows ~linearly with head_dim)."""
        key = launch.key
        if key in table:
            return table[key]
        same = [(_parse_key(k)[1], v) for k, v in table.items()
                if _parse_key(k)[0] == launch.quant and _parse_key(k)[2:] == (launch.block_m, launch.block_n)]
        if not same:
            raise ConfigError(f"cost model for {self.gpu!r} has no {what} for quant={launch.quant!r} with "
                              f"blocks {launch.block_m}x{launch.block_n}; measured: {sorted(table)}")
        d, v = min(same, key=lambda dv: abs(math.log(dv[0] / launch.head_dim)))
        return v * launch.head_dim / d

    def predict_us(self, work: SiteWork) -> float:
        """Predicted time of one site, in microseconds."""
        t = 0.0
        for launch in work.launches:
            t += self._per_block(self.launch_us, launch, "launch cost")
            t += launch.visited_blocks * self._per_block(self.per_block_us, launch, "per-block cost")
            t += launch.query_blocks * self._per_block(self.per_query_block_us, launch, "per-query-block cost")
            if self.per_span_block_us and self.slots_for(launch.key):
                t += span_blocks(launch.query_blocks, launch.visited_blocks, self.slots_for(launch.key),
                                 launch.max_row_blocks) * \
                    self._per_block(self.per_span_block_us, launch, "per-span-block cost")
        if work.permuted_mib:
            t += self.permute_fixed_us + work.permuted_mib * self.permute_us_per_mib
        if work.scored_blocks:
            t += self.score_fixed_us + work.scored_blocks * self.score_us_per_block
        t += sum(self.pooled_attention_us(*p) for p in work.pooled)
        return t + work.extra_mib * self.permute_us_per_mib

    def pooled_attention_us(self, bh: float, q_len: int, kb: int, head_dim: int) -> float:
        """One pooled-remainder attention (core.pooled.pooled_remainder: bh query heads over kb pooled
        keys): by pooled_us (fitted on real pooled calls) where measured; else SDPA at kv_len = kb
        (sdpa_us, else vsopt's bf16 kernel at density 1) plus its unfused score passes
        (POOLED_SCORE_PASSES over the float32 (q_len, kb) scores) at permute_us_per_mib."""
        if bh <= 0:
            return 0.0
        if self.pooled_us:
            d = min((int(k[1:]) for k in self.pooled_us), key=lambda m: abs(math.log(m / head_dim)))
            c = self.pooled_us[f"d{d}"]
            f = dense_features(1, bh, q_len, kb, int(c.get("slots", self.slots)))
            f.pop("slots", None)
            return sum(c.get(n, 0.0) * a for n, a in f.items()) * (head_dim / d if d != head_dim else 1.0)
        t = self.dense_us(1, bh, q_len, kb, head_dim)
        if t is None:   # vsopt's bf16 kernel over every pooled key, at the first measured bf16 tile
            bm, bn = min((_parse_key(k)[2:] for k in self.per_block_us if k.startswith("none/")),
                         default=(SDPA_BLOCK, SDPA_BLOCK))
            qb = math.ceil(bh * math.ceil(q_len / bm))
            t = self.predict_us(SiteWork((Launch("none", head_dim, bm, bn, qb, qb * math.ceil(kb / bn)),)))
        return t + POOLED_SCORE_PASSES * bh * q_len * kb * 4 / 2**20 * self.permute_us_per_mib

    def op_cost_us(self, cudagraphs: bool) -> float:
        """Fixed cost of one extra ATen op of a lowered site (SiteWork.extra_ops): op_us[mode] where
        measured, else the measured per-launch-group overhead (overhead_us[mode_per_launch]), else
        the per-site one, else 0 (defaulted_prices says which)."""
        mode = "cudagraphs" if cudagraphs else "eager"
        for table, key in ((self.op_us, mode), (self.overhead_us, f"{mode}_per_launch"), (self.overhead_us, mode)):
            if key in table:
                return float(table[key])
        return 0.0

    def defaulted_prices(self, cudagraphs: bool) -> list[str]:
        """Which prices of the pooled remainder and the correction epilogues are defaults, not
        fitted (for a plan's notes)."""
        mode = "cudagraphs" if cudagraphs else "eager"
        out = []
        if not self.pooled_us:
            out.append("pooled attention: SDPA at kv_len=KB plus its score passes at permute_us_per_mib"
                       if self.sdpa_us else "pooled attention: vsopt's kernel at kv_len=KB plus its score passes")
        if mode not in self.op_us:
            src = next((k for k in (f"{mode}_per_launch", mode) if k in self.overhead_us), None)
            out.append(f"extra ATen op: overhead_us[{src!r}] per op" if src else "extra ATen op: 0 (not measured)")
        return out

    def dense_us(self, batch: int, heads: int, q_len: int, kv_len: int, head_dim: int) -> float | None:
        """Predicted time of the exact dense attention (SDPA) of these sizes, None where SDPA was not
        measured (an unmeasured head dim is scaled linearly from the nearest measured one)."""
        if not self.sdpa_us:
            return None
        d = min((int(k[1:]) for k in self.sdpa_us), key=lambda m: abs(math.log(m / head_dim)))
        c = self.sdpa_us[f"d{d}"]
        f = dense_features(batch, heads, q_len, kv_len, int(c.get("slots", self.slots)))
        f.pop("slots", None)
        return sum(c.get(name, 0.0) * amount for name, amount in f.items()) * (head_dim / d if d != head_dim else 1.0)

    def slots_for(self, key: str) -> int:
        """The concurrent programs the span term assumes for this kernel key."""
        return self.key_slots.get(key, self.slots)

    def lowering_overhead_us(self, cudagraphs: bool, launch_groups: int = 1, permuted: bool = False) -> float:
        """What one lowered site costs a compiled model beyond its kernels' GPU time, without or with
        CUDA graphs (0 where this model has no such measurement); with per-group terms
        (has_group_overhead), for a site of `launch_groups` launch groups, permuted or not."""
        mode = "cudagraphs" if cudagraphs else "eager"
        t = float(self.overhead_us.get(mode, 0.0))
        t += max(0, launch_groups - 1) * float(self.overhead_us.get(f"{mode}_per_launch", 0.0))
        return t + (float(self.overhead_us.get(f"{mode}_permuted", 0.0)) if permuted else 0.0)

    def has_group_overhead(self, cudagraphs: bool) -> bool:
        """Whether the per-site overhead was measured per launch group (benchmarks/host_overhead.py)."""
        return f"{'cudagraphs' if cudagraphs else 'eager'}_per_launch" in self.overhead_us

    def launch_cost_us(self, launch: Launch) -> float:
        """The fixed cost of one launch in this configuration (kernel launches, quantization)."""
        return self._per_block(self.launch_us, launch, "launch cost")

    def block_cost_us(self, quant: str, head_dim: int, block_m: int, block_n: int) -> float:
        """Marginal cost of one more visited block in this configuration."""
        return self._per_block(self.per_block_us, Launch(quant, head_dim, block_m, block_n, 0, 0), "per-block cost")

    # ------------------------------------------------------------------ fitting

    @staticmethod
    def features(work: SiteWork, slots: int | Mapping[str, int] = 0) -> dict[str, float]:
        """The linear features of a SiteWork: names -> amounts, matching the coefficient names
        (span features where the launch's key has slots > 0: one count, or one per key)."""
        f: dict[str, float] = {}
        for launch in work.launches:
            f[f"launch:{launch.key}"] = f.get(f"launch:{launch.key}", 0.0) + 1.0
            f[f"block:{launch.key}"] = f.get(f"block:{launch.key}", 0.0) + launch.visited_blocks
            f[f"qblock:{launch.key}"] = f.get(f"qblock:{launch.key}", 0.0) + launch.query_blocks
            n = slots.get(launch.key, 0) if isinstance(slots, Mapping) else slots
            if n:
                f[f"span:{launch.key}"] = f.get(f"span:{launch.key}", 0.0) + \
                    span_blocks(launch.query_blocks, launch.visited_blocks, n, launch.max_row_blocks)
        if work.permuted_mib:
            f["permute_fixed"], f["permute_mib"] = 1.0, work.permuted_mib
        if work.scored_blocks:
            f["score_fixed"], f["score_block"] = 1.0, float(work.scored_blocks)
        return f

    @classmethod
    def fit(cls, measurements: Sequence[tuple[SiteWork, float]], gpu: str, meta: Mapping | None = None,
            slots: int | Mapping[str, int] = 0) -> "CostModel":
        """Fit the coefficients to (work, measured microseconds) pairs by non-negative least squares,
        weighting each measurement by 1/time so that short and long runs count by relative error.
        slots > 0 adds the span term (see the module doc) with that many concurrent programs (a
        mapping: per kernel key)."""
        if not measurements:
            raise ConfigError("cannot fit a cost model without measurements")
        c, rel = fit_linear([cls.features(w, slots) for w, _ in measurements], [t for _, t in measurements])
        model = cls(
            gpu=gpu, launch_us={n.split(":", 1)[1]: v for n, v in c.items() if n.startswith("launch:")},
            per_block_us={n.split(":", 1)[1]: v for n, v in c.items() if n.startswith("block:")},
            per_query_block_us={n.split(":", 1)[1]: v for n, v in c.items() if n.startswith("qblock:")},
            permute_fixed_us=c.get("permute_fixed", 0.0), permute_us_per_mib=c.get("permute_mib", 0.0),
            score_fixed_us=c.get("score_fixed", 0.0), score_us_per_block=c.get("score_block", 0.0),
            meta={**dict(meta or {}), "measurements": len(measurements),
                  "fit_median_rel_error": float(np.median(rel)), "fit_max_rel_error": float(rel.max())},
            per_span_block_us={n.split(":", 1)[1]: v for n, v in c.items() if n.startswith("span:")},
            slots=0 if isinstance(slots, Mapping) else int(slots),
            key_slots={k: int(v) for k, v in slots.items()} if isinstance(slots, Mapping) else {},
        )
        return model

    # ------------------------------------------------------------------ files

    def to_dict(self) -> dict:
        return {"version": SCHEMA_VERSION, "gpu": self.gpu, "units": "microseconds",
                "launch_us": dict(sorted(self.launch_us.items())),
                "per_block_us": dict(sorted(self.per_block_us.items())),
                "per_query_block_us": dict(sorted(self.per_query_block_us.items())),
                "permute_fixed_us": self.permute_fixed_us, "permute_us_per_mib": self.permute_us_per_mib,
                "score_fixed_us": self.score_fixed_us, "score_us_per_block": self.score_us_per_block,
                "per_span_block_us": dict(sorted(self.per_span_block_us.items())), "slots": self.slots,
                "key_slots": dict(sorted(self.key_slots.items())),
                "sdpa_us": {k: dict(sorted(v.items())) for k, v in sorted(self.sdpa_us.items())},
                "overhead_us": dict(sorted(self.overhead_us.items())),
                "pooled_us": {k: dict(sorted(v.items())) for k, v in sorted(self.pooled_us.items())},
                "op_us": dict(sorted(self.op_us.items())),
                "meta": self.meta}

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "cost model") -> "CostModel":
        version = d.get("version")
        if version not in READABLE_VERSIONS:
            raise ConfigError(f"{where}: cost-model schema version {version!r}, this vsopt reads versions {READABLE_VERSIONS}")
        try:
            table = lambda name: {str(k): float(v) for k, v in d[name].items()}  # noqa: E731
            model = cls(gpu=str(d["gpu"]), launch_us=table("launch_us"), per_block_us=table("per_block_us"),
                        per_query_block_us=table("per_query_block_us"),
                        permute_fixed_us=float(d.get("permute_fixed_us", 0.0)),
                        permute_us_per_mib=float(d.get("permute_us_per_mib", 0.0)),
                        score_fixed_us=float(d.get("score_fixed_us", 0.0)),
                        score_us_per_block=float(d.get("score_us_per_block", 0.0)), meta=dict(d.get("meta", {})),
                        per_span_block_us=table("per_span_block_us") if "per_span_block_us" in d else {},
                        slots=int(d.get("slots", 0)),
                        key_slots={str(k): int(v) for k, v in d.get("key_slots", {}).items()},
                        sdpa_us={str(k): {str(n): float(x) for n, x in v.items()} for k, v in d.get("sdpa_us", {}).items()},
                        overhead_us={str(k): float(v) for k, v in d.get("overhead_us", {}).items()},
                        pooled_us={str(k): {str(n): float(x) for n, x in v.items()} for k, v in d.get("pooled_us", {}).items()},
                        op_us={str(k): float(v) for k, v in d.get("op_us", {}).items()})
            if any(k not in ("eager", "cudagraphs") for k in model.op_us):
                raise ValueError(f"op_us keys must be 'eager' or 'cudagraphs', got {sorted(model.op_us)}")
            if any(k not in OVERHEAD_KEYS for k in model.overhead_us):
                raise ValueError(f"overhead_us keys must be among {OVERHEAD_KEYS}, got {sorted(model.overhead_us)}")
            for name, table in (("sdpa_us", model.sdpa_us), ("pooled_us", model.pooled_us)):
                if any(not (k.startswith("d") and k[1:].isdigit()) for k in table):
                    raise ValueError(f"{name} keys must be 'd<head_dim>', got {sorted(table)}")
            unslotted = [k for k in model.per_span_block_us if model.slots_for(k) <= 0]
            if unslotted:
                raise ValueError(f"per_span_block_us of {unslotted} needs slots > 0")
            for key in [*model.launch_us, *model.per_block_us, *model.per_query_block_us, *model.per_span_block_us]:
                kernel_key(*_parse_key(key))  # validates the key's form and quant mode
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"{where}: malformed cost model ({type(e).__name__}: {e})") from None
        return model

    def save(self, path: str | os.PathLike) -> None:
        """Write the JSON atomically (temp file in the same folder, then os.replace)."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CostModel":
        try:
            with open(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"cost model {os.fspath(path)!r} is not valid JSON: {e}") from None
        return cls.from_dict(d, where=f"cost model {os.fspath(path)!r}")

    @classmethod
    def default(cls, gpu: str | None = None) -> "CostModel":
        """The shipped fitted model whose GPU name matches `gpu` (e.g. torch.cuda.get_device_name()),
        else an H100 one, else the first shipped (vsopt ships one fitted on an H200: the same Hopper
        chip as the H100 with faster memory, so the relative costs the search compares carry over)."""
        shipped = {p.name: p for p in resources.files("vsopt").joinpath("costmodels").iterdir()
                   if p.name.endswith(".json")}
        if not shipped:
            raise ConfigError("no shipped cost model found in vsopt/costmodels/")
        models = {name: cls.from_dict(json.loads(p.read_text()), where=f"vsopt/costmodels/{name}")
                  for name, p in sorted(shipped.items())}
        if gpu:
            for m in models.values():
                if m.gpu == gpu:
                    return m
        for m in models.values():
            if "H100" in m.gpu:
                return m
        return next(iter(models.values()))


def span_blocks(query_blocks: int, visited_blocks: int, slots: int, max_row_blocks: int = 0) -> float:
    """Blocks the busiest program runs in sequence: the longest row (the mean row when not known),
    or the visited blocks over the `slots` programs that run at once, whichever is more."""
    if not query_blocks:
        return 0.0
    row = max_row_blocks or visited_blocks / query_blocks
    return max(float(row), visited_blocks / max(1, slots))


SDPA_BLOCK = 64  # dense attention is counted in 64x64 block pairs
# float32 (q_len, KB) passes of pooled_remainder's unfused elementwise ops (read + write each):
# mul, add, masked_fill, sub, exp 2 each, logsumexp and the PV matmul 1 each
POOLED_SCORE_PASSES = 12


def dense_features(batch: int, heads: int, q_len: int, kv_len: int, slots: int = 0) -> dict[str, float]:
    """The features of one dense attention (sdpa_us's coefficient names)."""
    qb = batch * heads * math.ceil(q_len / SDPA_BLOCK)
    visited = qb * math.ceil(kv_len / SDPA_BLOCK)
    f = {"launch": 1.0, "qblock": float(qb), "block": float(visited)}
    if slots:
        f["span"] = span_blocks(qb, visited, slots, math.ceil(kv_len / SDPA_BLOCK))
    return f


def fit_linear(rows: Sequence[Mapping[str, float]], times: Sequence[float]) -> tuple[dict[str, float], np.ndarray]:
    """(coefficients by feature name, relative errors) of times ~ rows . coefficients, fitted by
    non-negative least squares weighted by 1/time (every measurement counts by relative error)."""
    names = sorted({n for r in rows for n in r})
    A = np.array([[r.get(n, 0.0) for n in names] for r in rows], dtype=np.float64)
    y = np.array(times, dtype=np.float64)
    if np.any(y <= 0):
        raise ConfigError("measured times must be positive")
    w = 1.0 / y
    coef = nnls(A * w[:, None], y * w)
    return dict(zip(names, coef.tolist())), np.abs(A @ coef - y) / y


def nnls(A: np.ndarray, b: np.ndarray, max_iter: int | None = None) -> np.ndarray:
    """Non-negative least squares, min ||A x - b|| subject to x >= 0 (Lawson-Hanson active set)."""
    m, n = A.shape
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    max_iter = max_iter or 3 * n + 10
    tol = 1e-10 * max(1.0, np.abs(A).max()) * max(1.0, np.abs(b).max())
    for _ in range(max_iter):
        grad = A.T @ (b - A @ x)
        if passive.all() or grad[~passive].max(initial=-np.inf) <= tol:
            break
        j = np.argmax(np.where(passive, -np.inf, grad))
        passive[j] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(A[:, passive], b, rcond=None)[0]
            if z[passive].min() > 0:
                x = z
                break
            # step back toward z until a coefficient hits zero, and make it active again
            neg = passive & (z <= 0)
            alpha = np.min(x[neg] / (x[neg] - z[neg]))
            x = x + alpha * (z - x)
            passive &= x > tol
            x[~passive] = 0.0
    return x


def describe_environment() -> dict:
    """torch/triton versions and the date, recorded in a fitted model's meta."""
    import torch

    info = {"torch": torch.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info
