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
