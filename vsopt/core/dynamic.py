"""Dynamic block masks: predicted online, per head, from pooled block scores.

For heads whose pattern depends on the input (SpargeAttn, DraftAttention, XAttention, AdaSpa),
the mask is chosen at run time from a cheap low-resolution estimate of the attention map:
q and k are mean-pooled per block, softmax(pooled_q pooled_k^T * scale + log(block size)) over key
blocks estimates each block's share of the attention mass, and each query block row keeps
  - TOP_K:           the ceil(value * KB) highest-scoring key blocks, or
  - CUMULATIVE_MASS: the fewest key blocks whose estimated mass reaches `value`,
always plus its diagonal block (self-attention). Because the pattern is stable across denoising
steps (AdaSpa), a mask can be computed at one step and reused for the next `reuse_steps` steps.
"""
from __future__ import annotations

import enum
import math
import threading
from dataclasses import dataclass
from typing import Any, Mapping

import torch


class DynamicMethod(str, enum.Enum):
    """How a dynamic head selects key blocks per query block row."""

    TOP_K = "top_k"  # value = fraction of the key blocks of a row, in (0, 1]
    CUMULATIVE_MASS = "cumulative_mass"  # value = share of the estimated row mass, in (0, 1]


@dataclass(frozen=True)
class DynamicSpec:
    """A dynamic head: selection method, its value (see DynamicMethod), and how many following
    denoising steps reuse a computed mask (0: recompute at every step)."""

    method: DynamicMethod = DynamicMethod.TOP_K
    value: float = 0.2
    reuse_steps: int = 0

    def __post_init__(self):
        try:
            object.__setattr__(self, "method", DynamicMethod(self.method))
        except ValueError:
            raise ValueError(f"DynamicSpec.method {self.method!r} is not one of "
                             f"{[m.value for m in DynamicMethod]}") from None
        if not isinstance(self.value, (int, float)) or not 0.0 < float(self.value) <= 1.0:
            raise ValueError(f"DynamicSpec.value must be in (0, 1], got {self.value!r}")
        object.__setattr__(self, "value", float(self.value))
        if not isinstance(self.reuse_steps, int) or self.reuse_steps < 0:
            raise ValueError(f"DynamicSpec.reuse_steps must be an int >= 0, got {self.reuse_steps!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method.value, "value": self.value, "reuse_steps": self.reuse_steps}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DynamicSpec":
        unknown = sorted(set(d) - {"method", "value", "reuse_steps"})
        if unknown:
            raise ValueError(f"dynamic: unknown field(s) {unknown}")
        return cls(DynamicMethod(d.get("method", "top_k")), d.get("value", 0.2), int(d.get("reuse_steps", 0)))


def pooled_block_scores(q: torch.Tensor, k: torch.Tensor, scale: float, block_m: int, block_n: int) -> torch.Tensor:
    """Estimated block attention mass from mean-pooled q and k.

    q: (B, H, Nq, D), k: (B, Hkv, Nk, D) with H a multiple of Hkv. Returns float32
    (B, H, QB, KB); each row sums to 1. A key block's logit gets + log(its token count), so a
    ragged last block is not overweighted (the mass of n equal keys is n * exp(s)). On CUDA the
    pooling runs the Triton kernel of kernels/block_mask; elsewhere its PyTorch reference."""
    H, Hkv = q.shape[1], k.shape[1]
    if H % Hkv:
        raise ValueError(f"query heads {H} not a multiple of key heads {Hkv}")
    if q.is_cuda:
        from ..kernels.block_mask import launch as impl
    else:
        from ..kernels.block_mask import reference as impl
    return impl.block_scores(q, k, scale, block_m, block_n)


def select_blocks(scores: torch.Tensor, spec: DynamicSpec, diagonal: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask (..., QB, KB) choosing key blocks per row of `scores` (..., QB, KB) by `spec`,
    OR-ed with `diagonal` (bool (QB, KB), e.g. patterns.diagonal_blocks) when given."""
    kb = scores.shape[-1]
    if spec.method is DynamicMethod.TOP_K:
        k = max(1, math.ceil(spec.value * kb))
        idx = scores.topk(k, dim=-1).indices
        mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)
    else:
        vals, idx = scores.sort(dim=-1, descending=True)
        before = vals.cumsum(-1) - vals  # mass of the blocks ranked before each one
        take = before < spec.value * scores.sum(-1, keepdim=True) - 1e-7
        mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, take)
    if diagonal is not None:
        mask = mask | diagonal.to(mask.device)
    return mask


class MaskReuseCache:
    """Keeps each dynamic site's last mask so that it can be reused for `reuse_steps` steps.

    The current denoising step is the one set with set_step() (a sampler calls it once per step);
    if none was set, each get() call for a key counts as one step. A mask computed at step s is
    reused while s < step <= s + reuse_steps; a step below s (a new generation) or a change of
    shape recomputes it. Thread-safe; reset() forgets everything."""

    def __init__(self):
        self._lock = threading.Lock()
        self._step: int | None = None
        self._entries: dict[str, tuple[int, torch.Tensor]] = {}
        self._calls: dict[str, int] = {}

    def set_step(self, step: int | None) -> None:
        with self._lock:
            self._step = step

    @property
    def step(self) -> int | None:
        with self._lock:
            return self._step

    def reset(self) -> None:
        with self._lock:
            self._step, self._entries, self._calls = None, {}, {}

    def get(self, key: str, reuse_steps: int, shape: tuple[int, ...], compute) -> torch.Tensor:
        """The cached mask for `key` if still valid at the current step, else compute() (cached)."""
        with self._lock:
            if self._step is None:
                step = self._calls.get(key, -1) + 1
                self._calls[key] = step
            else:
                step = self._step
            entry = self._entries.get(key)
        if entry is not None:
            at, mask = entry
            if at <= step <= at + reuse_steps and tuple(mask.shape) == tuple(shape):
                return mask
        mask = compute()
        with self._lock:
            self._entries[key] = (step, mask)
        return mask


MASK_CACHE = MaskReuseCache()  # the process-wide cache used by the vsopt::dynamic_block_mask op


def set_denoising_step(step: int | None) -> None:
    """Tell vsopt the current denoising step: it selects a plan's step-range head plans at run
    time (backend) and lets dynamic masks be reused across steps. None: unknown (default head
    plans; dynamic masks count calls). vsopt.models.sampler.sample sets it at every step."""
    MASK_CACHE.set_step(step)


def current_denoising_step() -> int | None:
    """The step last given to set_denoising_step (None if unknown)."""
    return MASK_CACHE.step


@torch.library.custom_op("vsopt::dynamic_block_mask", mutates_args=())
def dynamic_block_mask(q: torch.Tensor, k: torch.Tensor, scale: float, block_m: int, block_n: int, method: str,
                       value: float, reuse_steps: int, cache_key: str) -> torch.Tensor:
    """Bool (B, H, QB, KB) mask predicted from pooled block scores of q (B, H, Nq, D) and
    k (B, Hkv, Nk, D), see module doc; the diagonal blocks are kept when Nq == Nk.

    With reuse_steps > 0 the mask is looked up in MASK_CACHE under cache_key and reused across
    steps: the op is then deliberately stateful (it is opaque to the compiler, so the state lives
    at run time, one entry per site)."""
    def compute() -> torch.Tensor:
        return predicted_block_mask(q, k, scale, block_m, block_n, method, value)

    if reuse_steps == 0:
        return compute()
    shape = (q.shape[0], q.shape[1], math.ceil(q.shape[2] / block_m), math.ceil(k.shape[2] / block_n))
    return MASK_CACHE.get(cache_key, reuse_steps, shape, compute).clone()


def predicted_block_mask(q: torch.Tensor, k: torch.Tensor, scale: float, block_m: int, block_n: int, method: str,
                         value: float) -> torch.Tensor:
    """The mask vsopt::dynamic_block_mask computes when nothing is reused: pooled block scores
    (vsopt::block_scores, a triton_op), then select_blocks with the diagonal kept for
    self-attention. Plain torch calls, so that where passes/inline_dynamic_masks writes it into a
    graph in the op's place, Inductor compiles it (the pooling kernel and fused ATen kernels) and
    no Python op runs per call."""
    from . import ops  # noqa: F401  (registers torch.ops.vsopt.block_scores)
    from .patterns import diagonal_blocks

    scores = torch.ops.vsopt.block_scores(q, k, scale, block_m, block_n)
    diag = (diagonal_blocks(q.shape[2], k.shape[2], block_m, block_n, device=q.device)
            if q.shape[2] == k.shape[2] else None)  # on q's device: no host copy (CUDA graphs)
    return select_blocks(scores, DynamicSpec(DynamicMethod(method), value), diag)


@dynamic_block_mask.register_fake
def _(q, k, scale, block_m, block_n, method, value, reuse_steps, cache_key):
    qb, kb = (q.shape[2] + block_m - 1) // block_m, (k.shape[2] + block_n - 1) // block_n
    return q.new_empty((q.shape[0], q.shape[1], qb, kb), dtype=torch.bool)
