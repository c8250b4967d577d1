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

Orders are named axis orders (vsopt/core/orders.py): for a model whose tokens are not frame-major
(TokenGrid.axes, e.g. "hwf"), token_mask / block_mask in order O are the masks of the sequence
reordered to O, the same as for the frame-major grid; in the model's own order
(orders.model_order(grid)) they are the masks of its tokens as they are.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .ir import TokenGrid
from .orders import TokenOrder, inverse_permutation, order_permutation, token_coordinates


Terms = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _dist(n: int) -> torch.Tensor:
    """|a - b| for coordinates a, b in range(n): int64 (n, n)."""
    r = torch.arange(n)
    return (r[:, None] - r[None, :]).abs()


def _ones(n: int) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool)


@dataclass(frozen=True)
class Pattern:
    """Base class of the static patterns.

    A pattern's rule between two video tokens is a union of separable terms: each term is three
    bool matrices (F_f (F, F), F_h (H, H), F_w (W, W)), indexed [query coordinate, key coordinate],
    and keeps the pair when F_f[qf, kf] and F_h[qh, kh] and F_w[qw, kw]. Subclasses define KIND
    (the name in plan JSON), their parameters as fields, and terms(grid). Separability is what lets
    block_mask run in O(QB * N * (F + H + W)) instead of O(N^2)."""

    KIND: ClassVar[str] = ""
    text_global: bool = dataclasses.field(default=True, kw_only=True)

    def terms(self, grid: TokenGrid) -> Terms:
        raise NotImplementedError

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

    def terms(self, grid):
        return [(_ones(grid.frames), _ones(grid.height), _ones(grid.width))]


@dataclass(frozen=True)
class Skip(Pattern):
    """No pair kept, not even text or self pairs: the head's output is zero (Sparse-vDiT: some
    heads can be dropped)."""

    KIND: ClassVar[str] = "skip"
    text_global: bool = dataclasses.field(default=False, kw_only=True)

    def terms(self, grid):
        return []


@dataclass(frozen=True)
class LocalWindow(Pattern):
    """3D local window (NATTEN / sliding tile): |df| <= frames, |dh| <= height, |dw| <= width."""

    KIND: ClassVar[str] = "local_window"
    frames: int = 1
    height: int = 2
    width: int = 2

    def __post_init__(self):
        _check_nonneg(self, "frames", "height", "width")

    def terms(self, grid):
        return [(_dist(grid.frames) <= self.frames, _dist(grid.height) <= self.height,
                 _dist(grid.width) <= self.width)]


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

    def terms(self, grid):
        df = _dist(grid.frames)
        frames = df % self.frame_stride == 0
        if self.max_frame_distance is not None:
            frames &= df <= self.max_frame_distance
        return [(frames, _dist(grid.height) <= self.spatial_radius, _dist(grid.width) <= self.spatial_radius)]


@dataclass(frozen=True)
class VerticalStripes(Pattern):
    """Vertical stripes: every query attends to the global keys, here all tokens of the frames in
    `key_frames` (negative indices count from the end; (0,) is the first frame, an attention
    sink; frames outside the grid are ignored), plus the text tokens (text_global)."""

    KIND: ClassVar[str] = "vertical_stripes"
    key_frames: tuple[int, ...] = (0,)

    def __post_init__(self):
        object.__setattr__(self, "key_frames", tuple(int(f) for f in self.key_frames))

    def terms(self, grid):
        keys = torch.zeros(grid.frames, dtype=torch.bool)
        for f in self.key_frames:
            if -grid.frames <= f < grid.frames:
                keys[f] = True
        return [(keys[None, :].expand(grid.frames, -1).clone(), _ones(grid.height), _ones(grid.width))]


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

    def terms(self, grid):
        df, dh, dw = _dist(grid.frames), _dist(grid.height), _dist(grid.width)
        out, lo, band = [], -1, 0  # band j holds lo < |df| <= hi
        while lo < grid.frames - 1:
            hi = self.dense_frames * 2 ** band
            r = self.spatial_radius // 2 ** band
            out.append(((df > lo) & (df <= hi), dh <= r, dw <= r))
            lo, band = hi, band + 1
        return out


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

    def terms(self, grid):
        def same_tile(n, t):
            tile = torch.arange(n) // t
            return tile[:, None] == tile[None, :]

        return [(same_tile(grid.frames, self.tile_frames), same_tile(grid.height, self.tile_height),
                 same_tile(grid.width, self.tile_width))]


@dataclass(frozen=True)
class Union(Pattern):
    """Pairs kept by any of `parts` (e.g. a local window plus vertical stripes, Sparse-vDiT's mix).
    The text rule is the Union's own text_global; the parts' text_global is not used."""

    KIND: ClassVar[str] = "union"
    parts: tuple[Pattern, ...] = ()

    def __post_init__(self):
        if not self.parts or not all(isinstance(p, Pattern) for p in self.parts):
            raise ValueError(f"Union needs one or more Pattern parts, got {self.parts!r}")
        object.__setattr__(self, "parts", tuple(self.parts))

    def terms(self, grid):
        return [t for p in self.parts for t in p.terms(grid)]


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


def token_mask(pattern: Pattern, grid: TokenGrid, order: TokenOrder | str = TokenOrder.FHW) -> torch.Tensor:
    """The token-level mask, bool (N, N), in `order` (row = query, column = key). O(N^2) memory:
    meant for tests and references at small N; block_mask never builds it."""
    n = grid.num_tokens
    if isinstance(pattern, Skip):
        return torch.zeros(n, n, dtype=torch.bool)
    perm = order_permutation(grid, order)
    f, h, w, video = (t[perm] for t in token_coordinates(grid))
    mask = torch.zeros(n, n, dtype=torch.bool)
    vq, vk = video[:, None], video[None, :]
    fq, hq, wq = (t.clamp_min(0)[:, None] for t in (f, h, w))  # text rows are masked by `video` below
    fk, hk, wk = (t.clamp_min(0)[None, :] for t in (f, h, w))
    for tf, th, tw in pattern.terms(grid):
        mask |= tf[fq, fk] & th[hq, hk] & tw[wq, wk]
    mask &= vq & vk
    if pattern.text_global:
        mask |= ~vq | ~vk
    return mask | torch.eye(n, dtype=torch.bool)


def num_blocks(n: int, block: int) -> int:
    return math.ceil(n / block)


@functools.lru_cache(maxsize=512)
def _block_mask_cached(pattern: Pattern, grid: TokenGrid, order: TokenOrder, block_m: int,
                       block_n: int) -> torch.Tensor:
    n = grid.num_tokens
    qb, kb = num_blocks(n, block_m), num_blocks(n, block_n)
    if isinstance(pattern, Skip):
        return torch.zeros(qb, kb, dtype=torch.bool)
    F, H, W = grid.frames, grid.height, grid.width
    position = inverse_permutation(order_permutation(grid, order))  # token -> place in the new order
    video_pos = position[grid.text_before:grid.text_before + grid.video_tokens]  # by video index
    q_block, k_block = video_pos // block_m, video_pos // block_n
    terms = [tuple(t.float() for t in term) for term in pattern.terms(grid)]
    out = torch.zeros(qb, kb, dtype=torch.bool)
    # Per chunk of query blocks: R[i, key] = number of (query of block i, key) pairs kept, summed
    # over the separable terms, one axis at a time; then summed into key blocks.
    chunk = max(1, (1 << 23) // max(1, grid.video_tokens))
    for b0 in range(0, qb, chunk):
        b1 = min(qb, b0 + chunk)
        sel = (q_block >= b0) & (q_block < b1)
        member = torch.zeros(b1 - b0, grid.video_tokens)
        member[q_block[sel] - b0, torch.nonzero(sel).squeeze(1)] = 1.0
        member = member.view(-1, F, H, W)
        counts = torch.zeros_like(member)
        for tf, th, tw in terms:
            r = torch.einsum("ifhw,fg->ighw", member, tf)
            r = torch.einsum("ighw,hk->igkw", r, th)
            counts += torch.einsum("igkw,wl->igkl", r, tw)
        per_block = torch.zeros(b1 - b0, kb).index_add_(1, k_block, counts.view(b1 - b0, -1))
        out[b0:b1] = per_block > 0.5
    if pattern.text_global and grid.num_tokens > grid.video_tokens:
        is_text = torch.ones(n, dtype=torch.bool)
        is_text[grid.text_before:grid.text_before + grid.video_tokens] = False  # text never moves
        text_pos = torch.nonzero(is_text).squeeze(1)
        out[text_pos // block_m, :] = True
        out[:, text_pos // block_n] = True
    return out | diagonal_blocks(n, n, block_m, block_n)  # self pairs: same place in q and k


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
    # In a named order the reordered sequence does not depend on the model's layout (grid.axes),
    # so every layout shares the frame-major grid's mask (its evaluation indexes tokens frame-major).
    grid = dataclasses.replace(grid, axes="fhw") if grid.axes != "fhw" else grid
    return _block_mask_cached(pattern, grid, TokenOrder(order), int(block_m), int(block_n)).clone()


def expand_block_mask(mask: torch.Tensor, q_len: int, kv_len: int, block_m: int, block_n: int) -> torch.Tensor:
    """Token-level mask (..., q_len, kv_len) from a block mask (..., QB, KB): what block-sparse
    attention computes, for references."""
    m = mask.repeat_interleave(block_m, dim=-2).repeat_interleave(block_n, dim=-1)
    return m[..., :q_len, :kv_len]


def diagonal_blocks(q_len: int, kv_len: int, block_m: int, block_n: int, device=None) -> torch.Tensor:
    """Bool (QB, KB): for self-attention (q_len == kv_len), the key blocks that hold the keys of the
    same positions as the queries of each query block (one block when block_m == block_n).
    device: where to build it (a dynamic mask's, so that no host-to-device copy runs per call)."""
    if q_len != kv_len:
        raise ValueError(f"diagonal blocks need self-attention, got q_len={q_len}, kv_len={kv_len}")
    qb, kb = num_blocks(q_len, block_m), num_blocks(kv_len, block_n)
    i = torch.arange(qb, device=device)[:, None]
    j = torch.arange(kb, device=device)[None, :]
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
