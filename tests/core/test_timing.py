"""vsopt.core.timing: the shared timing loop (CPU path; the CUDA-event path runs in the GPU benchmarks)."""
import time

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
