"""Attention kernel benchmark on the GPU: vsopt's block-sparse op (bf16, INT8-QK, FP8, INT8 P V; the bf16 row
names the kernel the op's route took, kernels/block_sparse/route.py; where that is the Gluon kernel the op
with the route off, the Triton kernel, is timed beside it as vsopt_none_triton; and Gluon variants called
directly, v1 and v2, as vsopt_gluon_v1_none / vsopt_gluon_v2_none) side by side
with cuDNN SDPA, FlashAttention-3 (fa3-fwd, bf16 and FP8), FlashAttention-4 (flash-attn-4, CuTe DSL:
dense and block-sparse with the same table), SageAttention 1.0.6 and FlexAttention with the same block
mask, on the reference workloads of WORKLOADS.md; writes JSON and the "Attention kernels" section of
BENCHMARKS.md. FlashAttention-4 runs where its wheels are installed (on the GPU machine:
benchmarks/fetch_fa4_wheels.sh here, then `VSOPT_FA4=1 source benchmarks/gpu_env.sh` in two runs, see
that script); without them its rows are listed under "Not run" with the import error.

    python3 benchmarks/attention.py --workloads wan480,cog720 --out benchmarks/results/attention.json

Useful TFLOP/s = 4 * B * H * N^2 * D * density / time, density = the fraction of (query block,
key block) pairs the mask keeps (as run). Accuracy (cosine, relative L2) is against float32 attention
with the same mask on the same random normal inputs, at every density (structured inputs: the quant
part of tests/kernels/gpu_check.py). Times: GPU time, the median of CUDA-graph
replays (triton.testing.do_bench_cudagraph), for every kernel alike; for vsopt also the eager
time of one op call (do_bench, L2 flushed), which adds the host-side launch work. vsopt's times
include its quantization kernels and reuse the work order of a static table (see work_order).

Mask ("3D window"): tokens are in raster order (frame, row, column) after the text tokens; each
128-token block gets the centre (f, y, x) of its video tokens. Query block i keeps the
ceil(density * KB) key blocks nearest to it by a weighted Chebyshev distance
max(|df| * wf, |dy| * wy, |dx| * wx) (each axis scaled by its extent; the weights change per head, so
heads have different window shapes: wide in time, wide in space). The diagonal block (distance 0)
and every block holding text tokens are always kept. Density 1.0 keeps every block.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from markdown_section import update_section  # noqa: E402  (a sibling script)


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    heads: int
    head_dim: int
    frames: int
    height: int
    width: int
    text_before: int = 0
    text_after: int = 0

    @property
    def n(self) -> int:
        return self.frames * self.height * self.width + self.text_before + self.text_after


WORKLOADS = {
    "wan480": Workload("wan480", 12, 128, 21, 30, 52),
    "cog720": Workload("cog720", 48, 64, 13, 30, 45, text_before=226),
    "hyv720": Workload("hyv720", 24, 128, 33, 45, 80, text_after=256),
    "wan720": Workload("wan720", 40, 128, 21, 45, 80),
}

# Per-head axis weights (time, rows, columns): heads cycle through these window shapes.
_HEAD_WEIGHTS = ((1.0, 1.0, 1.0), (0.3, 1.0, 1.0), (2.0, 0.7, 0.7), (1.0, 2.0, 0.5))


def window_block_mask(w: Workload, density: float, block: int, device) -> torch.Tensor:
    """bool (1, H, KB, KB) 3D-window block mask (see the module docstring)."""
    n = w.n
    nb = math.ceil(n / block)
    if density >= 1.0:
        return torch.ones(1, w.heads, nb, nb, dtype=torch.bool, device=device)
    tok = torch.arange(n, device=device)
    vid = tok - w.text_before
    is_text = (vid < 0) | (vid >= w.frames * w.height * w.width)
    vid = vid.clamp(0, w.frames * w.height * w.width - 1)
    coords = torch.stack([vid // (w.height * w.width) / w.frames, (vid // w.width) % w.height / w.height,
                          vid % w.width / w.width], 1).float()                          # (n, 3) in [0, 1)
    pad = nb * block - n
    weight = torch.nn.functional.pad((~is_text).float(), (0, pad)).view(nb, block)
    centre = (torch.nn.functional.pad(coords, (0, 0, 0, pad)).view(nb, block, 3) * weight[..., None]).sum(1)
    centre = centre / weight.sum(1).clamp_min(1)[:, None]
    text_block = torch.nn.functional.pad(is_text.float(), (0, pad)).view(nb, block).amax(1) > 0
    keep = max(1, math.ceil(density * nb))
    masks = []
    for h in range(w.heads):
        wt = torch.tensor(_HEAD_WEIGHTS[h % len(_HEAD_WEIGHTS)], device=device)
        dist = ((centre[:, None, :] - centre[None, :, :]).abs() * wt).amax(-1)   # (QB, KB)
        dist = dist.masked_fill(text_block[None, :], -1.0)                        # text: always kept
        dist.fill_diagonal_(-2.0)                                                 # diagonal: always kept
        nearest = dist.topk(keep, dim=1, largest=False).indices
        masks.append(torch.zeros(nb, nb, dtype=torch.bool, device=device).scatter(1, nearest, True)
                     | (dist < 0))
    return torch.stack(masks)[None]


BLOCK = 128
MODES = ("none", "int8", "fp8", "int8_fp8", "int8_int8")
#: What --gluon times beside the op (bf16): "triton" = the op with the Gluon route switched off (the
#: Triton kernel; timed only where the route takes the Gluon kernel), v1 = the Gluon kernel called directly
#: in the first GPU run's variant (one program per row, ping-pong consumers), v2 = the Gluon kernel called
#: directly in the variant measured fastest at the workload's head dim (gluon_launch.default_config: the
#: route's at head_dim 128).
GLUON_VARIANTS = ("triton", "v1", "v2")


def gluon_config(variant: str, head_dim: int):
    from vsopt.kernels.block_sparse import gluon_launch
    if variant == "v1":
        return gluon_launch.GluonConfig(2, False, True)
    return gluon_launch.default_config(head_dim)


def _route_off(fn):
    """fn with the block-sparse ops' Gluon route switched off while it runs (captured or eager)."""
    from vsopt.kernels.block_sparse import route

    def call():
        with route.switched(False):
            return fn()
    return call


def _bench(fn, rep_ms: float) -> float:
    """GPU time of fn in ms: median over replays of a CUDA graph (launch overhead excluded, as under
    torch.compile with CUDA graphs); plain do_bench (events, L2 flushed) if fn cannot be captured."""
    import triton.testing
    fn()
    torch.cuda.synchronize()
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")
    except Exception:  # noqa: BLE001 - not capturable: time it eagerly
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, warmup=max(25, rep_ms / 4), rep=rep_ms, return_mode="median")


def _bench_eager(fn, rep_ms: float) -> float:
    """Eager time of fn in ms (do_bench: events around each call, L2 flushed): includes the
    host-side work when it is longer than the GPU work."""
    import triton.testing
    return triton.testing.do_bench(fn, warmup=max(25, rep_ms / 4), rep=rep_ms, return_mode="median")


def _accuracy(out: torch.Tensor, ref: torch.Tensor) -> dict:
    o, r = out.float().flatten(), ref.float().flatten()
    return {"cosine": float(torch.nn.functional.cosine_similarity(o, r, dim=0)),
            "rel_l2": float((o - r).norm() / r.norm())}


def reference_attention(q, k, v, block_mask, scale, chunk=4096):
    """float32 attention with a (1, H, QB, KB) block mask, chunked over queries (N^2 never materialised)."""
    B, H, N, D = q.shape
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for h in range(H):
        kh, vh = k[:, h].float(), v[:, h].float()
        for s in range(0, N, chunk):
            e = min(N, s + chunk)
            qb = torch.arange(s, e, device=q.device) // BLOCK
            allowed = block_mask[0, h][qb].repeat_interleave(BLOCK, dim=1)[:, :N]            # (chunk, N)
            scores = (q[:, h, s:e].float() @ kh.transpose(-1, -2)) * scale
            scores = scores.masked_fill(~allowed, float("-inf"))
            out[:, h, s:e] = torch.softmax(scores, dim=-1) @ vh
    return out


def _peers():
    """Optional peers that load here: name -> callable(q, k, v, scale) in (B, H, N, D), or the reason."""
    peers, missing = {}, {}
    try:
        from sageattention import sageattn
        peers["sage1.0.6_int8"] = lambda q, k, v, s: sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=s)
    except Exception as e:  # noqa: BLE001 - a peer that does not load is recorded, not fatal
        missing["sageattention"] = repr(e)[:200]
    try:
        from fa3_fwd_interface import flash_attn_func

        def fa3(q, k, v, s):
            return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=s)

        def fa3_fp8(q, k, v, s, cache={}):
            key = (q.data_ptr(), k.data_ptr(), v.data_ptr())
            if key not in cache:   # inputs cast once, outside the timed region (per-tensor unit scales)
                cache.clear()
                cache[key] = [t.transpose(1, 2).contiguous().to(torch.float8_e4m3fn) for t in (q, k, v)]
            qf, kf, vf = cache[key]
            return flash_attn_func(qf, kf, vf, softmax_scale=s)
        peers["fa3_bf16"] = fa3
        peers["fa3_fp8"] = fa3_fp8
    except Exception as e:  # noqa: BLE001
        missing["fa3-fwd"] = repr(e)[:200]
    return peers, missing


def _fa4():
    """FlashAttention-4's interface (flash_attn.cute), or the reason it does not load."""
    try:
        from flash_attn.cute import flash_attn_func
        from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch
        return (flash_attn_func, BlockSparseTensorsTorch), None
    except Exception as e:  # noqa: BLE001 - a peer that does not load is recorded, not fatal
        return None, repr(e)[:200]


def _fa4_out(result):
    return result[0] if isinstance(result, tuple) else result   # (out, lse) in flash-attn-4 4.0.0b36


def _fa4_block_sparse(fa4, qt, kt, vt, kv_indices, kv_counts, scale, n):
    """FA4's block-sparse forward on vsopt's table: every listed block as a 'full' block (no mask_mod;
    FA4 masks the ragged sequence end itself), no partial blocks. qt/kt/vt: (B, N, H, D) contiguous.
    FA4 wants index tensors with one column per key block: the table is zero-padded to that width."""
    flash_attn_func, BlockSparseTensorsTorch = fa4
    B = qt.shape[0]
    kb = math.ceil(n / BLOCK)
    idx = torch.zeros(*kv_indices.shape[:3], kb, dtype=torch.int32, device=qt.device)
    idx[..., :kv_indices.shape[3]] = kv_indices
    idx, cnt = idx.expand(B, -1, -1, -1).contiguous(), kv_counts.expand(B, -1, -1).contiguous()
    tensors = BlockSparseTensorsTorch(mask_block_cnt=torch.zeros_like(cnt), mask_block_idx=torch.zeros_like(idx),
                                      full_block_cnt=cnt, full_block_idx=idx, block_size=(BLOCK, BLOCK))
    return lambda: _fa4_out(flash_attn_func(qt, kt, vt, softmax_scale=scale, block_sparse_tensors=tensors))


def _flex(q, k, v, kv_indices, kv_counts, scale, n):
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
    compiled = torch.compile(flex_attention, dynamic=False)
    bm = BlockMask.from_kv_blocks(kv_counts.expand(q.shape[0], -1, -1).contiguous(),
                                  kv_indices.expand(q.shape[0], -1, -1, -1).contiguous(),
                                  BLOCK_SIZE=BLOCK, seq_lengths=(n, n))
    return lambda: compiled(q, k, v, block_mask=bm, scale=scale)


def run_workload(w: Workload, densities, modes, accuracy: bool, rep_ms: float, log,
                 gluon_variants=GLUON_VARIANTS) -> dict:
    import vsopt.core  # noqa: F401  (registers torch.ops.vsopt.*)
    from vsopt.core import ops as vsopt_ops
    from vsopt.kernels.block_sparse import launch as bsa_launch
    from vsopt.kernels.quant import launch as quant_launch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev = "cuda"
    torch.manual_seed(0)
    B, H, N, D = 1, w.heads, w.n, w.head_dim
    q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
    scale = D ** -0.5
    dense_flops = 4 * B * H * N * N * D
    res = {"workload": dataclasses.asdict(w), "n": N, "dense": {}, "sparse": []}

    def record(where, name, ms, density, extra=None):
        row = {"name": name, "ms": ms, "density": density,
               "useful_tflops": dense_flops * density / (ms * 1e-3) / 1e12, **(extra or {})}
        where.append(row) if isinstance(where, list) else where.__setitem__(name, row)
        log(f"{w.name} d={density:.3f} {name:>22}: {ms:8.3f} ms  {row['useful_tflops']:6.0f} TFLOP/s "
            + " ".join(f"{k}={v:.5f}" for k, v in (extra or {}).items() if isinstance(v, float)))
        return row

    with torch.no_grad():
        dense_ref = reference_attention(q, k, v, torch.ones(1, H, 1, 1, dtype=torch.bool, device=dev).expand(
            1, H, math.ceil(N / BLOCK), math.ceil(N / BLOCK)), scale) if accuracy else None
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            record(res["dense"], "cudnn_sdpa", _bench(lambda: torch.nn.functional.scaled_dot_product_attention(
                q, k, v, scale=scale), rep_ms), 1.0)
        peers, missing = _peers()
        res["peers_missing"] = missing
        for name, fn in peers.items():
            try:
                ms = _bench(lambda: fn(q, k, v, scale), rep_ms)
                extra = {}
                if accuracy:
                    out = fn(q, k, v, scale)
                    out = out.transpose(1, 2) if name.startswith("fa3") else out
                    extra = _accuracy(out, dense_ref)
                record(res["dense"], name, ms, 1.0, extra)
            except Exception as e:  # noqa: BLE001
                res["peers_missing"][name] = repr(e)[:200]
                log(f"{name} failed: {e!r}"[:300])
        fa4, fa4_missing = _fa4()
        qt = kt = vt = None
        if fa4 is None:
            res["peers_missing"]["flash-attn-4"] = fa4_missing
        else:   # (B, N, H, D) copies made once, outside the timed region
            qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
            try:
                fn = lambda: _fa4_out(fa4[0](qt, kt, vt, softmax_scale=scale))  # noqa: E731
                ms = _bench(fn, rep_ms)
                record(res["dense"], "fa4_bf16", ms, 1.0,
                       _accuracy(fn().transpose(1, 2), dense_ref) if accuracy else {})
            except Exception as e:  # noqa: BLE001
                res["peers_missing"]["fa4_bf16"] = repr(e)[:200]
                log(f"fa4_bf16 failed: {e!r}"[:300])
        best_dense = min(r["ms"] for r in res["dense"].values() if not r["name"].endswith("fp8"))
        res["best_dense_bf16_ms"] = best_dense

        for density in densities:
            mask = window_block_mask(w, density, BLOCK, dev)
            kv_indices, kv_counts = torch.ops.vsopt.mask_to_table(mask)
            real_density = float(mask.float().mean())
            ref = reference_attention(q, k, v, mask, scale) if accuracy else None
            table_ms = _bench(lambda: torch.ops.vsopt.mask_to_table(mask), rep_ms)
            order_ms = _bench(lambda: bsa_launch.work_order(kv_counts.clone(), B), rep_ms)   # clone: no cache
            for mode in modes:
                op = lambda mode=mode: torch.ops.vsopt.block_sparse_attention(  # noqa: E731
                    q, k, v, kv_indices, kv_counts, scale, BLOCK, BLOCK, mode)
                kernel, why = vsopt_ops.block_sparse_route(q, k, v, BLOCK, BLOCK, mode)
                runs = [(f"vsopt_{mode}", op, kernel, why)]
                if kernel == "gluon" and "triton" in gluon_variants:   # the same op with the route off
                    runs.append((f"vsopt_{mode}_triton", _route_off(op), "triton", "the Gluon route switched off"))
                for name, fn, kernel, why in runs:
                    ms = _bench(fn, rep_ms)
                    extra = {"table_ms": table_ms, "order_ms": order_ms, "eager_ms": _bench_eager(fn, rep_ms)}
                    if mode != "none":
                        extra["quant_ms"] = _bench(lambda: quant_launch.quantize_qkv(q, k, v, mode, BLOCK, BLOCK),
                                                   rep_ms)
                    if ref is not None:
                        extra.update(_accuracy(fn(), ref))
                    row = record(res["sparse"], name, ms, real_density, extra)
                    row.update(speedup_vs_best_dense=best_dense / ms, kernel=kernel, route=why)
            for variant in [x for x in gluon_variants if x != "triton"] if "none" in modes else ():   # bf16 only
                name = f"vsopt_gluon_{variant}_none"
                try:
                    from vsopt.kernels.block_sparse import gluon_launch
                    config = gluon_config(variant, D)
                    fn = lambda: gluon_launch.block_sparse_attention_gluon(  # noqa: E731
                        q, k, v, kv_indices, kv_counts, scale, BLOCK, BLOCK, config=config)[0]
                    ms = _bench(fn, rep_ms)
                    extra = _accuracy(fn(), ref) if ref is not None else {}
                    row = record(res["sparse"], name, ms, real_density, extra)
                    row["speedup_vs_best_dense"] = best_dense / ms
                    row["config"] = str(config)
                except Exception as e:  # noqa: BLE001 - not a Hopper GPU, not Triton 3.6: recorded
                    log(f"gluon kernel {variant} failed: {e!r}"[:300])
                    res.setdefault("peers_missing", {})[name] = repr(e)[:200]
            try:
                flex = _flex(q, k, v, kv_indices, kv_counts, scale, N)
                ms = _bench(flex, rep_ms)
                extra = _accuracy(flex(), ref) if ref is not None else {}
                row = record(res["sparse"], "flex_attention", ms, real_density, extra)
                row["speedup_vs_best_dense"] = best_dense / ms
            except Exception as e:  # noqa: BLE001
                log(f"flex failed: {e!r}"[:300])
                res.setdefault("peers_missing", {})["flex_attention"] = repr(e)[:200]
            if fa4 is not None:
                try:
                    fn = _fa4_block_sparse(fa4, qt, kt, vt, kv_indices, kv_counts, scale, N)
                    ms = _bench(fn, rep_ms)
                    extra = _accuracy(fn().transpose(1, 2), ref) if ref is not None else {}
                    row = record(res["sparse"], "fa4_block_sparse", ms, real_density, extra)
                    row["speedup_vs_best_dense"] = best_dense / ms
                except Exception as e:  # noqa: BLE001
                    log(f"fa4 block-sparse failed: {e!r}"[:300])
                    res["peers_missing"]["fa4_block_sparse"] = repr(e)[:200]
            del mask, kv_indices, kv_counts, ref
            torch.cuda.empty_cache()
        res["autotuned"] = {str(k): str(v) for k, v in bsa_launch._tuned_kernel.cache.items()}
    return res


def _fmt(row: dict, key: str, digits: int) -> str:
    return f"{row[key]:.{digits}f}" if key in row else ""


def markdown(results: dict) -> str:
    lines = ["## Attention kernels", "",
             f"Command: `{results['command']}`  ",
             f"Date: {results['date']}; GPU: {results['gpu']}; torch {results['torch']}, triton {results['triton']}  ",
             "Mask: 3D window (per-head window shapes, diagonal and text blocks kept; see benchmarks/attention.py), "
             "block 128x128, B=1, random normal bf16 inputs. Times: GPU time (median of CUDA-graph replays); vsopt's "
             "include its quantization kernels; 'eager ms' is one eager op call (host launch work included). "
             "Useful TFLOP/s = 4*B*H*N^2*D*density/time; speedup is over the fastest dense bf16 kernel. Accuracy vs "
             "float32 with the same mask (every density; dense peers vs dense float32). quant ms: the "
             "quantization kernels alone (part of the vsopt time).", ""]
    for res in results["workloads"]:
        w = res["workload"]
        lines += [f"### {w['name']} (H={w['heads']}, N={res['n']}, D={w['head_dim']})", "",
                  "| kernel | density | ms | useful TFLOP/s | speedup vs best dense | cosine | rel L2 | eager ms | quant ms |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in res["dense"].values():
            lines.append(f"| {r['name']} (dense) | 1.0 | {r['ms']:.3f} | {r['useful_tflops']:.0f} | "
                         f"{res['best_dense_bf16_ms'] / r['ms']:.2f} | {_fmt(r, 'cosine', 5)} | "
                         f"{_fmt(r, 'rel_l2', 4)} | | |")
        for r in res["sparse"]:
            kernel = f" ({r['kernel']} kernel)" if r.get("kernel") else ""
            lines.append(f"| {r['name']}{kernel} | {r['density']:.3f} | {r['ms']:.3f} | {r['useful_tflops']:.0f} | "
                         f"{r['speedup_vs_best_dense']:.2f} | {_fmt(r, 'cosine', 5)} | {_fmt(r, 'rel_l2', 4)} | "
                         f"{_fmt(r, 'eager_ms', 3)} | {_fmt(r, 'quant_ms', 3)} |")
        if res.get("peers_missing"):
            lines.append("")
            lines.append("Not run: " + "; ".join(f"{k}: {v}" for k, v in res["peers_missing"].items()))
        lines.append("")
    return "\n".join(lines)


def _atomic_write(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    import triton
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default="wan480,cog720")
    p.add_argument("--densities", default="0.1,0.2,0.3,0.5,1.0")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--no-accuracy", action="store_true")
    p.add_argument("--gluon", default=",".join(GLUON_VARIANTS),
                   help="beside the op (whose bf16 row takes the route's kernel): triton (the op with the Gluon route "
                        "off, where the route takes Gluon), v1, v2 (Gluon variants called directly; see GLUON_VARIANTS); "
                        "empty: none. Run tests/kernels/gpu_check_gluon.py first on a new variant: it guards against "
                        "a hang in a child process, this script does not")
    p.add_argument("--rep-ms", type=float, default=200.0)
    p.add_argument("--out", default="benchmarks/results/attention.json")
    p.add_argument("--markdown", default="BENCHMARKS.md", help="file whose 'Attention kernels' section is rewritten")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/attention.py needs a CUDA GPU", file=sys.stderr)
        return 2
    results = {"command": "python3 benchmarks/attention.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "workloads": []}
    log = lambda s: print(s, flush=True)  # noqa: E731
    for name in args.workloads.split(","):
        results["workloads"].append(run_workload(
            WORKLOADS[name], [float(d) for d in args.densities.split(",")], args.modes.split(","),
            not args.no_accuracy and name != "hyv720", args.rep_ms, log,
            tuple(x for x in args.gluon.split(",") if x)))
        _atomic_write(args.out, json.dumps(results, indent=1))
    section = markdown(results)
    if args.markdown:
        update_section(args.markdown, "## Attention kernels", section + "\n")
    print(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
