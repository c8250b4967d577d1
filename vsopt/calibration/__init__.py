"""The calibration wing: measure a model's attention and search for the plan that meets a budget.

    from vsopt.calibration import calibrate, SiteErrorBudget
    result = calibrate(model, inputs, SiteErrorBudget(0.05), out="m.plan.json")

(vsopt.calibrate(...) is the same function.) One idea per module:
    budgets       what a calibration must achieve (SiteErrorBudget, DensityBudget, SpeedupBudget, QualityFloor)
    options       what the search may choose from (CalibrationOptions, default_patterns)
    capture       what each site sees (run_observing, SiteCall) and the model's calls (record_forward_inputs)
    order_choice  each head's token order from its block mass in every order
    measure       the two measuring passes: block mass and candidates, candidate errors (SiteState)
    choices       a head's (candidate, precision) as a HeadPlan, priced through vsopt.core.semantics
    search        the Lagrangian searches under each budget (bisect_price), decide: one SiteDecision
                  per site (its choices, and why it stays dense), never_slower
    result        CalibrationResult, SiteResult, and the plan assembled from the choices
    checkpoint    resuming an interrupted calibration
    inputs        calibration inputs as positional calls, step ranges, the reference model's inputs
    run           calibrate / calibrate_many: the passes, the searches, the check of the plan
    check         running a written plan: check_plan, reference_sampler_check
    sensitivity   how much the final output moves per site and step (euler_sensitivity)
    failures      a failure in the user's code: which step failed, then the cause, one line
    cli           `vsopt calibrate`

Names are imported lazily (the CLI module must stay light).
"""
from __future__ import annotations

import importlib

_LAZY = {
    "SiteErrorBudget": "budgets", "DensityBudget": "budgets", "SpeedupBudget": "budgets", "QualityFloor": "budgets",
    "QualityMetric": "budgets", "Budget": "budgets",
    "CalibrationOptions": "options", "default_patterns": "options",
    "SiteCall": "site_call", "RecordedCall": "capture", "run_observing": "capture",
    "record_forward_inputs": "capture",
    "order_block_mass": "order_choice", "choose_orders": "order_choice",
    "SiteState": "measure", "site_plan_output": "measure",
    "HeadChoice": "choices", "predicted_time_us": "choices",
    "search_site_error": "search", "search_density": "search", "search_time": "search",
    "SiteDecision": "search", "decide": "search", "never_slower": "search", "fastest_within_error": "search",
    "SiteResult": "result", "CalibrationResult": "result",
    "calibrate": "run", "calibrate_many": "run",
    "reference_model_inputs": "inputs",
    "check_plan": "check", "reference_sampler_check": "check",
    "euler_sensitivity": "sensitivity",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
