"""The reference model on the GPU: one forward at 4096 tokens (batch 2) and `vsopt demo` (issue 15).

    source benchmarks/gpu_env.sh && python3 benchmarks/demo_gpu.py          # on the GPU machine

1. forward: the shipped reference model (latents 2 x 4 x 16 x 32 x 32 = 4096 video tokens, the two
   guidance halves of a sampling step as batch 2; bf16), one forward per configuration:
       eager, inductor (torch.compile's default), vsopt-noplan (backend="vsopt", every site
       vsopt's exact dense op), vsopt-plan (the shipped calibrated plan)
   each compiled configuration also with CUDA graphs (inductor: mode="reduce-overhead"; vsopt:
   options={"cudagraphs": True}). The shipped plan changes head plans at step 4, so every
   configuration is timed at step 0 (segment 0-3) and at step 4 (segment 4+), after warming up
   both segments (3 calls each: autotuning, CUDA graph warm-up, recording); median of --iters
   CUDA-event-timed calls, every configuration compiled first and then timed in --rounds
   interleaved rounds (vsopt.core.timing.interleaved_ms). Also: the first call (compilation),
   relative L2 of the output against eager, Inductor's count of graphs it ran without CUDA graphs
   ("cudagraph_skips"), and for vsopt a profile of GPU time by kernel category.
2. demo: `python3 -m vsopt.cli demo` in a fresh process, as is and with --cudagraphs; its
   demo.json (median step per run, speedups, compile times, PSNR) is collected.

Both parts together are estimated at ~8 minutes on an H200 from a cold start (mostly compiling);
to stay within a 10-minute command limit run them apart, --parts forward then --parts demo with
the same --out: each run merges its part into OUT/demo_gpu.json.
Writes OUT/demo_gpu.json, OUT/demo_gpu.md (tables) and OUT/demo*/ (the demos' files), OUT being
--out (default: $OUT/demo_gpu if $OUT is set, else benchmarks/results/demo_gpu). Without a GPU it
runs as a smoke test at --frames/--size (no CUDA graph rows). To put the tables into
BENCHMARKS.md afterwards (no GPU needed):

    python3 benchmarks/demo_gpu.py --render OUT/demo_gpu.json --markdown BENCHMARKS.md
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from markdown_section import update_section  # noqa: E402  (a sibling script)

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Reference model on the GPU: forward and `vsopt demo`"


def _version(pkg: str) -> str:
    try:
        from importlib.metadata import version

        return version(pkg)
    except Exception:  # noqa: BLE001 - a missing package is reported as such
        return "not installed"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def forward_configs(cuda: bool, plan_path: str | None):
    """(name, backend, compile kwargs) of every configuration of part 1."""
    configs = [("eager", None, {}), ("inductor", "inductor", {}), ("vsopt-noplan", "vsopt", {"options": {}})]
    if plan_path:
        configs.append(("vsopt-plan", "vsopt", {"options": {"plan": plan_path}}))
    if cuda:
        configs += [("inductor+cudagraphs", "inductor", {"mode": "reduce-overhead"}),
                    ("vsopt-noplan+cudagraphs", "vsopt", {"options": {"cudagraphs": True}})]
        if plan_path:
            configs.append(("vsopt-plan+cudagraphs", "vsopt", {"options": {"plan": plan_path, "cudagraphs": True}}))
    return configs


def run_forward(args, device: str) -> dict:
    import torch

    import vsopt
    from torch._dynamo.utils import counters
    from vsopt.core.metrics import relative_l2
    from vsopt.core.timing import interleaved_ms
    from vsopt.demo import resolve_plan
    from vsopt.models import data, model as model_lib

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from e2e_wan import profile_breakdown

    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    ref = model_lib.load_shipped(device, dtype)
    c = ref.config
    frames, size = args.frames or c.frames, args.size or c.height
    plan_path, plan_why = resolve_plan("shipped", frames, size, c)
    tokens = data.sample_scenes(1, 0).tokens.to(device)
    cond = torch.cat([ref.encode(tokens), ref.encode(torch.zeros_like(tokens))])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, data.CHANNELS, frames, size, size, generator=g).to(device, dtype)
    inputs = (x, torch.full((2,), 500.0, device=device), cond)
    steps = (0, 4)  # the first steps of the shipped plan's two segments
    # Every configuration is compiled and warmed up first, then all are timed in interleaved rounds
    # (vsopt.core.timing.interleaved_ms): at this size a forward is host-bound, and timing one
    # configuration after another let the machine's drift fall on whichever ran last (session 8 saw
    # "vsopt-noplan" 1.46x slower than an all-dense plan that compiles to the same graph).
    torch._dynamo.reset()
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    rows, models = {}, {}
    for name, backend, kwargs in forward_configs(cuda and args.cudagraphs, plan_path):
        model = ref.transformer if backend is None else torch.compile(ref.transformer, backend=backend, **kwargs)
        skips = counters["inductor"]["cudagraph_skips"]
        row = {"backend": backend or "eager", "compile_kwargs": {k: (v if k != "options" else
                                                                   {kk: str(vv) for kk, vv in v.items()})
                                                               for k, v in kwargs.items()}}
        print(f"{name}: compiling / warming up ...", flush=True)
        with torch.no_grad():
            t0 = time.perf_counter()
            for s in steps:      # every segment's graph: compiled, autotuned, CUDA graphs recorded
                vsopt.set_denoising_step(s)
                for _ in range(3):
                    model(*inputs, return_dict=False)
            if cuda:
                torch.cuda.synchronize()
            row["warmup_s"] = round(time.perf_counter() - t0, 2)
            row["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"] - skips
        rows[name], models[name] = row, model
    rounds = max(1, min(args.rounds, args.iters))
    reference = None
    with torch.no_grad():
        for s in steps:
            vsopt.set_denoising_step(s)
            calls = {name: (lambda m=m: m(*inputs, return_dict=False)) for name, m in models.items()}
            times = interleaved_ms(calls, rounds, max(1, args.iters // rounds), warmup=1, cuda=cuda)
            for name, ms in times.items():
                rows[name][f"ms_step{s}"] = round(statistics.median(ms), 4)
                rows[name][f"all_ms_step{s}"] = [round(t, 4) for t in ms]
        vsopt.set_denoising_step(steps[-1])
        for name, model in models.items():
            row = rows[name]
            out = model(*inputs, return_dict=False)[0].float().clone()
            if row["backend"] == "vsopt" and not args.no_profile:
                row["profile_step4"] = profile_breakdown(lambda: model(*inputs, return_dict=False), device)
            reference = out if reference is None else reference
            row["rel_l2_vs_eager"] = relative_l2(out, reference)
            print(f"  {name}: {row['ms_step0']:.3f} ms (step 0), {row['ms_step4']:.3f} ms (step 4), warm-up "
                  f"{row['warmup_s']} s, rel L2 vs eager {row['rel_l2_vs_eager']:.2e}, cudagraph skips "
                  f"{row['cudagraph_skips']}", flush=True)
        vsopt.set_denoising_step(None)
    return {"latent": [2, data.CHANNELS, frames, size, size], "tokens": frames * (size // 2) ** 2,
            "dtype": str(dtype), "plan": plan_why, "iters": args.iters, "rounds": rounds, "rows": rows}


def run_demos(args, out: Path, cuda: bool) -> dict:
    """`vsopt demo` in fresh processes (honest compile times), as is and with --cudagraphs."""
    variants = {"demo": []}
    if cuda:
        variants["demo_cudagraphs"] = ["--cudagraphs"]
    extra = []
    if args.frames:
        extra += ["--frames", str(args.frames)]
    if args.size:
        extra += ["--size", str(args.size)]
    if args.demo_steps:
        extra += ["--steps", str(args.demo_steps)]
    results = {}
    for name, flags in variants.items():
        folder = out / name
        cmd = [sys.executable, "-m", "vsopt.cli", "demo", "--out", str(folder), *extra, *flags]
        print(f"{name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        folder.mkdir(parents=True, exist_ok=True)
        _write(folder / "stdout.txt", proc.stdout + "\n--- stderr ---\n" + proc.stderr)
        entry = {"command": "vsopt " + " ".join(cmd[3:]), "returncode": proc.returncode,
                 "wall_s": round(time.perf_counter() - t0, 1)}
        if proc.returncode == 0:
            doc = json.loads((folder / "demo.json").read_text())
            entry.update(timing=doc["timing"], metrics=doc["metrics"], plan=doc["plan"], steps=doc["steps"])
        else:
            entry["error"] = proc.stderr.strip().splitlines()[-1:] or ["(no stderr)"]
        print(f"  {name}: rc {proc.returncode}, {entry['wall_s']} s", flush=True)
        results[name] = entry
    return results


def render(r: dict) -> str:
    """The markdown section of a demo_gpu.json."""
    lines = [SECTION, "",
             f"`{r['command']}` on {r['device']}, {r['date']}, torch {r['torch']}, triton {r['triton']}, "
             f"diffusers {r['diffusers']}."]
    f = r.get("forward")
    if f:
        rows = f["rows"]
        base = {k: rows[k]["ms_step4"] for k in ("eager", "inductor", "vsopt-noplan") if k in rows}
        lines += ["", f"One forward of the shipped reference model, latents {'x'.join(map(str, f['latent']))} "
                      f"({f['tokens']} video tokens, the two guidance halves as batch 2), {f['dtype']}; plan: "
                      f"{f['plan']}. Median of {f['iters']} timed calls (CUDA events on a GPU; every configuration "
                      f"compiled first, then timed in {f.get('rounds', 1)} interleaved rounds) after warming up both "
                      "step segments of the shipped plan (it changes head plans at step 4).", "",
                  "| config | ms, step 0 | ms, step 4 | vs eager | vs inductor | vs vsopt-noplan | first calls s "
                  "| rel L2 vs eager | cudagraph skips |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, v in rows.items():
            ms = v["ms_step4"]
            ratio = [f"{base[k] / ms:.2f}x" if k in base else "-" for k in ("eager", "inductor", "vsopt-noplan")]
            lines.append(f"| {name} | {v['ms_step0']:.3f} | {ms:.3f} | {' | '.join(ratio)} | {v['warmup_s']} | "
                         f"{v['rel_l2_vs_eager']:.2e} | {v['cudagraph_skips']} |")
        prof = [(k, v["profile_step4"]["by_category_ms"]) for k, v in rows.items() if "profile_step4" in v]
        if prof:
            lines += ["", "Device time by kernel category at step 4 (ms, torch.profiler, one call):", ""]
            lines += [f"- {k}: " + ", ".join(f"{c} {t:.3f}" for c, t in cats.items()) for k, cats in prof]
    d = r.get("demo")
    if d:
        lines += ["", "`vsopt demo` (fresh process each; every graph compiled and warmed up before timing; median "
                      "sampling step = one forward of batch 2):", "",
                  "| command | steps | eager ms | inductor ms | vsopt ms | vsopt vs eager | vsopt vs inductor | "
                  "compile + warm-up s (inductor, vsopt) | compiled while timing | PSNR dB | wall s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for v in d.values():
            if v["returncode"]:
                lines.append(f"| `{v['command']}` | failed: {v['error'][0]} |")
                continue
            t, m = v["timing"], v["metrics"]
            med, cs = t["median_step_ms"], t["compile_and_warmup_s"]
            lines.append(f"| `{v['command']}` | {v['steps']} | {med['eager']:.2f} | {med.get('inductor', 0):.2f} | "
                         f"{med['vsopt']:.2f} | {t['speedup']['vs_eager']:.2f}x | {t['speedup']['vs_inductor']:.2f}x | "
                         f"{cs.get('inductor', 0):.1f}, {cs['vsopt']:.1f} | {t['graphs_compiled_while_timing']} | "
                         f"{m['psnr_db'] if isinstance(m['psnr_db'], str) else round(m['psnr_db'], 2)} | {v['wall_s']} |")
        first = next((v for v in d.values() if not v["returncode"]), None)
        if first:
            lines += ["", f"The demo's note on this device: {first['timing']['meaning']}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    default_out = Path(os.environ["OUT"]) / "demo_gpu" if os.environ.get("OUT") else ROOT / "benchmarks/results/demo_gpu"
    ap.add_argument("--out", type=Path, default=default_out)
    ap.add_argument("--parts", default="forward,demo", help="comma-separated: forward, demo")
    ap.add_argument("--iters", type=int, default=50, help="timed forwards per configuration and step")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds the --iters calls are split into")
    ap.add_argument("--no-cudagraphs", dest="cudagraphs", action="store_false",
                    help="forward: skip the CUDA-graph configurations")
    ap.add_argument("--frames", type=int, default=None, help="latent frames (default: the trained 16)")
    ap.add_argument("--size", type=int, default=None, help="latent height = width (default: the trained 32)")
    ap.add_argument("--demo-steps", type=int, default=None, help="--steps of the demo runs (default: the demo's)")
    ap.add_argument("--no-profile", action="store_true", help="skip the profile of the vsopt forwards")
    ap.add_argument("--render", type=Path, default=None, help="only render this demo_gpu.json to markdown")
    ap.add_argument("--markdown", type=Path, default=None, help="also replace the section in this markdown file")
    args = ap.parse_args(argv)

    if args.render:
        section = render(json.loads(args.render.read_text()))
        if args.markdown:
            update_section(args.markdown, SECTION, section)
        print(section)
        return 0

    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    parts = set(args.parts.split(","))
    result = {"benchmark": "demo_gpu", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "python3 benchmarks/demo_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "triton": _version("triton"), "diffusers": _version("diffusers")}
    print(f"{result['device']}, torch {result['torch']}, triton {result['triton']}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    previous = args.out / "demo_gpu.json"
    if previous.exists():   # an earlier run's other part (--parts forward, then --parts demo)
        kept = {k: v for k, v in json.loads(previous.read_text()).items() if k in ("forward", "demo") and
                k not in parts}
        if kept:
            result["command"] += " (with " + ", ".join(kept) + " from an earlier run in the same folder)"
        result.update(kept)
    if "forward" in parts:
        result["forward"] = run_forward(args, device)
        _write(args.out / "demo_gpu.json", json.dumps(result, indent=1))   # kept if the demos fail or time out
    if "demo" in parts:
        result["demo"] = run_demos(args, args.out, cuda)
    _write(args.out / "demo_gpu.json", json.dumps(result, indent=1))
    section = render(result)
    _write(args.out / "demo_gpu.md", section)
    if args.markdown:
        update_section(args.markdown, SECTION, section)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
