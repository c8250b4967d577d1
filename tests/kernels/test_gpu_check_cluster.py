"""The CPU path of tests/kernels/gpu_check_cluster.py: --smoke runs its references and passes."""
import importlib.util
import json
from pathlib import Path

_spec = importlib.util.spec_from_file_location("gpu_check_cluster", Path(__file__).with_name("gpu_check_cluster.py"))
check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check)


def test_smoke_run_passes(tmp_path):
    assert check.main(["--smoke", "--out", str(tmp_path / "c.json")]) == 0
    (r,) = json.loads((tmp_path / "c.json").read_text())["results"]
    assert r["pass"] and r["top_p_1_rel_l2_vs_exact"] < 1e-5
    (point,) = r["points"]
    assert 0 < point["density"] < 1 and point["rel_l2_vs_reference"] < 1e-5
