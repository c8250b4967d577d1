"""Compile a diffusers Wan transformer with a vsopt plan, and compare it with the eager model.

    python examples/compile_wan.py                       # a small random Wan, a local-window plan
    python examples/compile_wan.py --plan wan.plan.json  # your plan (from examples/calibrate.py)

Shows: the attention sites vsopt finds (vsopt.inspect), the plan, torch.compile(model,
backend="vsopt", options={"plan": ...}), and the output's relative error against eager.
"""
from __future__ import annotations

import argparse
import time

import torch

import vsopt
from small_wan import make, window_plan


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plan", default=None, help="a .plan.json (default: a local-window plan made here)")
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--size", type=int, default=16, help="latent height = width")
    args = p.parse_args()

    model, inputs = make(args.frames, args.size)
    print(vsopt.inspect(model, *inputs).table())
    plan = args.plan or window_plan(model, inputs)
    with torch.no_grad():
        want = model(*inputs).sample
        compiled = torch.compile(model, backend="vsopt", options={"plan": plan})
        start = time.perf_counter()
        got = compiled(*inputs).sample
        print(f"first call (compiles): {time.perf_counter() - start:.1f} s")
    err = ((got - want).norm() / want.norm()).item()
    print(f"relative L2 error of the optimized model against eager: {err:.4f}")


if __name__ == "__main__":
    main()
