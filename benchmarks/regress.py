"""Speed regression check (issue 16 item 6): a fixed small set timed on the GPU, compared with the
stored results of the same GPU kind; exit status 1 on a slowdown beyond noise.

    python3 benchmarks/regress.py                      # run, compare with results/regress_<kind>.json
    python3 benchmarks/regress.py --update             # run and store this GPU kind's baseline
    python3 benchmarks/regress.py --compare BASE.json NEW.json    # compare two stored runs (no GPU)

The set (bf16; each case timed in ROUNDS rounds of the median of ITERS CUDA-event-timed calls, after
warm-up, so that each case carries its own spread):
    kernel/<mode>/d<density>   torch.ops.vsopt.block_sparse_attention at wan480 (B=1, H=12,
                               N=32760, D=128), 128x128 blocks, a random block mask with the
                               diagonal, densities 0.1 and 0.5, modes none / int8 / fp8 / int8_fp8
    wan_block                  one Wan2.1-1.3B transformer block (diffusers, random weights, 480p,
                               81 frames: 32760 tokens, 512 text tokens) compiled with
                               backend="vsopt" and a uniform local-window plan of density ~0.2
    reference_model            the shipped reference model's forward (bf16, batch 2, its trained
                               clip size) compiled with backend="vsopt" and its shipped plan
The run takes about 2-4 minutes on an H200 from a cold start (autotuning and compiling most of it;
estimated, not yet measured).

The noise threshold. A case regresses when new_ms > base_ms * (1 + threshold), with
    threshold = max(FLOOR, SPREAD_FACTOR * max(spread_base, spread_new))
and spread = (max - min) / median of the case's ROUNDS round medians in that run. FLOOR (5%) is a
choice, not a measurement: slowdowns smaller than that are not worth failing a run for, and
CUDA-event medians of millisecond kernels on an otherwise idle GPU usually repeat within a few
percent. SPREAD_FACTOR (3) widens it for the cases that this run or the baseline's measured as
noisy (the compiled models more than the kernels), so that a case's own measured noise cannot trip
it. Both are stored with every result and can be set (--floor, --spread-factor). A case missing
from the new run fails; a case new to it is reported, not compared. Runs with another torch or
Triton version than the baseline's are compared, with a warning in the output.

Writes the run to --out (default: $OUT/regress_<kind>.json if $OUT is set, else
benchmarks/results/regress_<kind>_latest.json); --update writes the baseline
benchmarks/results/regress_<kind>.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
FLOOR = 0.05
SPREAD_FACTOR = 3.0
ROUNDS, ITERS = 5, 10
MODES = ("none", "int8", "fp8", "int8_fp8")
DENSITIES = (0.1, 0.5)
CASE_GROUPS = ("kernel", "wan_block", "reference_model")


# ----------------------------------------------------------------------------- comparison (no GPU)

def gpu_kind(device_name: str) -> str:
    """The baseline key of a GPU: 'NVIDIA H200' -> 'h200', 'NVIDIA H100 80GB HBM3' -> 'h100'; any
    other name slugified ('NVIDIA RTX A6000' -> 'nvidia_rtx_a6000')."""
    m = re.search(r"\b([abhlt]\d{2,3}s?|gb\d{3}|rtx ?\d{4})\b", device_name.lower())
    if m:
        return m.group(1).replace(" ", "")
    return re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_") or "unknown"


def spread(round_ms: list[float]) -> float:
    """(max - min) / median of a case's round medians: its measured noise, relative."""
    if not round_ms:
        raise ValueError("spread: no rounds")
    med = statistics.median(round_ms)
    return (max(round_ms) - min(round_ms)) / med if med > 0 else math.inf


def summarize(round_ms: list[float]) -> dict:
    """A case's stored form: the median of its round medians, its spread, the rounds."""
    return {"ms": statistics.median(round_ms), "spread": spread(round_ms), "rounds_ms": list(round_ms)}


@dataclass(frozen=True)
class Finding:
    """One case's comparison: status is 'ok', 'slower', 'missing' or 'new'."""

    case: str
    status: str
    base_ms: float | None = None
    new_ms: float | None = None
    threshold: float | None = None

    @property
    def change(self) -> float | None:
        """new / base - 1 (positive: slower)."""
        return None if self.base_ms is None or self.new_ms is None else self.new_ms / self.base_ms - 1

    @property
    def failed(self) -> bool:
        return self.status in ("slower", "missing")

    def line(self) -> str:
        if self.status == "missing":
            return f"FAIL {self.case:<28} missing from the new run (baseline {self.base_ms:.3f} ms)"
        if self.status == "new":
            return f"NEW  {self.case:<28} {self.new_ms:.3f} ms (not in the baseline)"
        tag = "FAIL" if self.failed else "ok  "
        return (f"{tag} {self.case:<28} {self.base_ms:9.3f} -> {self.new_ms:9.3f} ms ({self.change:+.1%}, "
                f"threshold +{self.threshold:.1%})")


def compare(baseline: dict, new: dict, floor: float = FLOOR, spread_factor: float = SPREAD_FACTOR) -> list[Finding]:
    """Every case of baseline["cases"] against new["cases"] (see the module docstring)."""
    if floor < 0 or spread_factor < 0:
        raise ValueError(f"compare: floor and spread_factor must be >= 0, got {floor}, {spread_factor}")
    base_cases, new_cases = baseline.get("cases"), new.get("cases")
    if not isinstance(base_cases, dict) or not isinstance(new_cases, dict):
        raise ValueError("compare: both results need a 'cases' mapping (a file written by benchmarks/regress.py)")
    out = []
    for case, b in base_cases.items():
        if case not in new_cases:
            out.append(Finding(case, "missing", base_ms=b["ms"]))
            continue
        n = new_cases[case]
        threshold = max(floor, spread_factor * max(b.get("spread", 0.0), n.get("spread", 0.0)))
        status = "slower" if n["ms"] > b["ms"] * (1 + threshold) else "ok"
        out.append(Finding(case, status, b["ms"], n["ms"], threshold))
    out += [Finding(c, "new", new_ms=n["ms"]) for c, n in new_cases.items() if c not in base_cases]
    return out


def version_warnings(baseline: dict, new: dict) -> list[str]:
    return [f"warning: {k} {baseline.get(k)} in the baseline, {new.get(k)} now"
            for k in ("torch", "triton", "gpu") if baseline.get(k) != new.get(k)]


def report(baseline: dict, new: dict, floor: float, spread_factor: float) -> int:
    """Print the comparison; 0 when nothing regressed, 1 otherwise."""
    for w in version_warnings(baseline, new):
        print(w)
    findings = compare(baseline, new, floor, spread_factor)
    for f in findings:
        print(f.line())
    failed = [f.case for f in findings if f.failed]
    print(f"{len(failed)} regression(s)" + (": " + ", ".join(failed) if failed else ""))
    return 1 if failed else 0


def load(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SystemExit(f"regress: {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise SystemExit(f"regress: {path} is not JSON ({e})") from None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--update", action="store_true", help="store this run as the GPU kind's baseline")
    p.add_argument("--baseline", type=Path, help="baseline file (default: benchmarks/results/regress_<kind>.json)")
    p.add_argument("--out", type=Path, help="where to write this run")
    p.add_argument("--cases", default=",".join(CASE_GROUPS),
                   help=f"comma-separated case groups to run, of {', '.join(CASE_GROUPS)} (default: all)")
    p.add_argument("--floor", type=float, default=FLOOR, help=f"minimum slowdown that fails (default {FLOOR})")
    p.add_argument("--spread-factor", type=float, default=SPREAD_FACTOR,
                   help=f"multiple of the measured spread that fails (default {SPREAD_FACTOR})")
    p.add_argument("--rounds", type=int, default=ROUNDS, help=f"rounds per case (default {ROUNDS})")
    p.add_argument("--iters", type=int, default=ITERS, help=f"timed calls per round (default {ITERS})")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("BASE", "NEW"),
                   help="compare two stored runs and exit (no GPU needed)")
    args = p.parse_args(argv)
    groups = [g for g in args.cases.split(",") if g]
    bad = [g for g in groups if g not in CASE_GROUPS]
    if bad or not groups:
        p.error(f"--cases: unknown group(s) {bad}; choose from {', '.join(CASE_GROUPS)}")
    if args.rounds < 2 or args.iters < 1:
        p.error("--rounds must be >= 2 (the spread needs two) and --iters >= 1")
    if args.floor < 0 or args.spread_factor < 0:
        p.error("--floor and --spread-factor must be >= 0")
    args.groups = groups
    return args


# ----------------------------------------------------------------------------- measurement (GPU)

def _rounds(fn, rounds: int, iters: int) -> list[float]:
    from vsopt.core.timing import time_calls

    fn()   # warm-up: autotuning, compilation
    return [statistics.median(time_calls(fn, iters, warmup=1, cuda=True)) for _ in range(rounds)]


def kernel_cases(rounds: int, iters: int) -> dict:
    import torch

    import vsopt.core  # noqa: F401  (registers torch.ops.vsopt.*)
    from vsopt.kernels.block_mask import reference as mask_ref

    H, N, D, block = 12, 32760, 128, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    nb = math.ceil(N / block)
    out = {}
    for density in DENSITIES:
        mask = torch.rand(1, H, nb, nb, device="cuda", generator=g) < density
        diag = mask_ref.diagonal_blocks(nb, nb, 1, 1, "cuda").clamp_max(nb - 1)
        mask = mask.scatter(-1, diag.expand(1, H, nb)[..., None], True)
        idx, cnt = torch.ops.vsopt.mask_to_table(mask)
        for mode in MODES:
            call = lambda: torch.ops.vsopt.block_sparse_attention(q, k, v, idx, cnt, D ** -0.5, block, block, mode)  # noqa: E731
            out[f"kernel/{mode}/d{density}"] = summarize(_rounds(call, rounds, iters))
            print(f"kernel/{mode}/d{density}: {out[f'kernel/{mode}/d{density}']['ms']:.3f} ms", flush=True)
    return out


def wan_block_case(rounds: int, iters: int) -> dict:
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import vsopt.backend as vb
    from e2e_wan import WAN_1_3B, _capture_block_inputs, build_model, compile_blocks, make_inputs, window_for_density
    from vsopt.core.config import VsoptConfig
    from vsopt.core.ir import TokenGrid
    from vsopt.core.plan import HeadPlan, Plan, Sparsity

    config = dict(WAN_1_3B, num_layers=1)
    grid = TokenGrid(21, 30, 52)
    inputs = make_inputs(grid.frames, grid.height, grid.width, 512, config["text_dim"], "cuda", torch.bfloat16)
    pattern, density = window_for_density(grid, 0.2, 128)
    model = build_model(config, "cuda", torch.bfloat16)
    with torch.no_grad():
        block_inputs = _capture_block_inputs(model, inputs)
        _, rep = vb.trace_and_rewrite(model.blocks[0], block_inputs, VsoptConfig(grid=grid))
        head = HeadPlan(Sparsity.PATTERN, pattern=pattern, block_m=128, block_n=128)
        plan = Plan.uniform([s for s in rep.sites if s.is_self_attention], head)
        torch._dynamo.reset()
        block = model.blocks[0]
        compile_blocks(model, "vsopt", {"grid": grid, "plan": plan})
        ms = _rounds(lambda: block(*block_inputs), rounds, iters)
    print(f"wan_block: {statistics.median(ms):.3f} ms (density {density:.3f})", flush=True)
    return {"wan_block": {**summarize(ms), "density": density}}


def reference_model_case(rounds: int, iters: int) -> dict:
    import torch

    import vsopt
    from vsopt.demo import resolve_plan
    from vsopt.models import data
    from vsopt.models import model as model_lib

    ref = model_lib.load_shipped("cuda", torch.bfloat16)
    c = ref.config
    plan_path, _why = resolve_plan("shipped", c.frames, c.height, c)
    tokens = data.sample_scenes(1, 0).tokens.to("cuda")
    cond = torch.cat([ref.encode(tokens), ref.encode(torch.zeros_like(tokens))])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, data.CHANNELS, c.frames, c.height, c.width, generator=g).to("cuda", torch.bfloat16)
    inputs = (x, torch.full((2,), 500.0, device="cuda"), cond)
    torch._dynamo.reset()
    model = torch.compile(ref.transformer, backend="vsopt", options={"plan": plan_path})
    with torch.no_grad():
        vsopt.set_denoising_step(0)
        try:
            ms = _rounds(lambda: model(*inputs, return_dict=False), rounds, iters)
        finally:
            vsopt.set_denoising_step(None)
    print(f"reference_model: {statistics.median(ms):.3f} ms", flush=True)
    return {"reference_model": summarize(ms)}


def measure(args) -> dict:
    import torch

    from importlib.metadata import version

    run = {"benchmark": "regress", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": version("triton"), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "rounds": args.rounds, "iters": args.iters, "floor": args.floor, "spread_factor": args.spread_factor,
           "cases": {}}
    groups = {"kernel": kernel_cases, "wan_block": wan_block_case, "reference_model": reference_model_case}
    for g in args.groups:
        run["cases"].update(groups[g](args.rounds, args.iters))
        torch.cuda.empty_cache()
    return run


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.compare:
        return report(load(args.compare[0]), load(args.compare[1]), args.floor, args.spread_factor)
    import torch

    if not torch.cuda.is_available():
        print("regress.py measures on a CUDA GPU (use --compare BASE NEW to compare stored runs)", file=sys.stderr)
        return 2
    from vsopt.core.io import atomic_write_json

    kind = gpu_kind(torch.cuda.get_device_name())
    baseline_path = args.baseline or RESULTS / f"regress_{kind}.json"
    run = measure(args)
    if args.update:
        atomic_write_json(baseline_path, run)
        print(f"stored the baseline of {kind}: {baseline_path}")
        return 0
    out = args.out or (Path(os.environ["OUT"]) / f"regress_{kind}.json" if os.environ.get("OUT")
                       else RESULTS / f"regress_{kind}_latest.json")
    atomic_write_json(out, run)
    print(f"this run: {out}")
    if not baseline_path.exists():
        print(f"no baseline for {kind} at {baseline_path}: run with --update to store one", file=sys.stderr)
        return 3
    return report(load(baseline_path), run, args.floor, args.spread_factor)


if __name__ == "__main__":
    raise SystemExit(main())
