"""Regenerate the accuracy regression baselines in tests/baselines/ (CPU, a few minutes).

    python3 benchmarks/update_accuracy_baselines.py

Scores a few fixed plans on the shipped reference model at the reduced size CI runs (see
SETTINGS) and writes, atomically, tests/baselines/accuracy.json (settings, tolerances, scores)
and the plan files tests/baselines/plans/<case>.plan.json (+ .safetensors where a plan has
masks). tests/e2e/test_accuracy_regression.py re-scores the same plans and fails when accuracy
falls beyond the tolerances. Run it only when a change is MEANT to move accuracy, and say why in
the commit.
"""
from __future__ import annotations

import datetime
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "baselines"

SETTINGS = dict(steps=3, clips=1, seed=0, block=64, clip=(16, 16, 16), calibration_steps=2, calibration_clips=1)
# A run may lose at most this much against its baseline (scores are deterministic on one machine;
# the slack covers other CPUs and BLAS libraries).
TOLERANCE = {"psnr_db": 1.0, "rel_l2_factor": 1.15, "site_cosine": 0.005}


def main() -> int:
    from vsopt.benchmark import BenchSettings, Method, PlanScorer, method_plan
    from vsopt.core.io import atomic_write_json
    from vsopt.core.plan import Quant
    from vsopt.models.model import load_shipped

    torch.manual_seed(0)
    ref = load_shipped().eval()
    settings = BenchSettings(**SETTINGS)
    scorer = PlanScorer(ref, settings)
    fp8 = BenchSettings(**SETTINGS, quant=Quant.FP8)
    plans = {
        "window-0.3": method_plan(Method.WINDOW, scorer.sites, 0.3, settings)[0],
        "window-0.3-fp8": method_plan(Method.WINDOW, scorer.sites, 0.3, fp8)[0],
        "topk-0.3": method_plan(Method.TOPK, scorer.sites, 0.3, settings)[0],
        "sage-int8": method_plan(Method.SAGE, scorer.sites, 1.0, settings)[0],
        "calibrated-0.3": scorer.calibrated_plan(0.3),
    }
    cases = {}
    (OUT / "plans").mkdir(parents=True, exist_ok=True)
    for name, plan in plans.items():
        plan.save(OUT / "plans" / f"{name}.plan.json")
        scores = scorer.score(plan)
        cases[name] = {k: v for k, v in scores.items() if k != "sites"}
        print(f"{name:16s} density {scores['density']:.3f} PSNR {scores['psnr']:.2f} SSIM {scores['ssim']:.4f} "
              f"relL2 {scores['rel_l2']:.4f} site cos min {scores['site_cosine_min']:.4f}", flush=True)
    doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": "python3 benchmarks/update_accuracy_baselines.py", "torch": torch.__version__,
           "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in SETTINGS.items()},
           "tolerance": TOLERANCE, "cases": cases}
    atomic_write_json(OUT / "accuracy.json", doc, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
