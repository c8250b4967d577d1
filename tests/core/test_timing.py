"""vsopt.core.timing: the shared timing loop (CPU path; the CUDA-event path runs in the GPU benchmarks)."""
import time
import types

import pytest

from vsopt.core.timing import median_ms, time_calls


def test_time_calls_counts_warmup_and_measures_each_call():
    calls = []

    def sleep_2ms():
        calls.append(1)
        time.sleep(0.002)

    times = time_calls(sleep_2ms, iters=3, warmup=2, cuda=False)
    assert len(calls) == 5 and len(times) == 3
    assert all(t >= 1.9 for t in times)                     # milliseconds, not seconds
    assert 1.9 <= median_ms(sleep_2ms, iters=3, cuda=False) < 200


def test_time_calls_rejects_no_iterations():
    with pytest.raises(ValueError, match="iters"):
        time_calls(lambda: None, iters=0, cuda=False)


def test_call_timer_times_every_call_and_passes_results_through():
    from vsopt.core.timing import CallTimer

    timer = CallTimer(lambda x, scale=1: (time.sleep(0.002), x * scale)[1], cuda=False)
    assert [timer(i, scale=2) for i in range(3)] == [0, 2, 4]
    assert len(timer.ms) == 3 and all(t >= 1.9 for t in timer.ms)


def test_interleaved_ms_times_each_callable_in_turn_every_round():
    from vsopt.core.timing import interleaved_ms

    order = []
    fns = {name: (lambda name=name: (order.append(name), time.sleep(0.002))) for name in ("a", "b", "c")}
    times = interleaved_ms(fns, rounds=3, iters=2, warmup=1, cuda=False)
    assert {k: len(v) for k, v in times.items()} == {"a": 6, "b": 6, "c": 6}
    assert all(t >= 1.9 for v in times.values() for t in v)
    # each round: a's warm-up and 2 calls, then b's, then c's; three rounds
    assert order == (["a"] * 3 + ["b"] * 3 + ["c"] * 3) * 3
    with pytest.raises(ValueError, match="rounds"):
        interleaved_ms(fns, rounds=0, iters=1, cuda=False)


def test_pipelined_us_times_back_to_back_calls_per_call(monkeypatch):
    """One warm-up call, then `reps` runs of `calls` calls, each run's time divided by `calls`;
    sync after the warm-up and after every run; the median, or the fastest with best."""
    from vsopt.core import timing

    clock = iter([0.0, 0.004, 1.0, 1.002, 2.0, 2.010] * 2)   # runs of 4, 2 and 10 ms (seconds)
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))   # this module's clock only
    events = []
    fn, sync = (lambda: events.append("call")), (lambda: events.append("sync"))
    assert timing.pipelined_us(fn, calls=2, reps=3, sync=sync) == pytest.approx(2000.0)   # median of 2000, 1000, 5000 us
    assert events == ["call", "sync"] + ["call", "call", "sync"] * 3
    assert timing.pipelined_us(fn, calls=2, reps=3, best=True) == pytest.approx(1000.0)
    assert events.count("sync") == 4                                                      # none without sync
