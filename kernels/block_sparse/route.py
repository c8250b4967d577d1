"""Which kernel a block-sparse call runs: the Gluon kernel (gluon_launch.py) where a GPU run measured
it faster and it covers the call, the Triton kernel (launch.py) everywhere else.

Measured (H200, 2026-12-02 05:30 UTC, `tests/kernels/gpu_check_gluon.py --parts speed`; CUDA events
around eager calls, the same random 128x128 block mask plus the diagonal for every kernel, useful
TFLOP/s at densities 0.1 / 0.2 / 0.5 / 1.0; every variant matched the Triton kernel at density 0.2,
rel L2 <= 1e-3; benchmarks/results/gpu_check_gluon_s9_h200.json):
    wan480 (12 x 32760 x 128)  Triton kernel 381 / 449 / 482 / 485
                               Gluon, persistent, 3 stages, pipelined, ordered ping-pong 437 / 550 / 572 / 585
    cog720 (48 x 17776 x 64)   Triton kernel 326 / 343 / 408 / 409
                               every Gluon variant within ~0-5% of it, some slower: no clear gain
So the Gluon route is taken at head_dim 128 (1.15-1.22x) and not at 64 (ROUTE_HEAD_DIMS), with the
variant gluon_launch.default_config(128).

choose() is the rule; every "no" has its reason, in this order:
  the switch is off (VSOPT_GLUON=0 in the environment at import, or route.GLUON = False);
  Triton's interpreter; a device other than CUDA;
  quant other than "none", a soft cap, a dtype other than float16/bfloat16, a head dim outside
  ROUTE_HEAD_DIMS, table blocks other than 128 x 64/128 (what the Gluon kernel covers, or where it
  was not faster);
  a layout the persistent kernel's host TMA descriptors do not take as it is: q, k, v must each be a
  contiguous (B, H, N, D) tensor or a (B, N, H, D) view (a projection's output), k and v the same one,
  16-byte aligned (the launcher would copy any other layout: a cost nobody has measured);
  an AOTInductor compilation (the Gluon route is an opaque Python op, which a package could only call
  back into Python for; the package keeps the Triton kernel it compiles in);
  the GPU: compute capability (9, 0) and Triton 3.6 (the Gluon API the kernel is written for).

Where the ops use it (vsopt/core/ops.py): an eager call on real tensors launches the Gluon kernel
directly; a traced call (Inductor decomposing the triton_op) puts the opaque op
vsopt::block_sparse_attention_gluon into the graph instead of wrap_triton (Inductor's user-kernel path
re-emits a kernel's helpers as @triton.jit source and analyses it as TTIR: neither holds for Gluon), and that op
runs the launcher eagerly inside the compiled graph, CUDA graphs included.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os

import torch

from ..runtime import interpreting
from ..spec import QuantMode
from . import gluon_launch

#: The switch: False sends every call to the Triton kernel. VSOPT_GLUON=0 in the environment sets it at
#: import. A compiled graph keeps the route it was traced with (vsopt's Inductor cache key includes it).
GLUON = os.environ.get("VSOPT_GLUON", "1") != "0"
#: Head dims where the Gluon kernel was measured faster than the Triton kernel (module docstring).
ROUTE_HEAD_DIMS = (128,)
KERNELS = ("gluon", "triton")


@dataclasses.dataclass(frozen=True)
class Route:
    """kernel: "gluon" or "triton"; reason: why, in words; config: the Gluon variant (gluon only)."""
    kernel: str
    reason: str
    config: gluon_launch.GluonConfig | None = None


def _triton(reason: str) -> Route:
    return Route("triton", reason)


def _row_layout(x: torch.Tensor) -> str | None:
    """"bhnd" (contiguous) or "bnhd" (a (B, N, H, D) view), the layouts the persistent kernel's 2-D
    descriptors take without a copy (gluon_launch._flat), else None."""
    if x.stride(-1) != 1:
        return None
    if x.is_contiguous():
        return "bhnd"
    if x.transpose(1, 2).is_contiguous():
        return "bnhd"
    return None


def _aligned(x: torch.Tensor) -> bool:
    """16-byte aligned strides (TMA); the base pointer too where the tensor is real (a traced call's
    fake tensor has none: the compiled graph's call checks it again, see vsopt.core.ops)."""
    if any((s * x.element_size()) % 16 for s in x.stride()[:-1]):
        return False
    return type(x) is not torch.Tensor or x.data_ptr() % 16 == 0


def _aot_compiling() -> bool:
    """Inside aoti_compile / aoti_compile_and_package (Inductor sets the flag around the whole
    compilation, the op's decomposition included)."""
    try:
        from torch._inductor.virtualized import V
    except ImportError:
        return False
    return bool(V.aot_compilation)


@functools.lru_cache(maxsize=None)
def _hardware(index: int) -> str | None:
    """Why the GPU `index` cannot run the Gluon kernel, or None (read once per device)."""
    import triton

    if not torch.cuda.is_available():
        return "no CUDA device is visible to read its compute capability"
    cap = torch.cuda.get_device_capability(index)
    if cap != (9, 0):
        return f"compute capability {cap}: the Gluon kernel is written for Hopper (9, 0)"
    if not triton.__version__.startswith(gluon_launch.TRITON_VERSION):
        return f"Triton {triton.__version__}: the Gluon kernel is written for Triton {gluon_launch.TRITON_VERSION}"
    try:
        import triton.experimental.gluon  # noqa: F401
    except ImportError as e:
        return f"Triton's Gluon does not import ({e})"
    return None


def choose(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_m: int, block_n: int,
           quant: QuantMode | str = "none", softcap: float = 0.0) -> Route:
    """The kernel a call with these inputs takes, and why (module docstring: the rule). The inputs
    passed inputs.check_inputs; q, k, v may be real, fake or functional tensors."""
    mode = QuantMode(quant)
    D = q.shape[-1]
    if not GLUON:
        return _triton("the Gluon route is switched off (VSOPT_GLUON=0 / route.GLUON = False)")
    if interpreting():
        return _triton("Triton's interpreter (TRITON_INTERPRET=1) cannot run the Gluon kernel")
    if q.device.type != "cuda":
        return _triton(f"device {q.device.type}: the Gluon kernel needs a CUDA GPU")
    if mode is not QuantMode.NONE:
        return _triton(f"quant {mode.value!r}: the Gluon kernel runs quant 'none' only")
    if softcap > 0:
        return _triton("a soft cap: the Gluon kernel has none")
    if q.dtype not in (torch.float16, torch.bfloat16):
        return _triton(f"dtype {q.dtype}: the Gluon kernel takes float16/bfloat16")
    if D not in ROUTE_HEAD_DIMS:
        return _triton(f"head_dim {D}: the Gluon kernel was measured faster at head_dim "
                       f"{' / '.join(map(str, ROUTE_HEAD_DIMS))} only (at 64 it was not: cog720, H200 2026-12-02)")
    if block_m != 128 or block_n not in gluon_launch.BLOCK_NS:
        return _triton(f"table blocks {block_m} x {block_n}: the Gluon kernel takes 128 x 64 or 128 x 128")
    layouts = [_row_layout(x) for x in (q, k, v)]
    if None in layouts or layouts[1] != layouts[2] or not all(_aligned(x) for x in (q, k, v)):
        return _triton("q, k, v layouts " + "/".join(str(x) for x in layouts) + ": the Gluon route takes each as "
                       "a contiguous (B, H, N, D) tensor or a (B, N, H, D) view, k and v alike, 16-byte aligned")
    if _aot_compiling():
        return _triton("an AOTInductor package keeps the Triton kernel (the Gluon route is an opaque Python op)")
    problem = _hardware(q.device.index if q.device.index is not None else torch.cuda.current_device())
    if problem is not None:
        return _triton(problem)
    config = gluon_launch.default_config(D)
    return Route("gluon", f"head_dim {D}, {block_m} x {block_n} table, {str(q.dtype)[6:]}: {config}", config)


@contextlib.contextmanager
def switched(on: bool):
    """The switch (GLUON) set to `on` inside the block, restored after: to run or time the ops on one
    route against the other (eager calls; a graph keeps the route it was traced or captured with)."""
    global GLUON
    saved, GLUON = GLUON, on
    try:
        yield
    finally:
        GLUON = saved


def cache_tag() -> str:
    """What of the route a compiled graph depends on, for vsopt's Inductor cache key."""
    return f"gluon route {'on' if GLUON else 'off'}, head dims {ROUTE_HEAD_DIMS}, " \
           f"{[gluon_launch.DEFAULT_CONFIGS[d] for d in ROUTE_HEAD_DIMS]}"
