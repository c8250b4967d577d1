"""Static attention patterns and the block masks they produce.

A pattern says, for a query token and a key token given by their ORIGINAL (frame, height, width)
coordinates, whether the pair is kept. block_mask() evaluates it at token level and pools it to
blocks in the chosen token order: block (i, j) is kept when any (query, key) pair inside it is
kept. Because the pattern is stated in original coordinates, the same pattern is correct (a
superset of its token pairs) in any of the 6 orders; only its density changes with the order.

Rules shared by every pattern except Skip:
- a token always attends to itself, so every query row keeps its diagonal block (no empty rows);
- text tokens (grid.text_before / text_after) attend to everything and are attended to by every
  query (`text_global`, default True): they are global tokens in joint-attention models.

Patterns are frozen dataclasses (hashable: masks are cached per (pattern, grid, order, blocks)).
Coordinates and distances are in tokens of the grid (latent patches), radii are half-widths:
LocalWindow(1, 2, 2) keeps |df| <= 1, |dh| <= 2, |dw| <= 2 (a 3 x 5 x 5 window), centred on the
query and cut at the borders of the video (no NATTEN-style shift at the edges).

The calibrated mask (calibrated_block_mask) is different: it is measured in one order, so it is
already a block mask in that order.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch

from .ir import TokenGrid
from .orders import TokenOrder, order_permutation, token_coordinates


class Coords(NamedTuple):
    """Coordinates of a set of tokens (any broadcastable shape): frame, height, width (int64, -1
    for text tokens) and whether each is a video token."""

    f: torch.Tensor
    h: torch.Tensor
    w: torch.Tensor
    video: torch.Tensor


@dataclass(frozen=True)
class Pattern:
    """Base class: a token-level rule `keeps(q, k)` over original coordinates.

    Subclasses define KIND (the name in plan JSON), their parameters as fields, and `_video_rule`
    (the rule between two video tokens); the self pair and the text rule are added here."""

    KIND: ClassVar[str] = ""
    text_global: bool = dataclasses.field(default=True, kw_only=True)

    def _video_rule(self, q: Coords, k: Coords) -> torch.Tensor:
        raise NotImplementedError

    def keeps(self, q: Coords, k: Coords) -> torch.Tensor:
        """Bool tensor, broadcast of q and k: True where query q may attend to key k (self pairs
        are added by block_mask / token_mask, which know token identity)."""
        rule = self._video_rule(q, k) & q.video & k.video
        if self.text_global:
            rule = rule | ~q.video | ~k.video
        return rule

    def to_dict(self) -> dict[str, Any]:
        d = {"kind": self.KIND}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            d[f.name] = [p.to_dict() for p in v] if f.name == "parts" else (list(v) if isinstance(v, tuple) else v)
        return d


def _check_nonneg(p: Pattern, *names: str) -> None:
    for n in names:
        v = getattr(p, n)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{type(p).__name__}.{n} must be an int >= 0, got {v!r}")


def _check_positive(p: Pattern, *names: str) -> None:
    for n in names:
        v = getattr(p, n)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{type(p).__name__}.{n} must be an int >= 1, got {v!r}")


@dataclass(frozen=True)
class Dense(Pattern):
    """Every pair kept (density 1)."""

    KIND: ClassVar[str] = "dense"

    def _video_rule(self, q, k):
        return torch.ones_like(q.f, dtype=torch.bool) & torch.ones_like(k.f, dtype=torch.bool)


@dataclass(frozen=True)
class Skip(Pattern):
    """No pair kept: the head's output is zero (Sparse-vDiT: some heads can be dropped)."""

    KIND: ClassVar[str] = "skip"
    text_global: bool = dataclasses.field(default=False, kw_only=True)

    def _video_rule(self, q, k):
        return torch.zeros_like(q.f, dtype=torch.bool) & torch.zeros_like(k.f, dtype=torch.bool)

    def keeps(self, q, k):
        return self._video_rule(q, k)


@dataclass(frozen=True)
class LocalWindow(Pattern):
    """3D local window (NATTEN / sliding tile): |df| <= frames, |dh| <= height, |dw| <= width."""

    KIND: ClassVar[str] = "local_window"
    frames: int = 1
    height: int = 2
    width: int = 2

    def __post_init__(self):
        _check_nonneg(self, "frames", "height", "width")

    def _video_rule(self, q, k):
        return ((q.f - k.f).abs() <= self.frames) & ((q.h - k.h).abs() <= self.height) & \
               ((q.w - k.w).abs() <= self.width)


@dataclass(frozen=True)
class TemporalDiagonals(Pattern):
    """Temporal multi-diagonal: the same spatial place (within `spatial_radius`) in other frames,
    every `frame_stride`-th frame, up to `max_frame_distance` frames away (None: all frames)."""

    KIND: ClassVar[str] = "temporal_diagonals"
    spatial_radius: int = 0
    frame_stride: int = 1
    max_frame_distance: int | None = None

    def __post_init__(self):
        _check_nonneg(self, "spatial_radius")
        _check_positive(self, "frame_stride")
        if self.max_frame_distance is not None:
            _check_nonneg(self, "max_frame_distance")

    def _video_rule(self, q, k):
        df = (q.f - k.f).abs()
        rule = ((q.h - k.h).abs() <= self.spatial_radius) & ((q.w - k.w).abs() <= self.spatial_radius)
        rule = rule & (df % self.frame_stride == 0)
        if self.max_frame_distance is not None:
            rule = rule & (df <= self.max_frame_distance)
        return rule


@dataclass(frozen=True)
class VerticalStripes(Pattern):
    """Vertical stripes: every query attends to the global keys, here all tokens of the frames in
    `key_frames` (negative indices count from the end; (0,) is the first frame, an attention
    sink), plus the text tokens (text_global)."""

    KIND: ClassVar[str] = "vertical_stripes"
    key_frames: tuple[int, ...] = (0,)

    def __post_init__(self):
        object.__setattr__(self, "key_frames", tuple(int(f) for f in self.key_frames))

    def _video_rule(self, q, k):
        # resolved against the grid in block_mask (negative frames): see _resolve
        rule = torch.zeros_like(k.f, dtype=torch.bool)
        for f in self.key_frames:
            rule = rule | (k.f == f)
        return rule & torch.ones_like(q.f, dtype=torch.bool)


@dataclass(frozen=True)
class Radial(Pattern):
    """Radial attention: the spatial window narrows as temporal distance grows. Frames with
    |df| <= dense_frames keep a spatial radius of `spatial_radius`; in band j >= 1 (|df| in
    (dense_frames * 2^(j-1), dense_frames * 2^j]) the radius is spatial_radius // 2^j, so far
    frames keep only the same place (radius 0): O(n log n) pairs."""

    KIND: ClassVar[str] = "radial"
    spatial_radius: int = 8
    dense_frames: int = 1

    def __post_init__(self):
        _check_nonneg(self, "spatial_radius")
        _check_positive(self, "dense_frames")

    def _video_rule(self, q, k):
        df = (q.f - k.f).abs()
        # band 0 for df <= dense_frames, then j = ceil(log2(df / dense_frames))
        ratio = (df.float() / self.dense_frames).clamp_min(1.0)
        band = torch.ceil(torch.log2(ratio) - 1e-9).clamp_min(0).to(torch.int64)
        radius = torch.div(torch.full_like(band, self.spatial_radius), 2 ** band, rounding_mode="floor")
        return ((q.h - k.h).abs() <= radius) & ((q.w - k.w).abs() <= radius)


@dataclass(frozen=True)
class FrameTiles(Pattern):
    """3D tiles (Efficient-vDiT attention tile, block-diagonal): a token attends to the tokens of
    its own tile of tile_frames x tile_height x tile_width (tiles start at 0; edge tiles are cut)."""

    KIND: ClassVar[str] = "frame_tiles"
    tile_frames: int = 1
    tile_height: int = 1_000_000  # default: whole frames
    tile_width: int = 1_000_000

    def __post_init__(self):
        _check_positive(self, "tile_frames", "tile_height", "tile_width")

    def _video_rule(self, q, k):
        return (q.f // self.tile_frames == k.f // self.tile_frames) & \
               (q.h // self.tile_height == k.h // self.tile_height) & \
               (q.w // self.tile_width == k.w // self.tile_width)


@dataclass(frozen=True)
class Union(Pattern):
    """Pairs kept by any of `parts` (e.g. a local window plus vertical stripes, Sparse-vDiT's mix)."""

    KIND: ClassVar[str] = "union"
    parts: tuple[Pattern, ...] = ()

    def __post_init__(self):
        if not self.parts or not all(isinstance(p, Pattern) for p in self.parts):
            raise ValueError(f"Union needs one or more Pattern parts, got {self.parts!r}")
        object.__setattr__(self, "parts", tuple(self.parts))

    def keeps(self, q, k):
        out = self.parts[0].keeps(q, k)
        for p in self.parts[1:]:
            out = out | p.keeps(q, k)
        if self.text_global:
            out = out | ~q.video | ~k.video
        return out


PATTERN_KINDS: dict[str, type[Pattern]] = {c.KIND: c for c in
                                           (Dense, Skip, LocalWindow, TemporalDiagonals, VerticalStripes,
                                            Radial, FrameTiles, Union)}


def pattern_from_dict(d: dict[str, Any]) -> Pattern:
    """Inverse of Pattern.to_dict. Raises ValueError naming the unknown kind or bad parameter."""
    if not isinstance(d, dict) or "kind" not in d:
        raise ValueError(f"a pattern must be a dict with a 'kind', got {d!r}")
    kind = d["kind"]
    if kind not in PATTERN_KINDS:
        raise ValueError(f"unknown pattern kind {kind!r}; known kinds: {sorted(PATTERN_KINDS)}")
    cls = PATTERN_KINDS[kind]
    params = {k: v for k, v in d.items() if k != "kind"}
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - names)
    if unknown:
        raise ValueError(f"pattern {kind!r}: unknown parameter(s) {unknown}; parameters are {sorted(names)}")
    if "parts" in params:
        params["parts"] = tuple(pattern_from_dict(p) for p in params["parts"])
    if "key_frames" in params:
        params["key_frames"] = tuple(params["key_frames"])
    return cls(**params)


# ----------------------------------------------------------------------------- evaluation


def _resolve(pattern: Pattern, grid: TokenGrid) -> Pattern:
    """Replace grid-relative parameters (negative key frames) by absolute ones."""
    if isinstance(pattern, VerticalStripes):
        frames = tuple(sorted({f % grid.frames for f in pattern.key_frames if -grid.frames <= f < grid.frames}))
        return dataclasses.replace(pattern, key_frames=frames)
    if isinstance(pattern, Union):
        return dataclasses.replace(pattern, parts=tuple(_resolve(p, grid) for p in pattern.parts))
    return pattern


def _coords(grid: TokenGrid, index: torch.Tensor) -> Coords:
    f, h, w, video = token_coordinates(grid)
    return Coords(f[index], h[index], w[index], video[index])


def token_mask(pattern: Pattern, grid: TokenGrid, order: TokenOrder | str = TokenOrder.FHW) -> torch.Tensor:
    """The token-level mask, bool (N, N), in `order` (row = query, column = key). O(N^2) memory:
    meant for tests and references at small N; block_mask never builds it whole."""
    pattern = _resolve(pattern, grid)
    perm = order_permutation(grid, order)
    c = _coords(grid, perm)
    q = Coords(*(t[:, None] for t in c))
    k = Coords(*(t[None, :] for t in c))
    mask = pattern.keeps(q, k)
    if not isinstance(pattern, Skip):
        mask = mask | torch.eye(grid.num_tokens, dtype=torch.bool)
    return mask


def num_blocks(n: int, block: int) -> int:
    return math.ceil(n / block)


@functools.lru_cache(maxsize=512)
def _block_mask_cached(pattern: Pattern, grid: TokenGrid, order: TokenOrder, block_m: int,
                       block_n: int) -> torch.Tensor:
    n = grid.num_tokens
    qb, kb = num_blocks(n, block_m), num_blocks(n, block_n)
    if isinstance(pattern, Skip):
        return torch.zeros(qb, kb, dtype=torch.bool)
    pattern = _resolve(pattern, grid)
    perm = order_permutation(grid, order)
    c = _coords(grid, perm)
    k = Coords(*(t[None, :] for t in c))
    pad_k = kb * block_n - n
    out = torch.empty(qb, kb, dtype=torch.bool)
    # query blocks in chunks so that a chunk holds ~4M pairs: memory bounded, few Python steps
    blocks_per_chunk = max(1, (1 << 22) // max(1, block_m * n))
    for b0 in range(0, qb, blocks_per_chunk):
        b1 = min(qb, b0 + blocks_per_chunk)
        rows = slice(b0 * block_m, min(n, b1 * block_m))
        q = Coords(*(t[rows, None] for t in c))
        m = pattern.keeps(q, k)
        pos = torch.arange(rows.start, rows.stop)
        m[torch.arange(len(pos)), pos] = True  # the self pair
        m = torch.nn.functional.pad(m, (0, pad_k, 0, (b1 - b0) * block_m - len(pos)))
        out[b0:b1] = m.view(b1 - b0, block_m, kb, block_n).any(dim=3).any(dim=1)
    return out


def block_mask(pattern: Pattern, grid: TokenGrid, order: TokenOrder | str = TokenOrder.FHW,
               block_m: int = 64, block_n: int = 64) -> torch.Tensor:
    """The block mask of `pattern` for self-attention over `grid` with tokens in `order`.

    Returns bool (QB, KB), QB = ceil(N / block_m), KB = ceil(N / block_n), N = grid.num_tokens:
    entry (i, j) is True when some query of block i may attend to some key of block j, blocks taken
    over the REORDERED sequence (the last block of each axis may be ragged). Cached; returns a
    fresh copy."""
    if block_m < 1 or block_n < 1:
        raise ValueError(f"block sizes must be >= 1, got block_m={block_m}, block_n={block_n}")
    if not isinstance(pattern, Pattern):
        raise TypeError(f"expected a Pattern, got {type(pattern).__name__}")
    return _block_mask_cached(pattern, grid, TokenOrder(order), int(block_m), int(block_n)).clone()


def expand_block_mask(mask: torch.Tensor, q_len: int, kv_len: int, block_m: int, block_n: int) -> torch.Tensor:
    """Token-level mask (..., q_len, kv_len) from a block mask (..., QB, KB): what block-sparse
    attention computes, for references."""
    m = mask.repeat_interleave(block_m, dim=-2).repeat_interleave(block_n, dim=-1)
    return m[..., :q_len, :kv_len]


def diagonal_blocks(q_len: int, kv_len: int, block_m: int, block_n: int) -> torch.Tensor:
    """Bool (QB, KB): for self-attention (q_len == kv_len), the key blocks that hold the keys of the
    same positions as the queries of each query block (one block when block_m == block_n)."""
    if q_len != kv_len:
        raise ValueError(f"diagonal blocks need self-attention, got q_len={q_len}, kv_len={kv_len}")
    qb, kb = num_blocks(q_len, block_m), num_blocks(kv_len, block_n)
    i = torch.arange(qb)[:, None]
    j = torch.arange(kb)[None, :]
    q0, q1 = i * block_m, torch.clamp((i + 1) * block_m, max=q_len)  # query token range [q0, q1)
    k0, k1 = j * block_n, torch.clamp((j + 1) * block_n, max=kv_len)
    return (k0 < q1) & (q0 < k1)


def calibrated_block_mask(mass: torch.Tensor, share: float, keep_diagonal: bool = True) -> torch.Tensor:
    """The fewest blocks holding `share` of the measured attention mass, per head.

    mass: (..., QB, KB) float, e.g. vsopt.core.metrics.block_attention_mass averaged over inputs
    (measured in the order the head will run in). share in (0, 1]. Returns bool of mass's shape.
    Every row first keeps its diagonal block (self-attention, QB == KB; otherwise its heaviest
    block), then blocks are added heaviest first until the kept mass reaches share * total.
    Greedy is optimal here: all blocks cost the same."""
    if not 0.0 < share <= 1.0:
        raise ValueError(f"share must be in (0, 1], got {share}")
    if mass.dim() < 2:
        raise ValueError(f"mass must be (..., QB, KB), got shape {tuple(mass.shape)}")
    qb, kb = mass.shape[-2:]
    m = mass.float().reshape(-1, qb, kb)
    if keep_diagonal and qb == kb:
        base = torch.eye(qb, dtype=torch.bool).expand_as(m).clone()
    else:
        base = torch.zeros_like(m, dtype=torch.bool)
        base.scatter_(-1, m.argmax(-1, keepdim=True), True)
    flat, kept0 = m.flatten(1), base.flatten(1)
    total = flat.sum(-1, keepdim=True)
    need = share * total - (flat * kept0).sum(-1, keepdim=True)  # mass still to add
    rest = flat.masked_fill(kept0, -1.0)  # already kept blocks sort last
    vals, idx = rest.sort(dim=-1, descending=True)
    vals = vals.clamp_min(0.0)
    before = vals.cumsum(-1) - vals  # mass of the blocks taken before this one
    take = before < need - 1e-12 * total  # take a block while the target is not reached
    out = kept0.clone()
    out.scatter_(-1, idx, take | out.gather(-1, idx))
    return out.view(mass.shape)
