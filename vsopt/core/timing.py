"""Wall-clock timing of a callable on the device it runs on: the one loop that the calibration's
measured check, `vsopt bench` and the end-to-end benchmark share.

On CUDA each call is bracketed by CUDA events (GPU time of the work the call enqueues, host launch
gaps included, as a user sees it) and synchronized; elsewhere time.perf_counter is used.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def time_calls(fn: Callable[[], object], iters: int, warmup: int = 1, cuda: bool | None = None) -> list[float]:
    """Milliseconds of each of `iters` calls of fn, after `warmup` untimed calls. cuda: time with
    CUDA events (default: when CUDA is available)."""
    if iters < 1:
        raise ValueError(f"time_calls: iters must be >= 1, got {iters}")
    cuda = torch.cuda.is_available() if cuda is None else cuda
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def median_ms(fn: Callable[[], object], iters: int, warmup: int = 1, cuda: bool | None = None) -> float:
    """Median of time_calls."""
    return statistics.median(time_calls(fn, iters, warmup, cuda))
