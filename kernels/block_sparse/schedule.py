"""What the block-sparse launchers (launch.py: the Triton kernel; gluon_launch.py: the Gluon one)
share besides their inputs' checks: the work order of a table's rows, and the allocator that
device-built TMA descriptors need in eager launches."""
from __future__ import annotations

import weakref

import torch
import triton

from ..errors import check


def _tma_scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda" if torch.cuda.is_available() else "cpu")


def ensure_tma_allocator() -> None:
    """Device-built TMA descriptors live in global scratch memory that Triton asks an allocator for.
    Inductor provides its own; for eager launches install one unless the user already has."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_tma_scratch)


ORDERS = ("per_head_lpt", "lpt", "natural")
_ORDER_CACHE: dict[int, tuple] = {}
_ORDER_CACHE_SIZE = 16
#: The device whose tensors the cache takes (a module constant so that the CPU tests can point the
#: cache at CPU tensors, tests/kernels/test_work_order_cache.py).
_CACHE_DEVICE = "cuda"
#: Cached orders a CUDA graph captured (id -> tensor): kept for the life of the process. A captured
#: launch reads the order's memory at every replay, and the graph does not own it: evicted and freed,
#: its memory would be reused and the replay would read someone else's data (silently wrong rows).
_PINNED_ORDERS: dict[int, torch.Tensor] = {}


def work_order(kv_counts: torch.Tensor, batch: int, strategy: str = "per_head_lpt") -> torch.Tensor:
    """int32 (batch * H * QB,) flattened (b, h, qb) rows in launch order.

    natural: as stored. lpt: the largest count first over all rows (stable): the best balance, but
    the programs running together then come from every head, and the K/V of all heads compete for
    L2. per_head_lpt (default): heads in order, each head's rows largest count first: one head's
    K/V is in L2 at a time and the light rows of the last head fill the tail.

    Eager calls on a real CUDA tensor reuse the order computed for the same counts tensor (the same
    live object, unmodified: a weak reference and the version counter say so), saving the sort's
    launches on every call of a static plan (a cache of _ORDER_CACHE_SIZE entries, oldest evicted).
    While the current stream is capturing a CUDA graph: a cached order the graph reads is pinned
    (_PINNED_ORDERS, never freed); a new order is sorted inside the graph (the graph's own memory,
    recomputed at each replay) and not cached (its values exist only once the graph has run)."""
    check(strategy in ORDERS, f"work_order: strategy must be one of {ORDERS}, got {strategy!r}")
    cacheable = kv_counts.device.type == _CACHE_DEVICE and type(kv_counts) is torch.Tensor \
        and not torch.compiler.is_compiling()
    key = (kv_counts._version, tuple(kv_counts.shape), batch, strategy)
    hit = _ORDER_CACHE.get(id(kv_counts)) if cacheable else None
    if hit is not None and hit[0]() is kv_counts and hit[1] == key:
        if torch.cuda.is_current_stream_capturing():
            _PINNED_ORDERS[id(hit[2])] = hit[2]
        return hit[2]
    counts = kv_counts.expand(batch, -1, -1)
    rows = counts.shape[2]
    if strategy == "natural":
        order = torch.arange(counts.numel(), device=counts.device, dtype=torch.int32)
    elif strategy == "lpt":
        order = torch.argsort(counts.reshape(-1), descending=True, stable=True).to(torch.int32)
    else:
        within = torch.argsort(counts.reshape(-1, rows), dim=1, descending=True, stable=True)
        base = torch.arange(within.shape[0], device=counts.device)[:, None] * rows
        order = (within + base).reshape(-1).to(torch.int32)
    if cacheable and not torch.cuda.is_current_stream_capturing():
        if len(_ORDER_CACHE) >= _ORDER_CACHE_SIZE:
            _ORDER_CACHE.pop(next(iter(_ORDER_CACHE)))
        _ORDER_CACHE[id(kv_counts)] = (weakref.ref(kv_counts), key, order)
    return order


def checked_row_order(row_order: torch.Tensor, rows: int, device: torch.device) -> torch.Tensor:
    """A work order computed ahead (the ops' row_order argument), checked: int32 (rows,) on the
    inputs' device. The rows are scheduling only: any order of all rows gives the same output."""
    check(row_order.dim() == 1 and row_order.dtype == torch.int32 and row_order.numel() == rows
          and row_order.device == device,
          f"block_sparse_attention: row_order must be int32 ({rows},) on {device}, got "
          f"{row_order.dtype} {tuple(row_order.shape)} on {row_order.device}")
    return row_order
