"""vsopt's custom ops (torch.ops.vsopt.*), registered through torch.library.

Every op here is functional (returns new tensors, mutates nothing) and has a fake (meta)
implementation so that Dynamo, Inductor and torch.export can trace it. Layout is (B, H, N, D).

- vsopt::attention        exact dense attention; what every detected site is first rewritten into.
                          Differentiable (backward: vsopt/core/autograd.py).
- vsopt::permute_tokens   per-head token reorder (PARO): y[:, h, i] = x[:, h, perm[h, i]].
- vsopt::unpermute_tokens its inverse:              y[:, h, perm[h, i]] = x[:, h, i].
The block-sparse / quantized ops that run the Triton kernels are registered further down.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .autograd import attention_backward, attention_setup_context
from .errors import KernelInputError

# ----------------------------------------------------------------------------- dense attention


def _check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise KernelInputError(f"vsopt.attention expects 4-D (B, H, N, D) q/k/v, got {tuple(q.shape)}, "
                               f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise KernelInputError(f"vsopt.attention: incompatible q {tuple(q.shape)}, k {tuple(k.shape)}, "
                               f"v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise KernelInputError(f"vsopt.attention: query heads {q.shape[1]} not a multiple of kv heads {k.shape[1]}")


@torch.library.custom_op("vsopt::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
              scale: float = 1.0, is_causal: bool = False, softcap: float = 0.0) -> torch.Tensor:
    """Exact dense attention, softmax(cap(q k^T * scale) + mask) v, in (B, H, N, D) layout.

    q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D); v: (B, Hkv, Nk, Dv) with Hq a multiple of Hkv
    (grouped-query attention); attn_mask broadcastable to (B, Hq, Nq, Nk), boolean (True = keep)
    or additive. softcap > 0: logit soft-capping, cap(s) = softcap * tanh(s / softcap) (0: none).
    Returns (B, Hq, Nq, Dv) in q's dtype. Runs torch SDPA, the fastest exact path on each device
    (cuDNN / flash on Hopper), so a dense plan costs nothing over the original model; a capped
    site runs the explicit math (SDPA has no cap).
    """
    _check_attention_inputs(q, k, v)
    _check_softcap(softcap)
    if k.shape[1] != q.shape[1]:
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    if softcap > 0:
        out = softcapped_attention(q, k, v, attn_mask, scale, is_causal, softcap)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
    # A fixed layout (the fake's); SDPA's own depends on the backend. Copy only when they differ:
    # flash and cuDNN already return q's layout, so a (B, N, H, D) view stays one without a copy.
    if out.stride() == _attention_out_like(q, v, device="meta").stride():
        return out
    return _attention_out_like(q, v).copy_(out)


def _attention_out_like(q: torch.Tensor, v: torch.Tensor, device=None) -> torch.Tensor:
    """An empty output: q's memory layout when the head dims agree, else contiguous."""
    if v.shape[-1] == q.shape[-1]:
        return torch.empty_like(q, device=device)
    return q.new_empty((*q.shape[:-1], v.shape[-1]), device=device)


def _check_softcap(softcap) -> None:
    if not isinstance(softcap, (int, float)) or not math.isfinite(softcap) or softcap < 0:
        raise KernelInputError(f"vsopt.attention: softcap must be 0 (no cap) or a positive finite number, got {softcap!r}")


def softcapped_attention(q, k, v, attn_mask, scale: float, is_causal: bool, softcap: float) -> torch.Tensor:
    """softmax(softcap * tanh(q k^T * scale / softcap) + mask) v with q, k, v of equal heads; the
    scores in q's dtype as a model computes them, the softmax in at least float32."""
    s = (q @ k.transpose(-2, -1)) * scale
    s = softcap * torch.tanh(s / softcap)
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
    if is_causal:
        keep = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    work = torch.float32 if s.element_size() < 4 else s.dtype   # 16-bit scores: the softmax in float32
    return torch.softmax(s.to(work), dim=-1).to(v.dtype) @ v


@attention.register_fake
def _(q, k, v, attn_mask=None, scale=1.0, is_causal=False, softcap=0.0):
    _check_attention_inputs(q, k, v)
    _check_softcap(softcap)
    return _attention_out_like(q, v)


# The op is differentiable from the moment it exists (a rewritten graph must stay trainable).
attention.register_autograd(attention_backward, setup_context=attention_setup_context)


ATTENTION_ARGS = ("q", "k", "v", "attn_mask", "scale", "is_causal", "softcap")
_ATTENTION_DEFAULTS = {"attn_mask": None, "scale": 1.0, "is_causal": False, "softcap": 0.0}


def attention_arguments(args: tuple, kwargs: dict) -> dict:
    """The arguments of one vsopt.attention call by name, defaults filled in: the one binding of
    the op's signature, for graph nodes (node.args, node.kwargs) and for run-time values alike."""
    bound = {**_ATTENTION_DEFAULTS, **dict(zip(ATTENTION_ARGS, args)), **kwargs}
    return {name: bound[name] for name in ATTENTION_ARGS}


# ----------------------------------------------------------------------------- token permutation


def _check_perm(x: torch.Tensor, perm: torch.Tensor, op: str) -> None:
    # (H or 1, N): a static order per head; (B, H, N): one per sample and head (clustering orders)
    per_head = perm.dim() == 2 and perm.shape[0] in (1, x.shape[1])
    per_sample = perm.dim() == 3 and tuple(perm.shape[:2]) == tuple(x.shape[:2])
    if x.dim() != 4 or not (per_head or per_sample) or perm.shape[-1] != x.shape[2]:
        raise KernelInputError(f"vsopt.{op}: x must be (B, H, N, D) and perm (H or 1, N) or (B, H, N); got x "
                               f"{tuple(x.shape)}, perm {tuple(perm.shape)}")
    if perm.dtype != torch.int64:
        raise KernelInputError(f"vsopt.{op}: perm must be int64, got {perm.dtype}")


def _gather_index(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    B, H, N, D = x.shape
    perm = perm.to(x.device)
    return (perm[None] if perm.dim() == 2 else perm)[..., None].expand(B, H, N, D)


@torch.library.custom_op("vsopt::permute_tokens", mutates_args=())
def permute_tokens(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Reorder tokens per head: y[:, h, i] = x[:, h, perm[h, i]]. x: (B, H, N, D); perm: (H or 1, N)
    int64, each row a permutation of range(N), or (B, H, N): y[b, h, i] = x[b, h, perm[b, h, i]]."""
    _check_perm(x, perm, "permute_tokens")
    return torch.gather(x, 2, _gather_index(x, perm)).contiguous()


@permute_tokens.register_fake
def _(x, perm):
    _check_perm(x, perm, "permute_tokens")
    return x.new_empty(x.shape)  # contiguous, like the real output (x may be a strided view)


@torch.library.custom_op("vsopt::unpermute_tokens", mutates_args=())
def unpermute_tokens(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Undo permute_tokens with the same perm: y[:, h, perm[h, i]] = x[:, h, i]."""
    _check_perm(x, perm, "unpermute_tokens")
    return x.new_empty(x.shape).scatter_(2, _gather_index(x, perm), x)


@unpermute_tokens.register_fake
def _(x, perm):
    _check_perm(x, perm, "unpermute_tokens")
    return x.new_empty(x.shape)


# ---- block-sparse and quantized ops (kernels)
# Each op's body branches on the device: CPU tensors run kernels/<family>/reference.py (so that
# torch.compile / torch.export on CPU trace plain torch ops), CUDA tensors the Triton launcher
# (through torch.library.wrap_triton, so Inductor and AOTInductor see the kernels). The block-sparse
# attention ops take the Gluon kernel instead where kernels/block_sparse/route.py says so (Hopper,
# bf16/fp16, head_dim 128, ...): eager calls launch it directly, traced calls go through the opaque
# op vsopt::block_sparse_attention_gluon below (Inductor cannot wrap a Gluon kernel).

import collections  # noqa: E402
import contextlib  # noqa: E402
import logging  # noqa: E402

from vsopt.kernels import errors as _kernel_errors  # noqa: E402
from vsopt.kernels.block_mask import reference as _mask_ref  # noqa: E402
from vsopt.kernels.block_sparse import inputs as _bsa_inputs  # noqa: E402
from vsopt.kernels.block_sparse import reference as _bsa_ref  # noqa: E402

# The launchers (and the @triton.jit code under them) are imported on first CUDA use only: Triton
# decides at decoration time whether a kernel is interpreted, so importing vsopt.core must not
# decorate them before a test has set TRITON_INTERPRET.


def _bsa_launch():
    from vsopt.kernels.block_sparse import launch
    return launch


def _mask_launch():
    from vsopt.kernels.block_mask import launch
    return launch


def _bsa_route():
    from vsopt.kernels.block_sparse import route
    return route


def _gluon_launch():
    from vsopt.kernels.block_sparse import gluon_launch
    return gluon_launch


_log = logging.getLogger("vsopt.kernels")
#: Why a CUDA call ran the reference instead of the Triton kernel (each reason is logged once).
KERNEL_FALLBACKS: set[str] = set()
#: Every route a block-sparse call took, (kernel, reason): "gluon" / "triton" (kernels/block_sparse/route.py)
#: or "reference" (KERNEL_FALLBACKS); each is logged once, at INFO ("reference": WARNING). Traced calls
#: record the route they were traced with.
KERNEL_ROUTES: set[tuple[str, str]] = set()
#: Kernel launches the block-sparse ops made themselves, by kernel ("gluon" / "triton"): eager calls and
#: the Gluon route's opaque op inside compiled graphs (a compiled graph launches the Triton kernel
#: itself, uncounted).
KERNEL_LAUNCHES: collections.Counter = collections.Counter()


@contextlib.contextmanager
def _as_vsopt_errors():
    """The kernels sit below the core and raise their own KernelInputError; re-raise it as vsopt's."""
    try:
        yield
    except _kernel_errors.KernelInputError as e:
        raise KernelInputError(str(e)) from e


def _bsa_fallback_reason(q: torch.Tensor) -> str | None:
    if q.device.type != "cuda":
        return f"device {q.device.type}"
    if q.shape[-1] not in _bsa_inputs.GPU_HEAD_DIMS:
        return f"head_dim {q.shape[-1]} not in {_bsa_inputs.GPU_HEAD_DIMS}"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {q.dtype} (the kernel takes float16/bfloat16)"
    return None


def _note_route(kernel: str, reason: str) -> None:
    if (kernel, reason) not in KERNEL_ROUTES:
        KERNEL_ROUTES.add((kernel, reason))
        _log.info("vsopt.block_sparse_attention runs the %s kernel: %s", kernel, reason)


def block_sparse_route(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_m: int, block_n: int,
                       quant: str = "none", softcap: float = 0.0) -> tuple[str, str]:
    """The kernel block_sparse_attention(_lse) takes for these inputs, and why: ("gluon" | "triton" |
    "reference", reason). q, k, v may be meta or fake tensors on the device in question (the alignment
    of a real base pointer is then assumed)."""
    reason = _bsa_fallback_reason(q)
    if reason is not None:
        return "reference", reason
    with _as_vsopt_errors():
        route = _bsa_route().choose(q, k, v, block_m, block_n, quant, softcap)
    return route.kernel, route.reason


def _run_kernel(q, k, v, kv_indices, kv_counts, scale, block_m, block_n, mode, with_lse, softcap, row_order,
                route):
    """The launch of a route's kernel on inputs check_inputs accepted (eager, or traced for the Triton kernel)."""
    if route.kernel == "gluon":
        KERNEL_LAUNCHES["gluon"] += 1
        return _gluon_launch().launch_validated(q, k, v, kv_indices, kv_counts, scale, block_m, block_n, with_lse,
                                                route.config, row_order=row_order)
    if _launching_eagerly(q, k, v, kv_indices, kv_counts):
        KERNEL_LAUNCHES["triton"] += 1
    return _bsa_launch().run_checked(q, k, v, kv_indices, kv_counts, scale, block_m, block_n, mode, with_lse,
                                     softcap=softcap, row_order=row_order)


def _launching_eagerly(*tensors) -> bool:
    from vsopt.kernels.runtime import plain_eager
    return plain_eager(*tensors)


def _run_block_sparse(q, k, v, kv_indices, kv_counts, scale, block_m, block_n, quant, with_lse, softcap,
                      row_order=None):
    with _as_vsopt_errors():
        # Validated once here (the quant string parsed to its QuantMode); the launcher's
        # run_checked then checks only what the kernel alone needs.
        mode = _bsa_inputs.check_inputs(q, k, v, kv_indices, kv_counts, block_m, block_n, quant, softcap)
        reason = _bsa_fallback_reason(q)
        if reason is None:
            route = _bsa_route().choose(q, k, v, block_m, block_n, mode, softcap)
            _note_route(route.kernel, route.reason)
            # (the Triton launcher checks the scale itself, in run_checked)
            _kernel_errors.check(route.kernel != "gluon" or scale > 0,
                                 f"block_sparse_attention: scale must be positive, got {scale}")
            if route.kernel == "gluon" and not _launching_eagerly(q, k, v, kv_indices, kv_counts):
                # Traced (Inductor decomposing this op): the opaque op, which launches eagerly at run
                # time. The work order is computed here, in the graph (or is the static constant).
                from vsopt.kernels.block_sparse.schedule import work_order

                order = row_order if row_order is not None else work_order(kv_counts, q.shape[0])
                out, lse = torch.ops.vsopt.block_sparse_attention_gluon(q, k, v, kv_indices, kv_counts, scale,
                                                                        block_m, block_n, order, with_lse)
                return out, (lse if with_lse else None)
            return _run_kernel(q, k, v, kv_indices, kv_counts, scale, block_m, block_n, mode, with_lse, softcap,
                               row_order, route)
        if q.device.type == "cuda" and reason not in KERNEL_FALLBACKS:
            KERNEL_FALLBACKS.add(reason)
            KERNEL_ROUTES.add(("reference", reason))
            _log.warning("vsopt.block_sparse_attention runs the PyTorch reference: %s", reason)
        out, lse = _bsa_ref.block_sparse_attention(q, k, v, kv_indices, kv_counts, scale, block_m, block_n, mode,
                                                   softcap)
        return torch.empty_like(q).copy_(out), lse   # q's layout, as the kernel's output (see _bsa_fake)


def _bsa_fake(q, k, v, kv_indices, kv_counts, block_m, block_n, quant, softcap):
    with _as_vsopt_errors():
        _bsa_inputs.check_inputs(q, k, v, kv_indices, kv_counts, block_m, block_n, quant, softcap)
    # q's memory layout (the kernel writes through strides): a (B, N, H, D) view stays one, so the
    # model's transpose back to (B, N, H * D) needs no copy.
    return torch.empty_like(q)


@torch.library.triton_op("vsopt::block_sparse_attention", mutates_args=())
def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_indices: torch.Tensor,
                           kv_counts: torch.Tensor, scale: float, block_m: int, block_n: int,
                           quant: str = "none", softcap: float = 0.0,
                           row_order: torch.Tensor | None = None) -> torch.Tensor:
    """Block-sparse attention: query block qb of head h attends to the key blocks
    kv_indices[b, h, qb, :kv_counts[b, h, qb]] only (b is 0 when the table has Bt = 1).
    softcap > 0 caps the scaled scores, s -> softcap * tanh(s / softcap), before the softmax.

    q (B, Hq, Nq, D); k, v (B, Hkv, Nk, D), Hq % Hkv == 0; kv_indices int32 (Bt, Hq, ceil(Nq/block_m),
    MAXK) ascending; kv_counts int32 (Bt, Hq, ceil(Nq/block_m)); quant in none / int8 / fp8 /
    int8_fp8 / int8_int8 (see docs/KERNELS.md). Returns (B, Hq, Nq, D) in q's dtype; rows that visit no block are 0.
    row_order: the kernel's work order of this table and batch (row_order() below), computed ahead
    (vsopt.inductor.prepare makes it a constant for a static table); None: computed per call. It
    orders the rows only: the output does not depend on it (the reference ignores it).
    On CUDA the Triton kernel runs, or the Gluon kernel where kernels/block_sparse/route.py takes it
    (block_sparse_route() says which, and why).
    """
    return _run_block_sparse(q, k, v, kv_indices, kv_counts, scale, block_m, block_n, quant, False, softcap,
                             row_order)[0]


@block_sparse_attention.register_fake
def _(q, k, v, kv_indices, kv_counts, scale, block_m, block_n, quant="none", softcap=0.0, row_order=None):
    return _bsa_fake(q, k, v, kv_indices, kv_counts, block_m, block_n, quant, softcap)


@torch.library.triton_op("vsopt::block_sparse_attention_lse", mutates_args=())
def block_sparse_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_indices: torch.Tensor,
                               kv_counts: torch.Tensor, scale: float, block_m: int, block_n: int,
                               quant: str = "none", softcap: float = 0.0,
                               row_order: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """block_sparse_attention that also returns the natural-log log-sum-exp of each row's scaled
    (and capped) scores, float32 (B, Hq, Nq) (-inf for rows that visit no block): to merge partial
    attentions."""
    out, lse = _run_block_sparse(q, k, v, kv_indices, kv_counts, scale, block_m, block_n, quant, True, softcap,
                                 row_order)
    return out, lse


@block_sparse_attention_lse.register_fake
def _(q, k, v, kv_indices, kv_counts, scale, block_m, block_n, quant="none", softcap=0.0, row_order=None):
    out = _bsa_fake(q, k, v, kv_indices, kv_counts, block_m, block_n, quant, softcap)
    return out, q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("vsopt::block_sparse_attention_gluon", mutates_args=())
def block_sparse_attention_gluon(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_indices: torch.Tensor,
                                 kv_counts: torch.Tensor, scale: float, block_m: int, block_n: int,
                                 row_order: torch.Tensor, with_lse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gluon route of block_sparse_attention(_lse) inside a compiled graph, an opaque op Inductor
    calls with the real tensors: what the traced op body puts in the graph where route.py chose the
    Gluon kernel (the inputs were validated when it was traced). Returns (out, lse), lse float32
    (B, Hq, Nq) with with_lse, else an empty (0,) tensor. At run time the route is chosen again on the
    real tensors (a base pointer's alignment, the switch): where it says "triton" now, the Triton
    kernel runs, and the route is recorded (KERNEL_ROUTES) and logged once."""
    with _as_vsopt_errors():
        mode = _bsa_inputs.check_inputs(q, k, v, kv_indices, kv_counts, block_m, block_n, "none", 0.0)
        route = _bsa_route().choose(q, k, v, block_m, block_n, mode)
        _note_route(route.kernel, route.reason)
        out, lse = _run_kernel(q, k, v, kv_indices, kv_counts, scale, block_m, block_n, mode, with_lse, 0.0,
                               row_order, route)
    return out, (lse if with_lse else _no_lse(q))


def _no_lse(q: torch.Tensor) -> torch.Tensor:
    return q.new_empty((0,), dtype=torch.float32)


@block_sparse_attention_gluon.register_fake
def _(q, k, v, kv_indices, kv_counts, scale, block_m, block_n, row_order, with_lse):
    out = _bsa_fake(q, k, v, kv_indices, kv_counts, block_m, block_n, "none", 0.0)
    return out, (q.new_empty(q.shape[:3], dtype=torch.float32) if with_lse else _no_lse(q))


def row_order(kv_counts: torch.Tensor, batch: int) -> torch.Tensor:
    """int32 (batch * H * QB,): the order in which the block-sparse kernel runs the rows of a table
    with these counts (kernels/block_sparse/schedule.work_order, the one definition), for the
    row_order argument. Imports no kernel."""
    from vsopt.kernels.block_sparse.schedule import work_order

    return work_order(kv_counts, batch)


@torch.library.triton_op("vsopt::mask_to_table", mutates_args=())
def mask_to_table(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool block mask (Bt, H, QB, KB) -> (kv_indices int32 (Bt, H, QB, KB), kv_counts int32 (Bt, H, QB)):
    the True columns of each row, ascending, then zeros."""
    with _as_vsopt_errors():
        if mask.device.type == "cuda":
            return _mask_launch().mask_to_table(mask)
        if mask.dim() != 4 or mask.dtype != torch.bool:
            raise KernelInputError(f"mask_to_table: mask must be bool (Bt, H, QB, KB), got {mask.dtype} "
                                   f"{tuple(mask.shape)}")
        return _mask_ref.mask_to_table(mask)


@mask_to_table.register_fake
def _(mask):
    if mask.dim() != 4 or mask.dtype != torch.bool:
        raise KernelInputError(f"mask_to_table: mask must be bool (Bt, H, QB, KB), got {mask.dtype} {tuple(mask.shape)}")
    return (mask.new_empty(mask.shape, dtype=torch.int32), mask.new_empty(mask.shape[:-1], dtype=torch.int32))


def _check_scores_inputs(q, k, block_m, block_n):
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[1] % k.shape[1]:
        raise KernelInputError(f"block_scores: q (B, Hq, N, D) and k (B, Hkv, N, D) with Hq % Hkv == 0 expected, "
                               f"got {tuple(q.shape)}, {tuple(k.shape)}")
    if block_m < 1 or block_n < 1:
        raise KernelInputError(f"block_scores: block sizes must be positive, got {block_m}, {block_n}")


@torch.library.triton_op("vsopt::block_scores", mutates_args=())
def block_scores(q: torch.Tensor, k: torch.Tensor, scale: float, block_m: int, block_n: int) -> torch.Tensor:
    """Pooled block-score estimate, float32 (B, Hq, QB, KB): softmax over key blocks of
    mean-pooled q blocks . mean-pooled k blocks * scale. Feeds topk_block_mask / mass_block_mask."""
    _check_scores_inputs(q, k, block_m, block_n)
    with _as_vsopt_errors():
        if q.device.type == "cuda":
            return _mask_launch().block_scores(q, k, scale, block_m, block_n)
        return _mask_ref.block_scores(q, k, scale, block_m, block_n)


@block_scores.register_fake
def _(q, k, scale, block_m, block_n):
    _check_scores_inputs(q, k, block_m, block_n)
    qb, kb = -(-q.shape[2] // block_m), -(-k.shape[2] // block_n)
    return q.new_empty((q.shape[0], q.shape[1], qb, kb), dtype=torch.float32)


@torch.library.custom_op("vsopt::topk_block_mask", mutates_args=())
def topk_block_mask(scores: torch.Tensor, k: int, block_m: int, block_n: int) -> torch.Tensor:
    """Dynamic mask, bool (B, H, QB, KB): the k highest-scoring key blocks of each row plus the
    diagonal block (key block of the row's first token), so a row has k or k + 1 blocks."""
    if scores.dim() != 4 or k < 1:
        raise KernelInputError(f"topk_block_mask: scores (B, H, QB, KB) and k >= 1 expected, got "
                               f"{tuple(scores.shape)}, k={k}")
    return _mask_ref.topk_block_mask(scores, k, block_m, block_n)   # a topk and a scatter: torch on any device


@topk_block_mask.register_fake
def _(scores, k, block_m, block_n):
    return torch.empty_like(scores, dtype=torch.bool)


@torch.library.custom_op("vsopt::mass_block_mask", mutates_args=())
def mass_block_mask(scores: torch.Tensor, mass: float, block_m: int, block_n: int) -> torch.Tensor:
    """Dynamic mask, bool (B, H, QB, KB): per row the fewest highest-scoring key blocks whose
    scores sum to at least `mass` of the row's total, plus the diagonal block."""
    if scores.dim() != 4 or not 0.0 < mass <= 1.0:
        raise KernelInputError(f"mass_block_mask: scores (B, H, QB, KB) and 0 < mass <= 1 expected, got "
                               f"{tuple(scores.shape)}, mass={mass}")
    return _mask_ref.mass_block_mask(scores, mass, block_m, block_n)   # sort, cumsum, scatter: torch


@mass_block_mask.register_fake
def _(scores, mass, block_m, block_n):
    return torch.empty_like(scores, dtype=torch.bool)
