"""The CPU path of tests/kernels/gpu_check_rettention.py: --smoke passes, and the correction it
measures recovers error that plain block-sparse attention leaves."""
import importlib.util
import json
from pathlib import Path

_spec = importlib.util.spec_from_file_location("gpu_check_rettention",
                                               Path(__file__).with_name("gpu_check_rettention.py"))
check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check)


def test_smoke_run_passes(tmp_path):
    assert check.main(["--smoke", "--out", str(tmp_path / "r.json")]) == 0
    doc = json.loads((tmp_path / "r.json").read_text())
    assert [r["pass"] for r in doc["results"]] == [True, True]
    for r in doc["results"]:
        assert r["corrected_rel_l2_vs_exact"] < r["plain_rel_l2_vs_exact"]
