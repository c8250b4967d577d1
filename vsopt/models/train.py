"""Train the reference model with rectified flow (flow matching), as Wan is trained.

Each step draws a fresh batch of procedural clips (vsopt.models.data, seeded by the step), a noise
level sigma ~ logit-normal(0, 1) per clip, noise n, and regresses the model's output on the
velocity n - x0 at x_sigma = (1 - sigma) x0 + sigma n, timestep 1000 sigma (mean squared error).
10% of descriptions are replaced by the empty one so that classifier-free guidance works.
AdamW, bf16 autocast, linear warm-up then cosine decay, an exponential moving average of the
weights (the EMA is what is saved), gradient clipping at 1.

The run is bounded by wall-clock time: after `--probe-steps` steps it measures the step time and
fixes the total number of steps (and so the cosine schedule) to fit `--minutes`.

`--sizes 16x32x32,16x64x64` trains on several latent clip sizes (frames x height x width), one per
step in turn, each at a batch that keeps the video tokens per step those of the first size (Wan's
rotary embedding makes the same weights serve every size). `--resume CKPT` continues from a saved
checkpoint (its weights and config; the optimizer starts afresh), so a long run can be done in
stretches that each fit a GPU lease.

    python -m vsopt.models.train --out /tmp/run --minutes 6

writes to --out: reference.safetensors (bf16 EMA weights), train_config.json (everything that
defined the run, and what it measured), loss_curve.json and loss_curve.png.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from vsopt.core.io import atomic_write_bytes, atomic_write_text
from vsopt.models import data, model as model_lib

TINY = dict(num_layers=1, num_attention_heads=2, attention_head_dim=32, ffn_dim=64, text_dim=16, freq_dim=32,
            frames=4, height=8, width=8)


def plot_curve(points: list[dict], path: Path, title: str) -> None:
    """A small line plot (log-scale loss against step) drawn with Pillow; written atomically."""
    from io import BytesIO

    from PIL import Image, ImageDraw

    W, H, L, R, T, B = 640, 400, 70, 20, 30, 40
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    steps = [p["step"] for p in points]
    losses = [math.log10(max(p["loss"], 1e-12)) for p in points]
    lo, hi = math.floor(min(losses) * 4) / 4, math.ceil(max(losses) * 4) / 4
    hi = hi if hi > lo else lo + 0.25
    smax = max(steps[-1], 1)

    def xy(step: float, loss: float) -> tuple[float, float]:
        return L + (W - L - R) * step / smax, T + (H - T - B) * (hi - loss) / (hi - lo)

    d.rectangle([L, T, W - R, H - B], outline="black")
    for k in range(int(round((hi - lo) * 4)) + 1):
        v = lo + k / 4
        y = xy(0, v)[1]
        d.line([L - 4, y, L, y], fill="black")
        d.text((4, y - 6), f"{10 ** v:.3g}", fill="black")
    for k in range(6):
        s = smax * k / 5
        x = xy(s, lo)[0]
        d.line([x, H - B, x, H - B + 4], fill="black")
        d.text((x - 12, H - B + 8), f"{int(s)}", fill="black")
    d.line([xy(s, v) for s, v in zip(steps, losses)], fill=(30, 90, 200), width=2)
    d.text((L, 8), title, fill="black")
    d.text((W // 2 - 20, H - 16), "step", fill="black")
    buf = BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def flow_loss(transformer, text_embedding, x0: torch.Tensor, tokens: torch.Tensor, sigma: torch.Tensor,
              noise: torch.Tensor) -> torch.Tensor:
    """Rectified-flow loss: mean squared error of the predicted velocity (noise - x0) at
    x_sigma = (1 - sigma) x0 + sigma noise. x0, noise (B, C, F, H, W); tokens (B, L); sigma (B,)."""
    s = sigma.view(-1, 1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * noise
    v = transformer(x_t, 1000.0 * sigma, text_embedding(tokens), return_dict=False)[0]
    return F.mse_loss(v.float(), noise - x0)


@torch.no_grad()
def validation_loss(ref: model_lib.ReferenceModel, device: str, size: tuple[int, int, int] | None = None,
                    batch: int = 16, seed: int = 99_999) -> dict[str, float]:
    """Flow loss on a fixed held-out batch at sigma 0.25, 0.5 and 0.75 (same noise for every model),
    at latent clip `size` (frames, height, width; default the config's)."""
    c = ref.config
    x0, tokens = data.make_batch(batch, seed, *(size or (c.frames, c.height, c.width)), device)
    g = torch.Generator(device).manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g, device=device)
    out = {}
    for s in (0.25, 0.5, 0.75):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = flow_loss(ref.transformer, ref.text_embedding, x0, tokens, torch.full((batch,), s, device=device), noise)
        out[f"sigma={s}"] = float(loss)
    return out


def train_sigmas(z: torch.Tensor, shift: float) -> torch.Tensor:
    """Noise levels of a batch from standard normals z: logit-normal(0, 1) (Wan's training
    distribution); with shift != 1 every other clip's level is shifted as the sampler shifts its
    grid (sampler.sigmas: shift s / (1 + (shift - 1) s)). The sampler spends a quarter of its steps
    above sigma 0.9, where logit-normal(0, 1) puts 1.4% of the training clips: the shapes and the
    layout are decided there, so half of each batch is trained on the sampler's distribution and
    half on Wan's (which keeps the low-noise detail trained)."""
    s = torch.sigmoid(z)
    if shift == 1.0:
        return s
    shifted = shift * s / (1 + (shift - 1) * s)
    every_other = torch.arange(s.shape[0], device=s.device) % 2 == 1
    return torch.where(every_other, shifted, s)


def parse_sizes(text: str) -> list[tuple[int, int, int]]:
    """'16x32x32,16x64x64' -> [(16, 32, 32), (16, 64, 64)]: latent clip sizes (frames x height x width)."""
    sizes = []
    for part in text.split(","):
        dims = part.strip().lower().split("x")
        if len(dims) != 3 or not all(d.isdigit() and int(d) > 0 for d in dims):
            raise SystemExit(f"--sizes: {part!r} is not FRAMESxHEIGHTxWIDTH (e.g. 16x32x32)")
        sizes.append(tuple(int(d) for d in dims))
    return sizes


def _validation(ref: model_lib.ReferenceModel, device: str, sizes) -> dict[str, float]:
    if len(sizes) == 1:
        return validation_loss(ref, device, sizes[0], batch=16)
    base = sizes[0][0] * sizes[0][1] * sizes[0][2]
    return {f"{f}x{h}x{w} {k}": v for f, h, w in sizes
            for k, v in validation_loss(ref, device, (f, h, w), batch=max(2, 16 * base // (f * h * w))).items()}


def train(args: argparse.Namespace) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    done = 0  # steps of the earlier stretches: the data stream continues where they stopped
    if args.resume:
        ref = model_lib.load(args.resume, device, torch.float32)
        ref.transformer.train()
        config = ref.config
        done = int(ref.meta.get("steps_total", ref.meta.get("steps", "0")))
    else:
        config = model_lib.ReferenceConfig(**(TINY if args.tiny else {}))
        ref = model_lib.build(config, seed=args.seed).to(device)
    sizes = parse_sizes(args.sizes) if args.sizes else [(config.frames, config.height, config.width)]
    base_tokens = sizes[0][0] * sizes[0][1] * sizes[0][2]
    batches = [max(1, round(args.batch * base_tokens / (f * h * w))) for f, h, w in sizes]
    init_val = _validation(ref, device, sizes)
    params = list(ref.transformer.parameters()) + list(ref.text_embedding.parameters())
    n_params = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01, fused=device == "cuda")
    ema = [p.detach().clone() for p in params]
    forward = ref.transformer
    if args.compile:
        forward = torch.compile(ref.transformer, dynamic=False)  # one graph per clip size
    g = torch.Generator(device).manual_seed(args.seed * 1_000_003 + done)
    budget = args.minutes * 60.0
    total_steps = args.max_steps
    curve, window = [], []
    start = time.time()
    probe_t0 = None
    step = 0
    print(f"model: {n_params / 1e6:.2f} M parameters; clip sizes {sizes} at batches {batches}; device {device}",
          flush=True)
    while step < total_steps:
        if step == 5:
            probe_t0 = time.time()  # after compilation and warm-up
        if step == args.probe_steps and probe_t0 is not None:
            if device == "cuda":
                torch.cuda.synchronize()
            dt = (time.time() - probe_t0) / (step - 5)
            left = budget - (time.time() - start)
            total_steps = min(args.max_steps, step + max(0, int(left / dt)))
            print(f"step time {dt * 1000:.1f} ms -> {total_steps} steps in {args.minutes} min", flush=True)
            if step >= total_steps:
                break
        warm = min(1.0, (step + 1) / args.warmup)
        progress = step / max(total_steps, 1) if step >= args.probe_steps else 0.0
        lr = args.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
        for group in opt.param_groups:
            group["lr"] = lr
        size, batch = sizes[step % len(sizes)], batches[step % len(sizes)]
        x0, tokens = data.make_batch(batch, args.seed * 1_000_003 + done + step, *size, device)
        drop = torch.rand(batch, generator=g, device=device) < args.uncond_prob
        tokens = torch.where(drop[:, None], torch.zeros_like(tokens), tokens)
        sigma = train_sigmas(torch.randn(batch, generator=g, device=device), args.shift)
        noise = torch.randn(x0.shape, generator=g, device=device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = flow_loss(forward, ref.text_embedding, x0, tokens, sigma, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - args.ema)
        window.append(loss.detach())
        step += 1
        if step % args.log_every == 0 or step == total_steps:
            mean = float(torch.stack(window).mean())
            window = []
            curve.append({"step": step, "loss": mean, "lr": lr, "seconds": round(time.time() - start, 2)})
            print(f"step {step}/{total_steps} loss {mean:.4f} lr {lr:.2e} {time.time() - start:.0f}s", flush=True)
    seconds = time.time() - start
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    ref.transformer.eval()
    final_val = _validation(ref, device, sizes)
    clips = sum(batches[i % len(sizes)] for i in range(step))
    return dict(ref=ref, curve=curve, steps=step, steps_total=done + step, seconds=seconds, n_params=n_params, device=device,
                init_val=init_val, final_val=final_val, sizes=sizes, batches=batches, clips=clips)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train the vsopt reference model (rectified flow).")
    p.add_argument("--out", required=True, help="folder for the checkpoint, config and loss curve")
    p.add_argument("--minutes", type=float, default=6.0, help="wall-clock budget of the training loop")
    p.add_argument("--max-steps", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--uncond-prob", type=float, default=0.1)
    p.add_argument("--shift", type=float, default=1.0,
                   help="train every other clip at noise levels shifted as the sampler's grid (1: Wan's "
                        "logit-normal(0, 1) for all; see train_sigmas)")
    p.add_argument("--probe-steps", type=int, default=30, help="steps after which the step time is measured")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer for training")
    p.add_argument("--tiny", action="store_true", help="a tiny model and clip (tests, CPU smoke runs)")
    p.add_argument("--sizes", default=None, help="latent clip sizes FxHxW,... trained in turn (default: the config's)")
    p.add_argument("--resume", default=None, help="continue from this checkpoint (weights and config)")
    return p


def run(argv: list[str] | None = None, side_files: bool = True) -> dict:
    """Parse `argv`, train, write the checkpoint to --out (and, with side_files, train_config.json,
    loss_curve.json and loss_curve.png); returns the run's record (with "curve")."""
    args = build_parser().parse_args(argv)
    if args.resume and args.tiny:
        raise SystemExit("--resume takes its config from the checkpoint: drop --tiny")
    if args.probe_steps <= 5:
        raise SystemExit("--probe-steps must be > 5")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    r = train(args)
    ref = r["ref"]
    sizes = ",".join("x".join(map(str, s)) for s in r["sizes"])
    model_lib.save(ref, out / model_lib.CHECKPOINT_NAME, meta={"steps": str(r["steps"]), "sizes": sizes,
                                                                "steps_total": str(r["steps_total"]),
                                                                "resumed_from": str(args.resume or "")})
    device_name = torch.cuda.get_device_name() if r["device"] == "cuda" else "cpu"
    clips = r["clips"]
    record = {
        "command": "python -m vsopt.models.train " + " ".join(argv if argv is not None else sys.argv[1:]),
        "args": vars(args), "model": asdict(ref.config), "parameters": r["n_params"],
        "checkpoint_bytes": (out / model_lib.CHECKPOINT_NAME).stat().st_size,
        "sizes": sizes, "batches": r["batches"],
        "device": device_name, "torch": torch.__version__, "steps": r["steps"], "steps_total": r["steps_total"],
        "clips_seen": clips,
        "train_seconds": round(r["seconds"], 1), "clips_per_second": round(clips / r["seconds"], 1),
        "validation_loss_init": r["init_val"], "validation_loss_trained": r["final_val"],
        "schedule": "rectified flow, sigma ~ logit-normal(0,1)"
                    + (f", every other clip's sigma shifted by {args.shift}" if args.shift != 1.0 else "")
                    + ", timestep = 1000 sigma, target noise - x0",
    }
    if side_files:
        atomic_write_text(out / "train_config.json", json.dumps(record, indent=1))
        atomic_write_text(out / "loss_curve.json", json.dumps(r["curve"], indent=0))
        plot_curve(r["curve"], out / "loss_curve.png",
                   f"reference model: flow-matching loss ({r['steps']} steps, {device_name})")
    print(json.dumps({k: record[k] for k in ("steps", "train_seconds", "clips_per_second", "checkpoint_bytes",
                                             "validation_loss_init", "validation_loss_trained")}), flush=True)
    return {**record, "curve": r["curve"]}


def main(argv: list[str] | None = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
