"""The report types of `vsopt diff`: one SiteEntry per site or candidate, the DiffReport holding
both views, and the plan entry per head as the report shows it. Types and their JSON only: the
renderers (vsopt.debug.text, vsopt.debug.html) import these, not the other way round (the
render_* methods load them when called)."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from vsopt.core import semantics
from vsopt.core.errors import ConfigError
from vsopt.core.io import atomic_write_text
from vsopt.core.ir import AttentionSite

if TYPE_CHECKING:
    from vsopt.debug.graph import ChangeRegion, SourceLocation, StructuralDiff
    from vsopt.debug.numeric import NumericalDiff, StepDiff

REPORT_VERSION = 1


@dataclass
class SiteEntry:
    """One attention site or candidate, as both views show it.

    status: "rewritten" (the passes replaced it), "left alone" (a rule declined it: `reason`
    says why) or "unchanged" (detected, but no node of the graph changed). A rewritten site can
    carry a reason too, when a later pass declined part of what the plan asked (e.g. kept dense).
    site_id is the site's id; a candidate whose id another entry already has gets "id@node"."""

    site_id: str
    status: str
    rule: str
    reason: str | None
    node: str  # the before-graph node it is anchored on (the attention output, or the candidate)
    source: SourceLocation | None
    site: AttentionSite | None  # None for candidates that never became sites
    region: ChangeRegion | None
    plan_heads: list[dict[str, Any]] = field(default_factory=list)  # one dict per head; [] without a plan

    def to_dict(self, regions: Sequence[ChangeRegion] = ()) -> dict[str, Any]:
        """As JSON data; the region is given as its index in `regions` (the structure's list)."""
        index = next((i for i, r in enumerate(regions) if r is self.region), None)
        return {"site_id": self.site_id, "status": self.status, "rule": self.rule, "reason": self.reason,
                "node": self.node, "source": self.source.to_dict() if self.source else None,
                "site": self.site.to_dict() if self.site else None, "region": index, "plan_heads": self.plan_heads}


@dataclass
class DiffReport:
    """Everything `vsopt diff` found. `entries` are in execution order; `numerical` is None when
    numerics were not asked for; `steps` is empty unless a sampler was given."""

    model: str
    entries: list[SiteEntry]
    structure: StructuralDiff
    numerical: NumericalDiff | None
    steps: list[StepDiff] = field(default_factory=list)

    def entry(self, site_id: str) -> SiteEntry:
        for e in self.entries:
            if e.site_id == site_id:
                return e
        raise KeyError(f"no site {site_id!r} in the report; sites are {[e.site_id for e in self.entries]}")

    @property
    def rewritten(self) -> list[SiteEntry]:
        return [e for e in self.entries if e.status == "rewritten"]

    @property
    def left_alone(self) -> list[SiteEntry]:
        return [e for e in self.entries if e.status != "rewritten"]

    def to_dict(self) -> dict[str, Any]:
        regions = self.structure.regions
        return {"version": REPORT_VERSION, "model": self.model, "entries": [e.to_dict(regions) for e in self.entries],
                "structure": self.structure.to_dict(),
                "numerical": self.numerical.to_dict() if self.numerical else None,
                "steps": [s.to_dict() for s in self.steps]}

    def to_json(self) -> str:
        """The report as JSON: keys sorted, floats to 6 significant digits, inf/nan as strings,
        no timestamps or addresses, so the same inputs give the same bytes."""
        return json.dumps(_stable(self.to_dict()), sort_keys=True, indent=1, allow_nan=False) + "\n"

    def render_text(self, width: int = 80, color: bool = False) -> str:
        from vsopt.debug.text import render_text

        return render_text(self, width=width, color=color)

    def render_html(self) -> str:
        from vsopt.debug.html import render_html

        return render_html(self)

    def write_json(self, path: str | os.PathLike) -> Path:
        return atomic_write_text(path, self.to_json())

    def write_html(self, path: str | os.PathLike) -> Path:
        return atomic_write_text(path, self.render_html())


def _stable(obj: Any) -> Any:
    if isinstance(obj, float):
        if not math.isfinite(obj):
            return str(obj)  # "inf", "-inf", "nan": JSON has no such numbers
        return float(f"{obj:.6g}")
    if isinstance(obj, dict):
        return {str(k): _stable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_stable(v) for v in obj]
    return obj


def plan_heads(plan: Any, site_id: str) -> list[dict[str, Any]]:
    """The plan entry of a site (a vsopt.core.plan.Plan), one dict per head: sparsity, pattern,
    order, quant (precision), block, density (None where it is decided at run time). The
    step-independent head plans; [] when the plan has no entry."""
    if plan is None or site_id not in plan:
        return []
    site_plan = plan[site_id]
    rows = []
    for head in site_plan.heads_at(None):
        try:
            mask = semantics.static_mask(site_plan, head)
        except ConfigError:  # a pattern the site's grid cannot hold: lower_plan says why it stays dense
            mask = None
        rows.append({"sparsity": head.sparsity.value, "pattern": head.pattern.KIND if head.pattern else None,
                     "order": "cluster" if head.cluster is not None else head.order.value, "quant": head.quant.value, "block": [head.block_m, head.block_n],
                     "density": float(mask.float().mean()) if mask is not None else None})
    return rows
