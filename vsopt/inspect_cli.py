"""`vsopt inspect`: add_arguments(parser) and run_cli(args), without torch at module level, so that
`vsopt inspect --help` answers at once; the inspection itself is vsopt.inspection (imported when
the command runs)."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from vsopt.trace_modes import Trace


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("factory", metavar="MODULE:FACTORY",
                        help="a function (in an importable module or a .py file) that returns (model, example_inputs)")
    parser.add_argument("--grid", metavar="F,H,W[,TB[,TA]]",
                        help="token grid for sites whose grid cannot be inferred: frames,height,width"
                             "[,text tokens before[,text tokens after]]")
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE")
    parser.add_argument("--strict", action="store_true", help="fail on any attention candidate left alone")
    parser.add_argument("--trace", choices=[t.value for t in Trace], default=Trace.COMPILE.value,
                        help="trace as torch.compile does (default: what torch.compile(backend='vsopt') rewrites; "
                             "runs the model once) or as torch.export does (what `vsopt export` and calibration see)")


def _parse_grid(text: str) -> tuple[int, ...]:
    from vsopt.core.errors import ConfigError

    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--grid {text!r}: expected integers F,H,W[,text_before[,text_after]]") from None
    if len(values) not in (3, 4, 5):
        raise ConfigError(f"--grid {text!r}: expected 3 to 5 integers F,H,W[,text_before[,text_after]]")
    return values


def run_cli(args: argparse.Namespace) -> int:
    from vsopt.inspection import inspect
    from vsopt.io import atomic_write_json, load_target

    options: dict[str, Any] = {"strict": bool(args.strict)}
    if args.grid:
        options["grid"] = _parse_grid(args.grid)
    target = load_target(args.factory)
    report = inspect(target.model, *target.args, options=options, trace=args.trace)
    print(report.table())
    if args.json:
        atomic_write_json(args.json, report.to_dict())
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
