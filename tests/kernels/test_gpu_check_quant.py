"""The CPU path of gpu_check.py's quant and overhead parts (issue 16 items 2 and 3) at a tiny
workload: the script runs end to end, records one line per case, and its accuracy lines find the
quantized modes' errors (the op runs its reference on the CPU; the GPU run is the measurement)."""
import importlib.util

import torch
from pathlib import Path

_spec = importlib.util.spec_from_file_location("gpu_check", Path(__file__).with_name("gpu_check.py"))
check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check)


def test_quant_and_overhead_parts_run_on_a_tiny_workload(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(check, "DEVICE", "cpu")
    monkeypatch.setattr(check, "WORKLOADS", {"tiny": (2, 300, 16, ("random",))})
    monkeypatch.setattr(check, "failures", [])
    monkeypatch.setattr(check, "results", [])
    monkeypatch.setattr(check, "json_path", str(tmp_path / "q.json"))
    # fixed inputs: at D=16, fp8's error sits around its workload bound (6e-2: 0.05-0.07 across seeds;
    # seed 1 put random d0.5 fp8 at 0.0578 with K's full mean, 0.0607 with the sampled one; seed 2
    # failed with the full mean, passes with the sample)
    torch.manual_seed(3)
    check.quant_accuracy_cases()
    accuracy = [r for r in check.results if r["case"].startswith("quant tiny")]
    assert len(accuracy) == 2 * 4 * (len(check.REL_L2_BOUND) + 1)    # kinds x densities x (modes + fp8 INT8 P V)
    by_mode = {m: [r["rel_l2"] for r in accuracy if r["case"].endswith(" " + m) and "pv int8" not in r["case"]]
               for m in check.REL_L2_BOUND}
    by_mode["pv int8"] = [r["rel_l2"] for r in accuracy if r["case"].endswith(" pv int8")]
    assert max(by_mode["none"]) < 5e-3 < 1e-2 < min(by_mode["int8_fp8"])   # bf16 rounding only; the roundings applied
    assert 5e-3 < min(by_mode["int8_int8"]) and max(by_mode["int8_int8"]) < min(by_mode["int8_fp8"])   # INT8 P V: finer
    assert by_mode["pv int8"] and all(r["pass"] for r in accuracy)
    check.quant_overhead_cases()
    line = check.results[-1]
    assert line["case"] == "overhead tiny density 0.2"
    assert {"fp8", "int8_fp8", "int8", "int8_int8"} <= set(line) and "compiled_fused_ms" in line["int8_int8"]
    assert "compiled_fused_ms" not in line["int8"]
    import json

    written = json.loads((tmp_path / "q.json").read_text())["results"]   # rewritten after every line
    assert [r["case"] for r in written] == [r["case"] for r in check.results]
    out = capsys.readouterr().out
    assert "quantization overhead" in out and "quantize_qkv" in out


def test_speed_part_times_every_mode_on_a_tiny_workload(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(check, "DEVICE", "cpu")
    monkeypatch.setattr(check, "WORKLOADS", {"tiny": (2, 300, 16, ("random",))})
    monkeypatch.setattr(check, "SPEED_REPS", 1)
    monkeypatch.setattr(check, "failures", [])
    monkeypatch.setattr(check, "results", [])
    monkeypatch.setattr(check, "json_path", str(tmp_path / "s.json"))
    check.speed_cases()
    assert check.bsa_launch.FAST_CVT   # restored
    lines = [r for r in check.results if r["case"].startswith("speed tiny")]
    assert [r["case"] for r in lines] == [f"speed tiny density {d}" for d in check.DENSITIES]
    for r in lines:
        assert set(check.REL_L2_BOUND) <= set(r) and all(r[m]["ms"] > 0 and r[m]["tflops"] > 0 for m in check.REL_L2_BOUND)
        assert set(r["quant_ms"]) == set(check.REL_L2_BOUND) - {"none"}
        assert all(r[f"{m}_cvt"]["ms"] > 0 for m in check.CVT_MODES)
    assert lines[0]["density_run"] < lines[-1]["density_run"] == 1.0
    assert capsys.readouterr().out.count("SPEED tiny") == len(check.DENSITIES)
