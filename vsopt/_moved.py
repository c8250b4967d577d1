"""Deprecation aliases for modules that moved: the old module path loads the new module itself
(the same object, so attributes, isinstance and monkeypatching all agree) with a warning."""
from __future__ import annotations

import importlib
import sys
import warnings


def alias(old: str, new: str) -> None:
    """Make the module being imported under `old` the module `new`."""
    warnings.warn(f"{old} moved to {new}; the old path will be removed", DeprecationWarning, stacklevel=3)
    sys.modules[old] = importlib.import_module(new)
