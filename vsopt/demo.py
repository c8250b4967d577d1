"""`vsopt demo`: sample a clip from the shipped reference model: eager, Inductor and vsopt.

    vsopt demo --out vsopt-demo [--plan wan.plan.json] [--steps N] [--prompt "..."] [--cudagraphs]

Loads the reference model (a small diffusers WanTransformer3DModel trained on procedural clips,
see docs/MODEL.md), prints the attention sites vsopt finds in it and the plan used, then:

1. compiles, before any clock starts, every graph the timed runs need: torch.compile's default
   (Inductor) and torch.compile(model, backend="vsopt", options={"plan": ...}), warming up each
   step segment of a step-ranged plan (vsopt.set_denoising_step at the first step of each), with
   progress shown and the time taken reported on its own;
2. samples the same clip (same noise, same description) eagerly, through Inductor and through
   vsopt, timing every sampling step synchronized (vsopt.core.timing.CallTimer);
3. prints the median step of each, vsopt's speedup against eager and against Inductor, one line on
   what the numbers mean on this device (on a CPU vsopt's kernels run as their PyTorch
   references: no speedup is expected), and the PSNR/SSIM of vsopt's clip against the eager one.

It writes to --out: frames.png and clip.gif (vsopt.demo_images) and demo.json (everything printed,
per-step times included). By default the vsopt run uses the shipped plan calibrated for the
reference model (at the trained clip size); with --plan none every site runs vsopt's exact dense
op. Defaults depend on the device (DEVICE_DEFAULTS, printed): bf16, 20 steps and the large clip
(16384 tokens) on a GPU; float32, fewer steps and the small clip (4096) on the CPU. The shipped
plan calibrated for the clip's size runs; at a size with no shipped plan the plan of the trained
size is fitted to the clip (vsopt.core.resample), its density change printed.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from vsopt.models.plans import SHIPPED_PLAN, resolve_plan

# vsopt.core (torch) is imported inside the functions that run the demo: `vsopt demo --help` only
# builds the parser (vsopt.cli imports the command's module for its arguments).


#: Sampling steps by device when --steps is not given. On a 2-core CPU a step at the trained size
#: takes ~1.5 s eagerly and ~2.5 s through vsopt (its kernels' PyTorch references), and compiling
#: Inductor and vsopt ~70 s: 6 steps (both step ranges of the shipped plan, 0-3 and 4+, still run)
#: keep the default demo within 3 minutes there.
#: The clip (latent height = width) by device: the reference model's large size (16384 video tokens,
#: where sparsity pays) on a GPU, its small one (4096) on a CPU.
DEVICE_DEFAULTS = {"cuda": {"steps": 20, "size": 64}, "cpu": {"steps": 6, "size": 32}}


def sampling_note(plan, steps: int, guidance: float) -> str | None:
    """A line when this run samples otherwise than the plan's calibration did (its
    meta["calibration"]["sampling"]: steps, guidance), else None; None too for a plan that keeps
    every site dense (exact at any sampling). A plan's step ranges are step indices, and guidance
    scales the conditional branch's error: the plan's measured quality holds for its own sampling
    (the shipped 16384-token plan: 35.5 dB there, 24.9 dB at 20 steps and guidance 3,
    BENCHMARKS.md session 8)."""
    cal = (plan.meta.get("calibration") or {}).get("sampling")
    if not cal or all(sp.is_dense for sp in plan.sites.values()):
        return None
    cal_steps, cal_guidance = cal.get("steps"), float(cal.get("guidance", 1.0))
    if cal_steps == steps and cal_guidance == float(guidance):
        return None
    return (f"the plan was calibrated on {cal_steps}-step trajectories at guidance {cal_guidance:g}; this run samples "
            f"{steps} steps at guidance {float(guidance):g}, so its quality may differ from the calibration's "
            f"(calibrate for it: vsopt calibrate --reference --steps {steps} --guidance {float(guidance):g} ...)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="vsopt-demo", help="folder for frames.png, clip.gif and demo.json")
    p.add_argument("--plan", default=SHIPPED_PLAN, metavar="PATH|shipped|none",
                   help="plan for the optimized run: a plan JSON; 'shipped', the plan calibrated for the reference "
                        "model (fitted to the clip size); 'none', every site dense")
    p.add_argument("--prompt", default=None,
                   help='description, e.g. "waves background; red square moving left, clockwise, growing" '
                        "(default: drawn from --seed)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (and of the description if no --prompt)")
    p.add_argument("--steps", type=int, default=None,
                   help="Euler steps (default: " + ", ".join(f"{v['steps']} on {k}" for k, v in DEVICE_DEFAULTS.items())
                        + ")")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale; 1 = off")
    p.add_argument("--frames", type=int, default=None, help="latent frames (default: the trained 16; fewer is faster)")
    p.add_argument("--size", type=int, default=None,
                   help="latent height = width (default: " + ", ".join(f"{v['size']} on {k}" for k, v in DEVICE_DEFAULTS.items())
                        + "; even)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--backend", default="vsopt",
                   help="torch.compile backend of the optimized run (e.g. inductor to compare)")
    p.add_argument("--cudagraphs", action="store_true",
                   help="run both compiled models under CUDA graphs (vsopt: options cudagraphs; Inductor: "
                        "mode reduce-overhead); GPU only")


def _load_reference(model_lib, device: str, dtype: torch.dtype):
    """The shipped model; any failure is reported as what is wrong with the environment."""
    from vsopt.core.errors import VsoptError

    try:
        return model_lib.load_shipped(device, dtype)
    except VsoptError:
        raise
    except Exception as e:  # noqa: BLE001 - a broken environment (missing or mismatched packages, bad files)
        raise VsoptError(f"the shipped reference model could not be loaded ({type(e).__name__}: {e}); the demo "
                         f"needs {_environment_needs()}: reinstall with `python3 -m pip install -e .`") from e


def _environment_needs() -> str:
    """What the demo's environment must provide, with what is installed."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name, need in (("torch", "2.11 to 2.14"), ("diffusers", ">= 0.35"), ("safetensors", ">= 0.4")):
        try:
            have = version(name)
        except PackageNotFoundError:
            have = "not installed"
        found.append(f"{name} {need} (found {have})")
    return ", ".join(found)


@contextlib.contextmanager
def _progress(label: str):
    """Print `label ...`, the elapsed seconds while the block runs (on a terminal), then the time
    taken. Yields a dict whose "s" holds the seconds afterwards."""
    result: dict = {}
    done = threading.Event()
    tty = sys.stdout.isatty()
    start = time.perf_counter()
    print(f"  {label} ...", end="" if not tty else "\n", flush=True)

    def tick():
        while not done.wait(1.0):
            print(f"\r  {label} ... {time.perf_counter() - start:.0f} s", end="", flush=True)

    ticker = threading.Thread(target=tick, daemon=True) if tty else None
    if ticker:
        ticker.start()
    try:
        yield result
    finally:
        done.set()
        if ticker:
            ticker.join()
        result["s"] = time.perf_counter() - start
        print(f"\r  {label} ... {result['s']:.1f} s" if tty else f" {result['s']:.1f} s", flush=True)


@contextlib.contextmanager
def _quiet_cpu_compiler():
    """Inductor's C++ build on a machine without CUDA warns 'No CUDA runtime is found' once per
    process: noise in the demo's output."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _graphs_compiled() -> int:
    """Graphs Dynamo has compiled in this process (to check that none is compiled while timing)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class _HeldWarnings(logging.Handler):
    """Holds the backend's warnings (logger "vsopt") while a progress line is open, so that they
    can be printed after it, the sites left dense grouped by reason."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        self.log = logging.getLogger("vsopt")

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self):
        self.propagate, self.log.propagate = self.log.propagate, False
        self.log.addHandler(self)
        return self

    def __exit__(self, *exc):
        self.log.removeHandler(self)
        self.log.propagate = self.propagate
        dense: dict[str, list[str]] = {}
        for m in dict.fromkeys(self.messages):
            hit = re.fullmatch(r"vsopt: site '(.+)' runs dense: (.+)", m)
            if hit:
                dense.setdefault(hit[2], []).append(hit[1])
            else:
                print(f"    {m}")
        for reason, sites in dense.items():
            print(f"    {len(sites)} site(s) run dense ({reason}): {', '.join(sites)}")
        return False


@dataclass
class Run:
    """One way of running the model, and what happened: compile + warm-up seconds (before any
    timing), the milliseconds of every sampling step, the sampled latents."""

    name: str
    model: object
    graphs: str = "eager"
    compile_s: float = 0.0
    step_ms: list[float] = field(default_factory=list)
    total_s: float = 0.0
    latents: torch.Tensor | None = None

    @property
    def median_ms(self) -> float:
        return statistics.median(self.step_ms)


def _meaning(device: str, dtype: torch.dtype, cudagraphs: bool, plan_path: str | None) -> str:
    """One line: what the times mean on this device."""
    import torch

    if device != "cuda":
        return ("on the CPU vsopt's kernels run as their PyTorch references (float32, no Triton): these times show the "
                "pipeline runs, not vsopt's speed, and no speedup is expected; GPU numbers are in BENCHMARKS.md")
    name = torch.cuda.get_device_name()
    major, minor = torch.cuda.get_device_capability()
    text = (f"on {name} ({str(dtype).replace('torch.', '')}, vsopt's Triton kernels): per-step times are CUDA-event "
            f"medians after every graph was compiled and warmed up{', under CUDA graphs' if cudagraphs else ''}")
    if plan_path is None:
        text += "; no plan: every site runs vsopt's exact dense op, so this is the cost of the rewrite alone"
    if major != 9:
        text += f"; vsopt's kernels are tuned for Hopper (sm_90), this GPU is sm_{major}{minor}"
    return text


def run_demo(args: argparse.Namespace) -> dict:
    """Everything `vsopt demo` does; returns what it printed as a dict."""
    import torch

    import vsopt
    from vsopt.core.errors import VsoptError
    from vsopt.core.io import atomic_write_bytes
    from vsopt.core.metrics import psnr, relative_l2, ssim
    from vsopt.core.timing import CallTimer
    from vsopt.demo_images import write_images
    from vsopt.models import data, model as model_lib, sampler

    if args.device == "cuda" and not torch.cuda.is_available():
        raise VsoptError("--device cuda: no CUDA GPU is available")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if args.cudagraphs and device != "cuda":
        raise VsoptError("--cudagraphs needs a CUDA GPU")
    defaults = DEVICE_DEFAULTS[device]
    steps = args.steps if args.steps is not None else defaults["steps"]
    if steps < 1:
        raise VsoptError(f"--steps must be >= 1, got {steps}")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    ref = _load_reference(model_lib, device, dtype)
    c = ref.config
    frames, size = args.frames or c.frames, args.size or defaults["size"]
    if frames < 2 or size < 8 or size % 2:
        raise VsoptError(f"clip too small or odd: --frames {frames} (>= 2), --size {size} (even, >= 8)")
    try:
        tokens = data.tokenize(args.prompt)[None] if args.prompt else data.sample_scenes(1, args.seed).tokens
    except ValueError as e:
        raise VsoptError(str(e)) from None
    tokens = tokens.to(device)
    shape = (data.CHANNELS, frames, size, size)
    cond, uncond = ref.encode(tokens), ref.encode(torch.zeros_like(tokens))
    batch = 2 if args.guidance != 1.0 else 1
    chosen = [f"{steps} steps" + (" (--steps)" if args.steps is not None else
                                  f" (the {device} default; {DEVICE_DEFAULTS['cuda']['steps']} on a GPU)"
                                  if device == "cpu" else " (the GPU default)"),
              f"clip {frames}x{size}x{size}" + (" (a trained size, where a shipped plan applies)"
                                                if model_lib.shipped_plan(frames, size, size) else "")]
    result: dict = {"description": data.describe(tokens[0].cpu()), "device": device, "dtype": str(dtype),
                    "clip": {"latent": list(shape), "tokens": frames * (size // 2) ** 2}, "steps": steps,
                    "guidance": args.guidance, "seed": args.seed, "backend": args.backend,
                    "cudagraphs": args.cudagraphs, "defaults": f"{device}: " + ", ".join(chosen)}
    print(f"vsopt demo: {result['description']}")
    print(f"  {device} ({dtype}), latent clip {shape}, {result['clip']['tokens']} video tokens, "
          f"{steps} steps, guidance {args.guidance}")
    print(f"  settings for this device: {', '.join(chosen)}; --steps, --frames, --size override")

    plan_path, plan_source = resolve_plan(args.plan, frames, size, c)
    options: dict = {"plan": plan_path} if plan_path else {}
    if args.cudagraphs:
        options["cudagraphs"] = True
    example = (torch.zeros(batch, *shape, device=device, dtype=dtype), torch.full((batch,), 500.0, device=device),
               torch.cat([cond, uncond])[:batch])
    report = vsopt.inspect(ref.transformer, *example, options={k: v for k, v in options.items() if k == "plan"})
    print("\nattention sites found by vsopt:")
    print(report.table())
    result["sites"] = [s.site_id for s in report.sites]
    plan = None
    if plan_path:
        from vsopt.core.plan import Plan

        from vsopt.deploy.fitting import fit_plan

        calibrated = Plan.load(plan_path)
        fitted = fit_plan(calibrated, report.sites)  # another clip size: fitted, as the compile path does
        plan = fitted.plan
        density = plan.density()
        plan_text = (f"{plan_source}: {len(plan.sites)} planned site(s), mean block density "
                     f"{'dynamic' if density is None else f'{density:.3f}'}")
        if fitted.resampled:
            before = calibrated.density()
            plan_text += (f" (fitted to this clip: {len(fitted.lines)} site(s) resampled, mean density "
                          f"{'dynamic' if before is None else f'{before:.3f}'} at the calibrated size)")
            result["plan_fit"] = list(fitted.lines)
        changes = [b for b in plan.step_boundaries() if b > 0]
        if changes:
            plan_text += f", head plans change at step(s) {', '.join(map(str, changes))}"
    else:
        plan_text = plan_source
    print(f"\nplan: {plan_text}")
    for line in result.get("plan_fit", []):
        print(f"  {line}")
    note = sampling_note(calibrated, steps, args.guidance) if plan is not None else None
    if note:
        print(f"  note: {note}")
        result["plan_sampling_note"] = note
    result["plan"] = plan_text
    meaning = _meaning(device, dtype, args.cudagraphs, plan_path)

    # -- 1. compile and warm up everything the timed runs call, before any clock starts
    # the step segments the sampler will run (one graph each for a step-ranged plan), each called
    # once, twice on a GPU: Triton autotuning, then (CUDA graphs) the recording
    segments = sorted({plan.segment_start(i) for i in range(steps)}) if plan is not None and args.backend == "vsopt" \
        else [0]
    calls = 2 if device == "cuda" else 1

    def warm_up(run: Run, starts) -> None:
        # under no_grad, as the sampler calls it: Dynamo guards on the grad mode
        with _HeldWarnings(), _progress(f"{run.name}: {run.graphs}") as took, torch.no_grad():
            try:
                for start in starts:
                    vsopt.set_denoising_step(start)
                    for _ in range(calls):
                        run.model(*example, return_dict=False)
            finally:
                vsopt.set_denoising_step(None)
        run.compile_s = took["s"]

    inductor_kwargs = {"mode": "reduce-overhead"} if args.cudagraphs else {}
    runs = [Run("eager", ref.transformer, "warm-up forward")]
    if args.backend != "inductor":
        runs.append(Run("inductor", torch.compile(ref.transformer, **inductor_kwargs),
                        "torch.compile default: compiling and warming up"
                        + (" (mode reduce-overhead)" if args.cudagraphs else "")))
    optimized = Run(args.backend, torch.compile(ref.transformer, backend=args.backend,
                                                **({"options": options} if args.backend == "vsopt" else
                                                   inductor_kwargs if args.backend == "inductor" else {})),
                    f"compiling and warming up {len(segments)} step segment(s) (first steps "
                    f"{', '.join(map(str, segments))})" if len(segments) > 1 else "compiling and warming up")
    runs.append(optimized)
    print("\ncompiling and warming up (not timed below):")
    with _quiet_cpu_compiler():
        for run in runs:
            warm_up(run, segments if run is optimized else [0])

        # -- 2. the timed runs: the same clip, every step timed
        print("\nsampling, every step timed (synchronized):")
        graphs_before = _graphs_compiled()
        for run in runs:
            timer = CallTimer(run.model, cuda=device == "cuda")
            t0 = time.perf_counter()
            run.latents = sampler.sample(timer, cond, shape, steps=steps, seed=args.seed, guidance=args.guidance,
                                         uncond=uncond, progress=f"  {run.name}")
            if device == "cuda":
                torch.cuda.synchronize()
            run.total_s, run.step_ms = time.perf_counter() - t0, timer.ms
            print(f"  {run.name}: {run.total_s:.2f} s")
        late = _graphs_compiled() - graphs_before   # the warm-up above should leave none

    # -- 3. report
    eager = runs[0]
    inductor = next(r for r in runs if r.name == "inductor")
    print(f"\ntime per sampling step (median of {steps}; one transformer forward, batch {batch}):")
    for run in runs:
        line = f"  {run.name:<9} {run.median_ms:9.1f} ms"
        if run is optimized:
            line += (f"   {eager.median_ms / run.median_ms:.2f}x vs eager, "
                     f"{inductor.median_ms / run.median_ms:.2f}x vs inductor")
        print(line)
    compiled = [r for r in runs if r is not eager]
    print("compile and warm-up, before timing: " + ", ".join(f"{r.name} {r.compile_s:.1f} s" for r in compiled))
    if late:
        print(f"warning: {late} graph(s) were compiled during the timed runs: those times include compilation")
    print(f"note: {meaning}")

    dense_rgb = data.latent_to_rgb(eager.latents[0].cpu())
    opt_rgb = data.latent_to_rgb(optimized.latents[0].cpu())
    a, e = opt_rgb.float() / 255, dense_rgb.float() / 255
    metrics = {
        "psnr_db": psnr(a, e, data_range=1.0),
        "ssim": ssim(a.permute(0, 3, 1, 2), e.permute(0, 3, 1, 2), data_range=1.0),
        "latent_relative_l2": relative_l2(optimized.latents.cpu(), eager.latents.cpu()),
    }
    if inductor is not optimized:  # the compiler's own rounding, for scale
        metrics["inductor_psnr_db"] = psnr(data.latent_to_rgb(inductor.latents[0].cpu()).float() / 255, e,
                                           data_range=1.0)
    psnr_text = "inf (identical frames)" if metrics["psnr_db"] == float("inf") else f"{metrics['psnr_db']:.2f} dB"
    print(f"{optimized.name} vs eager: PSNR {psnr_text}, SSIM {metrics['ssim']:.4f}, "
          f"latent relative L2 {metrics['latent_relative_l2']:.2e}"
          + (f" (inductor vs eager: PSNR {metrics['inductor_psnr_db']:.2f} dB)"
             if metrics.get("inductor_psnr_db", float("inf")) != float("inf") else ""))
    result.update(
        timing={"meaning": meaning,
                "median_step_ms": {r.name: round(r.median_ms, 3) for r in runs},
                "speedup": {"vs_eager": round(eager.median_ms / optimized.median_ms, 3),
                            "vs_inductor": round(inductor.median_ms / optimized.median_ms, 3)},
                "step_ms": {r.name: [round(t, 3) for t in r.step_ms] for r in runs},
                "sampling_s": {r.name: round(r.total_s, 3) for r in runs},
                "compile_and_warmup_s": {r.name: round(r.compile_s, 3) for r in runs},
                "warmed_up_segments": segments, "warmup_calls_per_segment": calls,
                "graphs_compiled_while_timing": late},
        metrics=metrics)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_images(dense_rgb, opt_rgb, out)
    # JSON has no infinity: identical clips give PSNR "inf" as a string
    doc = dict(result, metrics={k: ("inf" if v == float("inf") else v) for k, v in metrics.items()})
    atomic_write_bytes(out / "demo.json", json.dumps(doc, indent=1).encode())
    print(f"wrote {out / 'frames.png'}, {out / 'clip.gif'}, {out / 'demo.json'}")
    return result


def run_cli(args: argparse.Namespace) -> int:
    run_demo(args)
    return 0
