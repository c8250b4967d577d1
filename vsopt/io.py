"""The front's file I/O: atomic writes (defined in vsopt.core.io, re-exported here) and loading a
user's model from MODULE:FACTORY, the one loader every command uses.

    target = "mypkg.models:make"  or  "path/to/file.py:make"  or  "file_in_cwd:make"
    made = load_target(target)     # FACTORY() -> (model, example_inputs[, sampler])
    made.model, made.args, made.sampler
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

from vsopt.core.errors import ConfigError
from vsopt.core.io import atomic_write_bytes, atomic_write_json, atomic_write_text

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_write_text", "load_factory", "load_target",
           "LoadedTarget"]


def load_factory(spec: str) -> Callable[..., Any]:
    """'pkg.module:fn', 'path/to/file.py:fn' or 'module_in_cwd:fn' -> the function fn.

    A dotted module is looked up on sys.path with the current folder first (as `python -m` does),
    so `vsopt inspect mymod:make` finds ./mymod.py from the console script too."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{spec!r}: expected MODULE:FACTORY, e.g. mypkg.models:make_model or ./model.py:make")
    try:
        if module_name.endswith(".py"):
            if not os.path.isfile(module_name):
                raise ConfigError(f"{spec!r}: no file {module_name!r}")
            loader_spec = importlib.util.spec_from_file_location(
                "_vsopt_target_" + os.path.basename(module_name)[:-3], module_name)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            cwd = os.getcwd()
            if cwd not in sys.path and "" not in sys.path:
                sys.path.insert(0, cwd)
            module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{spec!r}: cannot import {module_name!r}: {e}") from None
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's module failed while importing: say so, then the cause
        raise ConfigError(f"{spec!r}: importing {module_name!r} failed: {type(e).__name__}: {e}") from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"{spec!r}: {module_name!r} has no callable {attr!r}")
    return factory


@dataclass(frozen=True)
class LoadedTarget:
    """What a MODULE:FACTORY gave: the model, its inputs as returned, and an optional sampler (a
    callable the debugger uses to follow a denoising trajectory).

    `inputs` is kept as the factory returned it: calibration reads a list as several calibration
    calls and a tuple as one; `args` is the one call's positional arguments the other commands use."""

    model: Any
    inputs: Any
    sampler: Callable | None = None

    @property
    def args(self) -> tuple[Any, ...]:
        """The example inputs as one call's positional arguments."""
        return tuple(self.inputs) if isinstance(self.inputs, (tuple, list)) else (self.inputs,)


def load_target(spec: str) -> LoadedTarget:
    """Call MODULE:FACTORY; it must return (model, example_inputs) or (model, example_inputs,
    sampler). example_inputs is a tuple or list of positional arguments, or one tensor."""
    import torch

    factory = load_factory(spec)
    try:
        made = factory()
    except Exception as e:  # noqa: BLE001 - the user's factory failed: name the step, then the cause
        raise ConfigError(f"{spec}: calling the factory failed: {type(e).__name__}: {e}") from e
    if not (isinstance(made, tuple) and len(made) in (2, 3) and isinstance(made[0], torch.nn.Module)
            and (len(made) == 2 or made[2] is None or callable(made[2]))):
        raise ConfigError(f"{spec} must return (model, example_inputs) or (model, example_inputs, sampler), "
                          f"got {type(made).__name__}")
    return LoadedTarget(made[0], made[1], made[2] if len(made) == 3 else None)
