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


VIDEO_AXES = "fhw"  # the default order of the video tokens: frame-major, (f, h, w), width innermost


def _check_axes(axes: str, where: str) -> None:
    if not isinstance(axes, str) or sorted(axes) != sorted(VIDEO_AXES):
        raise ValueError(f"{where} must order the letters f, h, w (outermost first), e.g. 'fhw' or 'hwf'; "
                         f"got {axes!r}")


@dataclass(frozen=True)
class VideoSegment:
    """A further run of video tokens in a sequence, with its own grid, that is not the site's main
    video (TokenGrid counts it in text_before / text_after). start: its first token's index."""

    start: int
    frames: int
    height: int
    width: int
    axes: str = VIDEO_AXES

    def __post_init__(self):
        for name in ("frames", "height", "width"):
            if getattr(self, name) < 1:
                raise ValueError(f"VideoSegment.{name} must be >= 1, got {getattr(self, name)}")
        if self.start < 0:
            raise ValueError(f"VideoSegment.start must be >= 0, got {self.start}")
        _check_axes(self.axes, "VideoSegment.axes")

    @property
    def video_tokens(self) -> int:
        return self.frames * self.height * self.width

    def to_dict(self) -> dict[str, Any]:
        return {"start": self.start, "frames": self.frames, "height": self.height, "width": self.width,
                "axes": self.axes}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VideoSegment":
        return cls(**{k: (str(v) if k == "axes" else int(v)) for k, v in d.items()})


@dataclass(frozen=True)
class TokenGrid:
    """Video geometry of a token sequence.

    The sequence is [text_before tokens] + [frames*height*width video tokens] + [text_after
    tokens]. `axes` is the order of the video tokens, outermost first: "fhw" (the default) is
    frame-major, token index = (f*height + h)*width + w; "hwf" is index = (h*width + w)*frames + f.

    "Text" is every token that is not the main video: text, CLS / register / message tokens, and
    further video segments with their own grids (recorded in `segments`, each inside the text
    spans). Patterns keep all of them global (dense rows and columns) and token orders never move
    them, which is always correct; only the main video's attention is made sparse or reordered.
    """

    frames: int
    height: int
    width: int
    text_before: int = 0
    text_after: int = 0
    axes: str = VIDEO_AXES
    segments: tuple[VideoSegment, ...] = ()

    def __post_init__(self):
        for name in ("frames", "height", "width"):
            if getattr(self, name) < 1:
                raise ValueError(f"TokenGrid.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("text_before", "text_after"):
            if getattr(self, name) < 0:
                raise ValueError(f"TokenGrid.{name} must be >= 0, got {getattr(self, name)}")
        _check_axes(self.axes, "TokenGrid.axes")
        object.__setattr__(self, "segments", tuple(self.segments))
        video = range(self.text_before, self.text_before + self.video_tokens)
        for seg in self.segments:
            if not isinstance(seg, VideoSegment):
                raise ValueError(f"TokenGrid.segments must hold VideoSegments, got {seg!r}")
            end = seg.start + seg.video_tokens
            if end > self.num_tokens or (seg.start < video.stop and video.start < end):
                raise ValueError(f"video segment {seg} overlaps the main video {video} or ends after the "
                                 f"{self.num_tokens} tokens")

    @property
    def video_tokens(self) -> int:
        return self.frames * self.height * self.width

    @property
    def num_tokens(self) -> int:
        return self.text_before + self.video_tokens + self.text_after

    @property
    def is_frame_major(self) -> bool:
        return self.axes == VIDEO_AXES

    def to_dict(self) -> dict[str, Any]:
        """The five counts; axes and segments only where they are not the defaults (so the JSON of
        a frame-major grid is what it always was)."""
        d: dict[str, Any] = {"frames": self.frames, "height": self.height, "width": self.width,
                             "text_before": self.text_before, "text_after": self.text_after}
        if self.axes != VIDEO_AXES:
            d["axes"] = self.axes
        if self.segments:
            d["segments"] = [s.to_dict() for s in self.segments]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TokenGrid":
        """Inverse of to_dict; dicts without axes / segments (older plans) are frame-major grids."""
        out: dict[str, Any] = {}
        for k, v in d.items():
            if k == "axes":
                out[k] = str(v)
            elif k == "segments":
                out[k] = tuple(s if isinstance(s, VideoSegment) else VideoSegment.from_dict(s) for s in v)
            else:
                out[k] = int(v)
        return cls(**out)

    def __str__(self) -> str:
        s = f"{self.frames}x{self.height}x{self.width}"
        if self.axes != VIDEO_AXES:
            s += f"({self.axes})"
        if self.text_before:
            s = f"{self.text_before}+" + s
        if self.text_after:
            s += f"+{self.text_after}"
        if self.segments:
            s += " [also video " + ", ".join(f"{g.frames}x{g.height}x{g.width}@{g.start}" for g in self.segments) + "]"
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
