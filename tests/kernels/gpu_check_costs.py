"""Measure the cost-model coefficients of some precisions on this GPU, the way
vsopt/costmodels/<gpu>.json's entries are defined, and merge them into that file (the int8_int8
entries of h200.json are placeholders until this runs). About 1 minute per precision on an H200.

On the GPU (prints the entries as JSON and writes them to $OUT/quant_costs.json):
    python3 tests/kernels/gpu_check_costs.py --out $OUT [--quants int8_int8] [--flags fuse_kv,q_with_stats]
Back on any machine (merges the measured entries into the cost model, drops them from its
meta["unmeasured"], records where they came from in meta["refits"]):
    python3 tests/kernels/gpu_check_costs.py --apply quant_costs.json --costmodel vsopt/costmodels/h200.json

The measurement is benchmarks/measure_cost_model.py's attention section (its functions, its grid:
head dims 64 and 128, 64x64 and 128x128 blocks, N 1024..32768, densities 0.05..1, a banded mask,
batch 2 x 4 heads, CUDA-graph GPU time) for the chosen precisions only, and the fit is
benchmarks/fit_cost_model.py's (non-negative least squares weighted by 1/time; key_slots the
candidate that fits each key best). Each kernel key's coefficients (launch_us, per_block_us,
per_query_block_us, per_span_block_us, key_slots) depend on that key's points alone (the features
of two keys never share a column), so fitting one precision gives what a refit of the whole file
would give it. --flags turns quantization options of the launcher on for the measurement (fuse_kv:
launch.FUSE_KV_QUANT, q_in_kernel: QUANTIZE_Q_IN_KERNEL, q_with_stats: FUSE_Q_WITH_STATS; see
tests/kernels/gpu_check_quant_overhead.py), for entries of a launcher that will ship with them on;
the default measures the launcher as it ships.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
FLAGS = {"fuse_kv": "FUSE_KV_QUANT", "q_in_kernel": "QUANTIZE_Q_IN_KERNEL", "q_with_stats": "FUSE_Q_WITH_STATS"}


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fit_keys(measurements: dict) -> dict:
    """{kernel key: {table: value}, ...} fitted to the attention records of `measurements`
    (a measure_cost_model-format dict), one key at a time (see the module docstring)."""
    from vsopt.core.costmodel import CostModel

    fcm = _load("fit_cost_model")
    att = fcm.attention_points(measurements)
    sms = measurements.get("sm_count") or 132
    candidates = (0, *(k * sms for k in fcm.SLOTS_PER_SM))
    out = {}
    for key in sorted({w.launches[0].key for w, _ in att}):
        mine = [(w, t) for w, t in att if w.launches[0].key == key]
        slots = min(candidates, key=lambda n: fcm._score(CostModel.fit(mine, measurements["gpu"], slots=n)))
        model = CostModel.fit(mine, measurements["gpu"], slots={key: slots})
        out[key] = {"launch_us": model.launch_us.get(key, 0.0), "per_block_us": model.per_block_us.get(key, 0.0),
                    "per_query_block_us": model.per_query_block_us.get(key, 0.0),
                    # no span term where no slot count fits better than none (the file then has no entry)
                    "per_span_block_us": model.per_span_block_us.get(key, 0.0) if slots else None,
                    "key_slots": slots,
                    "points": len(mine), "fit_median_rel_error": round(model.meta["fit_median_rel_error"], 4),
                    "fit_max_rel_error": round(model.meta["fit_max_rel_error"], 4)}
    return out


def measure(args) -> int:
    import torch

    if not torch.cuda.is_available() and not args.dry_run:
        print("gpu_check_costs.py needs a CUDA GPU (or --dry-run)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO))
    mcm = _load("measure_cost_model")
    from vsopt.core.costmodel import describe_environment
    from vsopt.kernels.block_sparse import launch as bsa

    if args.dry_run:
        mcm.DEV, mcm.DRY_RUN = "cpu", True
    flags = [f for f in args.flags.split(",") if f]
    saved = {name: getattr(bsa, name) for name in FLAGS.values()}
    args.variant = ",".join(flags) or "shipped"
    quants = [q for q in args.quants.split(",") if q]
    records = []
    start = time.time()
    try:
        for f in flags:
            setattr(bsa, FLAGS[f], True)
        mcm.measure_attention(lambda kind, **r: records.append({"kind": kind, **r}), quants,
                              [int(x) for x in args.head_dims.split(",")], [int(x) for x in args.blocks.split(",")],
                              [int(x) for x in args.lengths.split(",")], [float(x) for x in args.densities.split(",")],
                              (8,), start + args.budget_s)
    finally:
        for name, value in saved.items():
            setattr(bsa, name, value)
    gpu = "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name()
    m = {"format": "vsopt-cost-measurements", "gpu": gpu, "dry_run": bool(args.dry_run),
         "sm_count": None if args.dry_run else torch.cuda.get_device_properties(0).multi_processor_count,
         "measurements": records}
    skipped = [r for r in records if "skipped" in r]
    entries = fit_keys(m)
    out = {"format": "vsopt-quant-costs", "gpu": gpu, "variant": args.variant, "quants": quants,
           "command": "python3 tests/kernels/gpu_check_costs.py " + " ".join(sys.argv[1:] if args.argv is None else args.argv),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "seconds": round(time.time() - start, 1), "skipped": skipped, **describe_environment(),
           "entries": entries, "measurements": records}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "quant_costs.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({"gpu": gpu, "variant": args.variant, "entries": entries, "skipped": len(skipped)}, indent=1))
    print(f"wrote {path} ({len(records)} records in {out['seconds']} s)")
    return 0


def apply(args) -> int:
    with open(args.apply) as f:
        res = json.load(f)
    if res.get("format") != "vsopt-quant-costs":
        print(f"{args.apply}: not a gpu_check_costs.py output", file=sys.stderr)
        return 2
    if "dry run" in res["gpu"] and not args.allow_dry_run:
        print(f"{args.apply}: a CPU dry run; its times are not a GPU's", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO))
    from vsopt.core.costmodel import CostModel

    model = CostModel.load(args.costmodel)
    if model.gpu != res["gpu"] and not args.allow_dry_run:
        print(f"{args.apply}: measured on {res['gpu']}, the cost model is {model.gpu}'s", file=sys.stderr)
        return 2
    if res.get("skipped"):
        print(f"{args.apply}: {len(res['skipped'])} grid points were skipped (time budget): not applied; rerun "
              "with a larger --budget-s or fewer --quants", file=sys.stderr)
        return 2
    for key, e in res["entries"].items():
        model.launch_us[key] = e["launch_us"]
        model.per_block_us[key] = e["per_block_us"]
        model.per_query_block_us[key] = e["per_query_block_us"]
        model.key_slots[key] = e["key_slots"]
        if e["per_span_block_us"] is None:
            model.per_span_block_us.pop(key, None)
        else:
            model.per_span_block_us[key] = e["per_span_block_us"]
    unmeasured = model.meta.get("unmeasured")
    if unmeasured:
        unmeasured["keys"] = [k for k in unmeasured["keys"] if k not in res["entries"]]
        if not unmeasured["keys"]:
            del model.meta["unmeasured"]
    model.meta.setdefault("refits", []).append(
        {"keys": sorted(res["entries"]), "command": res["command"], "date": res["date"], "variant": res["variant"],
         "gpu": res["gpu"], "torch": res.get("torch"), "triton": res.get("triton"),
         "fit": {k: {n: e[n] for n in ("points", "fit_median_rel_error", "fit_max_rel_error")}
                 for k, e in res["entries"].items()}})
    CostModel.from_dict(model.to_dict(), args.costmodel)   # still a valid cost model
    model.save(args.costmodel)
    print(f"merged {len(res['entries'])} keys into {args.costmodel}: {', '.join(sorted(res['entries']))}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--quants", default="int8_int8")
    p.add_argument("--flags", default="", help=f"launcher options on during the measurement, of {', '.join(FLAGS)}")
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--blocks", default="64,128")
    p.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768")
    p.add_argument("--densities", default="0.05,0.1,0.2,0.3,0.5,1.0")
    p.add_argument("--budget-s", type=float, default=150.0, help="no new grid point starts after this")
    p.add_argument("--dry-run", action="store_true", help="on the CPU, one call per timer (a check of the script)")
    p.add_argument("--apply", default=None, help="a quant_costs.json to merge into --costmodel (no GPU needed)")
    p.add_argument("--costmodel", default=str(REPO / "vsopt" / "costmodels" / "h200.json"))
    p.add_argument("--allow-dry-run", action="store_true", help="--apply a dry run (tests only)")
    args = p.parse_args(argv)
    if any(f not in FLAGS for f in args.flags.split(",") if f):
        p.error(f"--flags: choose from {', '.join(FLAGS)}")
    args.argv = argv
    return apply(args) if args.apply else measure(args)


if __name__ == "__main__":
    raise SystemExit(main())
