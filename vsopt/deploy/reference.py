"""The shipped reference model as an export target (`vsopt export --reference`): a trained
diffusers WanTransformer3DModel with one denoising step's inputs (vsopt's debug targets) and the
plan calibrated for it (vsopt.models.plans.resolve_plan: the shipped plan, calibrated at the trained clip
size and fitted to any other by vsopt.export, with the density change in the notes)."""
from __future__ import annotations

import importlib
from typing import Any


def _targets():
    try:   # the debugger's targets moved into vsopt.debug (the old path is a deprecation alias)
        return importlib.import_module("vsopt.debug.targets")
    except ImportError:
        return importlib.import_module("vsopt.debug_targets")


def reference_target(frames: int | None, size: int | None, plan: str | None) -> tuple[Any, tuple, Any, str | None]:
    """(model, example_inputs, plan path or None, a note for the result table or None)."""
    from vsopt.models.plans import SHIPPED_PLAN, resolve_plan
    from vsopt.models.model import ReferenceConfig

    model, inputs, _sampler = _targets().reference(frames, size, size)
    config = ReferenceConfig()
    choice = SHIPPED_PLAN if plan is None else plan
    path, why = resolve_plan(choice, frames or config.frames, size or config.height, config)
    return model, tuple(inputs), path, f"reference model, plan: {why}"
