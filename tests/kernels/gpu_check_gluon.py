"""GPU check of the Gluon block-sparse kernel: correctness against the references, then speed
against the Triton kernel, in one run (about 2-3 minutes on an H200); and the ops' route to it.

    python3 tests/kernels/gpu_check_gluon.py [--out DIR] [--parts correct,speed]
    python3 tests/kernels/gpu_check_gluon.py --parts op      (the ops' route alone, < 150 s; see op_part)

Needs a Hopper GPU and Triton 3.6 (the Gluon kernel cannot run in the interpreter). Correctness:
every variant (gluon_launch.CONFIGS) on small shapes with odd N, GQA, a batched table, a skipped head,
an empty key block, fp16 and bf16, head dims 64 and 128, 128x128 and 128x64 table blocks, against
reference.py in float32 (out and lse); at the workload shapes (wan480, cog720) against the Triton
kernel and a chunked float32 reference at density 0.2. Speed: wan480 (1, 12, 32760, 128) and cog720
(1, 48, 17776, 64), bf16, a random 128x128 block mask plus the diagonal at densities 0.1 / 0.2 / 0.5 /
1.0 (the same mask for every kernel), CUDA events, the median of REPS calls after warm-up; useful
TFLOP/s = 4 B H N^2 D density / time, with the density actually run. Writes gpu_check_gluon.json under
--out (default $OUT, else the current folder; gpu_check_gluon_op.json for --parts op alone); exit
status 1 if any correctness check fails.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import vsopt.core  # noqa: E402,F401  (registers torch.ops.vsopt.*)
from vsopt.core.timing import median_ms  # noqa: E402
from gpu_check import chunked_reference, random_mask  # noqa: E402
from vsopt.kernels.block_sparse import gluon_launch  # noqa: E402
from vsopt.kernels.block_sparse import launch as bsa_launch  # noqa: E402
from vsopt.kernels.block_sparse import reference as bsa_ref  # noqa: E402

BOUND = 1e-2          # relative L2 of the bf16/fp16 kernel against float32 (output rounding is ~3e-3)
LSE_BOUND = 2e-2      # max abs error of the natural-log lse
REPS = 20
WORKLOADS = {"wan480": (1, 12, 32760, 128), "cog720": (1, 48, 17776, 64)}
DENSITIES = (0.1, 0.2, 0.5, 1.0)
failures: list[str] = []
results: dict = {"correctness": [], "speed": []}


def rel_l2(out, ref):
    o, r = out.float().flatten(), ref.float().flatten()
    return float((o - r).norm() / r.norm().clamp_min(1e-30)), bool(torch.isfinite(o).all())


def record(case: str, ok: bool, detail: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'} {case:<78} {detail}", flush=True)
    results["correctness"].append({"case": case, "ok": ok, "detail": detail})
    if not ok:
        failures.append(case)


def run(q, k, v, idx, cnt, scale, bm, bn, config, with_lse=False, num_sms=None):
    return gluon_launch.block_sparse_attention_gluon(q, k, v, idx, cnt, scale, bm, bn, with_lse=with_lse,
                                                     config=config, num_sms=num_sms)


QUICK_CONFIGS = (gluon_launch.GluonConfig(2, False, True), gluon_launch.GluonConfig(2, False, True, persistent=True),
                 gluon_launch.GluonConfig(2, True, True, True, persistent=True))
# --small iterate: two shapes, every variant (a shorter run: 128x64 table, fp16, GQA off, batched table,
# (B, N, H, D) views; and 128x128, bf16, GQA, odd N at head_dim 128).
ITERATE_SHAPES = [(2, 4, 4, 777, 128, 64, torch.float16, 2), (1, 6, 3, 2049, 128, 128, torch.bfloat16, 1)]
SMOKE_SHAPE = [(1, 4, 1, 300, 64, 128, torch.float16, 1)]


def small_cases(configs, shapes=None):
    dev = "cuda"
    shapes = shapes or [  # B, Hq, Hkv, N, D, block_n, dtype, Bt
        (2, 8, 2, 1000, 64, 128, torch.bfloat16, 1), (2, 4, 4, 777, 128, 64, torch.float16, 2),
        (1, 6, 3, 2049, 128, 128, torch.bfloat16, 1), (1, 4, 1, 300, 64, 128, torch.float16, 1),
        (1, 2, 2, 1024, 128, 128, torch.bfloat16, 1), (1, 3, 3, 4000, 64, 64, torch.bfloat16, 1)]
    for B, Hq, Hkv, N, D, bn, dtype, bt in shapes:
        torch.manual_seed(N)
        q = torch.randn(B, Hq, N, D, device=dev, dtype=dtype)
        k, v = (torch.randn(B, Hkv, N, D, device=dev, dtype=dtype) for _ in range(2))
        k[:, :, 5] *= 8                  # a dominant key
        q[:, 0] *= 6                     # large magnitudes in one head
        mask = random_mask(bt, Hq, math.ceil(N / 128), math.ceil(N / bn), 0.3, dev)
        mask[..., -1] = False            # a key block no query visits (the ragged one)
        mask[..., 0, -1] = True          # ... except one row
        mask[:, 1 % Hq] = False          # a skipped head (all counts 0)
        idx, cnt = torch.ops.vsopt.mask_to_table(mask)
        ref, ref_lse = bsa_ref.block_sparse_attention(q.float(), k.float(), v.float(), idx, cnt, D ** -0.5, 128, bn)
        case = f"B{B} Hq{Hq} Hkv{Hkv} N{N} D{D} 128x{bn} {str(dtype)[6:]} Bt{bt}"
        # Every variant on four shapes (the smoke run's among them), three on the others (compile time).
        some = [c for c in configs if c in QUICK_CONFIGS]
        for config in (configs if (N, D) in ((1000, 64), (2049, 128), (777, 128), (300, 64)) else some):
            name = f"{case} {config}"
            if gluon_launch.shared_bytes(D, bn, config.stages) > 227 * 1024:
                continue
            try:
                out, lse = run(q, k, v, idx, cnt, D ** -0.5, 128, bn, config, with_lse=True)
                torch.cuda.synchronize()
            except Exception as e:  # a compile or launch failure is a failed check, with its reason
                record(name, False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                traceback.print_exc()
                continue
            rel, finite = rel_l2(out, ref)
            both_inf = torch.isinf(lse) & torch.isinf(ref_lse)
            lse_err = float((lse - ref_lse).masked_fill(both_inf, 0).abs().max())
            skipped_zero = bool(out[:, 1 % Hq].eq(0).all())
            ok = finite and rel <= BOUND and lse_err <= LSE_BOUND and skipped_zero
            record(name, ok, f"rel_l2 {rel:.2e} lse_err {lse_err:.2e} skipped head zero {skipped_zero}")
            if config.persistent:   # 3 programs: each loops over several rows (ring, Q hand-back, turns)
                out3, _ = run(q, k, v, idx, cnt, D ** -0.5, 128, bn, config, with_lse=True, num_sms=3)
                torch.cuda.synchronize()
                rel3, finite3 = rel_l2(out3, ref)
                record(f"{case} 3 programs {config}", finite3 and rel3 <= BOUND, f"rel_l2 {rel3:.2e}")
        # A (B, N, H, D) view, the layout of a projection's output (strided q, k, v and output).
        q2, k2, v2 = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
        for config in some:
            out, _ = run(q2, k2, v2, idx, cnt, D ** -0.5, 128, bn, config)
            rel, finite = rel_l2(out, ref)
            record(f"{case} (B, N, H, D) views {config}", finite and rel <= BOUND,
                   f"rel_l2 {rel:.2e} out strides {tuple(out.stride())}")


def workload_correctness(configs):
    for name, (B, H, N, D) in WORKLOADS.items():
        torch.manual_seed(0)
        q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        nb = math.ceil(N / 128)
        mask = random_mask(1, H, nb, nb, 0.2, "cuda")
        idx, cnt = torch.ops.vsopt.mask_to_table(mask)
        ref = chunked_reference(q, k, v, mask, D ** -0.5, 128)
        tri = triton_kernel(q, k, v, idx, cnt, D ** -0.5)
        rel_t, _ = rel_l2(tri, ref)
        for config in configs:
            if gluon_launch.shared_bytes(D, 128, config.stages) > 227 * 1024:
                continue
            out, _ = run(q, k, v, idx, cnt, D ** -0.5, 128, 128, config)
            rel, finite = rel_l2(out, ref)
            rel_vs_triton, _ = rel_l2(out, tri)
            record(f"{name} density 0.2 {config}", finite and rel <= BOUND,
                   f"rel_l2 {rel:.2e} (triton kernel {rel_t:.2e}; gluon vs triton {rel_vs_triton:.2e})")
        out, _ = bsa_launch.block_sparse_attention(q, k, v, idx, cnt, D ** -0.5, 128, 128, kernel="gluon")
        rel, finite = rel_l2(out, ref)
        record(f"{name} density 0.2 launch.block_sparse_attention(kernel='gluon')", finite and rel <= BOUND,
               f"rel_l2 {rel:.2e} ({gluon_launch.default_config(D)})")


def triton_kernel(q, k, v, idx, cnt, scale, block_n=128):
    """The Triton kernel through torch.ops.vsopt (its host launch work included, as the Gluon launcher's):
    the op with the Gluon route switched off (kernels/block_sparse/route.py)."""
    from vsopt.kernels.block_sparse import route

    with route.switched(False):
        return torch.ops.vsopt.block_sparse_attention(q, k, v, idx, cnt, scale, 128, block_n, "none")


def bench(fn, reps=REPS):
    return median_ms(fn, reps)   # CUDA events, after one warm-up call


def save(out: pathlib.Path, t0: float, name: str = "gpu_check_gluon.json") -> None:
    """Rewrite the JSON (after every part: a run cut short still leaves what it measured)."""
    results["failures"] = failures
    results["seconds"] = time.time() - t0
    (out / name).write_text(json.dumps(results, indent=1))


def speed(configs, workloads, out=None, t0=0.0):
    for name in workloads:
        B, H, N, D = WORKLOADS[name]
        torch.manual_seed(0)
        q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        nb = math.ceil(N / 128)
        for density in DENSITIES:
            mask = random_mask(1, H, nb, nb, density, "cuda")
            idx, cnt = torch.ops.vsopt.mask_to_table(mask)
            run_density = float(cnt.sum()) / (H * nb * nb)
            flops = 4 * B * H * N * N * D * run_density
            row = {"workload": name, "shape": [B, H, N, D], "density": density, "density_run": run_density}
            ms = bench(lambda: triton_kernel(q, k, v, idx, cnt, D ** -0.5))
            row["triton"] = {"ms": ms, "tflops": flops / ms / 1e9}
            tri = triton_kernel(q, k, v, idx, cnt, D ** -0.5) if density == 0.2 else None
            for config in configs:
                if gluon_launch.shared_bytes(D, 128, config.stages) > 227 * 1024:
                    continue
                try:
                    ms = bench(lambda: run(q, k, v, idx, cnt, D ** -0.5, 128, 128, config))
                    row[str(config)] = {"ms": ms, "tflops": flops / ms / 1e9}
                    if tri is not None:   # at scale, against the Triton kernel (both ~3e-3 from float32)
                        rel, finite = rel_l2(run(q, k, v, idx, cnt, D ** -0.5, 128, 128, config)[0], tri)
                        record(f"{name} density 0.2 vs the Triton kernel {config}", finite and rel <= BOUND,
                               f"rel_l2 {rel:.2e}")
                except Exception as e:
                    row[str(config)] = {"error": f"{type(e).__name__}: {e}"[:300]}
            results["speed"].append(row)
            cells = "  ".join(f"{key.replace('GluonConfig', 'gluon')}: {val['ms']:.3f} ms {val['tflops']:.0f} TF/s"
                              if "ms" in val else f"{key}: {val['error'][:80]}"
                              for key, val in row.items() if isinstance(val, dict))
            print(f"SPEED {name} density {density} (run {run_density:.3f})  {cells}", flush=True)
            if out is not None:
                save(out, t0)


# ----------------------------------------------------------------------------- the ops' route (--parts op)
OP_SHAPES = [  # B, Hq, Hkv, N, D, block_n, dtype, Bt, (B, N, H, D) views
    (1, 6, 3, 2049, 128, 128, torch.bfloat16, 1, False), (2, 4, 4, 777, 128, 64, torch.float16, 2, False),
    (1, 4, 2, 300, 128, 128, torch.bfloat16, 1, True), (1, 8, 2, 1000, 64, 128, torch.bfloat16, 1, False)]
OP_TIMED = [(0.2, 128), (1.0, 128), (0.2, 64)]   # (density, block_n) of the wan480 timings
OP_BUDGET_S = 120                                 # timings not started by then are recorded as skipped


def _op_inputs(B, Hq, Hkv, N, D, bn, dtype, bt, views, device, density=0.3):
    torch.manual_seed(N + D)
    q = torch.randn(B, Hq, N, D, device=device, dtype=dtype)
    k, v = (torch.randn(B, Hkv, N, D, device=device, dtype=dtype) for _ in range(2))
    if views:   # the layout of a projection's output
        q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    mask = random_mask(bt, Hq, math.ceil(N / 128), math.ceil(N / bn), density, device)
    mask[:, 1 % Hq] = False          # a skipped head
    idx, cnt = torch.ops.vsopt.mask_to_table(mask)
    return q, k, v, idx, cnt


def _launches(fn):
    """fn's result and the kernel launches the ops made meanwhile (ops.KERNEL_LAUNCHES)."""
    from vsopt.core import ops

    before = dict(ops.KERNEL_LAUNCHES)
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, {k: n - before.get(k, 0) for k, n in ops.KERNEL_LAUNCHES.items() if n != before.get(k, 0)}


def _failed(case: str, e: Exception) -> None:
    record(case, False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    traceback.print_exc()


def op_part(out_dir=None, t0=0.0, device="cuda", shapes=OP_SHAPES, workload=WORKLOADS["wan480"], timed=OP_TIMED,
            rounds=3, iters=7, dtype=torch.bfloat16):
    """torch.ops.vsopt.block_sparse_attention(_lse) with the route of kernels/block_sparse/route.py: which
    kernel each call takes; eager, under torch.compile (Inductor, and vsopt's compile_fx) and under CUDA
    graphs (a captured eager call; torch.compile's cudagraph trees) against float32 references; then the
    op with the Gluon route against the op with the route off (the Triton kernel) at wan480, in
    interleaved rounds. device, shapes, workload, timed, rounds, iters, dtype (the workload's): the CPU test
    runs it small and in float16 (the interpreter's bfloat16 tl.dot is wrong, runtime.interpreter_bf16_dot_ok), with
    the Gluon launcher stubbed (tests/kernels/test_gluon_route.py); CUDA graphs on CUDA only."""
    from torch._inductor.utils import run_and_get_code

    from vsopt import inductor as vsopt_inductor
    from vsopt.core import ops
    from vsopt.core.timing import interleaved_ms
    from vsopt.kernels.block_sparse import route

    rec = results.setdefault("op", {"routes": {}, "timing": []})
    for name, (B, H, N, D) in WORKLOADS.items():
        x = torch.empty(B, H, N, D, device=device, dtype=torch.bfloat16)
        rec["routes"][name] = ops.block_sparse_route(x, x, x, 128, 128)
        print(f"ROUTE {name}: {rec['routes'][name]}", flush=True)
    for name, want in (("wan480", "gluon"), ("cog720", "triton")):
        record(f"route: {name} (head_dim {WORKLOADS[name][3]}) takes the {want} kernel",
               rec["routes"][name][0] == want, rec["routes"][name][1])

    # Eager, small shapes: odd N, GQA, 128x64 table, batched table, views, head_dim 64; out and lse.
    for shape in shapes:
        B, Hq, Hkv, N, D, bn, dtype, bt, views = shape
        case = f"op eager B{B} Hq{Hq} Hkv{Hkv} N{N} D{D} 128x{bn} {str(dtype)[6:]} Bt{bt}{' views' if views else ''}"
        try:
            q, k, v, idx, cnt = _op_inputs(*shape, device)
            ref, ref_lse = bsa_ref.block_sparse_attention(q.float(), k.float(), v.float(), idx, cnt, D ** -0.5, 128,
                                                          bn)
            want = "gluon" if D in route.ROUTE_HEAD_DIMS else "triton"
            plain, ran = _launches(lambda: torch.ops.vsopt.block_sparse_attention(q, k, v, idx, cnt, D ** -0.5, 128, bn))
            if want == "triton":   # the route is what is checked here (the Triton kernel's own checks are gpu_check.py)
                rel, finite = rel_l2(plain, ref)
                record(case, finite and rel <= BOUND and ran == {want: 1}, f"ran {ran} (want {want}) rel_l2 {rel:.2e}")
                continue
            (out, lse), ran_lse = _launches(lambda: torch.ops.vsopt.block_sparse_attention_lse(
                q, k, v, idx, cnt, D ** -0.5, 128, bn))
        except Exception as e:
            _failed(case, e)
            continue
        rel, finite = rel_l2(out, ref)
        rel_plain, finite_plain = rel_l2(plain, ref)
        both_inf = torch.isinf(lse) & torch.isinf(ref_lse)
        lse_err = float((lse - ref_lse).masked_fill(both_inf, 0).abs().max())
        ok = finite and finite_plain and max(rel, rel_plain) <= BOUND and lse_err <= LSE_BOUND \
            and ran == ran_lse == {want: 1} and out.stride() == plain.stride() == q.stride()
        record(case, ok, f"ran {ran}, with lse {ran_lse} (want {want}) rel_l2 {rel_plain:.2e} (with lse {rel:.2e}) "
                         f"lse_err {lse_err:.2e} out strides {tuple(out.stride())}")

    # The workload: eager and compiled at density 0.2, against the chunked float32 reference.
    B, H, N, D = workload
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype) for _ in range(3))
    nb = math.ceil(N / 128)
    mask = random_mask(1, H, nb, nb, 0.2, device)
    idx, cnt = torch.ops.vsopt.mask_to_table(mask)
    ref = chunked_reference(q, k, v, mask, D ** -0.5, 128)
    shape = "x".join(map(str, workload))
    eager, ran = _launches(lambda: torch.ops.vsopt.block_sparse_attention(q, k, v, idx, cnt, D ** -0.5, 128, 128))
    rel, finite = rel_l2(eager, ref)
    record(f"op eager {shape} density 0.2", finite and rel <= BOUND and ran == {"gluon": 1},
           f"ran {ran} rel_l2 {rel:.2e}")

    # Timing: the op with the Gluon route against the op with the route off, interleaved rounds.
    for density, bn in timed:
        if time.time() - t0 > OP_BUDGET_S:
            rec["timing"].append({"workload": shape, "density": density, "table": f"128x{bn}",
                                  "skipped": f"not timed: {time.time() - t0:.0f} s elapsed"})
            print(f"OP SPEED {shape} density {density} table 128x{bn}: skipped (time)", flush=True)
            continue
        kb = math.ceil(N / bn)
        t_mask = random_mask(1, H, nb, kb, density, device)
        t_idx, t_cnt = torch.ops.vsopt.mask_to_table(t_mask)
        run_density = float(t_cnt.sum()) / (H * nb * kb)
        flops = 4 * B * H * N * N * D * run_density

        def op_with(gluon, bn=bn, idx=t_idx, cnt=t_cnt):
            def call():
                with route.switched(gluon):
                    return torch.ops.vsopt.block_sparse_attention(q, k, v, idx, cnt, D ** -0.5, 128, bn)
            return call

        times = interleaved_ms({"gluon route": op_with(True), "triton (route off)": op_with(False)},
                               rounds=rounds, iters=iters, warmup=2)
        row = {"workload": shape, "density": density, "density_run": run_density, "table": f"128x{bn}"}
        for name, ts in times.items():
            ms = statistics.median(ts)
            row[name] = {"ms": ms, "tflops": flops / ms / 1e9}
        row["speedup"] = row["triton (route off)"]["ms"] / row["gluon route"]["ms"]
        rec["timing"].append(row)
        print(f"OP SPEED {shape} density {density} (run {run_density:.3f}) table 128x{bn}: "
              + "  ".join(f"{n}: {r['ms']:.3f} ms {r['tflops']:.0f} TF/s" for n, r in row.items() if isinstance(r, dict))
              + f"  speedup {row['speedup']:.2f}x", flush=True)

    def attend(q, k, v):
        return torch.ops.vsopt.block_sparse_attention(q, k, v, idx, cnt, D ** -0.5, 128, 128)

    def attend_lse(q, k, v):
        return torch.ops.vsopt.block_sparse_attention_lse(q, k, v, idx, cnt, D ** -0.5, 128, 128)

    def vsopt_compile_fx(gm, example_inputs):   # what backend="vsopt" hands Inductor (vsopt.inductor)
        return vsopt_inductor.compile_fx(gm, example_inputs)

    for name, fn, backend in (("inductor", attend, "inductor"), ("vsopt compile_fx, lse", attend_lse, vsopt_compile_fx)):
        case = f"op torch.compile ({name}) {shape} density 0.2"
        try:
            torch._dynamo.reset()
            res, code = run_and_get_code(torch.compile(fn, backend=backend, fullgraph=True), q, k, v)
            res = res[0] if isinstance(res, tuple) else res
            in_graph = "vsopt.block_sparse_attention_gluon" in "\n".join(code)
            rel, finite = rel_l2(res, ref)
            record(case, finite and rel <= BOUND and in_graph,
                   f"Gluon op in the generated code {in_graph}, rel_l2 {rel:.2e}, bitwise equal to the eager call "
                   f"{torch.equal(res, eager)}")
        except Exception as e:
            _failed(case, e)

    if device == "cuda":
        # torch.compile's cudagraph trees (mode="reduce-overhead"), fed a new q after recording.
        case = f"op torch.compile(mode='reduce-overhead') {shape}, new q after recording"
        try:
            from torch._dynamo.utils import counters

            torch._dynamo.reset()
            counters.clear()
            compiled = torch.compile(attend, mode="reduce-overhead", fullgraph=True)
            for _ in range(3):   # warm-up, record, replay
                compiled(q, k, v)
            q2 = torch.randn_like(q)
            res, ran = _launches(lambda: compiled(q2, k, v).clone())
            rel, finite = rel_l2(res, chunked_reference(q2, k, v, mask, D ** -0.5, 128))
            skips = dict(counters["inductor"]).get("cudagraph_skips", 0)
            record(case, finite and rel <= BOUND and not skips,
                   f"rel_l2 {rel:.2e}, cudagraph skips {skips}, launches from Python in the replay {ran} (none: replayed)")
        except Exception as e:
            _failed(case, e)
        # An eager call captured in a CUDA graph, replayed on a new q copied into its input.
        case = "op eager call captured in a CUDA graph, replayed on a new q"
        try:
            sq, sk, sv, sidx, scnt = _op_inputs(*shapes[0], device)
            Ds, bns = shapes[0][4], shapes[0][5]
            torch.ops.vsopt.block_sparse_attention(sq, sk, sv, sidx, scnt, Ds ** -0.5, 128, bns)   # compile first
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                gout = torch.ops.vsopt.block_sparse_attention(sq, sk, sv, sidx, scnt, Ds ** -0.5, 128, bns)
            sq.copy_(torch.randn_like(sq))
            graph.replay()
            torch.cuda.synchronize()
            gref, _ = bsa_ref.block_sparse_attention(sq.float(), sk.float(), sv.float(), sidx, scnt, Ds ** -0.5, 128,
                                                     bns)
            rel, finite = rel_l2(gout, gref)
            record(case, finite and rel <= BOUND, f"rel_l2 {rel:.2e}")
        except Exception as e:
            _failed(case, e)
    del ref
    if out_dir is not None:
        save(out_dir, t0, "gpu_check_gluon_op.json")

    print(f"op part: {time.time() - t0:.0f} s", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--parts", default="correct,speed", help="correct, speed, op (the ops' route), smoke")
    parser.add_argument("--workloads", default="wan480,cog720")
    parser.add_argument("--small", default="all", choices=("all", "iterate"),
                        help="small correctness shapes: all six, or the two of ITERATE_SHAPES (shorter run)")
    args = parser.parse_args(argv)
    import triton

    print(f"torch {torch.__version__} triton {triton.__version__} {torch.cuda.get_device_name()}", flush=True)
    t0 = time.time()
    configs = gluon_launch.CONFIGS
    parts = args.parts.split(",")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if parts == ["op"]:   # the route's variant passed the smoke run already (docs/KERNELS.md): no child here
        op_part(out, t0)
        save(out, t0, "gpu_check_gluon_op.json")
        print(f"{len(failures)} failed; {time.time() - t0:.0f} s; wrote {out / 'gpu_check_gluon_op.json'}")
        return 1 if failures else 0
    smoke_file = out / "gpu_check_gluon_smoke.json"
    smoke_file.unlink(missing_ok=True)
    if parts == ["smoke"]:   # one tiny shape, every variant: the child process main() runs first
        small_cases(configs, SMOKE_SHAPE)
        passed = [str(c) for c in configs if not any(f.endswith(str(c)) for f in failures)]
        smoke_file.write_text(json.dumps(passed))
        return 1 if failures else 0
    # A wrong mbarrier phase hangs the GPU: the first launches run in a child process with a time limit.
    import subprocess

    try:
        smoke = subprocess.run([sys.executable, __file__, "--parts", "smoke", "--out", str(out)], timeout=120)
        passed = json.loads(smoke_file.read_text()) if smoke_file.exists() else []
        print(f"smoke run (child process): exit {smoke.returncode}, {time.time() - t0:.0f} s; variants that passed: "
              f"{passed}", flush=True)
        if smoke.returncode != 0:
            failures.append("smoke run failed")
        configs = tuple(c for c in configs if str(c) in passed)
    except subprocess.TimeoutExpired:
        print("FAIL smoke run: the Gluon kernel hung (child process killed after 120 s; the variant after the "
              "last line printed hung)", flush=True)
        failures.append("smoke run hung")
        configs = ()
    if not configs:
        parts = []
    if "correct" in parts:
        small_cases(configs, ITERATE_SHAPES if args.small == "iterate" else None)
        workload_correctness(configs)
        print(f"correctness: {len(failures)} failed, {time.time() - t0:.0f} s", flush=True)
        save(out, t0)
    if "speed" in parts:
        speed(configs, args.workloads.split(","), out, t0)
    if "op" in parts and configs:
        op_part(out, t0)
    save(out, t0)
    print(f"{len(failures)} failed; {time.time() - t0:.0f} s; wrote {out / 'gpu_check_gluon.json'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
