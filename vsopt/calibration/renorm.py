"""Softmax-mass correction (Re-ttention) as calibration candidates: a sparse candidate whose dropped
blocks' statistics are measured every r steps and correct the steps between, with its error
measured as it would run.

A sparse head loses the softmax mass of its dropped blocks; Re-ttention measures that mass (and
the dropped part's output) at one denoising step and restores it at the next ones, where the
statistics have changed little (vsopt.core.rettention). Here an interval r
(CalibrationOptions.renorm_every) offers every mask, pattern and (fresh) dynamic candidate again
with HeadPlan.renorm = Renorm(every=r): in the step range starting at step a it measures at a,
a + r, ... (vsopt.core.rettention.renorm_phase, what Plan.at_step resolves) and corrects between.
Pass 2 measures it exactly so: at a measuring step the candidate's output is the merged kept and
dropped parts (exact attention, or PSA's with the pooled remainder) and its statistics (and
masks) are kept; at the steps after it the kept statistics correct that step's kept blocks. Its
density is what it computes: every block at a measuring step with the dropped blocks through the
kernel, the kept blocks otherwise. An interval is offered only where pass 2 sees a correcting step
and the measuring step it uses (calibration.reuse.measurable_intervals: the same arithmetic).

Residual sharing (CalibrationOptions.residual_every, Renorm kind "residual", vsopt.core.residual)
runs through the same KeptStatistics: its measuring step is exact (every block, a pooled head's
too) and keeps R = exact - sparse, its correcting steps output the sparse output plus R.
"""
from __future__ import annotations

from typing import Callable

import torch

from vsopt.calibration.inputs import KeptPerRun
from vsopt.core import semantics
from vsopt.core.errors import ConfigError
from vsopt.core.plan import Quant
from vsopt.core.pooled import Remainder
from vsopt.core.rettention import Phase, Renorm, measured_step, renorm_phase


class KeptStatistics(KeptPerRun):
    """Each renormalized candidate's statistics of one site state, from its last measuring step."""

    kept: dict[int, tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]  # candidate -> (step, masks, rho, resid)

    def __init__(self, start: int):
        super().__init__()
        self.start = start

    def output(self, candidate: int, label: str, spec: Renorm, remainder: Remainder, step: int, q, k, v,
               masks_now: Callable[[], torch.Tensor], scale: float, block_m: int, block_n: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(output float32 (B, H, N, D), computed block fraction per batch and head (B, H)) of the
        candidate at `step` on q/k/v (in its heads' orders): measuring, or correcting with the
        statistics kept at its measuring step (a ConfigError when that step was not measured)."""
        if renorm_phase(spec, step, self.start) is Phase.MEASURE:
            masks = masks_now()
            out, rho, resid = semantics.renorm_statistics(q, k, v, masks, scale, Quant.NONE, block_m, block_n,
                                                          remainder, spec.kind)
            self.kept[candidate] = (step, masks, rho, resid)
            exact = remainder is Remainder.DROP or spec.residual   # every block computed
            done = torch.ones_like(masks, dtype=torch.float32) if exact else masks.float()
            return out, done.mean((-1, -2)).expand(q.shape[0], -1)
        at = measured_step(spec, step, self.start)
        kept = self.kept.get(candidate)
        if kept is None or kept[0] != at:
            raise ConfigError(f"calibration candidate {label}: step {step} corrects with the statistics of step {at}, "
                              "which this run's calibration inputs did not give before it (give consecutive steps of "
                              "one sampler run, in order)")
        _, masks, rho, resid = kept
        out = semantics.renorm_corrected(q, k, v, masks, scale, Quant.NONE, block_m, block_n, rho, resid, spec.kind,
                                         remainder)
        return out, masks.float().mean((-1, -2)).expand(q.shape[0], -1)
