"""A sheet of sampled clips next to clips of the data, to judge the reference model by eye.

Rows: for each clip size, first one data clip per description (the renderer's own drawing of a
random scene with that description: what "a red triangle" looks like), then the model's sample
for the same description; every other frame in columns. Sizes are scaled to one row height.

    python -m vsopt.models.preview --checkpoint vsopt/models/assets/reference.safetensors \
        --sizes 16x32x32 --steps 20 --out samples.png
"""
from __future__ import annotations

import argparse
from io import BytesIO
from pathlib import Path

import torch

from vsopt.core.io import atomic_write_bytes
from vsopt.models import data, model as model_lib, sampler

# single shapes of each kind, then two shapes that must keep their colours apart
DESCRIPTIONS = (
    "checker background; red triangle moving left, steady, fixed",
    "stripes background; blue square moving still, clockwise, fixed",
    "waves background; green circle moving right, steady, growing",
    "checker background; yellow triangle moving still, steady, fixed; white square moving up, steady, fixed",
)
ROW_PIXELS = 128


def sample_clips(ref: model_lib.ReferenceModel, texts, size: tuple[int, int, int], *, steps: int = 20,
                 guidance: float = 3.0, seed: int = 3) -> torch.Tensor:
    """Sampled latents (B, C, F, H, W) float32 for the descriptions `texts` at latent `size`."""
    tokens = torch.stack([data.tokenize(t) for t in texts]).to(ref.text_embedding.weight.device)
    cond, uncond = ref.encode(tokens), ref.encode(torch.zeros_like(tokens[:1]))
    return sampler.sample(ref.transformer, cond, (data.CHANNELS, *size), steps=steps, seed=seed,
                          guidance=guidance, uncond=uncond)


def data_clips(texts, size: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    """A data clip per description (B, C, F, H, W): scenes_for(texts, seed) rendered."""
    return data.render(scenes_for(texts, seed), *size)


def scenes_for(texts, seed: int = 0) -> data.Scenes:
    """Random scenes made to fit the descriptions: the words decide background, colours, shapes,
    motion, turn and size change; positions, speeds and textures stay random (the path keeps its
    middle point)."""
    scenes = data.sample_scenes(len(texts), seed)
    tokens = torch.stack([data.tokenize(t) for t in texts])
    fields = {k: getattr(scenes, k).clone() for k in data.Scenes.__dataclass_fields__}
    half_path = 0.5 * scenes.speed[..., None]
    centre = scenes.start + half_path * data._MOTION_DIR[scenes.motion]  # the middle of each path
    fields["tokens"] = tokens
    fields["background"] = tokens[:, 0] - data.TOKEN[data.BACKGROUNDS[0]]
    for i in range(data.MAX_SHAPES):
        w = tokens[:, 1 + i * data.WORDS_PER_SHAPE: 1 + (i + 1) * data.WORDS_PER_SHAPE]
        present = w[:, 0] != 0
        fields["present"][:, i] = present
        for j, (name, words) in enumerate((("colour", data.COLOURS), ("shape", data.SHAPES), ("motion", data.MOTIONS),
                                           ("turn", data.TURNS), ("size", data.SIZES))):
            fields[name][:, i] = torch.where(present, w[:, j] - data.TOKEN[words[0]], 0)
    fields["start"] = centre - half_path * data._MOTION_DIR[fields["motion"]]  # the new path, same middle
    fields["spin"] = data._TURN_RATE[fields["turn"]] * scenes.spin.abs().clamp(min=1.2)
    return data.Scenes(**fields)


def write_sheet(rows: list[tuple[str, torch.Tensor]], path: str | Path) -> None:
    """rows: (label, latent clip (C, F, H, W)); every other frame, scaled to ROW_PIXELS high."""
    from PIL import Image, ImageDraw

    label_w, pad = 330, 2
    rgbs = [(label, data.latent_to_rgb(clip.float().cpu())) for label, clip in rows]
    frames = rgbs[0][1].shape[0]
    cols = list(range(0, frames, 2 if frames > 8 else 1))
    sheet = Image.new("RGB", (label_w + (ROW_PIXELS + pad) * len(cols), (ROW_PIXELS + pad) * len(rows)), "white")
    d = ImageDraw.Draw(sheet)
    for r, (label, rgb) in enumerate(rgbs):
        y = r * (ROW_PIXELS + pad)
        for k, line in enumerate(_wrap(label, 54)):
            d.text((4, y + 8 + 12 * k), line, fill="black")
        for c, f in enumerate(cols):
            if f < rgb.shape[0]:
                img = Image.fromarray(rgb[f].numpy()).resize((ROW_PIXELS, ROW_PIXELS), Image.NEAREST)
                sheet.paste(img, (label_w + c * (ROW_PIXELS + pad), y))
    buf = BytesIO()
    sheet.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split(" "):
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line]


def sheet_rows(ref: model_lib.ReferenceModel, sizes, texts=DESCRIPTIONS, *, steps: int = 20,
               guidance: float = 3.0, seed: int = 3) -> list[tuple[str, torch.Tensor]]:
    """Data row then sample row for each description, at each size."""
    rows = []
    for size in sizes:
        tag = f"{'x'.join(map(str, size))}"
        samples = sample_clips(ref, texts, size, steps=steps, guidance=guidance, seed=seed)
        truth = data_clips(texts, size)
        for text, x, s in zip(texts, truth, samples):
            rows.append((f"data {tag}: {text}", x))
            rows.append((f"model {tag} ({steps} steps, guidance {guidance:g}, seed {seed})", s))
    return rows


def main(argv: list[str] | None = None) -> int:
    from vsopt.models.train import parse_sizes

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--sizes", default="16x32x32", help="latent clip sizes FxHxW,...")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--clips", type=int, default=len(DESCRIPTIONS), help="how many of the fixed descriptions")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ref = model_lib.load(args.checkpoint, device, torch.bfloat16 if device == "cuda" else torch.float32)
    write_sheet(sheet_rows(ref, parse_sizes(args.sizes), DESCRIPTIONS[: args.clips], steps=args.steps,
                           guidance=args.guidance, seed=args.seed), args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
