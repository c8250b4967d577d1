"""The bench result written out: the Pareto front, the plot, the JSON file, the summary table."""
from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Sequence

from vsopt.core.io import atomic_write_bytes, atomic_write_json


def pareto_front(points: Sequence[dict], quality: str = "psnr") -> list[dict]:
    """Points no other point beats in both speedup and quality, by increasing speedup."""
    front = []
    for p in sorted(points, key=lambda p: (-p["speedup"], -p[quality])):
        if not front or p[quality] > front[-1][quality]:
            front.append(p)
    return sorted(front, key=lambda p: p["speedup"])


def plot_pareto(result: dict, path: str | os.PathLike, quality: str = "psnr") -> Path:
    """Two panels, one curve per method: quality (PSNR by default) against the block density run
    (measured), and against the speedup over dense (measured on a GPU, or the cost model's
    prediction; the axis label says which). Written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=110)
    by_method: dict[str, list[dict]] = {}
    for p in result["points"]:
        by_method.setdefault(p["method"], []).append(p)
    cap = 60.0 if quality == "psnr" else math.inf
    markers = "osD^v<>pXh*"  # more methods than the colour cycle has colours: each its own marker too
    for ax, x in zip(axes, ("density", "speedup")):
        for i, (method, pts) in enumerate(sorted(by_method.items())):
            pts = sorted(pts, key=lambda p: p[x])
            ax.plot([p[x] for p in pts], [min(p[quality], cap) for p in pts], marker=markers[i % len(markers)],
                    linestyle="-" if i < 10 else "--", label=method)
        ax.grid(alpha=0.3)
        ax.set_ylabel(f"{quality.upper()} vs dense" + (" (dB, capped at 60)" if quality == "psnr" else ""))
    axes[0].set_xlabel("block density run (lower = sparser)")
    axes[0].invert_xaxis()
    source = ", ".join(sorted({p["speedup_source"] for p in result["points"]}))
    axes[1].set_xlabel(f"speedup over dense ({source})")
    axes[0].legend(fontsize=8)
    clip = "x".join(str(v) for v in result["model"]["latent_clip"])
    fig.suptitle(f"vsopt bench: reference model, latent clip {clip}, {result['settings']['steps']} steps, "
                 f"{result['device']}", fontsize=10)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, png.getvalue())


def write_json(result: dict, path: str | os.PathLike) -> Path:
    return atomic_write_json(path, result, indent=1)


def summary_table(result: dict) -> str:
    lines = [f"{'method':<17} {'density':>7} {'quant':<6} {'PSNR':>6} {'SSIM':>6} {'relL2':>7} {'site cos':>8} "
             f"{'speedup':>7}"]
    for p in result["points"]:
        lines.append(f"{p['method']:<17} {p['density']:>7.3f} {p['quant']:<6} {min(p['psnr'], 99):>6.2f} "
                     f"{p['ssim']:>6.4f} {p['rel_l2']:>7.4f} {p['site_cosine_min']:>8.4f} {p['speedup']:>6.2f}x")
    for n in result.get("not_run", ()):
        lines.append(f"not run: {n['method']} at {n['target_density']}: {n['why']}")
    return "\n".join(lines)
