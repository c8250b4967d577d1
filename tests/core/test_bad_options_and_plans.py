"""Bad options and bad plan files give one clear error naming the problem (issue 12, items 6-7)."""
from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from vsopt.core.config import VsoptConfig
from vsopt.core.errors import ConfigError, PlanError
from vsopt.core.ir import TokenGrid
from vsopt.core.plan import HeadPlan, Plan, SitePlan, Sparsity


@pytest.mark.parametrize("options, message", [
    ({"plan": 123}, "option 'plan' must be a vsopt Plan"),
    ({"plan": {"sites": {}}}, "option 'plan' must be a vsopt Plan"),
    ("strict", "vsopt options must be a dict"),
    ({"grid": (2.5, 8, 8)}, "grid sizes must be integers"),
    ({"grid": (True, 8, 8)}, "grid sizes must be integers"),
    ({"grids": {"a": (2, 8.0, 8)}}, "grid sizes must be integers"),
])
def test_bad_options_name_the_option(options, message):
    with pytest.raises(ConfigError, match=message):
        VsoptConfig.from_options(options)


def test_good_options_still_accepted():
    cfg = VsoptConfig.from_options({"grid": (2, 4, 8), "strict": True})
    assert cfg.grid == TokenGrid(2, 4, 8) and cfg.strict


def _mask_plan() -> Plan:
    mask = torch.eye(2, dtype=torch.bool)
    head = HeadPlan(Sparsity.MASK, mask=mask, block_m=16, block_n=16)
    return Plan({"a": SitePlan("a", 1, 32, 32, None, (head,))})


def test_plan_path_is_a_folder(tmp_path):
    with pytest.raises(PlanError, match="is a folder"):
        Plan.load(tmp_path)


@pytest.mark.parametrize("field, value", [("num_heads", 4.7), ("q_len", "32"), ("kv_len", -1), ("num_heads", True)])
def test_non_integer_counts_are_refused(tmp_path, field, value):
    path = _mask_plan().save(tmp_path / "m.plan.json")
    doc = json.loads(path.read_text())
    doc["sites"]["a"][field] = value
    path.write_text(json.dumps(doc))
    with pytest.raises(PlanError, match=f'"{field}" must be a non-negative integer'):
        Plan.load(path)


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "sub/m.plan.safetensors"])
def test_arrays_file_outside_the_plan_folder_is_refused(tmp_path, name):
    path = _mask_plan().save(tmp_path / "m.plan.json")
    doc = json.loads(path.read_text())
    doc["arrays"]["file"] = name
    path.write_text(json.dumps(doc))
    with pytest.raises(PlanError, match="must be a file name beside the plan"):
        Plan.load(path)


def test_plans_are_written_with_the_usual_mode(tmp_path):
    old = os.umask(0o022)
    try:
        path = _mask_plan().save(tmp_path / "m.plan.json")
    finally:
        os.umask(old)
    for p in (path, path.with_suffix(".safetensors")):
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p
    assert Plan.load(path).sites["a"].heads[0].mask.equal(torch.eye(2, dtype=torch.bool))
