"""Where the kernels run: Triton's interpreter (TRITON_INTERPRET=1, CPU tests) or a GPU.

Triton decides at decoration time whether @triton.jit functions are interpreted, from its own
TRITON_INTERPRET variable; the launchers mirror that decision (single autotune config, exact fp8
rounding) by reading the same variable when they run.
"""
from __future__ import annotations

import os


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
