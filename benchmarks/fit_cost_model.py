"""Fit vsopt's cost model (vsopt/core/costmodel.py) to the timings benchmarks/measure_cost_model.py
took on a GPU. Runs anywhere (no GPU needed):

    python3 benchmarks/fit_cost_model.py --measurements cost_model_measurements.json \
        --out vsopt/costmodels/h200.json [--before vsopt/costmodels/h200.json]

What is fitted from what (non-negative least squares weighted by 1/time: relative errors):
- the attention terms per kernel key (launch, per query block, per visited block, per span block)
  from the attention grid; key_slots (the span term's concurrent programs, per kernel key) is the
  candidate (0, or 1-4 programs per SM) that fits that key's grid points best;
- the permutation (fixed + per MiB) from one site's 3 permute + 1 unpermute in the model's layout
  with one order per head (what the lowering runs);
- SDPA (the dense path, sdpa_us per head dim) from the sdpa records in the model's layout;
- the dynamic-mask scoring from the dynamic records;
- overhead_us: one lowered site's cost beyond its GPU time in a compiled model, without and with
  CUDA graphs: (planned - dense) compiled wall time minus (planned - dense) GPU time (one site
  compiled by plain Inductor, without vsopt.inductor.prepare; the terms per launch group come from
  benchmarks/host_overhead.py --gpu, written in with its --apply after a refit);
- meta["host_overhead_us_not_in_model"]: an eager op call minus its graph replay, per kernel key;
- pooled_us (the pooled remainder's attention over KB pooled keys, the SDPA form per head dim) and
  op_us (the fixed cost of one extra ATen op: cudagraphs from GPU time, eager from eager wall time,
  with the MiB moved as a second feature) from the remainder records, where measured.
The shipped reference plan's sites (4096 and 16384 tokens) are not fitted on: they are the check.
The prediction errors there, and on every measured family, are reported for the model before
(--before, default the shipped one for the GPU) and after, printed and saved in meta["check"].
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from vsopt.core.costmodel import CostModel, Launch, SiteWork, dense_features, fit_linear  # noqa: E402
from vsopt.core.errors import ConfigError  # noqa: E402

SLOTS_PER_SM = (1, 2, 3, 4)



def _fit_dense_form(rs, candidates, features) -> dict[str, float]:
    """The SDPA-form coefficients (dense_features) fitted to records rs, at the concurrent-program
    count among candidates that scores best (median relative error + a quarter of the worst)."""
    best = None
    for n in candidates:
        c, rel = fit_linear([features(r, n) for r in rs], [r["gpu_us"] for r in rs])
        score = float(statistics.median(rel)) + 0.25 * float(rel.max())
        if best is None or score < best[0]:
            best = (score, {**c, "slots": float(n)})
    return best[1]

def _score(model: CostModel) -> float:
    """How well a fit fits: median relative error, plus a quarter of the worst."""
    return model.meta["fit_median_rel_error"] + 0.25 * model.meta["fit_max_rel_error"]


def load_measurements(path: str, allow_dry_run: bool = False) -> dict:
    with open(path) as f:
        m = json.load(f)
    if m.get("format") != "vsopt-cost-measurements":
        raise ConfigError(f"{path}: not a benchmarks/measure_cost_model.py output (format {m.get('format')!r})")
    if m.get("dry_run") and not allow_dry_run:
        raise ConfigError(f"{path}: a --dry-run on the CPU: its times are not a GPU's")
    return m


def records(m: dict, kind: str, **match) -> list[dict]:
    return [r for r in m["measurements"] if r["kind"] == kind and "skipped" not in r
            and all(r.get(k) == v for k, v in match.items())]


def work_of(d: dict) -> SiteWork:
    return SiteWork(tuple(Launch(**launch) for launch in d["launches"]), d["permuted_mib"], d["scored_blocks"])


def site_works(m: dict) -> dict[tuple[str, int], SiteWork]:
    """(site, tokens) -> the site's work as vsopt.core.semantics prices it now, for site records
    measured before their work recorded the longest rows (max_row_blocks): the reference plan's
    sites rebuilt as benchmarks/measure_cost_model.py builds them (on the CPU), used only where
    they give the recorded densities (the same plan)."""
    recs = [r for r in records(m, "site") if any("max_row_blocks" not in launch for launch in r["work"]["launches"])]
    if not recs:
        return {}
    import importlib.util

    from vsopt.core import semantics

    spec = importlib.util.spec_from_file_location(
        "measure_cost_model", os.path.join(os.path.dirname(os.path.abspath(__file__)), "measure_cost_model.py"))
    mcm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mcm)
    out = {}
    for tokens in sorted({r["tokens"] for r in recs}):
        for site, sp, _ in mcm.reference_sites(tokens):
            for st in sp.steps or [None]:
                heads = st.heads if st is not None else sp.heads
                where = f"{site.site_id}@{st.start if st is not None else 'all'}"
                densities = semantics.head_densities(site, heads)
                out[(where, tokens)] = (densities, semantics.site_work(site, heads, densities))
    found = {}
    for r in recs:
        d, w = out.get((r["site"], r["tokens"]), (None, None))
        if d is not None and all(abs(a - b) < 1e-6 for a, b in zip(d, r["densities"])):
            found[(r["site"], r["tokens"])] = w
    return found


def attention_points(m: dict) -> list[tuple[SiteWork, float]]:
    out = []
    for r in records(m, "attention"):
        out.append((SiteWork((Launch(r["quant"], r["head_dim"], r["block"], r["block"], r["query_blocks"],
                                     r["visited_blocks"], r.get("rows_max", 0)),)), r["gpu_us"]))
    return out


EPILOGUES = ("merge", "mass_measure", "mass_correct", "resid_measure", "resid_correct")  # remainder records


def fit(m: dict, before: CostModel | None, command: str, source: str) -> tuple[CostModel, dict]:
    """The fitted model and the check (errors before / after per measured family)."""
    att = attention_points(m)
    if not att:
        raise ConfigError("the measurements have no attention timings: nothing to fit")
    sms = m.get("sm_count") or 132
    candidates = (0, *(k * sms for k in SLOTS_PER_SM))
    key_slots = {}
    for key in sorted({w.launches[0].key for w, _ in att}):
        mine = [(w, t) for w, t in att if w.launches[0].key == key]
        key_slots[key] = min(candidates, key=lambda n: _score(CostModel.fit(mine, m["gpu"], slots=n)))
    model = CostModel.fit(att, m["gpu"], slots=key_slots)
    fitted = {"attention": len(att)}

    perm = records(m, "permute", op="site", layout="model", shared_order=False)
    if perm:
        c, _ = fit_linear([{"fixed": 1.0, "mib": r["permuted_mib"]} for r in perm], [r["gpu_us"] for r in perm])
        model.permute_fixed_us, model.permute_us_per_mib = c.get("fixed", 0.0), c.get("mib", 0.0)
        fitted["permute"] = len(perm)
    dyn = records(m, "dynamic")
    if dyn:
        c, _ = fit_linear([{"fixed": 1.0, "block": float(r["scored_blocks"])} for r in dyn], [r["gpu_us"] for r in dyn])
        model.score_fixed_us, model.score_us_per_block = c.get("fixed", 0.0), c.get("block", 0.0)
        fitted["dynamic"] = len(dyn)
    for d in sorted({r["head_dim"] for r in records(m, "sdpa", layout="model")}):
        rs = records(m, "sdpa", layout="model", head_dim=d)
        model.sdpa_us[f"d{d}"] = _fit_dense_form(rs, candidates,
                                                 lambda r, n: dense_features(r["batch"], r["heads"], r["n"], r["n"], n))
        fitted[f"sdpa/d{d}"] = len(rs)
    # the pooled remainder (measure_cost_model.py --sections remainder): its attention over the KB
    # pooled keys in the SDPA form, per head dim; and the fixed cost of one extra ATen op, from the
    # merge and the corrections' epilogues (time ~ ops + MiB moved), GPU time in a CUDA graph
    # (cudagraphs) and eager wall time (eager: ATen ops one by one, an upper bound for Inductor,
    # which fuses the elementwise ones)
    for d in sorted({r["head_dim"] for r in records(m, "remainder", what="pooled")}):
        rs = records(m, "remainder", what="pooled", head_dim=d)
        model.pooled_us[f"d{d}"] = _fit_dense_form(
            rs, candidates, lambda r, n: dense_features(1, r["batch"] * r["heads"], r["n"], r["pooled_keys"], n))
        fitted[f"pooled/d{d}"] = len(rs)
    epi = [r for r in records(m, "remainder") if r["what"] in EPILOGUES]
    if epi:
        for mode, y in (("cudagraphs", "gpu_us"), ("eager", "wall_us")):
            c, _ = fit_linear([{"op": float(r["ops"]), "mib": r["mib"]} for r in epi], [r[y] for r in epi])
            model.op_us[mode] = c.get("op", 0.0)
        fitted["op_us"] = len(epi)
    compiled = {(r["what"], r["mode"]): r for r in records(m, "compiled")}
    for mode, name in (("default", "eager"), ("reduce-overhead", "cudagraphs")):
        p, d = compiled.get(("planned", mode)), compiled.get(("dense", mode))
        if p and d:
            extra = (p["wall_us"] - d["wall_us"]) - (p["eager_gpu_us"] - d["eager_gpu_us"])
            model.overhead_us[name] = max(0.0, extra)
    host = {}
    for r in records(m, "launch"):
        if r["op"].startswith("block_sparse_attention/"):
            host[r["op"].split("/", 1)[1]] = round(max(0.0, r["wall_us"] - r["gpu_us"]), 1)
    sha = hashlib.sha256(open(source, "rb").read()).hexdigest()
    model.meta = {
        "source": "benchmarks/fit_cost_model.py", "command": command,
        "fitted": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "measured": {"command": m.get("command"), "date": m.get("date"), "gpu": m["gpu"], "sm_count": m.get("sm_count"),
                     "torch": m.get("torch"), "triton": m.get("triton"), "seconds": m.get("seconds"),
                     "sections": m.get("sections"), "file_sha256": sha},
        "torch": m.get("torch"), "triton": m.get("triton"), "date": m.get("date"),
        "fitted_on": fitted, "slots_per_sm": {k: v / sms for k, v in sorted(model.key_slots.items())},
        "fit_median_rel_error": model.meta["fit_median_rel_error"], "fit_max_rel_error": model.meta["fit_max_rel_error"],
        "host_overhead_us_not_in_model": dict(sorted(host.items())),
    }
    rebuilt = site_works(m)
    check = {"after": errors(m, model, rebuilt), "sites_priced_from_the_plan_now": len(rebuilt)}
    if before is not None:
        check["before"] = errors(m, before, rebuilt)
        check["before_model"] = {"gpu": before.gpu, "date": before.meta.get("date")}
    model.meta["check"] = check
    return model, check


def _rel(pairs) -> dict | None:
    rel = [abs(p - t) / t for p, t in pairs if p is not None and t > 0]
    if not rel:
        return None
    return {"n": len(rel), "median": round(statistics.median(rel), 4), "max": round(max(rel), 4)}


def errors(m: dict, model: CostModel, sites_rebuilt: dict | None = None) -> dict:
    """Relative prediction errors of `model` at every measured point, per family; the reference
    plan's sites per size (attention, permutations, whole site, dense)."""
    def safe(f):
        try:
            return f()
        except ConfigError:
            return None

    out = {"attention_grid": _rel((safe(lambda w=w: model.predict_us(w)), t) for w, t in attention_points(m)),
           "permute_grid": _rel((model.permute_fixed_us + r["permuted_mib"] * model.permute_us_per_mib, r["gpu_us"])
                                for r in records(m, "permute", op="site", layout="model", shared_order=False)),
           "pooled": _rel((model.pooled_attention_us(r["batch"] * r["heads"], r["n"], r["pooled_keys"], r["head_dim"]),
                           r["gpu_us"]) for r in records(m, "remainder", what="pooled")),
           "sdpa_grid": _rel((model.dense_us(r["batch"], r["heads"], r["n"], r["n"], r["head_dim"]), r["gpu_us"])
                             for r in records(m, "sdpa", layout="model"))}
    rebuilt = site_works(m) if sites_rebuilt is None else sites_rebuilt
    for tokens in sorted({r["tokens"] for r in records(m, "site")}):
        rs = records(m, "site", tokens=tokens)
        works = [rebuilt.get((r["site"], tokens)) or work_of(r["work"]) for r in rs]
        out[f"sites@{tokens}"] = {
            "attention": _rel((safe(lambda w=w: model.predict_us(SiteWork(w.launches))), r["attention_gpu_us"])
                              for w, r in zip(works, rs)),
            "permutation": _rel((model.permute_fixed_us + w.permuted_mib * model.permute_us_per_mib,
                                 r["permute_gpu_us"] + r["unpermute_gpu_us"]) for w, r in zip(works, rs) if r["permuted"]),
            "site": _rel((safe(lambda w=w: model.predict_us(w)), r["site_gpu_us"]) for w, r in zip(works, rs)),
            "dense": _rel((model.dense_us(r["batch"], r["heads"], r["tokens"], r["tokens"], r["head_dim"]),
                           r["dense_gpu_us"]) for r in rs),
            "measured_us": {"attention": _mean(r["attention_gpu_us"] for r in rs),
                            "permutation": _mean(r["permute_gpu_us"] + r["unpermute_gpu_us"] for r in rs if r["permuted"]),
                            "site": _mean(r["site_gpu_us"] for r in rs), "dense": _mean(r["dense_gpu_us"] for r in rs)},
            "predicted_us": {"attention": _mean(safe(lambda w=w: model.predict_us(SiteWork(w.launches))) for w in works),
                             "site": _mean(safe(lambda w=w: model.predict_us(w)) for w in works),
                             "dense": _mean(model.dense_us(r["batch"], r["heads"], r["tokens"], r["tokens"],
                                                           r["head_dim"]) for r in rs)},
        }
    return out


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(sum(xs) / len(xs), 2) if xs else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--measurements", required=True, help="benchmarks/measure_cost_model.py's JSON")
    p.add_argument("--out", required=True, help="cost-model JSON to write (e.g. vsopt/costmodels/h200.json)")
    p.add_argument("--before", default=None, help="the model to compare with (default: the shipped one for the GPU)")
    p.add_argument("--allow-dry-run", action="store_true", help="accept a CPU dry run (tests only)")
    args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    try:
        m = load_measurements(args.measurements, args.allow_dry_run)
        before = CostModel.load(args.before) if args.before else CostModel.default(m["gpu"])
        model, check = fit(m, before, "python3 benchmarks/fit_cost_model.py " + " ".join(argv), args.measurements)
    except ConfigError as e:
        print(f"fit_cost_model: {e}", file=sys.stderr)
        return 2
    model.save(args.out)
    print(f"{m['gpu']}: fitted on {model.meta['fitted_on']} (slots per SM {model.meta['slots_per_sm']}); wrote {args.out}")
    for name in sorted(check["after"]):
        print(f"  {name}: before {json.dumps(check.get('before', {}).get(name))}\n  {' ' * len(name)}  after  "
              f"{json.dumps(check['after'][name])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
