"""Wall-clock timing of a callable on the device it runs on: the one loop that the calibration's
measured check (interleaved_ms: several callables timed in turn), `vsopt bench`, the end-to-end benchmarks and `vsopt demo` (CallTimer: every call
of a model a sampler drives) share; and pipelined_us, back-to-back calls timed together (the
benchmarks' host-overhead and wall-clock measurements).

On CUDA each call is bracketed by CUDA events (GPU time of the work the call enqueues, host launch
gaps included, as a user sees it) and synchronized; elsewhere time.perf_counter is used.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Mapping

import torch


def _timed(fn: Callable[[], object], cuda: bool) -> tuple[object, float]:
    """fn()'s result and its milliseconds: the one timed call of this module. On CUDA the device
    is idle when the start event is recorded and synchronized after the end event."""
    if not cuda:
        t0 = time.perf_counter()
        out = fn()
        return out, (time.perf_counter() - t0) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    out = fn()
    end.record()
    torch.cuda.synchronize()
    return out, start.elapsed_time(end)


def time_calls(fn: Callable[[], object], iters: int, warmup: int = 1, cuda: bool | None = None) -> list[float]:
    """Milliseconds of each of `iters` calls of fn, after `warmup` untimed calls. cuda: time with
    CUDA events (default: when CUDA is available)."""
    if iters < 1:
        raise ValueError(f"time_calls: iters must be >= 1, got {iters}")
    cuda = torch.cuda.is_available() if cuda is None else cuda
    for _ in range(warmup):
        fn()
    return [_timed(fn, cuda)[1] for _ in range(iters)]


def median_ms(fn: Callable[[], object], iters: int, warmup: int = 1, cuda: bool | None = None) -> float:
    """Median of time_calls."""
    return statistics.median(time_calls(fn, iters, warmup, cuda))


def pipelined_us(fn: Callable[[], object], calls: int, reps: int, sync: Callable[[], object] | None = None,
                 best: bool = False) -> float:
    """Microseconds per call of fn over `calls` back-to-back calls (host and device pipelined, as a
    model runs without CUDA graphs: the larger of the two), timed `reps` times after one warm-up
    call; the median, or with `best` the fastest (host time on a shared machine: the minimum is the
    work itself). sync (e.g. torch.cuda.synchronize) runs after the warm-up and after each run."""
    fn()
    if sync is not None:
        sync()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        if sync is not None:
            sync()
        out.append(1e6 * (time.perf_counter() - t0) / calls)
    return min(out) if best else statistics.median(out)


def interleaved_ms(fns: Mapping[str, Callable[[], object]], rounds: int, iters: int, warmup: int = 1,
                   cuda: bool | None = None) -> dict[str, list[float]]:
    """Milliseconds of every call of each of `fns`, timed in turn: `rounds` rounds, each running
    time_calls(fn, iters, warmup) for every fn in order, so that a drift of the machine (clocks,
    other processes, a host-bound phase) falls on all of them alike instead of on whichever is
    timed last. Returns name -> the rounds * iters times."""
    if rounds < 1:
        raise ValueError(f"interleaved_ms: rounds must be >= 1, got {rounds}")
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            out[name] += time_calls(fn, iters, warmup, cuda)
    return out


class CallTimer:
    """A callable that times every call of `fn` as time_calls does (CUDA events and a synchronize
    on CUDA, time.perf_counter elsewhere), for loops someone else drives, e.g. one entry per
    sampling step of a sampler given the wrapped model:

        timer = CallTimer(model); sampler.sample(timer, ...); timer.ms   # [ms of each call]
    """

    def __init__(self, fn: Callable[..., object], cuda: bool | None = None):
        self.fn, self.cuda, self.ms = fn, torch.cuda.is_available() if cuda is None else cuda, []

    def __call__(self, *args, **kwargs):
        out, ms = _timed(lambda: self.fn(*args, **kwargs), self.cuda)
        self.ms.append(ms)
        return out
