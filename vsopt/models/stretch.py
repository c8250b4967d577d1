"""One resumable training stretch of the reference model and everything that judges it, in one call.

Trains from a checkpoint for --minutes (vsopt.models.train), saves the checkpoint, samples the
fixed descriptions at every trained size next to data clips (vsopt.models.preview), measures the
attention structure (vsopt.models.structure, docs/MODEL.md) at every size for the trained model and
the same architecture at initialisation, and writes few files to --out:

    reference.safetensors   the checkpoint (resume the next stretch from it)
    samples.png             data / model rows at each size
    stretch.json            the training record, the loss curve, held-out losses, structure per head

    python -m vsopt.models.stretch --out OUT --minutes 7 --resume vsopt/models/assets/reference.safetensors \
        --sizes 16x32x32,16x64x64 [train.py options, e.g. --shift 3 --lr 6e-4]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from vsopt.core.io import atomic_write_json
from vsopt.models import data, model as model_lib, preview, structure, train


def structure_at(ref: model_lib.ReferenceModel, size: tuple[int, int, int], *, clips: int = 2, steps: int = 20,
                 capture: tuple[int, ...] = (2, 10, 17), seed: int = 1234, guidance: float = 3.0) -> dict:
    """docs/MODEL.md's measure at latent `size`: per layer and head top-10% / top-20% block shares of
    the trained model and of the initial weights (seed 0), with their means."""
    device = ref.text_embedding.weight.device
    dtype = next(ref.transformer.parameters()).dtype
    tokens = data.sample_scenes(clips, seed).tokens.to(device)
    init = model_lib.build(ref.config, seed=0).to(device, dtype).eval()
    t0 = time.time()
    out = {"size": list(size), "tokens": structure._tokens(ref.config, size), "steps": steps, "capture_steps": list(capture),
           "clips": clips, "guidance": guidance, "descriptions": [data.describe(t) for t in tokens.cpu()]}
    for name, model in (("trained", ref), ("init", init)):
        out[name] = structure.measure(model, tokens, steps=steps, capture_steps=list(capture), seed=seed,
                                      guidance=guidance, size=size)
    del init
    for name in ("trained", "init"):
        for key in ("top10", "top20"):
            t = torch.tensor(out[name][key])
            out[f"{name}_{key}_mean"] = round(float(t.mean()), 4)
    t = torch.tensor(out["trained"]["top10"])
    out["heads_above_twice_uniform_top10"] = int((t > 0.2).sum())
    out["seconds"] = round(time.time() - t0, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=True)
    p.add_argument("--out", required=True)
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--no-structure", action="store_true", help="skip the structure measurement (CPU smoke runs)")
    p.add_argument("--structure-clips", type=int, default=2)
    args, rest = p.parse_known_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    record = train.run(["--out", str(out), *rest], side_files=False)
    curve = record.pop("curve")  # into stretch.json: train.plot_curve draws it where it is wanted
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ref = model_lib.load(out / model_lib.CHECKPOINT_NAME, device, torch.bfloat16 if device == "cuda" else torch.float32)
    sizes = train.parse_sizes(record["sizes"])
    doc = {"command": "python -m vsopt.models.stretch " + " ".join(argv), "train": record, "loss_curve": curve}
    t1 = time.time()
    preview.write_sheet(preview.sheet_rows(ref, sizes, steps=args.sample_steps), out / "samples.png")
    doc["samples"] = {"descriptions": list(preview.DESCRIPTIONS), "steps": args.sample_steps, "guidance": 3.0,
                      "seed": 3, "sizes": record["sizes"], "seconds": round(time.time() - t1, 1)}
    print(f"samples.png written ({doc['samples']['seconds']} s)", flush=True)
    if not args.no_structure:
        doc["structure"] = {}
        for size in sizes:
            s = structure_at(ref, size, clips=args.structure_clips)
            doc["structure"]["x".join(map(str, size))] = s
            print(f"structure {s['tokens']} tokens: top10 trained {s['trained_top10_mean']:.3f} "
                  f"(init {s['init_top10_mean']:.3f}), top20 {s['trained_top20_mean']:.3f} "
                  f"(init {s['init_top20_mean']:.3f}); {s['heads_above_twice_uniform_top10']} heads > 0.2; "
                  f"{s['seconds']} s", flush=True)
    doc["seconds"] = round(time.time() - t0, 1)
    atomic_write_json(out / "stretch.json", doc, indent=1)
    print(json.dumps({"steps_total": record["steps_total"], "validation": record["validation_loss_trained"],
                      "seconds": doc["seconds"]}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
