"""What the token dataflow (passes/token_segments.py) knows about a token axis: its segments (a Video
with its grid, or Other tokens) and where they lie (TokenState); cut, the segments of a range."""
from __future__ import annotations

from dataclasses import dataclass, replace



@dataclass(frozen=True)
class Video:
    """Video tokens of one grid, from the patch embedding `source` (the convolution's or the video
    tensor's node name: every view of the same tokens names the same source)."""

    frames: int
    height: int
    width: int
    axes: str
    source: str
    per_frame: bool = False  # from a per-frame Conv2d whose frames stay in the batch axis (frames 1)

    @property
    def size(self) -> int:
        return self.frames * self.height * self.width


@dataclass(frozen=True)
class Other:
    """Tokens of no known grid (text, CLS, registers, a video cut off mid-way)."""

    size: int


Segments = tuple["Video | Other", ...]


@dataclass(frozen=True)
class TokenState:
    """Axis `dim` of a node's output holds the tokens `segments`; other indices may be merged into
    that axis: it is (outer, tokens, inner) row-major."""

    segments: Segments
    dim: int
    outer: int = 1
    inner: int = 1
    # context parallelism: the state before this rank's shard was cut out of the sequence, and
    # whether a collective has since brought every rank's shard into the rank axis
    whole: "TokenState | None" = None
    gathered: bool = False
    # tokens of a data-dependent count follow the segments on the axis (text cut to its unpadded
    # length by a mask: passes/data_sizes.py); only a cat makes such a state, and any op that
    # needs the axis's size drops it
    data_after: bool = False

    @property
    def total(self) -> int:
        return sum(s.size for s in self.segments)


@dataclass(frozen=True)
class Several:
    """The states of the outputs of a node that returns several tensors (split, unbind, SDPA)."""

    states: tuple[TokenState | None, ...]


def cut(segments: Segments, start: int, stop: int) -> Segments:
    """The segments of tokens [start, stop). A video cut along its outermost axis stays a video
    (fewer frames of a frame-major one); cut anywhere else it becomes Other."""
    out, pos = [], 0
    for s in segments:
        lo, hi = max(start, pos), min(stop, pos + s.size)
        if lo < hi:
            if (lo, hi) == (pos, pos + s.size):
                out.append(s)
            elif isinstance(s, Video):
                dims = {"f": s.frames, "h": s.height, "w": s.width}
                step = s.size // dims[s.axes[0]]  # tokens per index of the outermost axis
                if (lo - pos) % step == 0 and (hi - pos) % step == 0:
                    dims[s.axes[0]] = (hi - lo) // step
                    out.append(replace(s, frames=dims["f"], height=dims["h"], width=dims["w"]))
                else:
                    out.append(Other(hi - lo))
            else:
                out.append(Other(hi - lo))
        pos += s.size
    return tuple(out)
