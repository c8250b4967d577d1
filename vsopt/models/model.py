"""The reference model: a small diffusers WanTransformer3DModel plus a learned word embedding.

Layout of a clip: latents (B, C, F, H, W) = (B, 4, 16, 32, 32); Wan's 1x2x2 patchify makes
F x H/2 x W/2 = 16 x 16 x 16 = 4096 video tokens, frame-major. The description (B, L) of token
ids goes through `text_embedding` (a DescriptionEmbedding: word plus position, (B, L, text_dim))
and becomes Wan's encoder_hidden_states (cross-attention only, as in Wan2.1).

The checkpoint is one safetensors file (bf16 weights, keys "transformer.*" and
"text_embedding.*", the ReferenceConfig as JSON in its metadata), shipped as package data in
vsopt/models/assets/ and found through importlib.resources, so it loads after a plain pip install.
"""
from __future__ import annotations

import importlib.resources
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from importlib.resources.abc import Traversable
from typing import Any

import torch
from torch import nn

from vsopt.core.io import atomic_write_bytes
from vsopt.models import data

CHECKPOINT_NAME = "reference.safetensors"


@dataclass(frozen=True)
class ReferenceConfig:
    """What defines the model: the WanTransformer3DModel kwargs, the word embedding width and
    the clip size it was trained on (latent frames, height, width)."""

    num_layers: int = 6
    num_attention_heads: int = 4
    attention_head_dim: int = 64
    ffn_dim: int = 1024
    text_dim: int = 64
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    frames: int = 16
    height: int = 32
    width: int = 32
    vocab_size: int = len(data.VOCAB)
    description_len: int = data.DESCRIPTION_LEN

    def wan_kwargs(self) -> dict[str, Any]:
        return dict(patch_size=tuple(self.patch_size), num_attention_heads=self.num_attention_heads,
                    attention_head_dim=self.attention_head_dim, in_channels=data.CHANNELS,
                    out_channels=data.CHANNELS, text_dim=self.text_dim, freq_dim=self.freq_dim,
                    ffn_dim=self.ffn_dim, num_layers=self.num_layers, cross_attn_norm=True,
                    qk_norm="rms_norm_across_heads", eps=1e-6)

    @property
    def video_tokens(self) -> int:
        p = self.patch_size
        return (self.frames // p[0]) * (self.height // p[1]) * (self.width // p[2])

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ReferenceConfig":
        d = json.loads(text)
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown ReferenceConfig fields {sorted(unknown)}")
        if "patch_size" in d:
            d["patch_size"] = tuple(d["patch_size"])
        return cls(**d)


class DescriptionEmbedding(nn.Module):
    """The "text encoder": a word embedding plus a learned embedding of each token's position.

    Wan's cross-attention has no positional encoding of its own (a real text encoder's outputs carry
    position), so plain word embeddings would make a description a bag of words: "red triangle,
    blue square" and "blue triangle, red square" would be the same input. The position embedding
    binds each colour, shape and motion word to its shape slot. A checkpoint without it (v1) loads
    with positions zero, which is exactly the bag-of-words model it was."""

    def __init__(self, vocab_size: int, length: int, dim: int):
        super().__init__()
        self.words = nn.Embedding(vocab_size, dim)
        self.positions = nn.Parameter(torch.zeros(length, dim))

    @property
    def weight(self) -> torch.Tensor:
        return self.words.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[-1] > self.positions.shape[0]:
            raise ValueError(f"descriptions have at most {self.positions.shape[0]} tokens, got {tokens.shape[-1]}")
        return self.words(tokens) + self.positions[: tokens.shape[-1]].to(self.words.weight.dtype)


@dataclass
class ReferenceModel:
    """The transformer (Wan's forward signature: (latents, timestep, encoder_hidden_states)) and
    the word embedding that makes its encoder_hidden_states."""

    transformer: nn.Module
    text_embedding: DescriptionEmbedding
    config: ReferenceConfig
    meta: dict[str, str] = field(default_factory=dict)

    @torch.no_grad()
    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, L) long -> encoder_hidden_states (B, L, text_dim) in the transformer's dtype
        (inference: no autograd; training calls text_embedding directly)."""
        w = self.text_embedding.weight
        dtype = next(self.transformer.parameters()).dtype
        return self.text_embedding(tokens.to(w.device)).to(dtype)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "ReferenceModel":
        from diffusers.utils import logging as diffusers_logging

        # diffusers warns that some modules "should be kept in float32"; at this size bf16 is fine
        level = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()
        try:
            self.transformer.to(device=device, dtype=dtype)
        finally:
            diffusers_logging.set_verbosity(level)
        self.text_embedding.to(device=device, dtype=dtype)
        return self

    def eval(self) -> "ReferenceModel":
        self.transformer.eval()
        self.text_embedding.eval()
        return self


def build(config: ReferenceConfig, seed: int = 0) -> ReferenceModel:
    """A freshly initialised model (float32), deterministic from `seed`."""
    try:
        from diffusers import WanTransformer3DModel
    except ImportError as e:
        raise ImportError(f"the reference model is diffusers' WanTransformer3DModel: pip install diffusers ({e})") from e

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = WanTransformer3DModel(**config.wan_kwargs())
        text_embedding = DescriptionEmbedding(config.vocab_size, config.description_len, config.text_dim)
        nn.init.normal_(text_embedding.words.weight, std=1.0)
        nn.init.normal_(text_embedding.positions, std=0.5)
    return ReferenceModel(transformer, text_embedding, config)


def state_dict(model: ReferenceModel, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    sd = {f"transformer.{k}": v for k, v in model.transformer.state_dict().items()}
    sd.update({f"text_embedding.{k}": v for k, v in model.text_embedding.state_dict().items()})
    return {k: v.detach().to("cpu", dtype).contiguous() for k, v in sd.items()}


def save(model: ReferenceModel, path: str | os.PathLike, meta: dict[str, str] | None = None,
         dtype: torch.dtype = torch.bfloat16) -> None:
    """Write the checkpoint atomically (temp file in the same folder, then os.replace)."""
    from safetensors.torch import save

    metadata = {"config": model.config.to_json(), **(meta or {})}
    atomic_write_bytes(path, save(state_dict(model, dtype), metadata=metadata))


def load(path: str | os.PathLike, device: torch.device | str = "cpu",
         dtype: torch.dtype = torch.float32) -> ReferenceModel:
    """Load a checkpoint written by save(); weights are cast to `dtype` on `device`, eval mode."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no reference checkpoint at {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        if "config" not in meta:
            raise ValueError(f"{path} is not a vsopt reference checkpoint (no 'config' in its metadata)")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    config = ReferenceConfig.from_json(meta.pop("config"))
    model = build(config)
    for prefix, module in (("transformer.", model.transformer), ("text_embedding.", model.text_embedding)):
        sub = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if module is model.text_embedding and "weight" in sub:  # v1: a plain nn.Embedding, no positions
            sub = {"words.weight": sub.pop("weight"), "positions": torch.zeros_like(module.positions), **sub}
        module.load_state_dict(sub, strict=True)
    model.meta = meta
    return model.to(device, dtype).eval()


def shipped_checkpoint() -> Traversable:
    """The checkpoint shipped in the package (vsopt/models/assets/reference.safetensors)."""
    ref = importlib.resources.files("vsopt.models") / "assets" / CHECKPOINT_NAME
    if not ref.is_file():
        raise FileNotFoundError(f"the shipped reference checkpoint is missing from the install: {ref}")
    return ref


#: The plans shipped for the reference model (vsopt/models/assets/), by latent clip size
#: (frames, height, width): each calibrated at its size on the GPU (docs/MODEL.md).
SHIPPED_PLANS = {(16, 32, 32): "reference.plan.json", (16, 64, 64): "reference_16x64x64.plan.json"}


def shipped_plan(frames: int, height: int, width: int) -> Traversable | None:
    """The shipped plan calibrated for this latent clip size, or None if none is shipped for it."""
    name = SHIPPED_PLANS.get((frames, height, width))
    ref = importlib.resources.files("vsopt.models") / "assets" / name if name else None
    return ref if ref is not None and ref.is_file() else None


def load_shipped(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> ReferenceModel:
    """Load the reference model shipped with vsopt."""
    with importlib.resources.as_file(shipped_checkpoint()) as path:
        return load(path, device, dtype)
