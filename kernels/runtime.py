"""Where and how the kernels run: Triton's interpreter or a GPU; the kernel object to launch.

Triton decides at decoration time whether @triton.jit functions are interpreted, from its own
TRITON_INTERPRET variable; the launchers mirror that decision (single autotune config, exact fp8
rounding) by reading the same variable when they run.

A launcher launches the Triton object itself when it runs eagerly on real tensors, and
torch.library.wrap_triton(kernel) when it is traced (see triton_launcher).
"""
from __future__ import annotations

import functools
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


@functools.cache
def interpreter_bf16_dot_ok() -> bool:
    """Whether Triton's interpreter computes tl.dot on bfloat16 operands right: one 16 x 16 product
    of small integers (exact in bfloat16 and float32), run once per process. Triton 3.8's does not:
    it keeps bfloat16 as uint16 bit patterns and its create_dot converts only 8-bit float operands,
    so it multiplies the bit patterns (results ~1e9 times too large; triton-lang/triton#11584, closed
    as not supported). Asked, not assumed from the version, so a fixed interpreter is used as such.
    Call it only while interpreting (the kernel is decorated here, at the first call)."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():   # real CPU tensors, also when asked while tracing (fake tensors)
        g = torch.Generator().manual_seed(0)
        a, b = (torch.randint(-2, 3, (16, 16), generator=g).to(torch.bfloat16) for _ in range(2))
        return torch.equal(square_dot(a, b), a.float() @ b.float())


def square_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """tl.dot of two M x M matrices (contiguous), float32 out: one program, no masking (the
    interpreter probe above, and its test)."""
    c = torch.empty(a.shape, dtype=torch.float32, device=a.device)
    _square_dot_kernel()[(1,)](a, b, c, a.shape[0])
    return c


@functools.cache
def _square_dot_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _dot(A, B, C, M: tl.constexpr):
        r = tl.arange(0, M)
        a = tl.load(A + r[:, None] * M + r[None, :])
        b = tl.load(B + r[:, None] * M + r[None, :])
        tl.store(C + r[:, None] * M + r[None, :], tl.dot(a, b))

    return _dot
