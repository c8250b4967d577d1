"""End-to-end speed: one Wan2.1-1.3B transformer forward at 480p / 81 frames, on the GPU.

The diffusers WanTransformer3DModel with the real Wan2.1-1.3B config (30 layers, dim 1536, 12 heads
of 128, ffn 8960) and random bf16 weights, latents (1, 16, 21, 60, 104) -> 21 x 30 x 52 = 32760
video tokens, 512 text tokens of dim 4096 for cross-attention. Side by side, in one run:

  inductor          torch.compile with Inductor's defaults (the SDPA backend torch picks: named
                    from the profiler's kernel names)
  inductor-cudnn    the same with cuDNN attention forced (sdpa_kernel(CUDNN_ATTENTION))
  vsopt-dense       backend="vsopt" without a plan (every self/cross attention -> vsopt.attention)
  vsopt-d{D}-{Q}    backend="vsopt" with a uniform plan: every self-attention head a static 3D
                    local-window pattern whose 128x128 block density is closest to D, precision Q

Each is compiled block by block (regional compilation, as diffusers recommends: the 30 identical
blocks share one compiled graph, so compiling takes seconds instead of minutes); timing is the
median of CUDA-event-timed forwards after warm-up. A profile of the vsopt forward splits its time
into attention, GEMMs, permutations, quantization, mask building and the rest.

    python3 benchmarks/e2e_wan.py                       # the full benchmark (GPU)
    python3 benchmarks/e2e_wan.py --tiny                # a smoke run at toy size (CPU or GPU)
Writes benchmarks/results/e2e_wan.json and a table section in BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from markdown_section import update_section  # noqa: E402  (a sibling script)

ROOT = Path(__file__).resolve().parent.parent

WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6)
TINY = dict(WAN_1_3B, num_attention_heads=2, attention_head_dim=32, text_dim=32, ffn_dim=64, num_layers=2,
            freq_dim=32)


def build_model(config: dict, device: str, dtype: torch.dtype):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU: 1.3B parameters take seconds on the CPU
        return WanTransformer3DModel(**config).to(dtype=dtype).eval()


def make_inputs(frames: int, height: int, width: int, text_tokens: int, text_dim: int, device: str, dtype):
    g = torch.Generator().manual_seed(1)
    # latent frames x (2*height) x (2*width): the 1x2x2 patchify gives the frames x height x width token grid
    latents = torch.randn(1, 16, frames, 2 * height, 2 * width, generator=g).to(device, dtype)
    text = torch.randn(1, text_tokens, text_dim, generator=g).to(device, dtype)
    timestep = torch.tensor([500], device=device)
    return latents, timestep, text


def window_for_density(grid, target: float, block: int):
    """The 3D local window (frame radius, spatial radius) whose block density at `block` is
    closest to `target`; returns (pattern, measured density)."""
    from vsopt.core.patterns import LocalWindow, block_mask

    best = None
    for rf in range(0, grid.frames):
        for rs in range(0, max(grid.height, grid.width)):
            p = LocalWindow(rf, rs, rs)
            d = float(block_mask(p, grid, block_m=block, block_n=block).float().mean())
            if best is None or abs(d - target) < abs(best[1] - target):
                best = (p, d)
            if d > target + 0.1:
                break
    return best


def compile_blocks(model, backend: str, options: dict | None):
    """Regional compilation: each transformer block compiled with the same backend/options."""
    for block in model.blocks:
        block.compile(backend=backend, options=options, fullgraph=False, dynamic=False)
    return model


CATEGORIES = (  # first match wins; kernel names lower-cased
    ("attention", ("attn", "attention", "fmha", "flash", "cudnn", "block_sparse", "sdpa")),
    ("quantization", ("quant",)),
    ("mask building", ("mask", "table", "score", "topk")),
    ("permutation", ("gather", "scatter", "permute", "index")),
    ("gemm", ("gemm", "sm90_xmma", "cutlass", "nvjet", "matmul", "mm_")),
)


def profile_breakdown(fn, device: str) -> dict[str, float]:
    """Milliseconds per category of GPU kernel in one call of fn, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CUDA] if device == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=acts) as prof:
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
    out: dict[str, float] = {}
    kernels: dict[str, float] = {}
    for e in prof.key_averages():
        t = (e.self_device_time_total if device == "cuda" else e.self_cpu_time_total) / 1e3
        if t <= 0:
            continue
        name = e.key.lower()
        cat = next((c for c, keys in CATEGORIES if any(k in name for k in keys)), "other")
        out[cat] = out.get(cat, 0.0) + t
        kernels[e.key[:80]] = t
    top = dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:12])
    return {"by_category_ms": {k: round(v, 3) for k, v in sorted(out.items(), key=lambda kv: -kv[1])},
            "top_kernels_ms": {k: round(v, 3) for k, v in top.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="toy sizes, for a smoke run on the CPU")
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--quant", default="fp8", choices=["none", "int8", "fp8", "int8_fp8"])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--window", default=None, help="F,S: use LocalWindow(F, S, S) instead of searching for --density")
    ap.add_argument("--skip", default="", help="comma-separated configs not to run (e.g. vsopt-dense)")
    ap.add_argument("--json", default=str(ROOT / "benchmarks/results/e2e_wan.json"))
    ap.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"))
    args = ap.parse_args(argv)

    import vsopt  # noqa: F401  (registers the backend's ops)
    from vsopt.core.timing import time_calls
    from vsopt.core.ir import TokenGrid
    from vsopt.core.plan import HeadPlan, Plan, Quant, Sparsity

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = TINY if args.tiny else WAN_1_3B
    grid = TokenGrid(2, 4, 6) if args.tiny else TokenGrid(21, 30, 52)
    text_tokens = 8 if args.tiny else 512
    block = 16 if args.tiny else 128
    inputs = make_inputs(grid.frames, grid.height, grid.width, text_tokens, config["text_dim"], device, dtype)

    if args.window:
        from vsopt.core.patterns import LocalWindow, block_mask

        rf, rs = (int(v) for v in args.window.split(","))
        pattern = LocalWindow(rf, rs, rs)
        density = float(block_mask(pattern, grid, block_m=block, block_n=block).float().mean())
    else:
        pattern, density = window_for_density(grid, args.density, block)
    print(f"grid {grid} ({grid.num_tokens} tokens); pattern {pattern} at {block}x{block} blocks: density {density:.3f}")

    # The plan: sites are found on one block (regional compilation: site ids are relative to a block).
    import vsopt.backend as vb
    from vsopt.core.config import VsoptConfig

    probe = build_model(config, device, dtype)
    with torch.no_grad():
        block_inputs = _capture_block_inputs(probe, inputs)
        _, report = vb.trace_and_rewrite(probe.blocks[0], block_inputs, VsoptConfig(grid=grid))
    self_sites = [s for s in report.sites if s.is_self_attention]
    print("sites in one block:", [(s.site_id, s.q_len, s.kv_len, str(s.grid)) for s in report.sites])
    head = HeadPlan(sparsity=Sparsity.PATTERN, pattern=pattern, quant=Quant(args.quant), block_m=block, block_n=block)
    plan = Plan.uniform(self_sites, head, meta={"benchmark": "e2e_wan", "density": density})
    del probe

    runs = {}
    import contextlib
    from torch.nn.attention import SDPBackend, sdpa_kernel

    configs = [
        ("inductor", "inductor", None, contextlib.nullcontext),
        (f"vsopt-d{args.density}-{args.quant}", "vsopt", {"grid": grid, "plan": plan}, contextlib.nullcontext),
        ("inductor-cudnn", "inductor", None, lambda: sdpa_kernel(SDPBackend.CUDNN_ATTENTION)),
        ("vsopt-dense", "vsopt", {"grid": grid}, contextlib.nullcontext),
    ]
    if device != "cuda":
        configs = [c for c in configs if c[0] != "inductor-cudnn"]
    configs = [c for c in configs if c[0] not in args.skip.split(",")]
    reference_out = None
    for name, backend, options, ctx in configs:
        model = compile_blocks(build_model(config, device, dtype), backend, options)
        with torch.no_grad(), ctx():
            t0 = time.perf_counter()
            out = model(*inputs, return_dict=False)[0]
            if device == "cuda":
                torch.cuda.synchronize()
            compile_s = time.perf_counter() - t0
            times = time_calls(lambda: model(*inputs, return_dict=False), args.iters, warmup=2,
                               cuda=device == "cuda")
            breakdown = profile_breakdown(lambda: model(*inputs, return_dict=False), device)
        from vsopt.core.metrics import cosine_similarity, relative_l2

        if reference_out is None:
            reference_out = out.float()
        runs[name] = {"median_ms": statistics.median(times), "times_ms": times, "first_call_s": compile_s,
                      "cosine_vs_inductor": cosine_similarity(out.float(), reference_out),
                      "rel_l2_vs_inductor": relative_l2(out.float(), reference_out), **breakdown}
        print(f"{name:22s} {runs[name]['median_ms']:9.2f} ms  first call {compile_s:6.1f} s  "
              f"cos {runs[name]['cosine_vs_inductor']:.5f}  {breakdown['by_category_ms']}")
        del model
        if device == "cuda":
            torch.cuda.empty_cache()

    fastest_base = min(v["median_ms"] for k, v in runs.items() if k.startswith("inductor"))
    runs = {k: runs[k] for k in sorted(runs, key=lambda k: (not k.startswith("inductor"), k))}
    for v in runs.values():
        v["speedup_vs_fastest_inductor"] = fastest_base / v["median_ms"]
    result = {
        "benchmark": "e2e_wan", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python3 benchmarks/e2e_wan.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "triton": _version("triton"), "diffusers": _version("diffusers"),
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
        "grid": grid.to_dict(), "text_tokens": text_tokens, "dtype": str(dtype),
        "plan": {"pattern": pattern.to_dict(), "block": block, "density": density, "quant": args.quant,
                 "sites_per_block": [s.site_id for s in self_sites]},
        "runs": runs,
    }
    if not args.tiny:
        _write_json(Path(args.json), result)
        _write_markdown(Path(args.markdown), result)
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "top_kernels_ms"} for k, v in runs.items()},
                     indent=1))
    return 0


def _capture_block_inputs(model, inputs):
    """The positional/keyword inputs of model.blocks[0] in one forward (to find a block's sites)."""
    captured = {}

    def hook(module, args, kwargs):
        captured["args"], captured["kwargs"] = args, kwargs
        raise _Captured

    handle = model.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(*inputs, return_dict=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    if captured.get("kwargs"):
        raise RuntimeError(f"block takes keyword inputs {sorted(captured['kwargs'])}: extend the probe")
    return captured["args"]


class _Captured(Exception):
    pass


def _version(pkg: str) -> str:
    try:
        from importlib.metadata import version

        return version(pkg)
    except Exception:  # noqa: BLE001 - a missing package is reported as such
        return "not installed"


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _write_markdown(path: Path, r) -> None:
    """Replace (or append) the section '## End-to-end: Wan2.1-1.3B forward' of BENCHMARKS.md."""
    title = "## End-to-end: Wan2.1-1.3B forward"
    lines = [title, "",
             f"`{r['command']}` on {r['gpu']}, {r['date']}, torch {r['torch']}, triton {r['triton']}, "
             f"diffusers {r['diffusers']}. One transformer forward, bf16, grid {r['grid']['frames']}x"
             f"{r['grid']['height']}x{r['grid']['width']} = 32760 video tokens + {r['text_tokens']} text tokens "
             f"(cross-attention); random weights; median of CUDA-event timings. vsopt plan: every self-attention "
             f"head a {r['plan']['pattern']} window, {r['plan']['block']}x{r['plan']['block']} blocks, measured "
             f"density {r['plan']['density']:.3f}, quant {r['plan']['quant']}; cross-attention dense.", "",
             "| config | ms | speedup vs fastest Inductor | cosine vs Inductor | attention ms | gemm ms | other ms |",
             "|---|---|---|---|---|---|---|"]
    for name, v in r["runs"].items():
        c = v["by_category_ms"]
        rest = sum(t for k, t in c.items() if k not in ("attention", "gemm"))
        lines.append(f"| {name} | {v['median_ms']:.1f} | {v['speedup_vs_fastest_inductor']:.2f}x | "
                     f"{v['cosine_vs_inductor']:.4f} | {c.get('attention', 0):.1f} | {c.get('gemm', 0):.1f} | {rest:.1f} |")
    vs = [k for k in r["runs"] if k.startswith("vsopt-d")]
    if vs:
        lines += ["", f"Where the time of `{vs[0]}` goes (GPU kernel ms by category): "
                  + ", ".join(f"{k} {t:.1f}" for k, t in r["runs"][vs[0]]["by_category_ms"].items()) + "."]
    update_section(path, title, "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
