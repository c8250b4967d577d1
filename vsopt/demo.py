"""`vsopt demo`: sample a clip from the shipped reference model, dense and through vsopt.

    vsopt demo --out vsopt-demo [--plan wan.plan.json] [--steps 20] [--prompt "..."]

Loads the reference model (a small diffusers WanTransformer3DModel trained on procedural clips,
see docs/MODEL.md), prints the attention sites vsopt finds in it and the plan used, samples the
same clip (same noise, same description) once with the eager model and once with
torch.compile(model, backend="vsopt", options={"plan": ...}), prints the time of each and the
PSNR/SSIM of the optimized clip against the dense one, and writes to --out:
    frames.png   dense frames, optimized frames, and their difference (x4), side by side
    clip.gif     dense | optimized, animated
    demo.json    everything printed, as JSON
By default the optimized run uses the shipped plan calibrated for the reference model (at the
trained clip size); with --plan none every site runs vsopt's exact dense op, so the two clips
agree to rounding.
Runs on the GPU (bf16) when there is one, else on the CPU (float32) in a few minutes.
"""
from __future__ import annotations

import argparse
import json
import time
from io import BytesIO
from pathlib import Path

import torch

from vsopt.core.errors import VsoptError
from vsopt.core.io import atomic_write_bytes


SHIPPED_PLAN = "shipped"


def resolve_plan(choice: str | None, frames: int, size: int, config) -> tuple[str | None, str]:
    """The plan file the demo runs, and why: `choice` is a path, 'shipped' or 'none'. The shipped
    plan (vsopt/models/assets/reference.plan.json, calibrated on the GPU for the trained clip size,
    see docs/CALIBRATION.md) holds block masks for that size only, so other sizes run dense."""
    if choice in (None, "", "none"):
        return None, "none: every site runs vsopt's exact dense attention"
    if choice != SHIPPED_PLAN:
        return choice, choice
    if (frames, size) != (config.frames, config.height):
        return None, (f"none: the shipped plan is calibrated for {config.frames} frames of {config.height}x"
                      f"{config.width}; this clip runs every site dense (--plan PATH for a plan of its size)")
    from importlib.resources import files

    path = files("vsopt.models") / "assets" / "reference.plan.json"
    return str(path), f"shipped calibrated plan ({path.name})"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="vsopt-demo", help="folder for frames.png, clip.gif and demo.json (default: %(default)s)")
    p.add_argument("--plan", default=SHIPPED_PLAN, metavar="PATH|shipped|none",
                   help="plan for the optimized run: a plan JSON; 'shipped' (default), the plan calibrated for the "
                        "reference model (used at the trained clip size, else every site dense); 'none', every "
                        "site dense")
    p.add_argument("--prompt", default=None,
                   help='description, e.g. "waves background; red square moving left, clockwise, growing" '
                        "(default: drawn from --seed)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (and of the description if no --prompt)")
    p.add_argument("--steps", type=int, default=20, help="Euler steps (default: %(default)s)")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale; 1 = off (default: %(default)s)")
    p.add_argument("--frames", type=int, default=None, help="latent frames (default: the trained 16; fewer is faster)")
    p.add_argument("--size", type=int, default=None, help="latent height = width (default: the trained 32; even)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--backend", default="vsopt",
                   help="torch.compile backend of the optimized run (default: vsopt; e.g. inductor to compare)")


def _upscale(frame, factor: int):
    from PIL import Image

    img = Image.fromarray(frame.numpy())
    return img.resize((img.width * factor, img.height * factor), Image.NEAREST)


def write_images(dense_rgb: torch.Tensor, opt_rgb: torch.Tensor, out: Path, factor: int = 6) -> None:
    """dense_rgb, opt_rgb: (F, H, W, 3) uint8. frames.png: rows dense / optimized / |diff| x 4,
    every other frame; clip.gif: dense | optimized, one GIF frame per video frame."""
    from PIL import Image, ImageDraw

    F_, H, W, _ = dense_rgb.shape
    diff = ((dense_rgb.float() - opt_rgb.float()).abs() * 4).clamp(0, 255).to(torch.uint8)
    cols = list(range(0, F_, 2 if F_ > 8 else 1))
    label_w, pad = 90, 2
    cw, ch = W * factor + pad, H * factor + pad
    sheet = Image.new("RGB", (label_w + cw * len(cols), ch * 3 + 18), "white")
    d = ImageDraw.Draw(sheet)
    for r, (name, video) in enumerate((("dense", dense_rgb), ("vsopt", opt_rgb), ("|diff| x4", diff))):
        d.text((4, 18 + r * ch + ch // 2 - 6), name, fill="black")
        for c, f in enumerate(cols):
            sheet.paste(_upscale(video[f], factor), (label_w + c * cw, 18 + r * ch))
    for c, f in enumerate(cols):
        d.text((label_w + c * cw + 4, 3), f"frame {f}", fill="black")
    buf = BytesIO()
    sheet.save(buf, format="PNG")
    atomic_write_bytes(out / "frames.png", buf.getvalue())

    frames = []
    for f in range(F_):
        both = Image.new("RGB", (2 * W * factor + 4, H * factor), "white")
        both.paste(_upscale(dense_rgb[f], factor), (0, 0))
        both.paste(_upscale(opt_rgb[f], factor), (W * factor + 4, 0))
        frames.append(both)
    buf = BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=125, loop=0)
    atomic_write_bytes(out / "clip.gif", buf.getvalue())


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _load_reference(model_lib, device: str, dtype: torch.dtype):
    """The shipped model; any failure is reported as what is wrong with the environment."""
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


def run_demo(args: argparse.Namespace) -> dict:
    """Everything `vsopt demo` does; returns what it printed as a dict."""
    import vsopt
    from vsopt.core.metrics import psnr, relative_l2, ssim
    from vsopt.models import data, model as model_lib, sampler

    if args.steps < 1:
        raise VsoptError(f"--steps must be >= 1, got {args.steps}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise VsoptError("--device cuda: no CUDA GPU is available")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    ref = _load_reference(model_lib, device, dtype)
    c = ref.config
    frames, size = args.frames or c.frames, args.size or c.height
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
    result: dict = {"description": data.describe(tokens[0].cpu()), "device": device, "dtype": str(dtype),
                    "clip": {"latent": list(shape), "tokens": frames * (size // 2) ** 2}, "steps": args.steps,
                    "guidance": args.guidance, "seed": args.seed, "backend": args.backend}
    print(f"vsopt demo: {result['description']}")
    print(f"  {device} ({dtype}), latent clip {shape}, {result['clip']['tokens']} video tokens, "
          f"{args.steps} steps, guidance {args.guidance}")

    plan_path, plan_source = resolve_plan(args.plan, frames, size, c)
    options: dict = {}
    if plan_path:
        options["plan"] = plan_path
    example = (torch.zeros(batch, *shape, device=device, dtype=dtype), torch.full((batch,), 500.0, device=device),
               torch.cat([cond, uncond])[:batch])
    report = vsopt.inspect(ref.transformer, *example, options=options)
    print("\nattention sites found by vsopt:")
    print(report.table())
    result["sites"] = [s.site_id for s in report.sites]
    if plan_path:
        from vsopt.core.plan import Plan

        plan = Plan.load(plan_path)
        plan.validate_against(report.sites)
        density = plan.density()
        plan_text = (f"{plan_source}: {len(plan.sites)} planned site(s), mean block density "
                     f"{'dynamic' if density is None else f'{density:.3f}'}")
    else:
        plan_text = plan_source
    print(f"\nplan: {plan_text}")
    result["plan"] = plan_text

    def run(model) -> tuple[torch.Tensor, float]:
        _sync(device)
        t0 = time.perf_counter()
        x = sampler.sample(model, cond, shape, steps=args.steps, seed=args.seed, guidance=args.guidance,
                           uncond=uncond, progress=True)
        _sync(device)
        return x, time.perf_counter() - t0

    print("\ndense (eager diffusers model):")
    # one untimed step first, as the compiled run gets: the first call pays for CUDA/cuBLAS set-up
    sampler.sample(ref.transformer, cond, shape, steps=1, seed=args.seed, guidance=args.guidance, uncond=uncond)
    dense, t_dense = run(ref.transformer)
    compiled = torch.compile(ref.transformer, backend=args.backend, **({"options": options} if args.backend == "vsopt" else {}))
    print(f"optimized (torch.compile backend={args.backend!r}): compiling (one sampling step)...")
    _sync(device)
    t0 = time.perf_counter()
    sampler.sample(compiled, cond, shape, steps=1, seed=args.seed, guidance=args.guidance, uncond=uncond)
    _sync(device)
    t_compile = time.perf_counter() - t0
    optimized, t_opt = run(compiled)

    dense_rgb = data.latent_to_rgb(dense[0].cpu())
    opt_rgb = data.latent_to_rgb(optimized[0].cpu())
    a, e = opt_rgb.float() / 255, dense_rgb.float() / 255
    metrics = {
        "psnr_db": psnr(a, e, data_range=1.0),
        "ssim": ssim(a.permute(0, 3, 1, 2), e.permute(0, 3, 1, 2), data_range=1.0),
        "latent_relative_l2": relative_l2(optimized.cpu(), dense.cpu()),
    }
    result.update(seconds={"dense": round(t_dense, 3), "compile": round(t_compile, 3), "optimized": round(t_opt, 3)},
                  metrics=metrics)
    print(f"\ntime: dense {t_dense:.2f} s, optimized {t_opt:.2f} s ({t_dense / t_opt:.2f}x), compile {t_compile:.1f} s")
    psnr_text = "inf (identical frames)" if metrics["psnr_db"] == float("inf") else f"{metrics['psnr_db']:.2f} dB"
    print(f"optimized vs dense: PSNR {psnr_text}, SSIM {metrics['ssim']:.4f}, "
          f"latent relative L2 {metrics['latent_relative_l2']:.2e}")

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
