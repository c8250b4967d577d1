"""The module paths moved by the restructure still import, as the new modules themselves, with a
DeprecationWarning; the public functions keep their names."""
from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from vsopt._moved import MOVED


@pytest.mark.parametrize("old, new", sorted(MOVED.items()))
def test_old_path_is_the_new_module(old, new):
    code = (f"import warnings, importlib; warnings.simplefilter('error', DeprecationWarning)\n"
            f"import vsopt\n"
            f"try:\n    importlib.import_module({old!r})\nexcept DeprecationWarning as w:\n    print('warned', w)\n"
            f"warnings.simplefilter('ignore')\n"
            f"print(importlib.import_module({old!r}) is importlib.import_module({new!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert f"warned {old} moved to {new}" in out and out.strip().endswith("True"), out


def test_public_functions_stay_callable_after_their_modules_are_imported():
    import vsopt

    for module in ("vsopt.calibration", "vsopt.benchmark", "vsopt.debug", "vsopt.inspection", "vsopt.cli"):
        importlib.import_module(module)
    for name in ("calibrate", "bench", "diff", "inspect"):
        assert callable(getattr(vsopt, name)) and not isinstance(getattr(vsopt, name), type(sys)), name
