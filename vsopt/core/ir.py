"""The intermediate representation every layer speaks: where an attention is (AttentionSite) and
what video geometry its sequence axis has (TokenGrid).

Conventions: vsopt's canonical attention layout is (B, H, N, D): batch, heads, tokens, head dim.
A site found in (B, N, H, D) layout records Layout.BNHD; the rewrite transposes into BHND."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch


class Layout(str, enum.Enum):
    """Memory layout of q/k/v at the site, as the model wrote it."""

    BHND = "bhnd"  # (batch, heads, tokens, head_dim): torch SDPA's layout
    BNHD = "bnhd"  # (batch, tokens, heads, head_dim): flash-attn / many video models
    BN_D = "b*h,n,d"  # heads merged into the batch axis (bmm / baddbmm forms)


class GridSource(str, enum.Enum):
    """How a site's TokenGrid was obtained."""

    INFERRED = "inferred"  # followed the sequence axis back to a patch embedding
    USER = "user"  # given in options
    UNKNOWN = "unknown"  # neither worked: patterns that need geometry are not available


@dataclass(frozen=True)
class TokenGrid:
    """Video geometry of a token sequence.

    The sequence is [text_before tokens] + [frames*height*width video tokens, frame-major:
    token index = (f*height + h)*width + w] + [text_after tokens].
    """

    frames: int
    height: int
    width: int
    text_before: int = 0
    text_after: int = 0

    def __post_init__(self):
        for name in ("frames", "height", "width"):
            if getattr(self, name) < 1:
                raise ValueError(f"TokenGrid.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("text_before", "text_after"):
            if getattr(self, name) < 0:
                raise ValueError(f"TokenGrid.{name} must be >= 0, got {getattr(self, name)}")

    @property
    def video_tokens(self) -> int:
        return self.frames * self.height * self.width

    @property
    def num_tokens(self) -> int:
        return self.text_before + self.video_tokens + self.text_after

    def to_dict(self) -> dict[str, int]:
        return {"frames": self.frames, "height": self.height, "width": self.width,
                "text_before": self.text_before, "text_after": self.text_after}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TokenGrid":
        return cls(**{k: int(v) for k, v in d.items()})

    def __str__(self) -> str:
        s = f"{self.frames}x{self.height}x{self.width}"
        if self.text_before:
            s = f"{self.text_before}+" + s
        if self.text_after:
            s += f"+{self.text_after}"
        return s


@dataclass(frozen=True)
class AttentionSite:
    """One attention found in a graph.

    site_id is the module path from nn_module_stack (e.g. "blocks.3.attn1"), stable across runs
    and between compile and export; where a module holds several attentions a suffix ":k" is
    added, and where no path exists the id is "attention.<ordinal>".
    Shapes are given in the canonical (B, H, N, D) sense whatever the layout.
    """

    site_id: str
    layer: int | None  # index of the transformer block the site sits in, if the path has one
    rule: str  # name of the rewrite rule that matched
    layout: Layout
    batch: int
    heads: int  # query heads
    kv_heads: int  # key/value heads (< heads for MQA/GQA)
    head_dim: int
    value_dim: int
    q_len: int
    kv_len: int
    dtype: torch.dtype
    scale: float
    has_mask: bool = False
    is_causal: bool = False
    grid: TokenGrid | None = None
    grid_source: GridSource = GridSource.UNKNOWN
    output_node: str = ""  # name of the node whose value is the attention output
    nodes: tuple[str, ...] = field(default=(), compare=False)  # names of the matched nodes
    softcap: float = 0.0  # > 0: scores -> softcap * tanh(scores / softcap) before the mask and softmax

    @property
    def is_self_attention(self) -> bool:
        return self.q_len == self.kv_len

    def to_dict(self) -> dict[str, Any]:
        return {
            "site_id": self.site_id, "layer": self.layer, "rule": self.rule, "layout": self.layout.value,
            "batch": self.batch, "heads": self.heads, "kv_heads": self.kv_heads, "head_dim": self.head_dim,
            "value_dim": self.value_dim, "q_len": self.q_len, "kv_len": self.kv_len,
            "dtype": str(self.dtype).removeprefix("torch."), "scale": self.scale, "has_mask": self.has_mask,
            "is_causal": self.is_causal, "grid": self.grid.to_dict() if self.grid else None,
            "grid_source": self.grid_source.value, **({"softcap": self.softcap} if self.softcap else {}),
        }


@dataclass(frozen=True)
class SkippedSite:
    """A candidate vsopt left exactly as it was, with the reason (shown by inspect and diff)."""

    site_id: str
    node: str  # the graph node the candidate was anchored on
    reason: str
    rule: str = ""
