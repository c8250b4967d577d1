"""Measure on this GPU what vsopt's cost model (vsopt/core/costmodel.py) prices, down to small N.

    source benchmarks/gpu_env.sh
    python3 benchmarks/measure_cost_model.py --out $OUT/cost_model_measurements.json

One run (about 4.5 minutes on an H200 with --budget-s 300; --budget-s stops starting new sections
in time and records what it skipped) writes one JSON of raw measurements; benchmarks/fit_cost_model.py
--measurements turns it into vsopt/costmodels/<gpu>.json. Sections (run in the order sites, launch,
permute, sdpa, compiled, dynamic, remainder, attention; attention, the longest, stops at the budget
point by point):

- sites: the shipped reference plan's sites (vsopt/models/assets, 6 sites x 2 step ranges) at
  4096 tokens (its grid 16x16x16) and fitted to 16384 tokens (16x32x32, vsopt.core.resample), at
  batch 2 in the model's layout (q/k/v are (B, N, H, D) tensors seen as (B, H, N, D)): the ops
  the lowering emits (passes/lower_plan.py: permute_tokens x3, one block_sparse_attention per
  launch group, unpermute_tokens), timed as permutations, attention and the whole site, against
  the dense site (vsopt.attention: SDPA), each replayed from a CUDA graph (GPU time) and called
  eagerly (host included), with the shipped cost model's prediction;
- compiled: one site (blocks.0.attn1 steps 0-4, 4096 tokens) and its dense version through
  torch.compile (Inductor; default and mode="reduce-overhead"): the per-site overhead a compiled
  model pays without and with CUDA graphs, Inductor's work-order launches included;
- launch: per-launch cost of each op on a tiny input: eager host time per call (a chain of calls,
  the GPU starved) and the GPU time per launch inside one CUDA graph;
- attention: block_sparse_attention per precision x head dim x block, N 1024..32768, densities
  0.05..1 (a banded mask), at batch*heads 8 (the reference model's) and some at 32;
- sdpa: the dense attention (vsopt.attention) at the same N and head dims;
- permute: one site's permutations (3 permute + 1 unpermute) per N, shared / per-head orders,
  contiguous / model layout;
- dynamic: dynamic_block_mask + mask_to_table per N;
- remainder (before attention, so the budget never skips it): the pooled remainder (PSA)
  and the softmax-mass / residual correction epilogues as the lowering emits them, against the
  kept blocks' block_sparse_attention_lse, at --remainder-lengths x batch*heads 8, 32 x the head
  dims, density 0.2 (fit_cost_model.py fits pooled_us and op_us from it).
Every record has its shapes, so any model can be fitted to it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import vsopt.core  # noqa: E402,F401  (registers the ops)
import vsopt.core.dynamic  # noqa: E402,F401  (registers vsopt::dynamic_block_mask)
from vsopt.core.timing import median_ms, pipelined_us  # noqa: E402
from vsopt.core import semantics  # noqa: E402
from vsopt.core.costmodel import CostModel, Launch, SiteWork, describe_environment  # noqa: E402
from vsopt.core.io import atomic_write_text  # noqa: E402
from vsopt.core.ir import AttentionSite, Layout, TokenGrid  # noqa: E402
from vsopt.core.plan import Plan  # noqa: E402
from vsopt.core.resample import fit_site_plan  # noqa: E402

DEV = "cuda"
BF16 = torch.bfloat16
PLAN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "vsopt", "models", "assets",
                    "reference.plan.json")


# ----------------------------------------------------------------------------- timing


DRY_RUN = False  # --dry-run: on the CPU, every timer is one call's wall time (a check of the script)


def _dry_us(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return 1e6 * (time.perf_counter() - t0)


def gpu_us(fn, target_us: float = 2000.0, reps: int = 5) -> tuple[float, str]:
    """(median GPU microseconds of one fn() call, how): n calls captured in one CUDA graph (n so
    that a replay lasts ~target_us), replayed `reps` times between CUDA events. 'eager' where fn
    cannot be captured (then host time may be in it)."""
    if DRY_RUN:
        return _dry_us(fn), "cpu dry run"
    fn()
    torch.cuda.synchronize()
    try:
        g1 = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g1):
            fn()
        g1.replay()
        torch.cuda.synchronize()
        est = max(1.0, _event_us(g1.replay, 3))
        n = int(min(400, max(1, target_us / est)))
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(n):
                fn()
        g.replay()
        torch.cuda.synchronize()
        t = _event_us(g.replay, reps) / n
        del g, g1
        return t, "cudagraph"
    except Exception as e:  # noqa: BLE001 - not capturable: time it eagerly and say so
        torch.cuda.synchronize()
        return _event_us(fn, 20), f"eager ({type(e).__name__}: {str(e)[:80]})"


def _event_us(fn, reps: int) -> float:
    if DRY_RUN:
        return _dry_us(fn)
    return 1e3 * median_ms(fn, reps, warmup=0, cuda=True)


def wall_us(fn, calls: int = 50, reps: int = 3) -> float:
    """Median wall-clock microseconds per fn() over `calls` back-to-back calls (host and GPU
    pipelined: the larger of the two, the time a model without CUDA graphs sees)."""
    if DRY_RUN:
        return _dry_us(fn)
    return pipelined_us(fn, calls, reps, torch.cuda.synchronize)


# ----------------------------------------------------------------------------- inputs


def _sync():
    if not DRY_RUN:
        torch.cuda.synchronize()


def qkv(batch: int, heads: int, n: int, d: int, layout: str = "model"):
    """q, k, v as (B, H, N, D): 'model' = views of (B, N, H, D) tensors (Wan's), 'contiguous'."""
    if layout == "model":
        return [torch.randn(batch, n, heads, d, device=DEV, dtype=BF16).transpose(1, 2) for _ in range(3)]
    return [torch.randn(batch, heads, n, d, device=DEV, dtype=BF16) for _ in range(3)]


def banded_mask(heads: int, qb: int, kb: int, density: float) -> torch.Tensor:
    """(1, heads, qb, kb) bool: each row keeps the ceil(density * kb) key blocks nearest its diagonal."""
    keep = max(1, math.ceil(density * kb))
    i = torch.arange(qb, device=DEV)[:, None].float() * kb / qb
    j = torch.arange(kb, device=DEV)[None, :].float()
    rank = (j - i).abs().argsort(dim=1).argsort(dim=1)
    return (rank < keep)[None, None].expand(1, heads, qb, kb).contiguous()


def table(masks: torch.Tensor):
    """The lowering's constant kv table of (1, H, QB, KB) masks (rows trimmed to the fullest)."""
    idx, counts = torch.ops.vsopt.mask_to_table(masks.to(DEV))
    width = max(1, int(counts.max()))
    return idx[..., :width].contiguous(), counts


# ----------------------------------------------------------------------------- sections


def site_ops(site: AttentionSite, heads, q, k, v):
    """(permute, attend, unpermute, whole) callables running what lower_plan emits for static heads
    (None when a launch group is dynamic: not emulated here)."""
    groups = semantics.launch_groups(heads)
    if any(key.dynamic is not None for key in groups):
        return None
    perm = semantics.permutations(site.grid, heads)
    perm = perm.to(DEV) if perm is not None else None
    launches = []
    for key, idx in groups.items():
        masks = torch.stack([semantics.static_mask(site, heads[h]) for h in idx])[None]
        sel = torch.tensor(idx, device=DEV) if len(groups) > 1 else None
        launches.append((key, sel, *table(masks)))
    order = [h for _, idx in groups.items() for h in idx]
    inverse = torch.argsort(torch.tensor(order, device=DEV)) if order != sorted(order) else None
    P, U, A = torch.ops.vsopt.permute_tokens, torch.ops.vsopt.unpermute_tokens, torch.ops.vsopt.block_sparse_attention

    def permute():
        return (P(q, perm), P(k, perm), P(v, perm)) if perm is not None else (q, k, v)

    def attend(qp, kp, vp):
        outs = []
        for key, sel, idx, counts in launches:
            g = (qp, kp, vp) if sel is None else [x.index_select(1, sel) for x in (qp, kp, vp)]
            outs.append(A(*g, idx, counts, site.scale, key.block_m, key.block_n, key.quant.value))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, 1)
        return out if inverse is None else out.index_select(1, inverse)

    def unpermute(o):
        return U(o, perm) if perm is not None else o

    pq = permute()
    o = attend(*pq)
    return ((lambda: permute()), (lambda: attend(*pq)), (lambda: unpermute(o)),
            (lambda: unpermute(attend(*permute()))), perm is not None)


def reference_sites(tokens: int):
    """[(AttentionSite, SitePlan, fit line)] of the shipped plan's self-attention sites at `tokens`
    video tokens (batch 2; its cross-attention entries, always dense, are not measured)."""
    plan = Plan.load(PLAN)
    out = []
    for sp in plan.sites.values():
        if sp.q_len != sp.kv_len:
            continue
        grid = sp.grid
        if tokens != sp.q_len:
            side = int(round(math.sqrt(tokens / grid.frames)))
            grid = TokenGrid(grid.frames, side, side)
        site = AttentionSite(site_id=sp.site_id, layer=None, rule="measure", layout=Layout.BHND, batch=2,
                             heads=sp.num_heads, kv_heads=sp.num_heads, head_dim=64, value_dim=64,
                             q_len=tokens, kv_len=tokens, dtype=BF16, scale=64 ** -0.5, grid=grid)
        fit = fit_site_plan(sp, site)
        if fit.plan is None:
            raise RuntimeError(fit.line())
        out.append((site, fit.plan, fit.line()))
    return out


def measure_sites(rec, cost: CostModel, tokens: int):
    for site, sp, line in reference_sites(tokens):
        q, k, v = qkv(site.batch, site.heads, site.q_len, site.head_dim)
        dense = lambda: torch.ops.vsopt.attention(q, k, v, None, site.scale, False)  # noqa: E731
        dense_gpu, how = gpu_us(dense)
        dense_wall = wall_us(dense)
        for st in sp.steps or [None]:
            heads = st.heads if st is not None else sp.heads
            ops = site_ops(site, heads, q, k, v)
            where = f"{site.site_id}@{st.start if st is not None else 'all'}"
            if ops is None:
                rec("site", site=where, tokens=tokens, skipped="a dynamic launch group (not emulated)")
                continue
            permute, attend, unpermute, whole, permuted = ops
            densities = semantics.head_densities(site, heads)
            work = semantics.site_work(site, heads, densities)
            r = {"site": where, "tokens": tokens, "batch": site.batch, "heads": site.heads, "head_dim": site.head_dim,
                 "grid": str(site.grid), "fit": line, "densities": densities, "permuted": permuted,
                 "launch_groups": len(work.launches), "features": CostModel.features(work),
                 "work": _work_dict(work), "dense_gpu_us": dense_gpu, "dense_wall_us": dense_wall,
                 "predicted_us_shipped_model": cost.predict_us(work),
                 "predicted_attention_us_shipped_model": cost.predict_us(SiteWork(work.launches)),
                 "predicted_dense_us_shipped_model": semantics.dense_us(site, cost)}
            for name, fn in (("permute", permute), ("attention", attend), ("unpermute", unpermute), ("site", whole)):
                r[f"{name}_gpu_us"], how = gpu_us(fn)
                r[f"{name}_wall_us"] = wall_us(fn)
            r["timer"] = how
            rec("site", **r)
        print(f"sites at {tokens}: {site.site_id} done", flush=True)


def _work_dict(work: SiteWork) -> dict:
    keys = ("quant", "head_dim", "block_m", "block_n", "query_blocks", "visited_blocks", "max_row_blocks")
    return {"launches": [{k: getattr(launch, k) for k in keys} for launch in work.launches],
            "permuted_mib": work.permuted_mib, "scored_blocks": work.scored_blocks}


def measure_compiled(rec):
    """One site and its dense version through torch.compile, default and reduce-overhead."""
    site, sp, _ = reference_sites(4096)[0]
    heads = sp.steps[0].heads if sp.steps else sp.heads
    q, k, v = qkv(site.batch, site.heads, site.q_len, site.head_dim)
    perm = semantics.permutations(site.grid, heads)
    perm = perm.to(DEV) if perm is not None else None
    key, idx = next(iter(semantics.launch_groups(heads).items()))
    kv_idx, kv_counts = table(torch.stack([semantics.static_mask(site, hp) for hp in heads])[None])
    P, U = torch.ops.vsopt.permute_tokens, torch.ops.vsopt.unpermute_tokens

    def planned(q, k, v):
        if perm is not None:
            q, k, v = P(q, perm), P(k, perm), P(v, perm)
        o = torch.ops.vsopt.block_sparse_attention(q, k, v, kv_idx, kv_counts, site.scale, key.block_m, key.block_n,
                                                   key.quant.value)
        return U(o, perm) if perm is not None else o

    def dense(q, k, v):
        return torch.ops.vsopt.attention(q, k, v, None, site.scale, False)

    for name, fn in (("planned", planned), ("dense", dense)):
        for mode in ("default", "reduce-overhead"):
            torch._dynamo.reset()
            t0 = time.perf_counter()
            c = torch.compile(fn, backend="eager", fullgraph=True) if DRY_RUN else \
                torch.compile(fn, mode=None if mode == "default" else mode, fullgraph=True)
            for _ in range(3):
                c(q, k, v)
            _sync()
            compile_s = time.perf_counter() - t0
            call = lambda: c(q, k, v)  # noqa: E731
            rec("compiled", site=site.site_id, tokens=4096, what=name, mode=mode, wall_us=wall_us(call, 100),
                events_us=_event_us(call, 20), compile_s=compile_s, groups=1, permuted=perm is not None,
                eager_gpu_us=gpu_us(lambda: fn(q, k, v))[0])
        print(f"compiled {name} done", flush=True)


def measure_launch(rec, quants, deadline: float = float("inf")):
    """Per-launch cost on a tiny input: host per eager call vs GPU per launch in a graph."""
    qkv_d = {d: qkv(1, 1, 128, d, "contiguous") for d in (64, 128)}
    q, k, v = qkv_d[64]
    perm = torch.randperm(128, device=DEV)[None]
    tables = {64: table(banded_mask(1, 2, 2, 1.0)), 128: table(banded_mask(1, 1, 1, 1.0))}
    ops = {f"block_sparse_attention/{qm}/d{d}/{b}x{b}":
           (lambda qm=qm, b=b, d=d: torch.ops.vsopt.block_sparse_attention(*qkv_d[d], *tables[b], d ** -0.5, b, b, qm))
           for qm in quants for d in (64, 128) for b in (64, 128)}
    ops["permute_tokens"] = lambda: torch.ops.vsopt.permute_tokens(q, perm)
    ops["unpermute_tokens"] = lambda: torch.ops.vsopt.unpermute_tokens(q, perm)
    ops["attention(sdpa)"] = lambda: torch.ops.vsopt.attention(q, k, v, None, 0.125, False)
    ops["sdpa(torch)"] = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)
    ops["index_select"] = lambda: q.index_select(1, torch.zeros(1, dtype=torch.long, device=DEV))
    for name, fn in sorted(ops.items(), key=lambda kv: "/d128/" in kv[0]):  # the reference's head dim first
        if time.time() > deadline:
            rec("launch", op=name, skipped="time budget")
            continue
        g, how = gpu_us(fn, target_us=500)
        rec("launch", op=name, wall_us=wall_us(fn, 200), gpu_us=g, timer=how)
    print("launch done", flush=True)


def measure_attention(rec, quants, head_dims, blocks, lengths, densities, bh_list, deadline):
    for quant in quants:
        for d in head_dims:
            for block in blocks:
                for bh in bh_list:
                    for n in lengths:
                        if block == 128 and n not in (lengths[0], 4096, 16384):
                            continue
                        if bh != 8 and (quant != "none" or n not in (1024, 4096, 16384)):
                            continue
                        if time.time() > deadline:
                            rec("attention", skipped="time budget", quant=quant, head_dim=d, block=block, n=n)
                            continue
                        batch, heads = (2, bh // 2)
                        q, k, v = qkv(batch, heads, n, d, "contiguous")
                        qb = kb = math.ceil(n / block)
                        for density in densities:
                            mask = banded_mask(heads, qb, kb, density)
                            idx, counts = table(mask)
                            fn = lambda: torch.ops.vsopt.block_sparse_attention(  # noqa: E731
                                q, k, v, idx, counts, d ** -0.5, block, block, quant)
                            t, how = gpu_us(fn)
                            visited = batch * int(mask.sum())
                            work = SiteWork((Launch(quant, d, block, block, batch * heads * qb, visited,
                                                    int(counts.max())),))
                            rec("attention", quant=quant, head_dim=d, block=block, n=n, batch=batch, heads=heads,
                                density=density, query_blocks=batch * heads * qb, visited_blocks=visited,
                                rows_max=int(counts.max()), gpu_us=t, timer=how, features=CostModel.features(work))
                        del q, k, v
                print(f"attention {quant} d{d} {block} done", flush=True)


def measure_sdpa(rec, head_dims, lengths, bh_list):
    for d in head_dims:
        for bh in bh_list:
            for n in lengths:
                if bh != 8 and n not in (1024, 4096, 16384):
                    continue
                for layout in ("model", "contiguous"):
                    q, k, v = qkv(2, bh // 2, n, d, layout)
                    fn = lambda: torch.ops.vsopt.attention(q, k, v, None, d ** -0.5, False)  # noqa: E731
                    t, how = gpu_us(fn)
                    rec("sdpa", head_dim=d, n=n, batch=2, heads=bh // 2, layout=layout, gpu_us=t, timer=how)
    print("sdpa done", flush=True)


def measure_permute(rec, lengths, head_dims):
    for d in head_dims:
        for n in lengths:
            for layout in ("model", "contiguous"):
                for shared in (True, False):
                    q, k, v = qkv(2, 4, n, d, layout)
                    perm = torch.stack([torch.randperm(n, device=DEV) for _ in range(1 if shared else 4)])
                    P, U = torch.ops.vsopt.permute_tokens, torch.ops.vsopt.unpermute_tokens
                    o = P(q, perm)
                    mib = 4 * q.numel() * q.element_size() / 2**20
                    for op, fn in (("site", lambda: (P(q, perm), P(k, perm), P(v, perm), U(o, perm))),
                                   ("permute", lambda: P(q, perm)), ("unpermute", lambda: U(o, perm))):
                        t, how = gpu_us(fn)
                        rec("permute", op=op, head_dim=d, n=n, batch=2, heads=4, layout=layout, shared_order=shared,
                            permuted_mib=mib if op == "site" else mib / 4, gpu_us=t, timer=how,
                            wall_us=wall_us(fn) if n == 4096 else None)
    print("permute done", flush=True)


def measure_dynamic(rec, lengths):
    for n in lengths:
        q, k, _ = qkv(2, 4, n, 64, "contiguous")

        def fn():
            m = torch.ops.vsopt.dynamic_block_mask(q, k, 0.125, 64, 64, "cumulative_mass", 0.9, 0, "")
            torch.ops.vsopt.mask_to_table(m)

        t, how = gpu_us(fn)
        nb = math.ceil(n / 64)
        rec("dynamic", n=n, batch=2, heads=4, block=64, scored_blocks=8 * nb * nb, gpu_us=t, timer=how)
    print("dynamic done", flush=True)


def measure_remainder(rec, lengths, head_dims, bh_list, density: float = 0.2):
    """The pooled remainder and the corrections' epilogues as the lowering emits them (eager ATen
    ops through core.pooled / core.rettention / core.residual), against plain block-sparse
    attention of the same mask: kept (block_sparse_attention_lse), pooled (the remainder alone:
    pool k/v, scores over the KB pooled keys, lse, PV), merge (two partials by lse), pooled_attention
    (the whole PSA head), and per correction kind its measuring and correcting epilogue, state
    reads and writes included. GPU time from a CUDA graph and eager wall time per call (host
    included), with the ops counted (semantics._op_counts) and the MiB moved."""
    from vsopt.core import residual, rettention
    from vsopt.core.costmodel import POOLED_SCORE_PASSES, dense_features
    from vsopt.core.lse import EagerEmitter, merge_partials, sparse_partial
    from vsopt.core.pooled import pooled_attention, pooled_remainder

    class Emitter(EagerEmitter):   # constants moved to the device once (no host copy inside a graph capture)
        def __init__(self):
            super().__init__(DEV)
            self.consts = {}

        def const(self, label, value):
            key = (label, tuple(value.shape), value.dtype)
            if key not in self.consts:
                self.consts[key] = value.to(self.device)
            return self.consts[key]

    counts = semantics._op_counts()
    for d in head_dims:
        for bh in bh_list:
            for n in lengths:
                batch, heads = 2, bh // 2
                q, k, v = qkv(batch, heads, n, d, "contiguous")
                em = Emitter()
                scale, block = d ** -0.5, 64
                qb = kb = math.ceil(n / block)
                masks = banded_mask(heads, qb, kb, density)
                idx, cnt = table(masks)
                kept = sparse_partial(em, q, k, v, idx, cnt, scale, block, block, "none")
                rem = pooled_remainder(em, q, k, v, masks, scale, block, block)
                out, rho, resid = rettention.measure(em, kept, rem)
                sel = torch.arange(heads, device=DEV)
                bufs = {"rho": torch.zeros_like(rho), "resid": torch.zeros_like(resid, dtype=BF16)}
                f32 = batch * heads * n * d * 4 / 2**20   # one float32 (B, H, N, D) tensor, MiB

                def mass_measure():
                    o, r, x = rettention.measure(em, kept, rem)
                    bufs["rho"].index_copy_(1, sel, r)
                    bufs["resid"].index_copy_(1, sel, x.to(BF16))
                    return o.to(BF16)

                def mass_correct():
                    return rettention.correct(em, kept[0], bufs["rho"].index_select(1, sel),
                                              bufs["resid"].index_select(1, sel)).to(BF16)

                def resid_measure():
                    o, x = residual.measure(em, kept, rem)
                    bufs["resid"].index_copy_(1, sel, x.to(BF16))
                    return o.to(BF16)

                def resid_correct():
                    return residual.correct(em, kept[0], bufs["resid"].index_select(1, sel)).to(BF16)

                pieces = {
                    "kept": (lambda: sparse_partial(em, q, k, v, idx, cnt, scale, block, block, "none"), 0, 0.0),
                    "pooled": (lambda: pooled_remainder(em, q, k, v, masks, scale, block, block), counts["pooled"],
                               POOLED_SCORE_PASSES * batch * heads * n * kb * 4 / 2**20),
                    "merge": (lambda: merge_partials(em, [kept, rem]), counts["merge"], 3 * f32),
                    "pooled_attention": (lambda: pooled_attention(em, q, k, v, masks, idx, cnt, scale, block, block,
                                                                  "none"), counts["pooled"] + counts["merge"], 3 * f32),
                    "mass_measure": (mass_measure, counts["mass_measure"] + 3, 4 * f32),
                    "mass_correct": (mass_correct, counts["mass_correct"] + 2, 3 * f32),
                    "resid_measure": (resid_measure, counts["resid_measure"] + 2, 4 * f32),
                    "resid_correct": (resid_correct, counts["resid_correct"] + 1, 3 * f32),
                }
                for what, (fn, ops, mib) in pieces.items():
                    t, how = gpu_us(fn)
                    rec("remainder", what=what, head_dim=d, n=n, batch=batch, heads=heads, block=block,
                        density=density, pooled_keys=kb, visited_blocks=batch * int(masks.sum()),
                        query_blocks=batch * heads * qb, ops=ops, mib=mib, gpu_us=t, timer=how, wall_us=wall_us(fn, 20),
                        features=dense_features(1, batch * heads, n, kb) if what == "pooled" else None)
                del q, k, v, kept, rem, out, rho, resid, bufs
    print("remainder done", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the measurements JSON to write")
    p.add_argument("--budget-s", type=float, default=200.0, help="start no new section after this many seconds")
    p.add_argument("--quants", default="none,int8,fp8,int8_fp8,int8_int8")
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--blocks", default="64,128")
    p.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768")
    p.add_argument("--densities", default="0.05,0.1,0.2,0.3,0.5,1.0")
    p.add_argument("--sections", default="sites,launch,permute,sdpa,compiled,dynamic,remainder,attention")
    p.add_argument("--site-tokens", default="4096,16384", help="token counts of the reference plan's sites")
    p.add_argument("--remainder-lengths", default="4096,16384",
                   help="token counts of the remainder section (pooled remainder and correction epilogues)")
    p.add_argument("--dry-run", action="store_true",
                   help="run every section on the CPU once per timer (checks the script; not for fitting)")
    args = p.parse_args(argv)
    global DEV, DRY_RUN
    if args.dry_run:
        DEV, DRY_RUN = "cpu", True
    elif not torch.cuda.is_available():
        print("measure_cost_model: needs a CUDA GPU", file=sys.stderr)
        return 2
    start = time.time()
    deadline = start + args.budget_s
    quants = args.quants.split(",")
    head_dims = [int(x) for x in args.head_dims.split(",")]
    lengths = [int(x) for x in args.lengths.split(",")]
    records: list[dict] = []
    sections: dict[str, dict] = {}

    def rec(kind, **r):
        records.append({"kind": kind, **r})

    gpu = "cpu (dry run)" if DRY_RUN else torch.cuda.get_device_name()
    cost = CostModel.default(None if DRY_RUN else gpu)
    work = {
        "sites": lambda: [measure_sites(rec, cost, int(n)) for n in args.site_tokens.split(",")],
        "compiled": lambda: measure_compiled(rec),
        "launch": lambda: measure_launch(rec, quants, start + 0.5 * args.budget_s),
        "sdpa": lambda: measure_sdpa(rec, head_dims, lengths, (8, 32)),
        "permute": lambda: measure_permute(rec, lengths, head_dims),
        "attention": lambda: measure_attention(rec, quants, head_dims, [int(x) for x in args.blocks.split(",")],
                                               lengths, [float(x) for x in args.densities.split(",")], (8, 32),
                                               deadline),
        "dynamic": lambda: measure_dynamic(rec, lengths[:4]),
        "remainder": lambda: measure_remainder(rec, [int(x) for x in args.remainder_lengths.split(",")], head_dims,
                                               (8, 32)),
    }

    def write():  # after every section, so that a run cut short still leaves what it measured
        out = {"format": "vsopt-cost-measurements", "version": 1, "gpu": gpu, "dry_run": DRY_RUN,
               "sm_count": None if DRY_RUN else torch.cuda.get_device_properties(0).multi_processor_count,
               **describe_environment(),
               "command": "python3 " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
               "seconds": round(time.time() - start, 1), "sections": sections,
               "shipped_cost_model": {"gpu": cost.gpu, "date": cost.meta.get("date")}, "measurements": records}
        atomic_write_text(args.out, json.dumps(out, indent=1))
        return out

    for name in args.sections.split(","):
        t0 = time.time()
        if t0 > deadline:
            sections[name] = {"status": "skipped: time budget"}
            continue
        try:
            work[name]()
            sections[name] = {"status": "ok"}
        except Exception as e:  # noqa: BLE001 - record the failure, keep the other sections
            traceback.print_exc()
            sections[name] = {"status": f"failed: {type(e).__name__}: {e}"[:400]}
        sections[name]["seconds"] = round(time.time() - t0, 1)
        print(f"section {name}: {sections[name]} (at {time.time() - start:.0f} s)", flush=True)
        write()
    out = write()
    print(f"wrote {args.out}: {len(records)} records in {out['seconds']} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
