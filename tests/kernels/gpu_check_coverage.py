"""GPU check of issue 14's coverage paths through torch.compile(backend="vsopt") with Inductor, on
unmodified diffusers models (small configs, head_dim 64 so the Triton kernel runs in bf16):

- Mochi under Dynamo's capture of data-dependent shapes (its text trimmed by nonzero): both joint
  sites found with their static part's grid, lowered (the split: video x video by the plan, the
  data-dependent text dense); on the CPU Inductor's bmm lowering guards on the text length
  (Eq(u0, 1)), so this path is only checked here;
- HunyuanVideo 1.5 (its block compiled after a graph break): the grid carried across graphs and the
  eager-built mask checked on the device (check_masks_on_device=True).

For each: no plan equals eager; a plan keeping every block (Dense pattern, through the kernel) equals
eager to bf16 rounding; a sparse plan lowers every video site (strict) and gives a finite output that
differs from dense. Writes one JSON object (stdout, and $OUT/coverage_gpu.json when OUT is set).

    python3 tests/kernels/gpu_check_coverage.py            (one CUDA GPU; exit status 1 if a check fails)
    python3 tests/kernels/gpu_check_coverage.py --smoke    (CPU, float32, Hunyuan only: the CPU path)
    python3 tests/kernels/gpu_check_coverage.py --cpu [--dtype bfloat16] [--cases hunyuan_video15]
                                                           (the same cases on the CPU, in bf16 by default)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch

import vsopt
from vsopt.core.patterns import Dense, LocalWindow
from vsopt.core.plan import HeadPlan, Plan, SitePlan, Sparsity

CAPTURE = {"capture_dynamic_output_shape_ops": True, "capture_scalar_outputs": True}
BOUND = 3e-2  # bf16 rounding of a whole forward


def mochi(device, dtype):
    from diffusers import MochiTransformer3DModel

    torch.manual_seed(0)
    m = MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=64, num_layers=2,
                                pooled_projection_dim=16, in_channels=4, text_embed_dim=16, time_embed_dim=16,
                                max_sequence_length=8).eval().to(device, dtype)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]], dtype=torch.bool, device=device)
    return m, (torch.randn(1, 4, 2, 16, 16, device=device, dtype=dtype),
               torch.randn(1, 8, 16, device=device, dtype=dtype), torch.tensor([500], device=device), mask)


def hunyuan15(device, dtype):
    from diffusers import HunyuanVideo15Transformer3DModel

    torch.manual_seed(0)
    m = HunyuanVideo15Transformer3DModel(in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=64,
                                         num_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=1,
                                         patch_size_t=1, text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=8,
                                         rope_axes_dim=(16, 24, 24), task_type="i2v").eval().to(device, dtype)
    t = lambda *s: torch.randn(*s, device=device, dtype=dtype)  # noqa: E731
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool, device=device)
    mask2 = torch.tensor([[1, 1, 0]], dtype=torch.bool, device=device)
    return m, (t(1, 9, 2, 8, 8), torch.tensor([500.0], device=device, dtype=dtype), t(1, 4, 16), mask, None, t(1, 3, 8), mask2,
               t(1, 3, 8))


def sample(out):
    return out.sample if hasattr(out, "sample") else out[0]


def rel(a, b):
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def check(row, factory, device, dtype, dynamo, options):
    """Fills `row`; row["step"] names the step running (kept where one raises)."""
    row["step"] = "build"
    model, inputs = factory(device, dtype)
    with torch.no_grad(), torch._dynamo.config.patch(**dynamo):
        row["step"] = "eager"
        want = sample(model(*inputs))
        row["step"] = "inspect"
        report = vsopt.inspect(model, *inputs, options=options)
        video = [s for s in report.sites if s.grid is not None and s.grid.video_tokens > 1]
        row["sites"] = [(s.site_id, str(s.grid), s.q_len) for s in report.sites]

        def run(plan):
            torch._dynamo.reset()
            told = []
            tell = vsopt.backend._tell
            vsopt.backend._tell = lambda config, reports: (told.extend(reports), tell(config, reports))
            try:
                t0 = time.time()
                got = sample(torch.compile(model, backend="vsopt", options={**options, **plan})(*inputs))
                return got, sorted({i for r in told for i in r.lowered}), round(time.time() - t0, 1)
            finally:
                vsopt.backend._tell = tell

        row["step"] = "compile without a plan"
        got, _, row["compile_s_noplan"] = run({})
        row["noplan_rel"] = rel(got, want)
        keep = HeadPlan(Sparsity.PATTERN, pattern=Dense(), block_m=64, block_n=64)
        sparse = HeadPlan(Sparsity.PATTERN, pattern=LocalWindow(0, 1, 1), block_m=64, block_n=64)
        dense_entry = HeadPlan(block_m=64, block_n=64)
        for label, head in (("dense_pattern", keep), ("sparse", sparse)):
            row["step"] = f"compile with the {label} plan"
            plan = Plan({s.site_id: SitePlan.for_site(s, head if s in video else dense_entry) for s in report.sites})
            got, lowered, secs = run({"plan": plan, "strict": True})
            row[f"{label}_lowered"] = lowered
            row[f"{label}_rel"] = rel(got, want)
            row[f"{label}_finite"] = bool(torch.isfinite(got).all())
            row[f"{label}_compile_s"] = secs
    torch._dynamo.reset()
    del row["step"]
    ids = sorted(s.site_id for s in video)
    row["ok"] = bool(ids and row["noplan_rel"] <= BOUND and row["dense_pattern_rel"] <= BOUND
                     and row["dense_pattern_lowered"] == ids and row["sparse_lowered"] == ids
                     and row["sparse_finite"] and row["sparse_rel"] > row["dense_pattern_rel"])
    return row


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="CPU, float32, Hunyuan only")
    ap.add_argument("--cpu", action="store_true", help="the GPU check's cases on the CPU (the kernels' references)")
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                    help="model dtype (default bfloat16; float32 with --smoke)")
    ap.add_argument("--cases", default=None, help="comma-separated subset of: mochi_capture,hunyuan_video15")
    args = ap.parse_args()
    cpu = args.smoke or args.cpu
    if not cpu and not torch.cuda.is_available():
        print("needs a CUDA GPU (or --cpu / --smoke)", file=sys.stderr)
        return 2
    device = "cpu" if cpu else "cuda"
    dtype = getattr(torch, args.dtype or ("float32" if args.smoke else "bfloat16"))
    cases = [("mochi_capture", mochi, CAPTURE, {}), ("hunyuan_video15", hunyuan15, {}, {"check_masks_on_device": True})]
    wanted = args.cases.split(",") if args.cases else ["hunyuan_video15"] if args.smoke else [c[0] for c in cases]
    unknown = set(wanted) - {c[0] for c in cases}
    if unknown:
        print(f"unknown case(s) {sorted(unknown)}; known: {[c[0] for c in cases]}", file=sys.stderr)
        return 2
    cases = [c for c in cases if c[0] in wanted]
    rows = []
    for name, factory, dynamo, options in cases:
        row = {"case": name}
        try:
            rows.append(check(row, factory, device, dtype, dynamo, options))
        except Exception as e:  # noqa: BLE001 - one line per failed case (its step kept), the others still run
            rows.append({**row, "ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"})
            traceback.print_exc()
            torch._dynamo.reset()
        _write(device, dtype, rows, final=False)   # after each case: a time limit keeps the cases done
    _write(device, dtype, rows, final=True)
    return 0 if all(r["ok"] for r in rows) else 1


def _write(device, dtype, rows, final: bool) -> None:
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": str(dtype), "rows": rows}
    text = json.dumps(result, indent=1)
    if final:
        print(text)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "coverage_gpu.json"), "w") as f:
            f.write(text)


if __name__ == "__main__":
    sys.exit(main())
