"""Token orders (PARO): the 6 orders of the (frame, height, width) axes of a video token sequence.

Most models lay their video tokens out frame-major: index = (f*height + h)*width + w, i.e. the
order FHW (frame outermost, width innermost); a model whose grid says otherwise (TokenGrid.axes,
e.g. "hwf") lays them out in that order. A TokenOrder names an order of the (frame, height,
width) axes themselves, whatever the model's layout: the sequence reordered to HWF is the same
for every layout of the same grid, and the identity permutation is the one to the model's own
order (model_order(grid)). Reordering the tokens of a head so that the keys it
attends to lie next to each other makes its attention map block-concentrated (PAROAttention);
e.g. a head that attends to the same spatial place in every frame is block-diagonal in order HWF.

Text tokens (grid.text_before / grid.text_after) never move: only the video span is permuted.

Convention for a permutation `perm` (int64, shape (N,)): position i of the reordered sequence holds
original token perm[i], i.e. reordered = x[perm]; inverse_permutation(perm)[perm[i]] = i. This is
the convention of torch.ops.vsopt.permute_tokens / unpermute_tokens (per head: perm (H or 1, N)).
"""
from __future__ import annotations

import enum
import functools

import torch

from .ir import TokenGrid


class TokenOrder(str, enum.Enum):
    """An order of the video axes, outermost first: HWF puts height outermost and frame innermost,
    so tokens with the same (h, w) in consecutive frames become neighbours."""

    FHW = "fhw"  # the model's own layout: the identity permutation
    FWH = "fwh"
    HFW = "hfw"
    HWF = "hwf"
    WFH = "wfh"
    WHF = "whf"

    @property
    def axes(self) -> tuple[int, int, int]:
        """Indices into (frame, height, width) of the axes, outermost first (FHW -> (0, 1, 2))."""
        return tuple("fhw".index(c) for c in self.value)

    @property
    def is_identity(self) -> bool:
        """The identity for a frame-major grid (TokenGrid.axes "fhw"); see model_order."""
        return self is TokenOrder.FHW


def model_order(grid: TokenGrid | None) -> TokenOrder:
    """The order the model's own tokens are in (its permutation is the identity); without a grid,
    frame-major (FHW) is assumed, as everywhere a site has no grid."""
    return TokenOrder.FHW if grid is None else TokenOrder(grid.axes)


def is_model_order(order: TokenOrder | str, grid: TokenGrid | None) -> bool:
    """Whether running in `order` moves no token of a site over `grid` (None: frame-major)."""
    return TokenOrder(order) is model_order(grid)


def _to_axes(layout: str, order: str) -> tuple[int, ...]:
    """permute() dims that take a tensor with dims in `layout` (letters of fhw) to dims in `order`."""
    return tuple(layout.index(c) for c in order)


@functools.lru_cache(maxsize=256)
def _permutation_cached(grid: TokenGrid, order: TokenOrder) -> torch.Tensor:
    dims = dict(zip("fhw", (grid.frames, grid.height, grid.width)))
    # the model's video token indices, as a tensor with one dim per axis in the model's layout
    video = torch.arange(grid.video_tokens, dtype=torch.int64).view([dims[c] for c in grid.axes])
    video = video.permute(_to_axes(grid.axes, order.value)).reshape(-1) + grid.text_before
    before = torch.arange(grid.text_before, dtype=torch.int64)
    after = torch.arange(grid.text_before + grid.video_tokens, grid.num_tokens, dtype=torch.int64)
    return torch.cat([before, video, after])


def order_permutation(grid: TokenGrid, order: TokenOrder | str) -> torch.Tensor:
    """The permutation (int64, (N,), N = grid.num_tokens) that puts the tokens of `grid` in `order`:
    reordered[i] = original[perm[i]]. Text tokens map to themselves. Returns a new tensor."""
    return _permutation_cached(grid, TokenOrder(order)).clone()


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """inv with inv[perm[i]] = i, for a permutation of any leading shape (..., N)."""
    inv = torch.empty_like(perm)
    idx = torch.arange(perm.shape[-1], dtype=perm.dtype, device=perm.device).expand_as(perm)
    return inv.scatter_(-1, perm, idx)


def head_permutations(grid: TokenGrid, orders: "list[TokenOrder] | tuple[TokenOrder, ...]") -> torch.Tensor:
    """Per-head permutations, int64 (H, N): row h is order_permutation(grid, orders[h]). This is the
    `perm` argument of torch.ops.vsopt.permute_tokens / unpermute_tokens."""
    return torch.stack([_permutation_cached(grid, TokenOrder(o)) for o in orders])


def token_coordinates(grid: TokenGrid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(frame, height, width, is_video) of every token in the ORIGINAL (the model's) order, each
    (N,): int64 coordinates (-1 for text tokens) and a bool mask of video tokens."""
    n, t0 = grid.num_tokens, grid.text_before
    dims = dict(zip("fhw", (grid.frames, grid.height, grid.width)))
    coords = {c: torch.full((n,), -1, dtype=torch.int64) for c in "fhw"}
    idx = torch.arange(grid.video_tokens, dtype=torch.int64)
    span = slice(t0, t0 + grid.video_tokens)
    stride = 1
    for c in reversed(grid.axes):  # the innermost axis of the model's layout first
        coords[c][span] = (idx // stride) % dims[c]
        stride *= dims[c]
    is_video = torch.zeros(n, dtype=torch.bool)
    is_video[span] = True
    return coords["f"], coords["h"], coords["w"], is_video
