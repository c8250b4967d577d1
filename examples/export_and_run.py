"""Export an optimized diffusers Wan transformer to every deployment format, then load and run
each artifact the way a deployment would (no vsopt passes, only its ops).

    python examples/export_and_run.py --out exported/          # pt2, aoti, onnx (both forms), trt
    python examples/export_and_run.py --formats pt2,onnx

vsopt.export writes the artifact, loads it in a fresh process and compares it with the eager
optimized model; vsopt.deploy.load(path) returns a callable for pt2, aoti and portable onnx files.
The trt format writes the custom ONNX and the kernel's PTX and needs TensorRT for the engine.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import vsopt
from vsopt.deploy import ExportError, load
from small_wan import make, window_plan

SUFFIX = {"pt2": "model.pt2", "aoti": "model.aoti.pt2", "onnx": "model.onnx", "onnx-custom": "model.custom.onnx",
          "trt": "trt"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="exported")
    p.add_argument("--formats", default="pt2,aoti,onnx,onnx-custom,trt")
    args = p.parse_args()

    model, inputs = make(frames=2, size=8, head_dim=64)   # head_dim 64: a dim vsopt's GPU kernel is built for
    plan = window_plan(model, inputs)
    out = Path(args.out)
    for fmt in args.formats.split(","):
        print(f"--- {fmt}")
        kind, form = fmt.split("-")[0], ("custom" if fmt.endswith("custom") else "portable")
        try:
            result = vsopt.export(model, inputs, plan, kind, out / SUFFIX[fmt], onnx_form=form)
        except ExportError as e:
            print(f"not completed: {e}")
            continue
        print(result.table())
        if fmt in ("pt2", "aoti", "onnx"):   # run the artifact here too
            run = load(result.path)
            with torch.no_grad():
                (sample,) = run(*inputs)
            print(f"loaded and ran {result.path.name}: output {tuple(sample.shape)}")


if __name__ == "__main__":
    main()
