"""The pictures `vsopt demo` writes: frames.png (dense, optimized, |difference| x 4, side by side)
and clip.gif (dense | optimized, animated), from two RGB clips (F, H, W, 3) uint8."""
from __future__ import annotations

from io import BytesIO
from pathlib import Path

import torch

from vsopt.core.io import atomic_write_bytes


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

