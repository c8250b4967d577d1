"""vsopt: a compiler for the attention of video transformers.

    model = torch.compile(model, backend="vsopt", options={"plan": "wan.plan.json"})

Public API (imported lazily so that `import vsopt` stays cheap):
    vsopt.inspect(model, *example_inputs) -> InspectReport    the attention sites of a model
    vsopt.calibrate(...), vsopt.diff(...), vsopt.bench(...)   see their modules
    vsopt.set_denoising_step(i)     the sampler's step: selects a plan's step ranges at run time
    vsopt.last_report()             what the last torch.compile(backend="vsopt") graph rewrote and
                                    left dense, with why (each site left dense is also logged, logger "vsopt")
"""
from __future__ import annotations

import importlib

from vsopt import _moved

__version__ = "0.1.0"
_moved.install()  # old module paths of the restructure still import (with a DeprecationWarning)

_LAZY = {
    "inspect": ("vsopt.inspection", "inspect"),
    "calibrate": ("vsopt.calibration", "calibrate"),
    "diff": ("vsopt.debug.build", "diff"),
    "bench": ("vsopt.benchmark.sweep", "bench"),
    "vsopt_backend": ("vsopt.backend", "vsopt_backend"),
    "last_report": ("vsopt.backend", "last_report"),
    "set_denoising_step": ("vsopt.core.dynamic", "set_denoising_step"),
}


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'vsopt' has no attribute {name!r}")
