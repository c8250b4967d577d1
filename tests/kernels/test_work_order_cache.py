"""The work-order cache (schedule.work_order) under CUDA graph capture, on the CPU: the cache is pointed
at CPU tensors and capture is simulated by patching torch.cuda.is_current_stream_capturing. A graph
reads the order's memory at every replay, so an order it captured must outlive the cache's eviction,
and an order sorted during capture (whose values exist only once the graph runs) must not be cached.
The GPU case (capture, evict, overwrite the freed memory, replay): tests/kernels/gpu_check.py --parts graph."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from vsopt.kernels.block_sparse import schedule


@pytest.fixture
def cpu_cache(monkeypatch):
    """A cache that takes CPU tensors, empty; capture off until a test turns it on."""
    monkeypatch.setattr(schedule, "_CACHE_DEVICE", "cpu")
    monkeypatch.setattr(schedule, "_ORDER_CACHE", {})
    monkeypatch.setattr(schedule, "_PINNED_ORDERS", {})
    capturing = {"on": False}
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing["on"])
    return capturing


def _counts(seed: int) -> torch.Tensor:
    return torch.randint(0, 9, (1, 3, 5), generator=torch.Generator().manual_seed(seed), dtype=torch.int32)


def _fill(n: int) -> list[torch.Tensor]:
    """n other tables through the cache (kept alive, so every entry stays valid): evicts the oldest."""
    others = [_counts(100 + i) for i in range(n)]
    for c in others:
        schedule.work_order(c, 2)
    return others


def test_an_order_a_graph_captured_outlives_its_eviction(cpu_cache):
    counts = _counts(0)
    eager = schedule.work_order(counts, 2)            # warm-up: cached
    cpu_cache["on"] = True
    captured = schedule.work_order(counts, 2)         # what the graph would read
    cpu_cache["on"] = False
    assert captured is eager                          # the cache's tensor (no copy, no sort in the graph)
    alive = weakref.ref(captured)
    want = captured.clone()
    del eager, captured
    others = _fill(20)                                # evicts the entry
    assert id(counts) not in schedule._ORDER_CACHE
    gc.collect()
    assert alive() is not None and torch.equal(alive(), want)
    assert len(others) == 20


def test_an_order_sorted_during_capture_is_not_cached(cpu_cache):
    counts = _counts(1)
    cpu_cache["on"] = True
    in_graph = schedule.work_order(counts, 2)         # a miss: sorted inside the graph
    cpu_cache["on"] = False
    assert not schedule._ORDER_CACHE and not schedule._PINNED_ORDERS
    eager = schedule.work_order(counts, 2)            # an eager call sorts again, it does not get the graph's
    assert eager is not in_graph and torch.equal(eager, in_graph)
    assert schedule.work_order(counts, 2) is eager    # and caches as before


def test_eager_calls_pin_nothing_and_the_cache_stays_bounded(cpu_cache):
    counts = _counts(2)
    first = schedule.work_order(counts, 2)
    assert schedule.work_order(counts, 2) is first    # a hit
    alive = weakref.ref(first)
    del first
    _fill(20)
    gc.collect()
    assert not schedule._PINNED_ORDERS and len(schedule._ORDER_CACHE) == schedule._ORDER_CACHE_SIZE
    assert alive() is None                            # evicted and freed, as before
