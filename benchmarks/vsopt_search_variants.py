"""vsopt's density search varied on ONE calibration measurement, each variant's plans scored on
the bench's clip (CPU or GPU; issue 17): what the search's error model costs in clip PSNR.

    python3 benchmarks/vsopt_search_variants.py --densities 0.2,0.3 --steps 8 --clip 4,32,32 \
        --variants bench,uniform --out DIR

The calibration's two measuring passes run once (calibrate_many with the bench's options); the
search (warmup.decide_with_warmup) is then re-run per variant on the same measured site states
with other error weights, and each plan is scored by the bench's PlanScorer. Variants:

    bench     the bench's search: the sensitivity weights (vsopt.calibration.sensitivity)
    uniform   every site and step weighs 1 (no sensitivity weights)
    steps     each step's weight the mean over sites (no per-site split)
    sqrt      the square root of each sensitivity weight (a flatter split)
    square    the square of each (a sharper split)
    probe     the sensitivity weights re-measured with a probe of the error kind the plans make
              (block top-k at the lowest density, pooled remainder) instead of top-k 0.5
    probe_each  the same with the probe at each point's own density (one measurement per density)
    warmup    the bench's search with a dense warm-up k = 0 or 1 on offer (the bench's default
              --vsopt-warmup 1)
    no_residual, no_renorm, residual_rN
              the bench's search with some corrections withdrawn from the measured candidates
              (their errors set out of reach): no residual sharing; no softmax-mass correction;
              of residual sharing only interval N (with --residual and --renorm on offer, one
              measurement compares them all)
    probe_no_residual  probe's weights, no residual sharing
    coherent  errors that add up coherently over sites and steps (final error = the sum of
              sqrt(weight) * site relative error, not the root of the weighted sum of squares):
              the density search re-run with each state's weight sqrt(w) / e at its last choice's
              predicted error e (iteratively reweighted, damped, 6 rounds)

Each point also carries a diagnosis of the search's error model (`diagnose`): per kind of head
(dense, mask, pattern, dynamic; pooled or not), the mean relative squared error the search
predicted (calibration clip) and the one the plan makes on the scored clip at the same steps
(the scored run's recorded q/k/v; needs --calibration-steps = --steps for the steps to match),
and the sensitivity model's predicted final relative error (sqrt of the weighted sum) beside the
scored clip's.

Writes OUT/search_variants.json and prints one line per variant.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vsopt_ablation import add_clip_arguments  # noqa: E402  (a sibling script)

VARIANTS = ("bench", "uniform", "steps", "sqrt", "square", "coherent", "warmup", "probe", "probe_each", "no_residual",
            "no_renorm", "residual_r2", "residual_r3", "residual_r4", "probe_no_residual")


def withdrawn(name: str):
    """Which candidates a variant withdraws (a predicate on a Candidate), or None."""
    if name in ("no_residual", "probe_no_residual"):
        return lambda c: c.renorm is not None and c.renorm.residual
    if name == "no_renorm":
        return lambda c: c.renorm is not None and not c.renorm.residual
    if name.startswith("residual_r"):
        keep = int(name[len("residual_r"):])
        return lambda c: c.renorm is not None and c.renorm.residual and c.renorm.every != keep
    return None


def restricted(states: dict, out) -> dict:
    """The measured site states with the candidates `out` selects out of reach (their squared
    errors made huge, so no search picks them; the other candidates' numbers are unchanged)."""
    import copy

    if out is None:
        return states
    res = {}
    for key, st in states.items():
        st2 = copy.copy(st)
        st2.err2 = st.err2.clone()
        for c, cand in enumerate(st.candidates):
            if out(cand):
                st2.err2[:, c] = 1e30 * max(float(st.norm2.max()), 1.0)
        res[key] = st2
    return res


def variant_weights(name: str, weights: dict | None) -> dict | None:
    """The (site, range) error weights of a variant, from the bench's (state_weights)."""
    if name == "bench" or weights is None:
        return weights
    if name in ("coherent", "warmup", "probe", "probe_each", "probe_no_residual") or withdrawn(name):
        # reweighed or re-measured in main, or the bench's weights on fewer candidates
        return weights
    if name == "uniform":
        return None
    if name == "sqrt":
        return {k: w ** 0.5 for k, w in weights.items()}
    if name == "square":
        return {k: w ** 2 for k, w in weights.items()}
    if name == "steps":
        ranges = {r for _, r in weights}
        mean = {r: statistics.fmean(w for (s, rr), w in weights.items() if rr == r) for r in ranges}
        return {k: mean[k[1]] for k in weights}
    raise ValueError(name)


def probe_weights(scorer, settings, ranges, density: float) -> dict:
    """(site, range) weights from sensitivity_weights with a pooled top-k probe at `density`."""
    from vsopt.core.dynamic import DynamicMethod, DynamicSpec
    from vsopt.core.plan import HeadPlan, Sparsity
    from vsopt.core.pooled import Remainder

    calls = scorer._calibration_inputs
    b = settings.block
    head = HeadPlan(Sparsity.DYNAMIC, block_m=b, block_n=b, dynamic=DynamicSpec(DynamicMethod.TOP_K, density),
                    remainder=Remainder.POOLED)
    per_step = scorer.sensitivity_weights(calls, head)
    n = len(calls)
    out = {}
    for sid, steps in per_step.items():
        for r, (a, stop) in enumerate(ranges or [(0, None)]):
            inside = [steps[i] for i in range(a, n if stop is None else stop)]
            out[(sid, r)] = sum(inside) / len(inside)
    return out


def coherent_decisions(decide, states, cost, budget, weights, ranges, rounds: int = 6, floor: float = 0.02):
    """The density search for a coherent error model (see the module doc): each round re-runs it
    with weight sqrt(w) / e per state, e the (damped) predicted relative error of its last choice."""
    base = weights or {k: 1.0 for k in states}
    decisions, _ = decide(states, cost, budget, base, ranges, ())
    e = None
    for _ in range(rounds):
        now = {k: max(floor, (sum(c.err2 for c in decisions[k].choices)
                              / max(float(st.norm2.sum()), 1e-300)) ** 0.5) for k, st in states.items()}
        e = now if e is None else {k: 0.5 * (e[k] + now[k]) for k in states}
        decisions, _ = decide(states, cost, budget, {k: base[k] ** 0.5 / e[k] for k in states}, ranges, ())
    return decisions


def diagnose(scorer, states, decisions, weights, ranges) -> dict:
    """The search's predicted errors against the plan's on the scored clip (see the module doc)."""
    import torch

    from vsopt.benchmark.scorer import site_output
    from vsopt.calibration.choices import head_plans

    kinds: dict[str, list[list[float]]] = {}
    pred_final = act_final = coherent = 0.0
    for (sid, r), st in states.items():
        ch = decisions[(sid, r)].choices
        heads = head_plans(st, ch)
        start = 0 if ranges is None else ranges[r][0]
        if start >= len(scorer.dense_calls_by_step):
            continue
        call = scorer.dense_calls_by_step[start][sid]
        with torch.no_grad():
            out = site_output(st.site, heads, call)
        ref = call.out.double()
        act = ((out.double() - ref) ** 2).sum((0, 2, 3)) / (ref ** 2).sum((0, 2, 3)).clamp_min(1e-300)
        w = 1.0 if weights is None else weights[(sid, r)]
        norm = max(float(st.norm2.sum()), 1e-300)
        pred_final += w * sum(c.err2 for c in ch) / norm
        site_err2 = float(((out.double() - ref) ** 2).sum() / (ref ** 2).sum())
        act_final += w * site_err2
        coherent += (w * site_err2) ** 0.5
        for h, (c, hp) in enumerate(zip(ch, heads)):
            kind = hp.sparsity.value + ("+pooled" if hp.remainder.value == "pooled" else "")
            kinds.setdefault(kind, []).append([c.err2 / max(float(st.norm2[h]), 1e-300), float(act[h])])
    return {"by_kind": {k: {"heads": len(v), "pred_rel_err2": sum(a for a, _ in v) / len(v),
                            "scored_rel_err2": sum(b for _, b in v) / len(v)} for k, v in sorted(kinds.items())},
            "sensitivity_final_rel_l2_predicted": pred_final ** 0.5,
            "sensitivity_final_rel_l2_from_scored_site_errors": act_final ** 0.5,
            "coherent_final_rel_l2_from_scored_site_errors": coherent}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_clip_arguments(p)
    p.add_argument("--no-pooled", action="store_true")
    p.add_argument("--renorm", default="", help="vsopt_renorm intervals, e.g. 3")
    p.add_argument("--residual", default="", help="vsopt_residual intervals (residual sharing), e.g. 2,3")
    p.add_argument("--held-out", action="store_true", help="vsopt_held_out (errors on a second calibration clip)")
    p.add_argument("--variants", default="bench,uniform")
    p.add_argument("--states", default=None,
                   help="a file of measured site states: loaded when it exists (the measurement skipped), "
                        "else written after measuring (torch.save; same settings only)")
    p.add_argument("--out", default="bench_search_variants")
    args = p.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    if not variants or any(v not in VARIANTS for v in variants):
        print(f"error: --variants {args.variants!r}: known {VARIANTS}", file=sys.stderr)
        return 2
    densities = tuple(float(d) for d in args.densities.split(","))
    clip = tuple(int(x) for x in args.clip.split(","))

    import torch

    import vsopt.calibration.run as run
    from vsopt.benchmark import BenchSettings, Method, PlanScorer
    from vsopt.benchmark.aggregate import plan_options, predicted_attention_speedup
    from vsopt.core.costmodel import CostModel
    from vsopt.calibration import DensityBudget
    from vsopt.calibration.result import assemble
    from vsopt.core.io import atomic_write_json
    from vsopt.models.model import load_shipped

    settings = BenchSettings(methods=(Method.VSOPT,), densities=densities, steps=args.steps, clip=clip,
                             calibration_steps=args.calibration_steps, calibration_clips=args.calibration_clips,
                             vsopt_warmup=(),
                             vsopt_pooled=not args.no_pooled,
                             vsopt_renorm=tuple(int(r) for r in args.renorm.split(",") if r),
                             vsopt_residual=tuple(int(r) for r in args.residual.split(",") if r),
                             vsopt_held_out=args.held_out)
    ref = load_shipped(device=args.device, dtype=torch.bfloat16 if args.device == "cuda" else torch.float32).eval()
    t0 = time.perf_counter()
    scorer = PlanScorer(ref, settings)
    speed_cost = CostModel.default(torch.cuda.get_device_name() if args.device == "cuda" else None)  # as the bench
    captured = {}
    original = run.decide_with_warmup

    def capture(states, cost, budget, weights, ranges, warmups):
        captured.update(states=states, cost=cost, weights=weights, ranges=ranges)
        return original(states, cost, budget, weights, ranges, warmups)

    if args.states and Path(args.states).exists():
        captured.update(torch.load(args.states, weights_only=False))
        options = captured.pop("options")
        if any(v.startswith("probe") for v in variants):  # the calibration clip's inputs (weights loaded)
            scorer._error_weights = {}
            scorer._calibration(min(densities))
    else:
        run.decide_with_warmup = capture
        try:
            calls, options = scorer._calibration(min(densities))
            run.calibrate_many(scorer.velocity, calls, [DensityBudget(densities[0], settings.quant)],
                               options=options, progress=False)
        finally:
            run.decide_with_warmup = original
        if args.states:
            torch.save({**captured, "options": options}, args.states)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"settings": json.loads(json.dumps(dataclasses.asdict(settings), default=lambda v: v.value)),
              "measure_s": time.perf_counter() - t0, "variants": {}}
    for name in variants:
        t = time.perf_counter()
        w = (probe_weights(scorer, settings, captured["ranges"], min(densities)) if name.startswith("probe")
             and name != "probe_each" else variant_weights(name, captured["weights"]))
        states = restricted(captured["states"], withdrawn(name))
        rows = []
        for d in densities:
            budget = DensityBudget(d, settings.quant)
            if name == "probe_each":
                w = probe_weights(scorer, settings, captured["ranges"], d)
            if name == "coherent":
                decisions = coherent_decisions(original, states, captured["cost"], budget, w, captured["ranges"])
            else:
                decisions, _ = original(states, captured["cost"], budget, w, captured["ranges"],
                                        (1,) if name == "warmup" else ())
            plan, _ = assemble(states, decisions, options, captured["cost"], budget)
            s = scorer.score(plan)
            rows.append({"target_density": d, "density": s["density"], "psnr": s["psnr"], "ssim": s["ssim"],
                         "rel_l2": s["rel_l2"], "options": plan_options(plan, scorer.sites, settings.steps),
                         "predicted_speedup": predicted_attention_speedup(plan, scorer.sites, speed_cost,
                                                                          settings.steps, scorer.dense_calls_by_step),
                         "diagnosis": diagnose(scorer, states, decisions, w, captured["ranges"])})
        result["variants"][name] = {"points": rows, "wall_s": time.perf_counter() - t}
        atomic_write_json(out / "search_variants.json", result)
        print(f"{name}: " + " | ".join(f"{r['density']:.3f} {r['psnr']:.2f} dB {r['predicted_speedup']:.3f}x"
                                       for r in rows)
              + f"  ({time.perf_counter() - t:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
