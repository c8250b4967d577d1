"""Is the reference model's attention structured? Block-mass concentration per layer and head.

For each self-attention (blocks.<i>.attn1) and head, the share of attention mass held by the top
10% and top 20% of 64x64 blocks of the (4096 x 4096) map, measured on clips the model samples,
at chosen sampling steps, for the trained model and for the same architecture at initialisation.
Uniform attention gives 0.10 and 0.20; a block-sparse method keeping that fraction of blocks
drops the rest of the mass.

q and k are captured by an attention processor of our own (AttentionProbe) set on the diffusers
WanAttention modules: it recomputes q and k exactly as Wan's processor does (projection, RMS
norm across heads, rotary embedding) and hands the call on to the original processor.

    python -m vsopt.models.structure --checkpoint vsopt/models/assets/reference.safetensors \
        --out docs/model_structure.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from vsopt.core.io import atomic_write_json
from vsopt.core.metrics import block_attention_mass, topk_block_share
from vsopt.models import data, model as model_lib, sampler

FRACTIONS = (0.1, 0.2)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on interleaved pairs: x (B, N, H, D); cos, sin (1, N, 1, D)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2).type_as(x)


class AttentionProbe:
    """Processor for a diffusers WanAttention: while `armed`, records per head the top-k block
    shares of its self-attention map, then runs the wrapped processor unchanged.

    shares[layer] is a list of (H, len(fractions)) float32 tensors, one per armed call, averaged
    over the batch."""

    def __init__(self, inner, layer: int, shares: dict[int, list[torch.Tensor]], block: int = 64,
                 fractions: tuple[float, ...] = FRACTIONS):
        self.inner, self.layer, self.shares, self.block, self.fractions = inner, layer, shares, block, fractions
        self.armed = False

    @staticmethod
    def query_key(attn, hidden_states: torch.Tensor, rotary_emb=None) -> tuple[torch.Tensor, torch.Tensor]:
        """q and k (B, H, N, D) of a WanAttention self-attention, as Wan's processor makes them."""
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            q, k = _rotate(q, *rotary_emb), _rotate(k, *rotary_emb)
        return q.transpose(1, 2), k.transpose(1, 2)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, **kwargs):
        if self.armed and encoder_hidden_states is None:
            q, k = self.query_key(attn, hidden_states, rotary_emb)
            mass = block_attention_mass(q, k, q.shape[-1] ** -0.5, self.block, self.block)
            shares = torch.stack([topk_block_share(mass, f) for f in self.fractions], dim=-1)  # (B, H, k)
            self.shares.setdefault(self.layer, []).append(shares.mean(0).float().cpu())
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)


def install_probes(transformer: torch.nn.Module, shares: dict[int, list[torch.Tensor]]) -> list[AttentionProbe]:
    """Wrap the processor of every blocks.<i>.attn1 in an AttentionProbe (disarmed)."""
    probes = []
    for i, block in enumerate(transformer.blocks):
        probe = AttentionProbe(block.attn1.processor, i, shares)
        block.attn1.processor = probe
        probes.append(probe)
    return probes


def measure(ref: model_lib.ReferenceModel, tokens: torch.Tensor, *, steps: int, capture_steps: list[int],
            seed: int, guidance: float, size: tuple[int, int, int] | None = None) -> dict:
    """Sample clips for `tokens` (B, L) and return per layer and head the mean top-k shares over
    the captured steps: {"top10": [[...heads] per layer], "top20": ...}."""
    shares: dict[int, list[torch.Tensor]] = {}
    probes = install_probes(ref.transformer, shares)
    try:
        def arm(step: int, sigma: float) -> None:
            for p in probes:
                p.armed = step in capture_steps

        cond = ref.encode(tokens)
        uncond = ref.encode(torch.zeros_like(tokens[:1]))
        c = ref.config
        sampler.sample(ref.transformer, cond, (data.CHANNELS, *(size or (c.frames, c.height, c.width))), steps=steps,
                       seed=seed, guidance=guidance, uncond=uncond, callback=arm)
    finally:
        for i, block in enumerate(ref.transformer.blocks):
            block.attn1.processor = probes[i].inner
    per_layer = torch.stack([torch.stack(shares[i]).mean(0) for i in sorted(shares)])  # (layers, H, k)
    return {f"top{round(f * 100)}": per_layer[..., j].tolist() for j, f in enumerate(FRACTIONS)}


def _tokens(c: model_lib.ReferenceConfig, size: tuple[int, int, int] | None) -> int:
    f, h, w = size or (c.frames, c.height, c.width)
    p = c.patch_size
    return (f // p[0]) * (h // p[1]) * (w // p[2])


def _summary(result: dict) -> str:
    lines = []
    for key in ("top10", "top20"):
        for name in ("trained", "init"):
            t = torch.tensor(result[name][key])
            lines.append(f"{name:7s} {key}: mean {t.mean():.3f}  min {t.min():.3f}  max {t.max():.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="trained checkpoint (safetensors)")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--clips", type=int, default=2, help="number of descriptions sampled")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--capture", default="2,10,17", help="comma-separated sampling steps to measure at")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--init-seed", type=int, default=0, help="seed of the untrained model (train.py's --seed)")
    p.add_argument("--size", default=None, help="latent clip size FxHxW to sample at (default: the config's)")
    args = p.parse_args(argv)
    size = None
    if args.size:
        from vsopt.models.train import parse_sizes
        (size,) = parse_sizes(args.size)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    capture = [int(s) for s in args.capture.split(",")]
    tokens = data.sample_scenes(args.clips, args.seed).tokens.to(device)
    trained = model_lib.load(args.checkpoint, device, dtype)
    init = model_lib.build(trained.config, seed=args.init_seed).to(device, dtype).eval()
    t0 = time.time()
    result = {
        "command": "python -m vsopt.models.structure " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "block": 64, "tokens": _tokens(trained.config, size), "size": size, "steps": args.steps,
        "capture_steps": capture,
        "guidance": args.guidance, "descriptions": [data.describe(t) for t in tokens.cpu()],
        "trained": measure(trained, tokens, steps=args.steps, capture_steps=capture, seed=args.seed,
                           guidance=args.guidance, size=size),
        "init": measure(init, tokens, steps=args.steps, capture_steps=capture, seed=args.seed, guidance=args.guidance,
                        size=size),
    }
    result["seconds"] = round(time.time() - t0, 1)
    out = Path(args.out)
    atomic_write_json(out, result, indent=1)
    print(_summary(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
