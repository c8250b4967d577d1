"""benchmarks/regress.py without a GPU: its argument parsing, the GPU-kind key, the noise threshold
and the comparison of two stored runs (the measurement itself needs the GPU)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "regress.py"
_spec = importlib.util.spec_from_file_location("regress", _PATH)
regress = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("regress", regress)   # dataclasses look their module up there
_spec.loader.exec_module(regress)


def _run(cases: dict, **extra) -> dict:
    return {"benchmark": "regress", "gpu": "NVIDIA H200", "torch": "2.11", "triton": "3.6",
            "cases": {name: regress.summarize(rounds) for name, rounds in cases.items()}, **extra}


BASE = _run({"kernel/none/d0.1": [1.00, 1.01, 0.99, 1.00, 1.00],       # spread 2%
             "wan_block": [50.0, 52.0, 49.0, 51.0, 50.0]})             # spread 6%: threshold 18%


def test_gpu_kind_keys_the_baseline():
    assert regress.gpu_kind("NVIDIA H200") == "h200"
    assert regress.gpu_kind("NVIDIA H100 80GB HBM3") == "h100"
    assert regress.gpu_kind("NVIDIA L40S") == "l40s"
    assert regress.gpu_kind("Some New Accelerator") == "some_new_accelerator"


def test_spread_and_summary():
    s = regress.summarize([2.0, 2.2, 1.8])
    assert s["ms"] == 2.0 and s["spread"] == pytest.approx(0.2) and s["rounds_ms"] == [2.0, 2.2, 1.8]
    with pytest.raises(ValueError, match="no rounds"):
        regress.spread([])


def test_threshold_is_the_floor_or_three_spreads():
    found = {f.case: f for f in regress.compare(BASE, BASE)}
    assert found["kernel/none/d0.1"].threshold == pytest.approx(0.06)     # 3 x 2% > the 5% floor
    assert found["wan_block"].threshold == pytest.approx(0.18)            # 3 x 6%
    assert not any(f.failed for f in found.values())
    tight = _run({"kernel/none/d0.1": [1.0, 1.0, 1.0], "wan_block": [50.0, 50.0, 50.0]})
    assert {f.threshold for f in regress.compare(tight, tight)} == {regress.FLOOR}


def test_a_slowdown_beyond_noise_fails_and_one_within_passes():
    new = _run({"kernel/none/d0.1": [1.10, 1.10, 1.11, 1.10, 1.10],     # +10% > 6%: fails
                "wan_block": [55.0, 55.5, 55.0, 54.5, 55.0]})           # +10% < 18%: passes
    found = {f.case: f for f in regress.compare(BASE, new)}
    assert found["kernel/none/d0.1"].status == "slower" and found["kernel/none/d0.1"].change == pytest.approx(0.10)
    assert found["wan_block"].status == "ok"
    faster = _run({"kernel/none/d0.1": [0.5, 0.5, 0.5], "wan_block": [20.0, 20.0, 20.0]})
    assert not any(f.failed for f in regress.compare(BASE, faster))
    assert any(f.failed for f in regress.compare(BASE, new, floor=0.0, spread_factor=0.0))


def test_missing_cases_fail_and_new_cases_are_reported():
    new = _run({"kernel/none/d0.1": [1.0, 1.0, 1.0], "reference_model": [9.0, 9.0, 9.0]})
    found = {f.case: f for f in regress.compare(BASE, new)}
    assert found["wan_block"].status == "missing" and found["wan_block"].failed
    assert found["reference_model"].status == "new" and not found["reference_model"].failed
    with pytest.raises(ValueError, match="'cases'"):
        regress.compare({"gpu": "x"}, new)


def test_compare_cli_exit_status_and_version_warning(tmp_path, capsys):
    base, same, slow = tmp_path / "base.json", tmp_path / "same.json", tmp_path / "slow.json"
    base.write_text(json.dumps(BASE))
    same.write_text(json.dumps({**BASE, "torch": "2.12"}))
    slow.write_text(json.dumps(_run({"kernel/none/d0.1": [2.0, 2.0, 2.0], "wan_block": [50.0, 50.0, 50.0]})))
    assert regress.main(["--compare", str(base), str(same)]) == 0
    out = capsys.readouterr().out
    assert "warning: torch 2.11 in the baseline, 2.12 now" in out and "0 regression(s)" in out
    assert regress.main(["--compare", str(base), str(slow)]) == 1
    assert "FAIL kernel/none/d0.1" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="does not exist"):
        regress.main(["--compare", str(base), str(tmp_path / "nope.json")])


def test_arguments():
    args = regress.parse_args([])
    assert args.groups == list(regress.CASE_GROUPS) and args.floor == regress.FLOOR and not args.update
    assert regress.parse_args(["--cases", "kernel", "--rounds", "3"]).groups == ["kernel"]
    for bad in (["--cases", "kernel,nope"], ["--rounds", "1"], ["--floor", "-0.1"]):
        with pytest.raises(SystemExit):
            regress.parse_args(bad)


def test_without_a_gpu_it_says_so(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert regress.main([]) == 2
    assert "CUDA GPU" in capsys.readouterr().err
