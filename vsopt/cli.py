"""The `vsopt` command line. The only module that reads environment variables.

Each command lives in the module that implements it, which provides
    add_arguments(parser: argparse.ArgumentParser) -> None
    run_cli(args: argparse.Namespace) -> int
and is listed in COMMANDS below. Only the module of the command being run is imported (so
`vsopt --help` answers without importing torch).

Errors: a VsoptError (bad input, a plan that does not fit, ...) prints one line, `vsopt CMD: error:
...`, and exits 1; Ctrl-C prints one line and exits 130. VSOPT_DEBUG=1 (or --debug before the
command) shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "inspect": ("vsopt.inspect_cli", "list the attention sites vsopt finds in a model"),
    "demo": ("vsopt.demo", "sample a clip from the shipped reference model, dense and optimized"),
    "calibrate": ("vsopt.calibration.cli", "measure a model's attention and write a plan"),
    "diff": ("vsopt.debug.cli", "show what the optimizer changed, left alone, and where error enters"),
    "bench": ("vsopt.benchmark.cli", "sweep configurations: accuracy against dense, and speed"),
    "export": ("vsopt.deploy.cli", "export the optimized model: torch.export, AOTInductor, ONNX or TensorRT"),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's help ends with its default, except where there is nothing to say (a flag off,
    an option unset) or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or action.required or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s own arguments are added (its module imported)."""
    parser = argparse.ArgumentParser(prog="vsopt", description="A compiler for the attention of video transformers.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks (also VSOPT_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=HelpFormatter)
        p.set_defaults(_module=module)
        if name != command:
            continue
        try:
            importlib.import_module(module).add_arguments(p)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            p.set_defaults(_missing=f"command {name!r} is not available in this build ({module} is missing)")
    return parser


def _join_negative_values(argv: list[str]) -> list[str]:
    """`--grid -4,4,4` -> `--grid=-4,4,4`: argparse takes a value that starts with '-' and is not a
    plain number for an option, and would answer "expected one argument" instead of checking the
    value (which then gets its own clear error)."""
    out: list[str] = []
    for a in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and re.match(r"^-\d[\d.,:]*$", a):
            out[-1] = f"{out[-1]}={a}"
        else:
            out.append(a)
    return out


def _command_in(argv: list[str]) -> str | None:
    return next((a for a in argv if a in COMMANDS), None)


def main(argv: list[str] | None = None) -> int:
    argv = _join_negative_values(sys.argv[1:] if argv is None else list(argv))
    parser = build_parser(_command_in(argv))
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "_missing", None):
        print(f"vsopt: error: {args._missing}", file=sys.stderr)
        return 2
    debug = args.debug or os.environ.get("VSOPT_DEBUG", "") not in ("", "0")
    from vsopt.core.errors import VsoptError

    try:
        return int(importlib.import_module(args._module).run_cli(args) or 0)
    except VsoptError as e:
        if debug:
            raise
        print(f"vsopt {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"vsopt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
