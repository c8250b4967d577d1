"""The report of `vsopt diff`: DiffReport, its data (vsopt.debug.report_data: SiteEntry,
ReportData, the JSON) with the text and HTML views, and the plan entry per head as the report
shows it. The renderers (vsopt.debug.text, vsopt.debug.html) read the data types from
report_data, never this module, so the imports run one way."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vsopt.core import semantics
from vsopt.core.errors import ConfigError
from vsopt.core.io import atomic_write_text
from vsopt.debug.html import render_html
from vsopt.debug.report_data import REPORT_VERSION, ReportData, SiteEntry  # noqa: F401  (re-exported)
from vsopt.debug.text import render_text


class DiffReport(ReportData):
    """Everything `vsopt diff` found (fields: ReportData's), with its text and HTML views."""

    def render_text(self, width: int = 80, color: bool = False) -> str:
        return render_text(self, width=width, color=color)

    def render_html(self) -> str:
        return render_html(self)

    def write_html(self, path: str | os.PathLike) -> Path:
        return atomic_write_text(path, self.render_html())


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
