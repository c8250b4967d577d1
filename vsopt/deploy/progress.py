"""Progress lines for the slow steps of an export (tracing, conversion, compilation, the check):
"[vsopt export] compiling the AOTInductor package ..." and, when it ends, the time it took."""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator

Report = Callable[[str], None]


@contextlib.contextmanager
def step(report: Report | None, what: str) -> Iterator[None]:
    """Report `what` before the block and its duration after (nothing when report is None)."""
    if report is None:
        yield
        return
    report(f"[vsopt export] {what} ...")
    start = time.perf_counter()
    yield
    report(f"[vsopt export] {what}: done in {time.perf_counter() - start:.1f} s")
