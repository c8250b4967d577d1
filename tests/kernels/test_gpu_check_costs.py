"""gpu_check_costs.py (the cost-model entries of chosen precisions, measured and merged): the per-key
fit equals a fit of all keys together (its claim that one precision can be refitted alone), the
CPU dry run writes its entries, and --apply merges them into a copy of the shipped h200.json,
drops them from meta["unmeasured"], records the refit, and refuses a dry run or a skipped grid."""
import importlib.util
import json
from pathlib import Path

import pytest

from vsopt.core.costmodel import CostModel, Launch, SiteWork

_spec = importlib.util.spec_from_file_location("gpu_check_costs", Path(__file__).with_name("gpu_check_costs.py"))
gcc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gcc)
SHIPPED = Path(__file__).resolve().parents[2] / "vsopt" / "costmodels" / "h200.json"


def _records(key_quant, launch, per_block, per_qblock):
    out = []
    for qb in (16, 64, 256):
        for visited_per_row in (1, 3, 8):
            visited = qb * visited_per_row
            t = launch + per_block * visited + per_qblock * qb
            out.append({"kind": "attention", "quant": key_quant, "head_dim": 128, "block": 128, "query_blocks": qb,
                        "visited_blocks": visited, "rows_max": visited_per_row, "gpu_us": t})
    return out


def test_one_key_fitted_alone_equals_the_joint_fit():
    recs = _records("int8_int8", 20.0, 0.01, 0.1) + _records("fp8", 30.0, 0.02, 0.05)
    m = {"gpu": "NVIDIA H200", "sm_count": 132, "measurements": recs}
    alone = gcc.fit_keys(m)
    joint = CostModel.fit([(SiteWork((Launch(r["quant"], 128, 128, 128, r["query_blocks"], r["visited_blocks"],
                                             r["rows_max"]),)), r["gpu_us"]) for r in recs], "NVIDIA H200")
    for key, e in alone.items():
        assert e["launch_us"] == pytest.approx(joint.launch_us[key], rel=1e-6)
        assert e["per_block_us"] == pytest.approx(joint.per_block_us[key], rel=1e-6)
        assert e["per_query_block_us"] == pytest.approx(joint.per_query_block_us[key], rel=1e-6)
    assert alone["int8_int8/d128/128x128"]["launch_us"] == pytest.approx(20.0, rel=1e-6)   # exact data, exact fit
    assert alone["fp8/d128/128x128"]["per_block_us"] == pytest.approx(0.02, rel=1e-6)


def test_dry_run_then_apply_merges_into_a_copy_of_the_cost_model(tmp_path):
    assert gcc.main(["--dry-run", "--out", str(tmp_path), "--flags", "q_with_stats", "--head-dims", "64", "--blocks", "64", "--lengths", "128,256",
                     "--densities", "0.3,0.6,1.0"]) == 0
    res = json.loads((tmp_path / "quant_costs.json").read_text())
    assert set(res["entries"]) == {"int8_int8/d64/64x64"} and len(res["measurements"]) == 6
    assert res["variant"] == "q_with_stats" and not gcc_launch().FUSE_Q_WITH_STATS   # restored
    model_path = tmp_path / "h200.json"
    shipped = json.loads(SHIPPED.read_text())
    shipped["meta"]["unmeasured"] = {"keys": ["int8_int8/d64/64x64", "int8_int8/d128/128x128"], "placeholder": "test"}
    model_path.write_text(json.dumps(shipped))   # a model with placeholders, as h200.json had before its refit
    args = ["--apply", str(tmp_path / "quant_costs.json"), "--costmodel", str(model_path)]
    assert gcc.main(args) == 2                                   # a dry run is refused
    before = json.loads(model_path.read_text())
    assert gcc.main(args + ["--allow-dry-run"]) == 0
    after = json.loads(model_path.read_text())
    e = res["entries"]["int8_int8/d64/64x64"]
    assert after["per_block_us"]["int8_int8/d64/64x64"] == e["per_block_us"] != before["per_block_us"]["int8_int8/d64/64x64"]
    assert after["key_slots"]["int8_int8/d64/64x64"] == e["key_slots"]
    assert ("int8_int8/d64/64x64" in after["per_span_block_us"]) == (e["per_span_block_us"] is not None)
    assert after["meta"]["unmeasured"]["keys"] == ["int8_int8/d128/128x128"]   # the measured key dropped
    assert after["meta"]["refits"][-1]["keys"] == ["int8_int8/d64/64x64"]
    assert after["launch_us"]["fp8/d128/128x128"] == before["launch_us"]["fp8/d128/128x128"]   # others untouched
    CostModel.load(model_path)                                   # still a valid cost model
    res["skipped"] = [{"kind": "attention", "skipped": "time budget"}]
    (tmp_path / "cut.json").write_text(json.dumps(res))
    assert gcc.main(["--apply", str(tmp_path / "cut.json"), "--costmodel", str(model_path), "--allow-dry-run"]) == 2


def gcc_launch():
    from vsopt.kernels.block_sparse import launch

    return launch
