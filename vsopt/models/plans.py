"""Which plan a run of the shipped reference model takes (`vsopt demo --plan`, `vsopt export
--reference --plan`): a path, 'shipped' (the plan shipped for the clip's size, else the trained
size's, fitted) or 'none'. Here, below both commands, so that neither imports the other."""
from __future__ import annotations

SHIPPED_PLAN = "shipped"


def resolve_plan(choice: str | None, frames: int, size: int, config) -> tuple[str | None, str]:
    """The plan file the demo runs, and why: `choice` is a path, 'shipped' or 'none'. The shipped
    plans (vsopt.models.model.SHIPPED_PLANS, each calibrated on the GPU at its clip size, see
    docs/MODEL.md) run at their size; at another size the plan of the trained size is fitted to the
    clip (vsopt.core.resample: its masks resampled in grid coordinates, as every plan made at
    another size)."""
    if choice in (None, "", "none"):
        return None, "none: every site runs vsopt's exact dense attention"
    if choice != SHIPPED_PLAN:
        return choice, choice
    from vsopt.models.model import shipped_plan

    path = shipped_plan(frames, size, size)
    if path is None:
        path = shipped_plan(config.frames, config.height, config.width)
        return str(path), (f"shipped calibrated plan ({path.name}), calibrated for {config.frames} frames of "
                           f"{config.height}x{config.width}, fitted to this clip")
    return str(path), f"shipped calibrated plan ({path.name})"
