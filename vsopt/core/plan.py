"""The plan: what each attention head of a model runs, decided offline and saved to disk.

    Plan -> SitePlan (one per site_id) -> HeadPlan (one per query head)

A HeadPlan gives a head's sparsity (dense, skip, a static block mask, a static pattern, or a
dynamic mask predicted online), its token order (one of the 6 orders of frame/height/width), its
quantization and its block size. A SitePlan may hold separate head plans for ranges of denoising
steps (StepPlan): early steps often need denser attention than late ones.

On disk a plan is two files written atomically: `name.plan.json` (schema below, strings for every
enum) and, when some head has a calibrated block mask, `name.plan.safetensors` beside it holding
the masks (bool (QB, KB), in the head's token order). Nothing is pickled. See docs/PLANS.md.
"""
from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from vsopt.kernels.spec import QuantMode as Quant  # the one definition of a precision

from .clustering import ClusterSpec
from .dynamic import DynamicMethod, DynamicSpec
from .errors import PlanError
from .io import atomic_write_bytes
from .ir import AttentionSite, TokenGrid
from .orders import TokenOrder, is_model_order
from .patterns import Pattern, block_mask, num_blocks, pattern_from_dict
from .pooled import Remainder
from .rettention import Phase, Renorm, renorm_phase

SCHEMA_VERSION = 1
FORMAT_NAME = "vsopt-plan"


def is_block_size(value: Any) -> bool:
    """Whether `value` is a block size the kernels take (block_m, block_n): a power of two in [16, 256]."""
    return isinstance(value, int) and not isinstance(value, bool) and 16 <= value <= 256 and not value & (value - 1)


class Sparsity(str, enum.Enum):
    """How a head chooses the key blocks it attends to."""

    DENSE = "dense"  # every block: the exact dense op (or the block-sparse kernel at density 1)
    SKIP = "skip"  # no block: the head's output is zero
    MASK = "mask"  # a static block mask measured by calibration (HeadPlan.mask)
    PATTERN = "pattern"  # a static pattern computed from the grid (HeadPlan.pattern)
    DYNAMIC = "dynamic"  # predicted online from pooled block scores (HeadPlan.dynamic)
    CLUSTER = "cluster"  # k-means token order and cluster-pair blocks, online (HeadPlan.cluster, SVG2)


@dataclass(frozen=True)
class HeadPlan:
    """What one query head runs.

    sparsity: see Sparsity; exactly the matching field below is set:
      pattern  (Sparsity.PATTERN) a vsopt.core.patterns.Pattern, evaluated on the site's grid
      mask     (Sparsity.MASK)    bool (QB, KB), QB = ceil(q_len / block_m), KB = ceil(kv_len /
                                  block_n), blocks taken in this head's token order
      dynamic  (Sparsity.DYNAMIC) a vsopt.core.dynamic.DynamicSpec
      cluster  (Sparsity.CLUSTER) a vsopt.core.clustering.ClusterSpec: the head's token order and
                                  its blocks come from k-means of its queries and keys (Sparse
                                  VideoGen 2); its order field stays FHW (on disk: "order": "cluster")
    order: token order the head runs in; the model's own (orders.model_order(grid): FHW for
      frame-major tokens, the default) moves no token.
    quant: precision. block_m, block_n: query / key block sizes of the kernel and of the mask.
    remainder: what a mask, pattern or dynamic head does with the key blocks it does not keep
      (vsopt.core.pooled.Remainder): dropped (default), or attended mean-pooled in the same
      softmax (PSA).
    renorm: softmax-mass correction (Re-ttention, vsopt.core.rettention.Renorm) of a mask,
      pattern or dynamic head: measure the dropped blocks' statistics every `every` steps (exactly
      through the kernel, or, with remainder "pooled", as the pooled remainder) and correct the
      steps between with them; a dynamic head's mask is the measuring step's until the next one.
      Renorm(kind="residual"): residual sharing instead (DiTFastAttn, vsopt.core.residual): the
      measuring step runs exactly and keeps R = exact - sparse output, the steps between output
      the sparse output (a pooled one with remainder "pooled") plus R. None: no correction.
    """

    sparsity: Sparsity = Sparsity.DENSE
    order: TokenOrder = TokenOrder.FHW
    quant: Quant = Quant.NONE
    block_m: int = 64
    block_n: int = 64
    pattern: Pattern | None = None
    mask: torch.Tensor | None = field(default=None, compare=False, repr=False)
    dynamic: DynamicSpec | None = None
    remainder: Remainder = Remainder.DROP
    renorm: Renorm | None = None
    cluster: ClusterSpec | None = None

    def __post_init__(self):
        for name, enum_type in (("sparsity", Sparsity), ("order", TokenOrder), ("quant", Quant),
                                ("remainder", Remainder)):
            value = getattr(self, name)
            if not isinstance(value, enum_type):
                try:
                    object.__setattr__(self, name, enum_type(value))
                except ValueError:
                    raise ValueError(f"HeadPlan.{name}: {value!r} is not one of "
                                     f"{[e.value for e in enum_type]}") from None
        for name in ("block_m", "block_n"):
            v = getattr(self, name)
            if not is_block_size(v):
                raise ValueError(f"HeadPlan.{name} must be a power of two in [16, 256], got {v!r}")
        s = self.sparsity
        want = {"pattern": s is Sparsity.PATTERN, "mask": s is Sparsity.MASK, "dynamic": s is Sparsity.DYNAMIC,
                "cluster": s is Sparsity.CLUSTER}
        for name, needed in want.items():
            present = getattr(self, name) is not None
            if needed and not present:
                raise ValueError(f"HeadPlan with sparsity {s.value!r} needs `{name}`")
            if present and not needed:
                raise ValueError(f"HeadPlan with sparsity {s.value!r} must not set `{name}`")
        if s is Sparsity.CLUSTER:
            if not isinstance(self.cluster, ClusterSpec):
                raise ValueError(f"HeadPlan.cluster must be a ClusterSpec, got {type(self.cluster).__name__}")
            if self.order is not TokenOrder.FHW:
                raise ValueError(f"a cluster head's token order comes from its clustering; order must be 'fhw', got "
                                 f"{self.order.value!r}")
            if self.remainder is not Remainder.DROP:
                raise ValueError("a cluster head cannot have remainder 'pooled' (not implemented for clustering)")
        if self.remainder is Remainder.POOLED and s in (Sparsity.DENSE, Sparsity.SKIP):
            raise ValueError(f"HeadPlan with sparsity {s.value!r} cannot have remainder 'pooled' (only mask, "
                             "pattern and dynamic heads leave key blocks out)")
        if self.renorm is not None:
            if not isinstance(self.renorm, Renorm):
                raise ValueError(f"HeadPlan.renorm must be a Renorm, got {type(self.renorm).__name__}")
            if s not in (Sparsity.MASK, Sparsity.PATTERN, Sparsity.DYNAMIC):
                raise ValueError(f"HeadPlan with sparsity {s.value!r} cannot have a renorm (only mask, pattern and "
                                 "dynamic heads: their kept blocks are what the statistics describe)")
            if s is Sparsity.DYNAMIC and self.dynamic is not None and self.dynamic.reuse_steps:
                raise ValueError("HeadPlan: a dynamic head with a renorm reuses its measuring step's mask until the "
                                 "next one; give dynamic.reuse_steps 0")
        if self.pattern is not None and not isinstance(self.pattern, Pattern):
            raise ValueError(f"HeadPlan.pattern must be a Pattern, got {type(self.pattern).__name__}")
        if self.dynamic is not None and not isinstance(self.dynamic, DynamicSpec):
            raise ValueError(f"HeadPlan.dynamic must be a DynamicSpec, got {type(self.dynamic).__name__}")
        if self.mask is not None:
            if not isinstance(self.mask, torch.Tensor) or self.mask.dim() != 2:
                raise ValueError(f"HeadPlan.mask must be a 2-D (QB, KB) tensor, got {self.mask!r}")
            object.__setattr__(self, "mask", self.mask.detach().to("cpu", torch.bool).contiguous())

    # -- derived

    def block_mask(self, q_len: int, kv_len: int, grid: TokenGrid | None) -> torch.Tensor | None:
        """The static block mask (QB, KB) in this head's order, or None for a dynamic head.
        Raises ValueError when a pattern needs a grid the site lacks or sizes disagree."""
        qb, kb = num_blocks(q_len, self.block_m), num_blocks(kv_len, self.block_n)
        if self.sparsity is Sparsity.DENSE:
            return torch.ones(qb, kb, dtype=torch.bool)
        if self.sparsity is Sparsity.SKIP:
            return torch.zeros(qb, kb, dtype=torch.bool)
        if self.sparsity is Sparsity.MASK:
            if tuple(self.mask.shape) != (qb, kb):
                raise ValueError(f"mask has shape {tuple(self.mask.shape)}, expected ({qb}, {kb}) for q_len "
                                 f"{q_len}, kv_len {kv_len}, blocks {self.block_m}x{self.block_n}")
            return self.mask.clone()
        if self.sparsity is Sparsity.PATTERN:
            if grid is None or grid.num_tokens != q_len or q_len != kv_len:
                raise ValueError(f"pattern {self.pattern.KIND!r} needs a self-attention site with a grid of "
                                 f"q_len tokens; got grid {grid}, q_len {q_len}, kv_len {kv_len}")
            return block_mask(self.pattern, grid, self.order, self.block_m, self.block_n)
        return None

    def to_json(self, mask_key: str | None) -> dict[str, Any]:
        order = "cluster" if self.cluster is not None else self.order.value
        d: dict[str, Any] = {"sparsity": self.sparsity.value, "order": order,
                             "quant": self.quant.value, "block": [self.block_m, self.block_n]}
        if self.pattern is not None:
            d["pattern"] = self.pattern.to_dict()
        if self.dynamic is not None:
            d["dynamic"] = self.dynamic.to_dict()
        if self.cluster is not None:
            d["cluster"] = self.cluster.to_dict()
        if self.mask is not None:
            d["mask"] = mask_key
            d["density"] = round(float(self.mask.float().mean()), 6)
        if self.remainder is not Remainder.DROP:  # older plans have none: dropped
            d["remainder"] = self.remainder.value
        if self.renorm is not None:
            d["renorm"] = self.renorm.to_dict()
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any], arrays: Mapping[str, torch.Tensor], where: str) -> "HeadPlan":
        if not isinstance(d, Mapping):
            raise PlanError(f"{where}: a head plan must be an object, got {d!r}")
        unknown = sorted(set(d) - {"sparsity", "order", "quant", "block", "pattern", "dynamic", "mask", "density",
                                 "remainder", "renorm", "cluster"})
        if unknown:
            raise PlanError(f"{where}: unknown field(s) {unknown}")
        try:
            block = d.get("block", [64, 64])
            if not (isinstance(block, list) and len(block) == 2):
                raise ValueError(f"block must be [block_m, block_n], got {block!r}")
            order = d.get("order", "fhw")
            if (order == "cluster") != (d.get("sparsity") == "cluster"):
                raise ValueError(f"order 'cluster' goes with sparsity 'cluster' (got order {order!r}, sparsity "
                                 f"{d.get('sparsity', 'dense')!r})")
            if order == "cluster":
                order = "fhw"
            mask = None
            if "mask" in d:
                key = d["mask"]
                if key not in arrays:
                    raise ValueError(f"mask {key!r} is not in the plan's safetensors file")
                mask = arrays[key]
            return cls(sparsity=Sparsity(d.get("sparsity", "dense")), order=TokenOrder(order),
                       quant=Quant(d.get("quant", "none")), block_m=block[0], block_n=block[1],
                       pattern=pattern_from_dict(d["pattern"]) if "pattern" in d else None,
                       dynamic=DynamicSpec.from_dict(d["dynamic"]) if "dynamic" in d else None, mask=mask,
                       remainder=d.get("remainder", "drop"),
                       renorm=Renorm.from_dict(d["renorm"]) if "renorm" in d else None,
                       cluster=ClusterSpec.from_dict(d["cluster"]) if "cluster" in d else None)
        except (ValueError, TypeError, KeyError) as e:
            raise PlanError(f"{where}: {e}") from None


@dataclass(frozen=True)
class StepPlan:
    """Head plans for the denoising steps start <= step < stop (stop None: to the end)."""

    start: int
    stop: int | None
    heads: tuple[HeadPlan, ...]

    def __post_init__(self):
        object.__setattr__(self, "heads", tuple(self.heads))
        if self.start < 0 or (self.stop is not None and self.stop <= self.start):
            raise ValueError(f"step range [{self.start}, {self.stop}) is empty or negative")

    def contains(self, step: int) -> bool:
        return self.start <= step and (self.stop is None or step < self.stop)


@dataclass(frozen=True)
class SitePlan:
    """The plan of one attention site.

    site_id, num_heads, q_len, kv_len and grid describe the site the plan was made for (checked
    against the model by Plan.validate_against). heads: one HeadPlan per query head, used at every
    denoising step not covered by `steps` (disjoint StepPlans, each with num_heads head plans)."""

    site_id: str
    num_heads: int
    q_len: int
    kv_len: int
    grid: TokenGrid | None
    heads: tuple[HeadPlan, ...]
    steps: tuple[StepPlan, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "heads", tuple(self.heads))
        object.__setattr__(self, "steps", tuple(sorted(self.steps, key=lambda s: s.start)))
        for label, heads in [("heads", self.heads)] + [(f"steps[{s.start}:{s.stop}]", s.heads) for s in self.steps]:
            if len(heads) != self.num_heads:
                raise ValueError(f"site {self.site_id!r}: {label} has {len(heads)} head plans, expected "
                                 f"{self.num_heads}")
        for a, b in zip(self.steps, self.steps[1:]):
            if a.stop is None or a.stop > b.start:
                raise ValueError(f"site {self.site_id!r}: step ranges [{a.start}, {a.stop}) and "
                                 f"[{b.start}, {b.stop}) overlap")
        for h in self.all_heads():
            if h.mask is not None:
                h.block_mask(self.q_len, self.kv_len, self.grid)  # checks the mask shape
            needs_grid = h.sparsity is Sparsity.PATTERN or not _order_free(h, self.grid)
            if needs_grid and (self.grid is None or self.grid.num_tokens != self.q_len or self.q_len != self.kv_len):
                raise ValueError(f"site {self.site_id!r}: pattern heads and token orders need self-attention with "
                                 f"a grid of q_len tokens; got grid {self.grid}, q_len {self.q_len}, "
                                 f"kv_len {self.kv_len}")

    def heads_at(self, step: int | None = None) -> tuple[HeadPlan, ...]:
        """The head plans for a denoising step (None: the default, step-independent ones)."""
        if step is not None:
            for s in self.steps:
                if s.contains(step):
                    return s.heads
        return self.heads

    def all_heads(self) -> Iterable[HeadPlan]:
        yield from self.heads
        for s in self.steps:
            yield from s.heads

    @property
    def is_dense(self) -> bool:
        """True when every head at every step is plain dense attention in the model's order."""
        return _plain_dense(self.all_heads(), self.grid)

    def density(self, step: int | None = None) -> float | None:
        """Mean block density over the heads (static heads only; None if any head is dynamic)."""
        total = 0.0
        for h in self.heads_at(step):
            m = h.block_mask(self.q_len, self.kv_len, self.grid)
            if m is None:
                return None
            total += float(m.float().mean())
        return total / self.num_heads

    @classmethod
    def for_site(cls, site: AttentionSite, heads: Sequence[HeadPlan] | HeadPlan,
                 steps: Sequence[StepPlan] = ()) -> "SitePlan":
        """A SitePlan describing `site`; a single HeadPlan is repeated for every head."""
        if isinstance(heads, HeadPlan):
            heads = (heads,) * site.heads
        return cls(site.site_id, site.heads, site.q_len, site.kv_len, site.grid, tuple(heads), tuple(steps))


def _grid_or_none(d: Any, where: str) -> TokenGrid | None:
    if d is None:
        return None
    try:
        return TokenGrid.from_dict(d)
    except (TypeError, ValueError, AttributeError) as e:
        raise PlanError(f"{where}: invalid grid {d!r}: {e}") from None


@dataclass(frozen=True)
class Plan:
    """A plan for a whole model: SitePlans keyed by site_id, plus free-form metadata (model name,
    how it was calibrated, budget...: JSON-serializable values only)."""

    sites: Mapping[str, SitePlan]
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        sites = dict(self.sites)
        for key, sp in sites.items():
            if not isinstance(sp, SitePlan) or sp.site_id != key:
                raise ValueError(f"Plan.sites[{key!r}] must be a SitePlan with site_id {key!r}")
        object.__setattr__(self, "sites", sites)
        object.__setattr__(self, "meta", dict(self.meta))

    def __contains__(self, site_id: str) -> bool:
        return site_id in self.sites

    def __getitem__(self, site_id: str) -> SitePlan:
        return self.sites[site_id]

    # -- denoising steps

    def step_boundaries(self) -> tuple[int, ...]:
        """The steps at which some site's head plans change (starts and stops of its StepPlans)."""
        edges = {b for sp in self.sites.values() for st in sp.steps for b in (st.start, st.stop) if b is not None}
        return tuple(sorted(edges))

    def segment_start(self, step: int | None) -> int | None:
        """The first step of the segment (between consecutive boundaries) holding `step`: every
        step of a segment runs the same head plans. None (no step known) stays None: the default
        head plans."""
        if step is None:
            return None
        return max((b for b in self.step_boundaries() if b <= step), default=0)

    @property
    def dense_warmup(self) -> int:
        """How many first denoising steps run every planned site as the model's own dense
        attention (Sparse VideoGen / Radial Attention's dense warm-up): the smallest, over the
        sites that are sparse at some step, of the steps from 0 covered without a gap by step
        ranges whose heads are all plain dense. 0 when no such warm-up (or no sparse site)."""
        ks = [_site_warmup(sp) for sp in self.sites.values() if not sp.is_dense]
        return min(ks) if ks else 0

    def with_dense_warmup(self, steps: int) -> "Plan":
        """This plan with its first `steps` denoising steps dense at every site that is sparse at
        some step: a StepPlan [0, steps) of plain dense heads (same block sizes) put in front of
        each such site's step ranges, which are cut to start at `steps`. steps 0: the plan as it is."""
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise ValueError(f"dense warm-up steps must be an integer >= 0, got {steps!r}")
        if steps == 0:
            return self
        sites = {}
        for sid, sp in self.sites.items():
            if sp.is_dense:
                sites[sid] = sp
                continue
            dense = tuple(HeadPlan(block_m=h.block_m, block_n=h.block_n) for h in sp.heads)
            later = [dataclasses.replace(st, start=max(st.start, steps)) for st in sp.steps
                     if st.stop is None or st.stop > steps]
            sites[sid] = dataclasses.replace(sp, steps=(StepPlan(0, steps, dense), *later))
        return Plan(sites, dict(self.meta, dense_warmup=steps))

    def at_step(self, step: int | None) -> "Plan":
        """The plan without step ranges that `step` runs: each site's heads_at(step), a
        renormalized head's phase resolved (vsopt.core.rettention.renorm_phase: measuring at its
        segment's first step and every `every` steps, correcting between; None measures)."""
        start = self.segment_start(step)
        sites = {sid: dataclasses.replace(sp, heads=tuple(_at_phase(h, step, start) for h in sp.heads_at(step)),
                                          steps=())
                 for sid, sp in self.sites.items()}
        return Plan(sites, dict(self.meta, at_step=step))

    def renorm_phases(self, step: int | None) -> tuple[Phase, ...]:
        """The phases of the renormalized heads at `step` (site by site, head by head; empty
        without such heads): two steps of one segment with equal phases run the same graph."""
        start = self.segment_start(step)
        return tuple(_at_phase(h, step, start).renorm.phase for sp in self.sites.values() for h in sp.heads_at(step)
                     if h.renorm is not None)

    # -- builders

    @classmethod
    def dense(cls, sites: Iterable[AttentionSite], meta: Mapping[str, Any] | None = None) -> "Plan":
        """Every head of every site dense, in the model's order, unquantized."""
        return cls.uniform(sites, HeadPlan(), meta=meta)

    @classmethod
    def uniform(cls, sites: Iterable[AttentionSite], head: HeadPlan,
                meta: Mapping[str, Any] | None = None) -> "Plan":
        """The same HeadPlan for every head of every site (benchmarks, baselines). Sites the head
        plan cannot apply to (a pattern or mask on a site without a matching grid or shape) get a
        dense head plan with the same quantization, listed in meta["uniform_dense_sites"]."""
        out, fallback = {}, []
        for s in sites:
            try:
                out[s.site_id] = SitePlan.for_site(s, head)
            except ValueError:
                out[s.site_id] = SitePlan.for_site(s, HeadPlan(quant=head.quant, block_m=head.block_m,
                                                               block_n=head.block_n))
                fallback.append(s.site_id)
        meta = dict(meta or {})
        if fallback:
            meta["uniform_dense_sites"] = fallback
        return cls(out, meta)

    # -- checks

    def differences(self, sites: Iterable[AttentionSite]) -> list[str]:
        """Everything in which this plan disagrees with a model's sites, one line each (empty when
        it fits). Model sites the plan does not mention are not differences: they stay dense."""
        model = {s.site_id: s for s in sites}
        diffs = []
        missing = sorted(set(self.sites) - set(model))
        if missing:
            diffs.append(f"plan sites not in the model: {missing} (model sites: {sorted(model)})")
        for sid, sp in self.sites.items():
            s = model.get(sid)
            if s is None:
                continue
            for what, planned, actual in (("heads", sp.num_heads, s.heads), ("q_len (N)", sp.q_len, s.q_len),
                                          ("kv_len", sp.kv_len, s.kv_len)):
                if planned != actual:
                    diffs.append(f"site {sid!r}: plan has {what} {planned}, model has {actual}")
            needs_grid = any(h.sparsity is Sparsity.PATTERN or h.order is not TokenOrder.FHW for h in sp.all_heads())
            if sp.grid != s.grid and (needs_grid or s.grid is not None):
                diffs.append(f"site {sid!r}: plan has grid {sp.grid}, model has grid {s.grid}")
        return diffs

    def validate_against(self, sites: Iterable[AttentionSite]) -> None:
        """Raise PlanError listing every difference between this plan and the model's sites."""
        diffs = self.differences(sites)
        if diffs:
            raise PlanError("the plan does not fit this model:\n  " + "\n  ".join(diffs))

    # -- summaries

    def density(self, step: int | None = None) -> float | None:
        """Mean block density over all planned heads (None if some head is dynamic)."""
        values = []
        for sp in self.sites.values():
            d = sp.density(step)
            if d is None:
                return None
            values.extend([d] * sp.num_heads)
        return sum(values) / len(values) if values else 1.0

    # -- files

    def to_json(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The JSON document and the arrays (mask key -> bool tensor) that save() writes."""
        arrays: dict[str, torch.Tensor] = {}

        def heads_json(sid: str, label: str, heads: Sequence[HeadPlan]) -> list[dict[str, Any]]:
            out = []
            for i, h in enumerate(heads):
                key = None
                if h.mask is not None:
                    key = f"{sid}/{label}/head{i}"
                    arrays[key] = h.mask
                out.append(h.to_json(key))
            return out

        sites = {}
        for sid, sp in self.sites.items():
            sites[sid] = {
                "num_heads": sp.num_heads, "q_len": sp.q_len, "kv_len": sp.kv_len,
                "grid": sp.grid.to_dict() if sp.grid else None,
                "heads": heads_json(sid, "all", sp.heads),
                "steps": [{"start": st.start, "stop": st.stop, "heads": heads_json(sid, f"steps{st.start}", st.heads)}
                          for st in sp.steps],
            }
        doc = {"format": FORMAT_NAME, "version": SCHEMA_VERSION, "meta": dict(self.meta), "arrays": None,
               "sites": sites}
        if self.dense_warmup:  # what the step ranges say, written out for readers; checked on load
            doc["dense_warmup"] = self.dense_warmup
        return doc, arrays

    def save(self, path: str | os.PathLike) -> Path:
        """Write the plan to `path` (conventionally name.plan.json) and, if it holds masks, the
        masks to the same name with suffix .safetensors; both atomically (temp file + os.replace),
        the arrays first, and the JSON records the arrays' sha256 so a mismatched pair is caught."""
        from safetensors.torch import save as st_save

        path = Path(path)
        doc, arrays = self.to_json()
        if arrays:
            arrays_path = path.with_suffix(".safetensors")
            blob = st_save({k: v.to(torch.uint8) for k, v in arrays.items()}, metadata={"format": FORMAT_NAME})
            atomic_write_bytes(arrays_path, blob)
            doc["arrays"] = {"file": arrays_path.name, "sha256": hashlib.sha256(blob).hexdigest()}
        atomic_write_bytes(path, (json.dumps(doc, indent=1) + "\n").encode())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        """Read a plan written by save(). Raises PlanError on a missing or corrupt file, a schema
        version newer than this vsopt understands, or arrays that do not match the JSON."""
        path = Path(path)
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise PlanError(f"plan file {str(path)!r} does not exist") from None
        except IsADirectoryError:
            raise PlanError(f"plan path {str(path)!r} is a folder, not a .plan.json file") from None
        except PermissionError:
            raise PlanError(f"plan file {str(path)!r} cannot be read (permission denied)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PlanError(f"plan file {str(path)!r} is not valid JSON (corrupt or truncated?): {e}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise PlanError(f"{str(path)!r} is not a vsopt plan (no \"format\": \"{FORMAT_NAME}\")")
        version = doc.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise PlanError(f"plan {str(path)!r}: invalid schema version {version!r}")
        if version > SCHEMA_VERSION:
            raise PlanError(f"plan {str(path)!r} has schema version {version}, newer than the newest this vsopt "
                            f"reads ({SCHEMA_VERSION}); upgrade vsopt or recalibrate")
        arrays = _load_arrays(path, doc.get("arrays"))
        return cls.from_json(doc, arrays, where=str(path))

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], arrays: Mapping[str, torch.Tensor], where: str = "plan") -> "Plan":
        sites_doc = doc.get("sites")
        if not isinstance(sites_doc, dict):
            raise PlanError(f"{where}: \"sites\" must be an object keyed by site_id")
        sites = {}
        for sid, sd in sites_doc.items():
            w = f"{where}: site {sid!r}"
            if not isinstance(sd, dict):
                raise PlanError(f"{w}: must be an object")
            try:
                n, q_len, kv_len = (_count(sd, key, w) for key in ("num_heads", "q_len", "kv_len"))
                grid = _grid_or_none(sd.get("grid"), w)
                heads = tuple(HeadPlan.from_json(h, arrays, f"{w} head {i}") for i, h in enumerate(sd["heads"]))
                steps = tuple(StepPlan(_count(st, "start", w), None if st["stop"] is None else _count(st, "stop", w),
                                       tuple(HeadPlan.from_json(h, arrays, f"{w} steps from {st['start']} head {i}")
                                             for i, h in enumerate(st["heads"])))
                              for st in sd.get("steps", []))
                sites[sid] = SitePlan(sid, n, q_len, kv_len, grid, heads, steps)
            except PlanError:
                raise
            except (KeyError, TypeError, ValueError) as e:
                raise PlanError(f"{w}: {type(e).__name__}: {e}") from None
        meta = doc.get("meta") or {}
        if not isinstance(meta, dict):
            raise PlanError(f"{where}: \"meta\" must be an object")
        plan = cls(sites, meta)
        if "dense_warmup" in doc:
            k = _count(doc, "dense_warmup", where)
            if k != plan.dense_warmup:
                raise PlanError(f"{where}: \"dense_warmup\" is {k} but the sites' step ranges run the first "
                                f"{plan.dense_warmup} step(s) dense")
        return plan


def _at_phase(hp: HeadPlan, step: int | None, segment_start: int | None) -> HeadPlan:
    """hp with its renorm's phase resolved at `step` (hp itself without a renorm or when resolved)."""
    if hp.renorm is None or hp.renorm.phase is not Phase.AUTO:
        return hp
    phase = renorm_phase(hp.renorm, step, segment_start)
    return dataclasses.replace(hp, renorm=dataclasses.replace(hp.renorm, phase=phase))


def _order_free(h: HeadPlan, grid: TokenGrid | None) -> bool:
    """Whether the head's order moves no token: the model's own (orders.model_order), or FHW,
    HeadPlan's default, which needs no grid to be checked here (on a grid laid out otherwise it
    is a permutation, which the meaning of the plan, vsopt.core.semantics, applies)."""
    return h.order is TokenOrder.FHW or is_model_order(h.order, grid)


def _plain_dense(heads: Iterable[HeadPlan], grid: TokenGrid | None = None) -> bool:
    """Plain dense attention: dense, unquantized heads, in the model's order or the default FHW
    (a dense unquantized head's output does not depend on its token order)."""
    return all(h.sparsity is Sparsity.DENSE and _order_free(h, grid) and h.quant is Quant.NONE for h in heads)


def _site_warmup(sp: SitePlan) -> int:
    """The steps from 0 that `sp`'s step ranges cover, without a gap, with plain dense heads."""
    k = 0
    for st in sp.steps:
        if st.start != k or st.stop is None or not _plain_dense(st.heads, sp.grid):
            break
        k = st.stop
    return k


def _count(d: Mapping[str, Any], key: str, where: str) -> int:
    """A non-negative integer field of the plan JSON (4.7 or "4" are errors, not 4)."""
    value = d[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise PlanError(f"{where}: \"{key}\" must be a non-negative integer, got {value!r}")
    return value


def _load_arrays(path: Path, ref: Any) -> dict[str, torch.Tensor]:
    if ref is None:
        return {}
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    if not isinstance(ref, dict) or not isinstance(ref.get("file"), str):
        raise PlanError(f"plan {str(path)!r}: \"arrays\" must be {{\"file\": ..., \"sha256\": ...}}, got {ref!r}")
    name = ref["file"]
    if Path(name).name != name or name in ("", ".", ".."):  # absolute paths and ../ escape the plan's folder
        raise PlanError(f"plan {str(path)!r}: arrays file {name!r} must be a file name beside the plan, not a path")
    arrays_path = path.parent / name
    try:
        blob = arrays_path.read_bytes()
    except FileNotFoundError:
        raise PlanError(f"plan {str(path)!r} needs its arrays file {str(arrays_path)!r}, which does not exist") from None
    if hashlib.sha256(blob).hexdigest() != ref.get("sha256"):
        raise PlanError(f"arrays file {str(arrays_path)!r} does not match plan {str(path)!r} (sha256 differs): "
                        "corrupt, or from another save")
    try:
        return {k: v.to(torch.bool) for k, v in st_load(blob).items()}
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise PlanError(f"arrays file {str(arrays_path)!r} is corrupt: {e}") from None


__all__ = ["SCHEMA_VERSION", "ClusterSpec", "DynamicMethod", "DynamicSpec", "HeadPlan", "Plan", "Quant", "Remainder",
           "Renorm", "SitePlan",
           "Sparsity",
           "StepPlan", "TokenOrder", "is_block_size"]
