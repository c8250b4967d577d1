"""Reused dynamic masks as calibration candidates (AdaSpa): a dynamic candidate whose mask is
computed at refresh steps and reused in between, with its error measured as it would run.

AdaSpa observes that a head's sparse pattern changes little from one denoising step to the next,
so the search for the mask (pooled q/k scores, top-k or cumulative mass) can run at a few steps
and its result be reused at the others: the scoring is paid once per refresh, and the price is
the error of a mask that is a few steps stale. Here a refresh interval r
(CalibrationOptions.mask_refresh) offers every dynamic candidate again with reuse_steps = r - 1:
in the step range (a segment of the plan, one lowered graph) starting at step a, the mask is
computed at a, a + r, a + 2r, ... (vsopt.core.semantics.mask_refresh_step, what the runtime's
MaskReuseCache does) and reused in between. Pass 2 measures it exactly so: at a refresh step the
candidate's masks are computed and kept, at the steps after it the kept masks run on that step's
q/k/v. An interval is offered only where pass 2 sees a step that reuses a mask and the refresh
step it reuses (else its error would be the fresh mask's, which is not what runs).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from vsopt.calibration.inputs import KeptPerRun
from vsopt.core.dynamic import DynamicSpec
from vsopt.core.errors import ConfigError
from vsopt.core.semantics import mask_refresh_step


def measurable_intervals(intervals: Sequence[int], start: int, steps: Sequence[int]) -> tuple[int, ...]:
    """The refresh intervals whose reuse pass 2 can measure in a range starting at `start`, given
    the steps of its pass-2 inputs in order: some step reuses the mask of a refresh step that is
    also measured, before it in the same run (a run restarts when the step does not grow)."""
    out = []
    for r in intervals:
        spec = DynamicSpec(reuse_steps=r - 1)
        seen: set[int] = set()
        last = None
        for s in steps:
            if last is not None and s <= last:
                seen = set()  # a new sampler run
            t = mask_refresh_step(spec, s, start)
            if t != s and t in seen:
                out.append(r)
                break
            seen.add(s)
            last = s
    return tuple(out)


class ReusedMasks(KeptPerRun):
    """The masks each reusing candidate of one site state kept at its last refresh step."""

    kept: dict[int, tuple[int, torch.Tensor]]  # candidate -> (refresh step, masks)

    def __init__(self, start: int):
        super().__init__()
        self.start = start

    def masks(self, candidate: int, label: str, spec: DynamicSpec, step: int,
              compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The candidate's masks at `step`: computed (and kept) at a refresh step, else the kept
        ones of the refresh step it reuses; a ConfigError when that step was not measured."""
        at = mask_refresh_step(spec, step, self.start)
        if at == step:
            m = compute()
            self.kept[candidate] = (step, m)
            return m
        kept = self.kept.get(candidate)
        if kept is None or kept[0] != at:
            raise ConfigError(f"calibration candidate {label}: step {step} reuses the mask of step {at}, which this "
                              "run's calibration inputs did not give before it (give consecutive steps of one "
                              "sampler run, in order)")
        return kept[1]
