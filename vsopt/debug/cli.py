"""`vsopt diff MODULE:FACTORY`: add_arguments(parser) and run_cli(args). Only argparse at module
level, and the default threshold from vsopt.debug.defaults (no torch: `vsopt diff --help` stays light);
the factory is loaded by vsopt.io.load_target, the one MODULE:FACTORY loader."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vsopt.debug.defaults import DEFAULT_THRESHOLD

    parser.add_argument("target", metavar="MODULE:FACTORY",
                        help="a function returning (model, example_inputs) or (model, example_inputs, sampler), "
                             "e.g. vsopt.debug.targets:reference")
    parser.add_argument("--plan", metavar="P", help="plan JSON file; none: every site dense")
    parser.add_argument("--html", metavar="OUT.html", help="write the report as one self-contained HTML page")
    parser.add_argument("--json", metavar="OUT.json", help="write the report as JSON")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help="relative L2 of a site output above which it is flagged")
    parser.add_argument("--no-numerics", action="store_true", help="structural view only: do not run the model")
    parser.add_argument("--steps", action="store_true",
                        help="also measure over the sampling steps (the factory must return a sampler too)")
    parser.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                        help="colour in the terminal (auto: only when stdout is a tty)")


def run_cli(args: argparse.Namespace) -> int:
    import math
    import sys

    from vsopt.core.errors import ConfigError
    from vsopt.debug.build import diff
    from vsopt.io import load_target

    if not math.isfinite(args.threshold) or args.threshold <= 0:
        raise ConfigError(f"--threshold must be a positive number, got {args.threshold}")
    target = load_target(args.target)
    if args.steps and target.sampler is None:
        raise ConfigError(f"--steps needs a sampler: {args.target} returned (model, example_inputs) only")
    report = diff(target.model, target.args, plan=args.plan, threshold=args.threshold, numerics=not args.no_numerics,
                  sampler=target.sampler if args.steps else None)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    print(report.render_text(width=80, color=color))
    if args.json:
        print(f"wrote {report.write_json(args.json)}")
    if args.html:
        print(f"wrote {report.write_html(args.html)}")
    return 0
