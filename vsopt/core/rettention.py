"""Softmax-mass correction (Re-ttention): a sparse head's output, corrected with statistics of the
dropped key blocks measured at an earlier denoising step.

Block-sparse attention normalizes each row over its kept keys only, so every kept key gets the
mass the dropped ones had, and the dropped keys' values are missing from the output. Re-ttention
(Chen et al., 2025, "Re-ttention: Ultra Sparse Visual Generation via Attention Statistical
Reshape") observes that these statistics change slowly across denoising steps, and corrects a
sparse step with those of an earlier step: the ratio of the kept keys' softmax denominator to the
full one (rho) rescales the sparse output, and a cached residual restores the dropped part. Here,
per query row t of a head whose kept key set is K:

  measuring step s (all keys, or the pooled remainder: exact where it runs):
    rho_t   = Z_K(t) / Z_all(t) = exp(lse_K - lse_all)                    kept share of the mass
    r_t     = sum_{u not in K} p_tu v_u = exp(lse_D - lse_all) o_D        the dropped part's output
    out_t   = rho_t o_K + r_t                                             = exact attention
  correcting step t' > s (the kept blocks only, through the kernel):
    out_t'  = rho_t(s) o_K(t') + r_t(s)

so the dropped keys keep the mass and the (mass-weighted mean) value they had at step s. With the
statistics of the same step the corrected output IS the full attention (of the measuring kind:
exact with the dropped blocks through the kernel, PSA's output with the pooled remainder); the
error at a later step is that of the statistics' staleness only, where plain sparse attention
loses the whole dropped mass.

HeadPlan.renorm = Renorm(every=r): the head measures at the first step of its segment of the plan
(one lowered graph per segment, vsopt.core.steps) and every r steps after it, and corrects in
between. Plan.at_step resolves each step's phase (renorm_phase), so a measuring and a correcting
step run different graphs: nothing is decided on the host inside a graph (CUDA graphs replay them
as they are). The statistics (rho float32 (B, H, N), r (B, H, N, Dv) in the site's dtype, and a
dynamic head's kept mask, which correcting steps reuse) live in per-site device buffers of
RENORM_STATE, shared by the graphs of one site (constant buffers of each graph, the same
tensors): a measuring graph writes its heads' slots (index_copy_), a correcting graph reads them.
They start as NaN: a correcting step that no measuring step preceded gives NaN, not a silently
uncorrected output.

Residual sharing (Renorm(kind="residual"), DiTFastAttn) is the second correction on the same
plumbing (phases, step variants, state buffers): its measuring step caches the whole error of the
head's sparse output, R = O - S, instead of rho and r, and its correcting steps output S + R
(vsopt.core.residual has the math and the idea).

Written once against lse.Emitter: semantics runs it eagerly (the meaning of a plan), passes/
lower_plan emits the same ops into the graph.
"""
from __future__ import annotations

import enum
import math
import threading
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from vsopt.core.lse import merge_partials

aten = torch.ops.aten


class Phase(str, enum.Enum):
    """What a renormalized head does at one step."""

    AUTO = "auto"  # in a plan file: measure at the segment's first step and every `every` steps, else correct
    MEASURE = "measure"  # the kept blocks and the dropped part (exact, or pooled), statistics recorded
    CORRECT = "correct"  # the kept blocks, corrected with the recorded statistics


class Correction(str, enum.Enum):
    """What a measuring step records and a correcting step applies."""

    MASS = "mass"  # Re-ttention: the kept share of the mass rho and the dropped part r; out = rho o_K + r
    RESIDUAL = "residual"  # DiTFastAttn's residual sharing: R = exact - sparse; out = sparse + R (core.residual)


@dataclass(frozen=True)
class Renorm:
    """A sparse head's correction across denoising steps: measured at the first step of its
    segment and every `every` steps after it (every >= 2: 1 would measure, at dense cost, at
    every step), the steps between corrected with it. kind: the softmax-mass correction
    (Re-ttention, the default) or residual sharing (DiTFastAttn). phase: resolved per step by
    Plan.at_step (AUTO in files)."""

    every: int = 2
    phase: Phase = Phase.AUTO
    kind: Correction = Correction.MASS

    def __post_init__(self):
        if not isinstance(self.every, int) or isinstance(self.every, bool) or self.every < 2:
            raise ValueError(f"Renorm.every must be an integer >= 2, got {self.every!r}")
        for name, enum_type in (("phase", Phase), ("kind", Correction)):
            try:
                object.__setattr__(self, name, enum_type(getattr(self, name)))
            except ValueError:
                raise ValueError(f"Renorm.{name} {getattr(self, name)!r} is not one of "
                                 f"{[p.value for p in enum_type]}") from None

    @property
    def residual(self) -> bool:
        return self.kind is Correction.RESIDUAL

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"every": self.every}
        if self.phase is not Phase.AUTO:
            d["phase"] = self.phase.value
        if self.kind is not Correction.MASS:  # older plans have none: the mass correction
            d["kind"] = self.kind.value
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Renorm":
        if not isinstance(d, Mapping):
            raise ValueError(f"renorm must be an object like {{\"every\": 4}}, got {d!r}")
        unknown = sorted(set(d) - {"every", "phase", "kind"})
        if unknown:
            raise ValueError(f"renorm: unknown field(s) {unknown}")
        return cls(d.get("every", 2), d.get("phase", "auto"), d.get("kind", "mass"))

    def effective_phase(self) -> Phase:
        """The phase a graph of this head runs: AUTO (the step unknown) measures, the safe choice
        (exact output; statistics of no other step trusted)."""
        return Phase.MEASURE if self.phase is Phase.AUTO else self.phase


def renorm_phase(spec: Renorm, step: int | None, segment_start: int | None) -> Phase:
    """The phase of a renormalized head at denoising `step` of the segment starting at
    `segment_start`: MEASURE at the segment's first step and every spec.every steps after it,
    CORRECT between; an unknown step (None) measures."""
    if step is None or segment_start is None:
        return Phase.MEASURE
    if step < segment_start:
        raise ValueError(f"step {step} is before its segment's first step {segment_start}")
    return Phase.MEASURE if (step - segment_start) % spec.every == 0 else Phase.CORRECT


def measured_step(spec: Renorm, step: int, segment_start: int) -> int:
    """The step whose statistics a correcting head uses at `step`: the last measuring step."""
    if step < segment_start:
        raise ValueError(f"step {step} is before its segment's first step {segment_start}")
    return segment_start + (step - segment_start) // spec.every * spec.every


# ----------------------------------------------------------------------------- the math


def measure(em, kept: tuple[Any, Any], dropped: tuple[Any, Any]) -> tuple[Any, Any, Any]:
    """A measuring step: the kept and dropped partials merged (the output), and the statistics
    rho (B, H, Nq) = exp(lse_K - lse_all) and r (B, H, Nq, D) = exp(lse_D - lse_all) o_D.
    Rows empty in both parts give out 0, rho 0, r 0."""
    out, lse = merge_partials(em, [kept, dropped])
    finite = em.op(aten.clamp_min.default, lse, -1e30)   # an all-empty row: weights exp(-inf) = 0
    rho = em.op(aten.exp.default, em.op(aten.sub.Tensor, kept[1], finite))
    w_drop = em.op(aten.exp.default, em.op(aten.sub.Tensor, dropped[1], finite))
    resid = em.op(aten.mul.Tensor, dropped[0], em.op(aten.unsqueeze.default, w_drop, -1))
    return out, rho, resid


def correct(em, o_kept, rho, resid) -> Any:
    """A correcting step: rho o_K + r, float32 (the kept output o_K in any float dtype)."""
    o = em.op(aten._to_copy.default, o_kept, dtype=torch.float32)
    scaled = em.op(aten.mul.Tensor, o, em.op(aten.unsqueeze.default, rho, -1))
    return em.op(aten.add.Tensor, scaled, em.op(aten._to_copy.default, resid, dtype=torch.float32))


# ----------------------------------------------------------------------------- the statistics


class RenormState:
    """The process-wide statistics buffers of renormalized sites, on their devices: per key
    (the site and the plan segment), shape, dtype and device one set of tensors, created once (NaN)
    and then only written in place, so every graph of the site holds the same tensors (a static
    address under CUDA graphs). Two compiled models running the same plan interleaved, step by
    step, would share them: compile one model per plan (documented in docs/PLANS.md)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._buffers: dict[tuple, torch.Tensor] = {}

    def buffer(self, key: str, what: str, shape: tuple[int, ...], dtype: torch.dtype,
               device: torch.device | str) -> torch.Tensor:
        """The buffer `what` ("rho", "resid", "mask") of `key`; new buffers are NaN (False for a mask)."""
        full = (key, what, tuple(int(s) for s in shape), dtype, str(torch.device(device)))
        with self._lock:
            buf = self._buffers.get(full)
            if buf is None:
                buf = torch.zeros(shape, dtype=dtype, device=device) if dtype == torch.bool else \
                    torch.full(shape, math.nan, dtype=dtype, device=device)
                self._buffers[full] = buf
            return buf

    def reset(self) -> None:
        """Forget every buffer (graphs already built keep theirs)."""
        with self._lock:
            self._buffers.clear()


RENORM_STATE = RenormState()


# ----------------------------------------------------------------------------- the reference


def reference_renorm(measured: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                     current: tuple[torch.Tensor, torch.Tensor, torch.Tensor], masks: torch.Tensor, scale: float,
                     block_m: int, block_n: int) -> torch.Tensor:
    """The corrected output written directly from its definition, in float64 (tests): per row t,
    with p the exact softmax at the measuring step's q/k/v and K the row's kept keys (token level
    from the block masks (B or 1, H, QB, KB)), rho = sum_{u in K} p_tu, r = sum_{u not in K} p_tu v_u
    (measuring step), o_K = softmax over K of the current step's scores times its v; out = rho o_K + r.
    q (B, H, N, D); k, v (B, Hkv, N, D)."""
    (qm, km, vm), (qc, kc, vc) = [tuple(x.double() for x in t) for t in (measured, current)]
    H = qm.shape[1]
    km, vm, kc, vc = (x.repeat_interleave(H // x.shape[1], 1) for x in (km, vm, kc, vc))
    nq, nk = qm.shape[2], km.shape[2]
    keep = masks.repeat_interleave(block_m, 2)[:, :, :nq].repeat_interleave(block_n, 3)[..., :nk]
    p = torch.softmax(scale * qm @ km.transpose(-1, -2), -1)
    rho = (p * keep).sum(-1, keepdim=True)
    resid = (p * ~keep) @ vm
    s = (scale * qc @ kc.transpose(-1, -2)).masked_fill(~keep, float("-inf"))
    o_kept = torch.nan_to_num(torch.softmax(s, -1)) @ vc
    return rho * o_kept + resid


__all__ = ["Correction", "Phase", "RENORM_STATE", "Renorm", "RenormState", "correct", "measure", "measured_step",
           "reference_renorm", "renorm_phase"]
