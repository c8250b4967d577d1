"""`vsopt diff`: what the optimizer changed, what it left alone and why, and where error enters.

    report = vsopt.diff(model, example_inputs, plan="wan.plan.json")
    print(report.render_text())            # both views, 80 columns, colour on a tty
    report.write_json("diff.json")          # stable across runs for the same inputs
    report.write_html("diff.html")          # one self-contained page

The report has two views, each built by its own module:
  structural (vsopt.debug.graph): the ATen graph before the passes aligned with the graph after
      them by provenance and the passes' reports; per attention site in execution order, the
      original ops (with source file and line) beside what replaced them and the plan entry per
      head; every site or candidate left alone with the reason its rule gave.
  numerical (vsopt.debug.numeric): per site and head, cosine / relative L2 / max error, isolated
      and accumulated; the model output's PSNR and relative L2; the first site over a threshold;
      optionally over a sampler's steps.
Modules: report_data (the report's types and JSON), report (DiffReport: them with the views), build (build_report, diff), graph, numeric, text (terminal)
and html (the page) renderers, targets (ready-made MODULE:FACTORY targets), cli (`vsopt diff`).
The public names below are loaded on first use.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "DiffReport": "report", "SiteEntry": "report", "plan_heads": "report", "REPORT_VERSION": "report",
    "build_report": "build", "diff": "build",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
