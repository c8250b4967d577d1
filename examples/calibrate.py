"""Calibrate a plan for a diffusers Wan transformer (vsopt's trained reference model, at a small
clip): measure its attention on a few inputs and keep, per head, the cheapest pattern / mask /
order / precision within an error budget.

    python examples/calibrate.py --out wan.plan.json     # then: examples/compile_wan.py --plan wan.plan.json

Uses the public vsopt.calibrate(model, calibration_inputs, budget, options=..., out=...). The
budget here keeps half of the key blocks (DensityBudget: placed where they lose the least); with
--error the budget is a per-site relative L2 error instead (at this small clip the cost model then
keeps most sites dense: sparsity does not pay for 256 tokens).
"""
from __future__ import annotations

import argparse

import torch

import vsopt
from small_wan import reference

try:   # the calibration wing (vsopt >= 0.2 layout); older layouts kept it in vsopt.calibrate
    from vsopt.calibration import CalibrationOptions, DensityBudget, SiteErrorBudget
except ImportError:
    from vsopt.calibrate import CalibrationOptions, DensityBudget, SiteErrorBudget


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="wan.plan.json")
    p.add_argument("--density", type=float, default=0.5, help="share of key blocks kept")
    p.add_argument("--error", type=float, default=None, help="a per-site relative L2 error budget instead")
    p.add_argument("--inputs", type=int, default=2, help="calibration inputs (noise seeds)")
    args = p.parse_args()

    # 4 x 8 x 8 tokens in 64-token blocks, head_dim 64: sizes the shipped GPU cost model knows
    model, inputs = reference(frames=4, size=16)
    calls = [inputs]
    for seed in range(1, args.inputs):
        g = torch.Generator().manual_seed(seed)
        calls.append((torch.randn(inputs[0].shape, generator=g), *inputs[1:]))
    options = CalibrationOptions(block_m=64, block_n=64, mass_shares=(0.8, 0.95), dynamic_values=(0.95,))
    budget = SiteErrorBudget(args.error) if args.error is not None else DensityBudget(args.density)
    result = vsopt.calibrate(model, calls, budget, options=options, out=args.out, progress=False)
    print(result.table())
    print(f"plan written to {args.out}")


if __name__ == "__main__":
    main()
