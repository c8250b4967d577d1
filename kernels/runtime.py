"""Where and how the kernels run: Triton's interpreter or a GPU; the kernel object to launch.

Triton decides at decoration time whether @triton.jit functions are interpreted, from its own
TRITON_INTERPRET variable; the launchers mirror that decision (single autotune config, exact fp8
rounding) by reading the same variable when they run.

A launcher launches the Triton object itself when it runs eagerly on real tensors, and
torch.library.wrap_triton(kernel) when it is traced (see triton_launcher).
"""
from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def plain_eager(*tensors: torch.Tensor) -> bool:
    """True for an eager launch on real tensors: not under Dynamo, no torch dispatch mode active
    (FakeTensorMode, FunctionalTensorMode, make_fx's proxy mode) and no tensor subclass."""
    if torch.compiler.is_compiling():
        return False
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return _get_current_dispatch_mode() is None and all(type(t) is torch.Tensor for t in tensors)


def triton_launcher(kernel, eager: bool):
    """What to index with the grid and call: the kernel itself for a plain eager launch (see
    plain_eager), else torch.library.wrap_triton(kernel), which tracing needs to see the launch.

    Why not always wrap_triton: outside a triton_op's eager body (which turns wrap_triton off),
    the wrapper launches through torch's triton_kernel_wrapper HOP, and for an autotuner with an
    early_config_prune the HOP builds a new Autotuner of the pruned configs on every call: a new,
    empty cache, so every direct launcher call benchmarked again (540 ms instead of 1.4 ms at
    wan480), and every launch paid the HOP's dispatch. The kernel itself keeps its one cache."""
    return kernel if eager else torch.library.wrap_triton(kernel)
