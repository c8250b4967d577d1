"""Deprecation aliases for modules that moved in the restructure (issue 11), without a file at
each old path: importing an old path loads the new module itself (the same object, so attributes,
isinstance and monkeypatching agree) and warns. Installed by vsopt/__init__.py.

Names that are now public functions (vsopt.calibrate, vsopt.bench, vsopt.inspect) cannot also be
module paths, so they are not aliased: their modules are vsopt.calibration, vsopt.benchmark and
vsopt.inspection.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "vsopt.capture": "vsopt.calibration.capture",
    "vsopt.sensitivity": "vsopt.calibration.sensitivity",
    "vsopt.costmodel": "vsopt.core.costmodel",
    "vsopt.timing": "vsopt.core.timing",
    "vsopt.debug_graph": "vsopt.debug.graph",
    "vsopt.debug_numeric": "vsopt.debug.numeric",
    "vsopt.debug_text": "vsopt.debug.text",
    "vsopt.debug_html": "vsopt.debug.html",
    "vsopt.debug_targets": "vsopt.debug.targets",
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, new: str):
        self.new = new

    def create_module(self, spec):
        return importlib.import_module(self.new)

    def exec_module(self, module):  # the new module is already executed
        pass


class MovedModules(importlib.abc.MetaPathFinder):
    """Finds the old paths in MOVED; every other import is left to the usual finders."""

    def find_spec(self, fullname, path=None, target=None):
        new = MOVED.get(fullname)
        if new is None:
            return None
        warnings.warn(f"{fullname} moved to {new}; the old path will be removed", DeprecationWarning, stacklevel=2)
        return importlib.util.spec_from_loader(fullname, _AliasLoader(new))


def install() -> None:
    if not any(isinstance(f, MovedModules) for f in sys.meta_path):
        sys.meta_path.append(MovedModules())
