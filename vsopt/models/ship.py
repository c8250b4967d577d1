"""Ship a trained reference checkpoint: the CPU half of a release, after the GPU stretches.

    python -m vsopt.models.ship --result DIR [--history DIR ...] [--calibrate-cpu] [--skip-baselines]

DIR is what vsopt/models/gpu_stretch.sh wrote ($OUT of the last call): reference.safetensors,
stretch.json, samples.png and, from a CALIBRATE=1 call, the plans. Earlier stretches' folders
(--history, oldest first) add their records and loss curves to the shipped training record. In
the source tree this:

1. copies the checkpoint to vsopt/models/assets/reference.safetensors and writes beside it
   train_config.json (every stretch's record, oldest first), loss_curve.json / .png (the stretches'
   curves end to end) and structure.json (the last stretch's measure, per clip size);
2. copies the plans that came back (reference.plan.*: 16x32x32; reference_16x64x64.plan.*) into
   the assets; with --calibrate-cpu and no 16x32x32 plan in DIR, calibrates that one here (slow);
3. copies samples.png to benchmarks/results/reference_v2/;
4. re-records tests/models/reference_output.safetensors (tests/models/test_checkpoint.py --write)
   and, unless --skip-baselines, the accuracy baselines (benchmarks/update_accuracy_baselines.py).

It prints what docs/MODEL.md reports (held-out losses and structure at each size).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from vsopt.core.io import atomic_write_json, atomic_write_text

ASSETS = Path(__file__).resolve().parent / "assets"
ROOT = Path(__file__).resolve().parents[2]
PLANS = ("reference.plan", "reference_16x64x64.plan")


def _stretch(folder: Path) -> dict:
    path = folder / "stretch.json"
    if not path.is_file():
        raise SystemExit(f"no stretch.json in {folder} (a vsopt/models/gpu_stretch.sh output folder)")
    return json.loads(path.read_text())


def joined_curve(docs: list[dict]) -> list[dict]:
    """The stretches' loss curves end to end: steps counted from the first stretch's start."""
    out, offset = [], 0
    for i, doc in enumerate(docs):
        out += [{**point, "step": point["step"] + offset, "stretch": i} for point in doc.get("loss_curve", [])]
        offset += doc["train"]["steps"]
    return out


def _run(cmd: list[str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--result", required=True, help="the last gpu_stretch.sh output folder")
    p.add_argument("--history", nargs="*", default=[], help="earlier stretches' output folders, oldest first")
    p.add_argument("--calibrate-cpu", action="store_true", help="calibrate the 16x32x32 plan here if DIR has none")
    p.add_argument("--skip-baselines", action="store_true", help="do not re-record the accuracy baselines")
    args = p.parse_args(argv)
    result = Path(args.result)
    folders = [Path(h) for h in args.history] + [result]
    docs = [_stretch(f) for f in folders]
    ckpt = result / "reference.safetensors"
    if not ckpt.is_file():
        raise SystemExit(f"no reference.safetensors in {result}")
    size = ckpt.stat().st_size
    if size > 20_000_000:
        raise SystemExit(f"{ckpt} is {size} bytes: the shipped checkpoint must stay <= 20 MB")

    shutil.copyfile(ckpt, ASSETS / "reference.safetensors")
    atomic_write_json(ASSETS / "train_config.json",
                      {"stretches": [{"folder": str(f), "command": d.get("command"), **d["train"]}
                                     for f, d in zip(folders, docs)]}, indent=1)
    curve = joined_curve(docs)
    atomic_write_text(ASSETS / "loss_curve.json", json.dumps(curve, indent=0))
    from vsopt.models.train import plot_curve

    plot_curve(curve, ASSETS / "loss_curve.png",
               f"reference model v2: flow-matching loss, {len(docs)} stretches ({docs[-1]['train']['device']})")
    structure = docs[-1].get("structure")
    if structure:
        atomic_write_json(ASSETS / "structure.json", structure, indent=1)
    for name in PLANS:
        src = result / f"{name}.json"
        if src.is_file():
            shutil.copyfile(src, ASSETS / f"{name}.json")
            masks = result / f"{name}.safetensors"
            if json.loads(src.read_text()).get("arrays"):
                if not masks.is_file():
                    raise SystemExit(f"{src} names a masks file that is not in {result}: {masks.name}")
                shutil.copyfile(masks, ASSETS / masks.name)
            elif (ASSETS / masks.name).is_file():
                (ASSETS / masks.name).unlink()  # the old plan's masks: this plan has none
            print(f"plan {name}.json shipped from {result}")
        elif name == "reference.plan" and args.calibrate_cpu:
            _run([sys.executable, "-m", "vsopt.cli", "calibrate", "--reference", "--steps", "8", "--clips", "2",
                  "--max-error", "0.05", "--step-ranges", "0:4,4:", "--out", str(ASSETS / "reference.plan.json"),
                  "--quiet"])
        else:
            print(f"no {name}.json in {result}: " + ("the shipped one was NOT recalibrated for these weights"
                                                      if (ASSETS / f"{name}.json").is_file() else "none shipped"))
    if (result / "samples.png").is_file():
        dest = ROOT / "benchmarks" / "results" / "reference_v2"
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(result / "samples.png", dest / "samples.png")
    _run([sys.executable, "tests/models/test_checkpoint.py", "--write"])
    if not args.skip_baselines:
        _run([sys.executable, "benchmarks/update_accuracy_baselines.py"])

    last = docs[-1]["train"]
    print(f"steps: {sum(d['train']['steps'] for d in docs)} in these stretches (total {last['steps_total']})")
    for key, value in last["validation_loss_trained"].items():
        print(f"held-out {key}: {value:.4f}")
    for name, s in (structure or {}).items():
        print(f"structure {name} ({s['tokens']} tokens): top10 {s['trained_top10_mean']:.3f} "
              f"(init {s['init_top10_mean']:.3f}), top20 {s['trained_top20_mean']:.3f} (init {s['init_top20_mean']:.3f}),"
              f" {s['heads_above_twice_uniform_top10']} heads above 0.2")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
