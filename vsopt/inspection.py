"""vsopt.inspect(): which attention sites vsopt finds in a model, and which it leaves alone.

    report = vsopt.inspect(model, *example_inputs, options={"grid": (4, 8, 8)})
    print(report.table())

    $ vsopt inspect mypkg.models:make_wan --grid 21,30,52 --json sites.json

FACTORY is a callable taking no arguments that returns (model, example_inputs_tuple).
The model is traced with torch.export (no compilation, nothing is run on real data) and the
passes run with rewrite off, so the report is what torch.compile(backend="vsopt") would rewrite.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from vsopt.core.config import VsoptConfig
from vsopt.core.errors import ConfigError
from vsopt.core.ir import AttentionSite, SkippedSite
from vsopt.io import atomic_write_json, load_target


@dataclass
class InspectReport:
    """The attention sites of a model (graph order) and the candidates left alone."""

    sites: list[AttentionSite]
    skipped: list[SkippedSite]

    def table(self) -> str:
        """The sites as a fixed-width table: site, layout, heads, head_dim, N, grid, rule."""
        head = ("site", "layout", "heads", "kv", "head_dim", "N", "kv_N", "grid", "rule")
        rows = [(s.site_id, s.layout.value, str(s.heads), str(s.kv_heads), str(s.head_dim), str(s.q_len),
                 str(s.kv_len), f"{s.grid} ({s.grid_source.value})" if s.grid else "unknown", s.rule)
                for s in self.sites]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *rows]]
        lines.append(f"{len(self.sites)} attention site(s)")
        for s in self.skipped:
            lines.append(f"left alone: {s.site_id} (node {s.node}): {s.reason}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"sites": [s.to_dict() for s in self.sites],
                "skipped": [{"site_id": s.site_id, "node": s.node, "reason": s.reason, "rule": s.rule}
                            for s in self.skipped]}


def inspect(model: torch.nn.Module, *example_inputs: Any, options: Mapping[str, Any] | None = None) -> InspectReport:
    """Find the attention sites of `model` on `example_inputs` (options as for the backend; a
    "strict" option raises on the first candidate left alone)."""
    from vsopt.backend import trace_and_rewrite

    config = VsoptConfig.from_options({**dict(options or {}), "rewrite": False})
    with torch.no_grad():
        _gm, report = trace_and_rewrite(model, example_inputs, config)
    return InspectReport(sites=report.sites, skipped=report.skipped)


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("factory", metavar="MODULE:FACTORY",
                        help="a function (in an importable module or a .py file) that returns (model, example_inputs)")
    parser.add_argument("--grid", metavar="F,H,W[,TB[,TA]]",
                        help="token grid for sites whose grid cannot be inferred: frames,height,width"
                             "[,text tokens before[,text tokens after]]")
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE")
    parser.add_argument("--strict", action="store_true", help="fail on any attention candidate left alone")


def _parse_grid(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--grid {text!r}: expected integers F,H,W[,text_before[,text_after]]") from None
    if len(values) not in (3, 4, 5):
        raise ConfigError(f"--grid {text!r}: expected 3 to 5 integers F,H,W[,text_before[,text_after]]")
    return values


def run_cli(args: argparse.Namespace) -> int:
    options: dict[str, Any] = {"strict": bool(args.strict)}
    if args.grid:
        options["grid"] = _parse_grid(args.grid)
    target = load_target(args.factory)
    report = inspect(target.model, *target.args, options=options)
    print(report.table())
    if args.json:
        atomic_write_json(args.json, report.to_dict())
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
