"""The numerical view of `vsopt diff`: where, and how much, the optimized graph departs from dense.

Three runs on the same inputs, each an FX interpreter that taps every site's output node:
  dense        the graph before the passes: the exact site outputs and model output;
  accumulated  the graph after the passes, as it is: site s sees the error of every site before it;
  isolated     the graph after the passes, but each site's optimized output is replaced by the
               dense one once measured, so the next site starts from exact inputs (only that site
               is optimized, as if the plan held it alone).
Site errors are measured per site and per head: cosine similarity, relative L2 and max absolute
error (vsopt.core.metrics), against the dense run's output of the same site.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx
from torch.utils._pytree import tree_leaves

from vsopt.core.errors import VsoptError
from vsopt.core.ir import Layout
from vsopt.core.metrics import cosine_similarity, psnr, relative_l2
from vsopt.debug.defaults import DEFAULT_THRESHOLD


@dataclass(frozen=True)
class ErrorStats:
    """How far an optimized tensor is from its dense reference."""

    cosine: float
    rel_l2: float
    max_abs: float

    @classmethod
    def between(cls, actual: torch.Tensor, expected: torch.Tensor) -> "ErrorStats":
        if actual.shape != expected.shape:
            raise VsoptError(f"cannot compare tensors of shapes {tuple(actual.shape)} and {tuple(expected.shape)}")
        max_abs = float((actual.double() - expected.double()).abs().max()) if actual.numel() else 0.0
        return cls(cosine_similarity(actual, expected), relative_l2(actual, expected), max_abs)

    def to_dict(self) -> dict[str, Any]:
        return {"cosine": self.cosine, "rel_l2": self.rel_l2, "max_abs": self.max_abs}


@dataclass(frozen=True)
class SiteProbe:
    """Where to read one site's output: the node in each graph, and how to split it into heads.

    The output may be (B, H, N, Dv), (B, N, H, Dv) or (B*H, N, Dv); see split_heads.
    """

    site_id: str
    before_node: str  # node of the graph before the passes that holds the dense output
    after_node: str  # node of the graph after the passes that holds the optimized output
    heads: int
    q_len: int
    layout: Layout


@dataclass
class SiteError:
    """Errors of one site. Per-head lists are indexed by query head (empty when the output could
    not be split into heads)."""

    site_id: str
    isolated: ErrorStats
    accumulated: ErrorStats
    heads_isolated: list[ErrorStats] = field(default_factory=list)
    heads_accumulated: list[ErrorStats] = field(default_factory=list)

    def worst_head(self) -> int | None:
        """The head with the largest isolated relative L2."""
        if not self.heads_isolated:
            return None
        return max(range(len(self.heads_isolated)), key=lambda h: self.heads_isolated[h].rel_l2)

    def to_dict(self) -> dict[str, Any]:
        return {"site_id": self.site_id, "isolated": self.isolated.to_dict(), "accumulated": self.accumulated.to_dict(),
                "heads_isolated": [e.to_dict() for e in self.heads_isolated],
                "heads_accumulated": [e.to_dict() for e in self.heads_accumulated]}


@dataclass(frozen=True)
class OutputError:
    """The model output, optimized against dense (all float tensor outputs taken together)."""

    psnr: float
    rel_l2: float
    cosine: float
    max_abs: float

    def to_dict(self) -> dict[str, Any]:
        return {"psnr": self.psnr, "rel_l2": self.rel_l2, "cosine": self.cosine, "max_abs": self.max_abs}


@dataclass
class NumericalDiff:
    """Per-site errors in execution order, the model output's error, and the threshold."""

    sites: list[SiteError]
    output: OutputError
    threshold: float = DEFAULT_THRESHOLD

    @property
    def first_over_threshold(self) -> str | None:
        """The first site, in execution order, whose isolated relative L2 exceeds the threshold:
        where error enters the model."""
        return next((s.site_id for s in self.sites if s.isolated.rel_l2 > self.threshold), None)

    @property
    def first_accumulated_over_threshold(self) -> str | None:
        """The first site whose accumulated relative L2 exceeds the threshold: where drift shows."""
        return next((s.site_id for s in self.sites if s.accumulated.rel_l2 > self.threshold), None)

    @property
    def ranking(self) -> list[str]:
        """Site ids, largest isolated relative L2 first (ties keep execution order)."""
        return [s.site_id for s in sorted(self.sites, key=lambda s: -s.isolated.rel_l2)]

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "first_over_threshold": self.first_over_threshold,
                "first_accumulated_over_threshold": self.first_accumulated_over_threshold,
                "ranking": self.ranking, "output": self.output.to_dict(), "sites": [s.to_dict() for s in self.sites]}


@dataclass
class StepDiff:
    """One sampler step: the denoiser's numerical diff on that step's (optimized-trajectory)
    inputs, and the sampler state after the step, optimized trajectory against dense."""

    step: int
    numerical: NumericalDiff
    state: OutputError

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "state": self.state.to_dict(), "numerical": self.numerical.to_dict()}


class _Tap(torch.fx.Interpreter):
    """Runs a graph, handing the value of each tapped node (node name -> site id) to `on_site`;
    when that returns a tensor, it replaces the value before any user sees it."""

    def __init__(self, gm: torch.fx.GraphModule, taps: dict[str, str],
                 on_site: Callable[[str, torch.Tensor], torch.Tensor | None]):
        super().__init__(gm, garbage_collect_values=True)
        self.taps, self.on_site = taps, on_site

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        site = self.taps.get(n.name)
        if site is not None:
            if not isinstance(out, torch.Tensor):
                raise VsoptError(f"site {site!r}: node {n.name!r} does not hold a tensor (got {type(out).__name__})")
            replacement = self.on_site(site, out.detach())
            if replacement is not None:
                if replacement.shape != out.shape:
                    raise VsoptError(f"site {site!r}: optimized output {tuple(out.shape)} does not match the dense "
                                     f"output {tuple(replacement.shape)}")
                out = replacement
        return out


def _run(gm: torch.fx.GraphModule, taps: dict[str, str], args: Sequence[Any],
         on_site: Callable[[str, torch.Tensor], torch.Tensor | None]) -> Any:
    missing = sorted(set(taps) - {n.name for n in gm.graph.nodes})
    if missing:
        raise VsoptError(f"the graph has no node(s) {missing} to read site outputs from")
    with torch.no_grad():
        return _Tap(gm, taps, on_site).run(*args)


def split_heads(t: torch.Tensor, heads: int, q_len: int, layout: Layout = Layout.BHND) -> list[torch.Tensor] | None:
    """A site output split into one tensor per query head, or None when its shape does not fit.

    The head axis is found from the shape, since the tapped node need not be in the layout the
    model wrote q/k/v in (an SDPA output is (B, H, N, D) whatever the model's layout):
    (B, H, N, Dv), (B, N, H, Dv) or (B*H, N, Dv); `layout` breaks the tie when H == N."""
    if t.dim() == 4:
        bhnd = t.shape[1] == heads and t.shape[2] == q_len
        bnhd = t.shape[2] == heads and t.shape[1] == q_len
        if bhnd and (not bnhd or layout is not Layout.BNHD):
            return list(t.unbind(1))
        if bnhd:
            return list(t.unbind(2))
    if t.dim() == 3 and t.shape[0] % heads == 0 and t.shape[1] == q_len:
        return list(t.reshape(t.shape[0] // heads, heads, *t.shape[1:]).unbind(1))
    return None


def _float_leaves(out: Any) -> torch.Tensor:
    leaves = [t.detach().double().flatten() for t in tree_leaves(out)
              if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not leaves:
        raise VsoptError("the model returned no floating-point tensor to compare")
    return torch.cat(leaves)


def compare_outputs(actual: Any, expected: Any) -> OutputError:
    """PSNR, relative L2, cosine and max error of two model outputs (pytrees of tensors)."""
    a, e = _float_leaves(actual), _float_leaves(expected)
    if a.shape != e.shape:
        raise VsoptError(f"optimized and dense outputs differ in size ({a.numel()} vs {e.numel()} values)")
    stats = ErrorStats.between(a, e)
    return OutputError(psnr(a, e), stats.rel_l2, stats.cosine, stats.max_abs)


def _errors(probe: SiteProbe, actual: torch.Tensor, dense: torch.Tensor) -> tuple[ErrorStats, list[ErrorStats]]:
    """The whole-site error and the per-head errors ([] when the output does not split into heads)."""
    whole = ErrorStats.between(actual, dense)
    a, e = (split_heads(t, probe.heads, probe.q_len, probe.layout) for t in (actual, dense))
    return whole, ([ErrorStats.between(x, y) for x, y in zip(a, e)] if a is not None and e is not None else [])


def measure(before: torch.fx.GraphModule, after: torch.fx.GraphModule, probes: Sequence[SiteProbe],
            args: Sequence[Any], threshold: float = DEFAULT_THRESHOLD) -> tuple[NumericalDiff, Any]:
    """Run dense, isolated and accumulated on `args` (the graphs' flat inputs). Returns the diff and
    the optimized graph's output (for a sampler to continue from). Memory: the dense output of
    every site is kept until the end; optimized outputs are reduced to statistics at once."""
    if not math.isfinite(threshold) or threshold <= 0:
        raise VsoptError(f"the error threshold must be a positive number, got {threshold!r}")
    by_site = {p.site_id: p for p in probes}
    dense: dict[str, torch.Tensor] = {}
    isolated: dict[str, tuple[ErrorStats, list[ErrorStats]]] = {}
    accumulated: dict[str, tuple[ErrorStats, list[ErrorStats]]] = {}

    def keep_dense(site: str, value: torch.Tensor) -> None:
        dense[site] = value

    def measure_then_restore(site: str, value: torch.Tensor) -> torch.Tensor:
        isolated[site] = _errors(by_site[site], value, dense[site])
        return dense[site]  # the next site starts from exact inputs

    def measure_only(site: str, value: torch.Tensor) -> None:
        accumulated[site] = _errors(by_site[site], value, dense[site])

    dense_out = _run(before, {p.before_node: p.site_id for p in probes}, args, keep_dense)
    after_taps = {p.after_node: p.site_id for p in probes}
    _run(after, after_taps, args, measure_then_restore)
    out = _run(after, after_taps, args, measure_only)
    sites = [SiteError(p.site_id, isolated[p.site_id][0], accumulated[p.site_id][0], isolated[p.site_id][1],
                       accumulated[p.site_id][1]) for p in probes]
    return NumericalDiff(sites, compare_outputs(out, dense_out), threshold), out


Denoiser = Callable[..., Any]


def measure_trajectory(before: torch.fx.GraphModule, after: torch.fx.GraphModule, probes: Sequence[SiteProbe],
                       sampler: Callable[[Denoiser], Sequence[torch.Tensor]],
                       threshold: float = DEFAULT_THRESHOLD) -> list[StepDiff]:
    """The numerical view over a sampler's steps.

    sampler(denoise) must run the whole sampling loop, calling denoise(*flat_inputs) once per step
    and returning the state after each step (one tensor per step); it must be deterministic (its
    own seeded noise). It runs twice: with the dense graph, and with the optimized graph measured
    at every call."""
    def dense_denoise(*args):
        with torch.no_grad():
            return torch.fx.Interpreter(before).run(*args)

    per_call: list[NumericalDiff] = []

    def optimized_denoise(*args):
        diff, out = measure(before, after, probes, args, threshold)
        per_call.append(diff)
        return out

    dense_states = list(sampler(dense_denoise))
    optimized_states = list(sampler(optimized_denoise))
    if len(dense_states) != len(optimized_states) or len(per_call) != len(optimized_states):
        raise VsoptError(f"the sampler must call the denoiser once per step and return one state per step; got "
                         f"{len(per_call)} calls, {len(optimized_states)} and {len(dense_states)} states")
    return [StepDiff(i, d, compare_outputs(o, e))
            for i, (d, o, e) in enumerate(zip(per_call, optimized_states, dense_states))]
