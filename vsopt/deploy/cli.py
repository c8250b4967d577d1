"""`vsopt export`: the optimized model as an artifact (pt2, aoti, onnx, trt), checked in a fresh process.

    vsopt export mypkg.models:make_wan --plan wan.plan.json --format onnx --out wan.onnx
    vsopt export --reference --format aoti --out reference.pt2
    vsopt export --reference --format onnx --onnx-form custom --out reference.custom.onnx

FACTORY returns (model, example_inputs) (see vsopt.io.load_target). --reference exports the shipped
reference model (a trained diffusers Wan, one denoising step's inputs) with its shipped plan.
Prints a progress line per slow step (stderr) and a closing table (stdout): format, file, size,
sites optimized / left dense with reasons, and the check run on the artifact.
"""
from __future__ import annotations

import argparse
import sys

FORMATS = ("pt2", "aoti", "onnx", "trt")   # = artifact.FORMATS (not imported: this module stays light)


def add_arguments(p: argparse.ArgumentParser) -> None:
    none = argparse.SUPPRESS   # options without a default value (their help says what happens)
    p.add_argument("target", nargs="?", metavar="MODULE:FACTORY", default=none,
                   help="the model: FACTORY() returns (model, example_inputs); or --reference")
    p.add_argument("--reference", action="store_true", help="the shipped reference model instead of MODULE:FACTORY")
    p.add_argument("--plan", default="auto", metavar="PATH|shipped|none|auto",
                   help="the plan; auto: shipped with --reference, else none (every site vsopt's exact dense op)")
    p.add_argument("--format", choices=FORMATS, default="pt2", help="artifact format")
    p.add_argument("--out", default=none, metavar="PATH",
                   help="where to write; without it vsopt-export.pt2 / vsopt-export.onnx, or the folder vsopt-export-trt")
    p.add_argument("--onnx-form", choices=("portable", "custom"), default="portable",
                   help="onnx: standard ops only (portable) or one vsopt-domain node per op (custom)")
    p.add_argument("--onnx-quant", choices=("drop", "fake"), default="drop",
                   help="portable onnx: run quantized heads at the model's precision (drop) or fake-quantize them "
                        "with standard ops (fake: the kernels' rounding, no speed-up)")
    p.add_argument("--opset", type=int, default=23, help="ONNX opset (18-22: MatMul/Softmax instead of Attention)")
    p.add_argument("--step", type=int, default=none,
                   help="denoising step whose head plans a step-ranged plan exports; without it, its default heads")
    p.add_argument("--frames", type=int, default=none, help="--reference: latent frames; without it the trained 16")
    p.add_argument("--size", type=int, default=none,
                   help="--reference: latent height = width; without it the trained 32")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="device to trace on (aoti on cuda compiles the Triton kernels into the package)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=none,
                   help="cast the model and floating inputs; without it, as the factory returns them")
    p.add_argument("--no-check", action="store_true", help="skip loading the artifact in a fresh process")
    p.add_argument("--json", default=none, metavar="PATH", help="also write the result as JSON")


def _opt(args: argparse.Namespace, name: str):
    return getattr(args, name, None)


def _target(args):
    from vsopt.core.errors import ConfigError

    target, plan = _opt(args, "target"), None if args.plan == "auto" else args.plan
    if args.reference == bool(target):
        raise ConfigError("give MODULE:FACTORY or --reference (one of them)")
    if args.reference:
        from .reference import reference_target

        return reference_target(_opt(args, "frames"), _opt(args, "size"), plan)
    if _opt(args, "frames") is not None or _opt(args, "size") is not None:
        raise ConfigError("--frames and --size apply to --reference only")
    from vsopt.io import load_target

    made = load_target(target)
    plan = None if plan in (None, "none") else plan
    if plan == "shipped":
        raise ConfigError("--plan shipped is the reference model's plan: use it with --reference")
    return made.model, made.args, plan, None


def run_cli(args: argparse.Namespace) -> int:
    import torch

    from vsopt.io import atomic_write_json

    from . import export

    model, inputs, plan, note = _target(args)
    if _opt(args, "dtype") or args.device != "cpu":
        dtype = getattr(torch, args.dtype) if _opt(args, "dtype") else None
        model = model.to(device=args.device, dtype=dtype)
        inputs = tuple(x.to(device=args.device, dtype=dtype if dtype and x.is_floating_point() else x.dtype)
                       if isinstance(x, torch.Tensor) else x for x in inputs)
    result = export(model, inputs, plan, args.format, _opt(args, "out"), onnx_form=args.onnx_form,
                    onnx_quant=args.onnx_quant, opset=args.opset, step=_opt(args, "step"), check=not args.no_check,
                    progress=lambda line: print(line, file=sys.stderr))
    if note:
        result.notes.insert(0, note)
    print(result.table())
    if _opt(args, "json"):
        atomic_write_json(args.json, result.to_dict())
    return 0 if result.check is None or result.check.ok is not False else 1
