"""What vsopt costs at the reference model's small size (4096 tokens, batch 2, 4 heads of 64), on the GPU.

    source benchmarks/gpu_env.sh
    python3 benchmarks/small_n_gpu.py --out $OUT/small_n_gpu.json          # ~2 minutes on an H200

Two parts (--parts ops,model):

- ops: the block-sparse kernel (vsopt.block_sparse_attention, bf16, 64x64 blocks, q/k/v in the
  model's (B, N, H, D) layout) at densities 0.3 / 0.5 / 1.0 against the dense attention a site left
  dense runs (vsopt.attention: SDPA), each as GPU time (calls replayed from a CUDA graph) and as the
  wall time of back-to-back eager calls (host included), next to the shipped cost model's
  prediction (vsopt/costmodels/, read by vsopt.core.costmodel). Masks: each query-block row keeps
  the ceil(density * KB) key blocks nearest its diagonal (benchmarks/measure_cost_model.py's
  banded_mask). Rows: the four heads in one launch (one launch group), and the same heads as four
  one-head launches (what four launch groups run: each launch lasts its longest row with a quarter
  of the programs); the permutation of a permuted site (q, k, v gathered in, the output back, as
  the compiled path runs them: ATen index_select); the host cost of one dense site as vsopt's custom
  op against ATen's SDPA on a tiny input (the calls' wall time, the GPU starved).
- model: one forward of the shipped reference model at 16x32x32 (4096 tokens, batch 2, bf16):
  Inductor (torch.compile's default), vsopt without a plan and vsopt with the shipped plan (at this
  size every site is dense by the never-slower rule), both with dense sites kept as vsopt's custom
  op (vsopt.inductor.INLINE_DENSE off, as before 2026-12-02), and vsopt without a plan with its
  dense sites written as ATen SDPA for Inductor (INLINE_DENSE on, the default since); each also under CUDA graphs
  (--no-cudagraphs skips those). Timed interleaved: --rounds rounds, each timing every config in
  turn (--iters CUDA-event-timed calls each, synchronized before every call, as the plan check and
  the demo time), so drift of the machine hits every config alike; plus the wall time of 20
  back-to-back calls (host and GPU pipelined). Relative L2 of each output against eager.

Writes --out (JSON: every row with its numbers) and prints the tables. --dry-run: on the CPU at a tiny
size, every timer one call's wall time (checks the script; its numbers mean nothing).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import measure_cost_model as mcm  # noqa: E402  (the GPU timers and masks of the cost-model measurements)
import vsopt.core  # noqa: E402,F401  (registers the ops)
from vsopt.core.costmodel import CostModel, Launch, SiteWork, describe_environment  # noqa: E402
from vsopt.core.io import atomic_write_text  # noqa: E402
from vsopt.core.timing import interleaved_ms  # noqa: E402

BATCH, HEADS, HEAD_DIM, BLOCK = 2, 4, 64, 64
DENSITIES = (0.3, 0.5, 1.0)


def _permute_mib(n: int) -> float:
    """MiB a permuted site moves: q, k, v in and the output back (vsopt.core.semantics.permuted_mib)."""
    from vsopt.core import semantics
    from vsopt.core.ir import TokenGrid

    shape = semantics.SiteShape("s", BATCH, HEADS, HEAD_DIM, n, n, TokenGrid(1, 1, n), torch.bfloat16)
    return semantics.permuted_mib(shape, HEADS)


def part_ops(rec, cost: CostModel, n: int) -> None:
    q, k, v = mcm.qkv(BATCH, HEADS, n, HEAD_DIM, "model")
    scale = HEAD_DIM ** -0.5
    qb = kb = math.ceil(n / BLOCK)
    dense = lambda: torch.ops.vsopt.attention(q, k, v, None, scale, False)  # noqa: E731
    t, how = mcm.gpu_us(dense)
    rec("dense", what="vsopt.attention (SDPA)", gpu_us=t, timer=how, wall_us=mcm.wall_us(dense),
        predicted_us=cost.dense_us(BATCH, HEADS, n, n, HEAD_DIM))
    bsa = torch.ops.vsopt.block_sparse_attention
    for density in DENSITIES:
        mask = mcm.banded_mask(HEADS, qb, kb, density)
        idx, counts = mcm.table(mask)
        visited, row = BATCH * int(mask.sum()), int(counts.max())
        one = lambda: bsa(q, k, v, idx, counts, scale, BLOCK, BLOCK, "none")  # noqa: E731
        t, how = mcm.gpu_us(one)
        work = SiteWork((Launch("none", HEAD_DIM, BLOCK, BLOCK, BATCH * HEADS * qb, visited, row),))
        rec("sparse", launches=1, density=density, visited_blocks=visited, longest_row=row, gpu_us=t, timer=how,
            wall_us=mcm.wall_us(one), predicted_us=cost.predict_us(work))
        # the same heads as four one-head launches (four launch groups)
        parts = [tuple(x[:, h:h + 1] for x in (q, k, v)) for h in range(HEADS)]
        tables = [mcm.table(mask[:, h:h + 1]) for h in range(HEADS)]
        four = lambda: [bsa(*parts[h], *tables[h], scale, BLOCK, BLOCK, "none") for h in range(HEADS)]  # noqa: E731
        t, how = mcm.gpu_us(four)
        work = SiteWork(tuple(Launch("none", HEAD_DIM, BLOCK, BLOCK, BATCH * qb, BATCH * int(mask[:, h].sum()),
                                     int(tables[h][1].max())) for h in range(HEADS)))
        rec("sparse", launches=HEADS, density=density, visited_blocks=visited, longest_row=row, gpu_us=t,
            timer=how, wall_us=mcm.wall_us(four), predicted_us=cost.predict_us(work))
    perm = torch.randperm(n, device=mcm.DEV)
    inverse = torch.argsort(perm)
    gathers = lambda: ([x.index_select(2, perm) for x in (q, k, v)], q.index_select(2, inverse))  # noqa: E731
    t, how = mcm.gpu_us(gathers)
    mib = _permute_mib(n)
    rec("permute", what="q, k, v in and the output back (index_select)", mib=mib, gpu_us=t, timer=how,
        wall_us=mcm.wall_us(gathers), predicted_us=cost.permute_fixed_us + mib * cost.permute_us_per_mib)
    tq = torch.randn(1, 1, 16, HEAD_DIM, device=mcm.DEV, dtype=mcm.BF16)
    for what, fn in (("vsopt.attention (custom op)", lambda: torch.ops.vsopt.attention(tq, tq, tq, None, scale, False)),
                     ("aten.scaled_dot_product_attention", lambda: torch.ops.aten.scaled_dot_product_attention(
                         tq, tq, tq, scale=scale))):
        rec("host", what=what, wall_us=mcm.wall_us(fn, calls=200, reps=5))
    del q, k, v


def _configs(cudagraphs: bool, plan: str):
    """(name, torch.compile kwargs, inline dense sites) of the model part."""
    out = []
    for cg in ((False, True) if cudagraphs else (False,)):
        tail = "+cudagraphs" if cg else ""
        out.append(("inductor" + tail, {"mode": "reduce-overhead"} if cg else {}, False))
        for name, options, inline in (("vsopt-noplan", {}, False), ("vsopt-plan", {"plan": plan}, False),
                                      ("vsopt-noplan-inlined", {"strict": False}, True)):
            # (options that differ: Dynamo reuses a graph compiled by the same backend and options)
            if cg:
                options = dict(options, cudagraphs=True)
            out.append((name + tail, {"backend": "vsopt", "options": options}, inline))
    return out


def part_model(rec, args) -> None:
    from vsopt import inductor
    from vsopt.calibration.inputs import reference_model_inputs
    from vsopt.core.dynamic import set_denoising_step
    from vsopt.core.metrics import relative_l2
    from vsopt.models import model as model_lib

    dry = mcm.DRY_RUN
    device, dtype = ("cpu", torch.float32) if dry else ("cuda", torch.bfloat16)
    ref = model_lib.load_shipped(device, dtype)
    f, h, w = (2, 8, 8) if dry else (16, 32, 32)
    ref.config = dataclasses.replace(ref.config, frames=f, height=h, width=w)
    call = reference_model_inputs(ref, clips=BATCH, steps=8, seed=0)[0]
    model = ref.transformer
    plan = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "vsopt", "models", "assets",
                        "reference.plan.json")
    set_denoising_step(0)
    fns, first_s = {}, {}
    default_inline = inductor.INLINE_DENSE
    with torch.no_grad():
        ref_out = model(*call.args, **call.kwargs)[0].float()
        for name, kwargs, inline in _configs(args.cudagraphs and not dry, plan):
            inductor.INLINE_DENSE = inline
            try:
                compiled = torch.compile(model, **kwargs)
                t0 = time.time()
                for _ in range(3):   # compile, autotune, CUDA-graph warm-up and recording
                    out = compiled(*call.args, **call.kwargs)[0].float()
                first_s[name] = round(time.time() - t0, 1)
                fns[name] = (lambda c=compiled: c(*call.args, **call.kwargs))
                rec("model_compiled", config=name, first_calls_s=first_s[name],
                    rel_l2_vs_eager=relative_l2(out, ref_out))
            except Exception as e:  # noqa: BLE001 - recorded; the other configs still run
                traceback.print_exc()
                rec("model_compiled", config=name, error=f"{type(e).__name__}: {str(e)[:300]}")
            finally:
                inductor.INLINE_DENSE = default_inline
            print(f"compiled {name} ({first_s.get(name)} s)", flush=True)
        cuda = not dry
        per_call = interleaved_ms(fns, rounds=args.rounds, iters=args.iters, cuda=cuda)
        for name, fn in fns.items():
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(20):
                fn()
            if cuda:
                torch.cuda.synchronize()
            rec("model", config=name, per_call_ms=statistics.median(per_call[name]),
                per_call_ms_min=min(per_call[name]), per_call_ms_max=max(per_call[name]),
                pipelined_ms=(time.perf_counter() - t0) * 1e3 / 20, calls=len(per_call[name]))
    set_denoising_step(None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the JSON to write")
    p.add_argument("--parts", default="ops,model")
    p.add_argument("--rounds", type=int, default=6, help="model: interleaved rounds")
    p.add_argument("--iters", type=int, default=10, help="model: timed calls per config and round")
    p.add_argument("--no-cudagraphs", dest="cudagraphs", action="store_false", help="model: skip the CUDA-graph rows")
    p.add_argument("--dry-run", action="store_true", help="on the CPU at a tiny size (checks the script)")
    args = p.parse_args(argv)
    if args.dry_run:
        mcm.DEV, mcm.DRY_RUN = "cpu", True
    elif not torch.cuda.is_available():
        print("small_n_gpu: needs a CUDA GPU (or --dry-run)", file=sys.stderr)
        return 2
    n = 256 if args.dry_run else 4096
    gpu = "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name()
    cost = CostModel.default(None if args.dry_run else gpu)
    rows: list[dict] = []
    status: dict[str, str] = {}
    start = time.time()

    def rec(kind, **r):
        rows.append({"kind": kind, **r})

    for part in args.parts.split(","):
        try:
            {"ops": lambda: part_ops(rec, cost, n), "model": lambda: part_model(rec, args)}[part]()
            status[part] = "ok"
        except Exception as e:  # noqa: BLE001 - recorded, the other part still runs
            traceback.print_exc()
            status[part] = f"failed: {type(e).__name__}: {str(e)[:300]}"
        print(f"part {part}: {status[part]} (at {time.time() - start:.0f} s)", flush=True)
    doc = {"gpu": gpu, "dry_run": args.dry_run, "tokens": n, "batch": BATCH, "heads": HEADS, "head_dim": HEAD_DIM,
           "cost_model": {"gpu": cost.gpu, "fitted": cost.meta.get("fitted")}, **describe_environment(),
           "command": "python3 benchmarks/small_n_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "seconds": round(time.time() - start, 1), "parts": status, "rows": rows}
    atomic_write_text(args.out, json.dumps(doc, indent=1))
    print(render(doc))
    return 0


def render(doc: dict) -> str:
    """The rows as text tables."""
    lines = [f"{doc['gpu']}, {doc['tokens']} tokens, batch {doc['batch']}, {doc['heads']} heads of {doc['head_dim']}"]
    f = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
    for r in doc["rows"]:
        if r["kind"] == "dense":
            lines.append(f"dense {r['what']}: gpu {f(r['gpu_us'])} us ({r['timer']}), wall {f(r['wall_us'])} us, "
                         f"cost model {f(r['predicted_us'])} us")
        elif r["kind"] == "sparse":
            lines.append(f"sparse density {r['density']:.1f}, {r['launches']} launch(es), longest row "
                         f"{r['longest_row']}: gpu {f(r['gpu_us'])} us ({r['timer']}), wall {f(r['wall_us'])} us, "
                         f"cost model {f(r['predicted_us'])} us")
        elif r["kind"] == "permute":
            lines.append(f"permute {r['what']}, {r['mib']:.1f} MiB: gpu {f(r['gpu_us'])} us, wall "
                         f"{f(r['wall_us'])} us, cost model {f(r['predicted_us'])} us")
        elif r["kind"] == "host":
            lines.append(f"host, one tiny call of {r['what']}: {f(r['wall_us'])} us")
        elif r["kind"] == "model_compiled":
            lines.append(f"model {r['config']}: " + (r["error"] if "error" in r else
                         f"first 3 calls {r['first_calls_s']} s, rel L2 vs eager {r['rel_l2_vs_eager']:.2e}"))
        elif r["kind"] == "model":
            lines.append(f"model {r['config']}: per call {r['per_call_ms']:.3f} ms (median of {r['calls']}, "
                         f"{r['per_call_ms_min']:.3f}-{r['per_call_ms_max']:.3f}), pipelined {r['pipelined_ms']:.3f} ms")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
