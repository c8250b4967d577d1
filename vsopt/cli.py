"""The `vsopt` command line. The only module that reads environment variables.

Each command lives in the module that implements it, which provides
    add_arguments(parser: argparse.ArgumentParser) -> None
    run_cli(args: argparse.Namespace) -> int
and is listed in COMMANDS below (imported only when used, so `vsopt --help` stays fast)."""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "inspect": ("vsopt.inspect", "list the attention sites vsopt finds in a model"),
    "demo": ("vsopt.demo", "sample a clip from the shipped reference model, dense and optimized"),
    "calibrate": ("vsopt.calibration.cli", "measure a model's attention and write a plan"),
    "diff": ("vsopt.debug", "show what the optimizer changed, left alone, and where error enters"),
    "bench": ("vsopt.bench", "sweep configurations: accuracy against dense, and speed"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vsopt", description="A compiler for the attention of video transformers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        try:
            importlib.import_module(module).add_arguments(p)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            p.set_defaults(_missing=f"command {name!r} is not available in this build ({module} is missing)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "_missing", None):
        print(f"vsopt: error: {args._missing}", file=sys.stderr)
        return 2
    from vsopt.core.errors import VsoptError

    try:
        return int(importlib.import_module(args._module).run_cli(args) or 0)
    except VsoptError as e:
        print(f"vsopt {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
