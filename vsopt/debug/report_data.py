"""The data of a `vsopt diff` report: one SiteEntry per site or candidate and ReportData holding
both views' findings, with their JSON. Below the renderers (vsopt.debug.text, vsopt.debug.html),
which read these types, and below vsopt.debug.report, whose DiffReport adds the rendering
methods: no module of the wing imports one above it."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

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
class ReportData:
    """Everything `vsopt diff` found (the data; DiffReport, in vsopt.debug.report, adds the views). `entries` are in execution order; `numerical` is None when
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

    def write_json(self, path: str | os.PathLike) -> Path:
        return atomic_write_text(path, self.to_json())

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


__all__ = ["REPORT_VERSION", "ReportData", "SiteEntry"]
