"""The CPU path of gpu_check_quant_overhead.py (issue 16 item 3) at a tiny shape under the
interpreter: every variant runs, gives the separate variant's output, and the JSON records the
kernel on pre-quantized inputs, the variants' overheads and each quantization kernel's time."""
import importlib.util
import json
from pathlib import Path

_spec = importlib.util.spec_from_file_location("gpu_check_quant_overhead",
                                               Path(__file__).with_name("gpu_check_quant_overhead.py"))
qo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(qo)


def test_overhead_script_runs_every_variant_on_a_tiny_shape(tmp_path, capsys):
    assert qo.main(["--device", "cpu", "--shape", "2,150,16", "--modes", "int8,int8_int8", "--layouts", "model",
                    "--reps", "1", "--no-sweep", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "quant_overhead.json").read_text())
    assert [line["mode"] for line in res["lines"]] == ["int8", "int8_int8"] and not res["skipped"]
    int8, i8i8 = res["lines"]
    assert set(int8["variants"]) == {"separate", "q_in_kernel"}   # 16-bit P V: no K V fusion, no statistics launch
    assert set(i8i8["variants"]) == set(qo.VARIANTS)
    for line in res["lines"]:
        assert line["kernel_prequantized_ms"] > 0 and line["bf16_ms"] > 0
        for v in line["variants"].values():
            assert v["op_ms"] > 0 and v["rel_l2_vs_separate"] < 1e-6
    assert {"channel_stats", "quantize_q", "quantize_k", "quantize_v", "quantize_kv", "stats_and_q"} == set(i8i8["parts"])
    assert {"quantize_q", "quantize_k"} == set(int8["parts"])   # K smoothed in its own launch: no statistics pass
    out = capsys.readouterr().out
    assert out.count("MISS ") + out.count("MET ") == 8   # one line per mode and variant


def test_overhead_script_stops_at_its_budget(tmp_path):
    assert qo.main(["--device", "cpu", "--shape", "1,64,16", "--modes", "int8", "--layouts", "contiguous,model",
                    "--reps", "1", "--no-sweep", "--budget-s", "0", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "quant_overhead.json").read_text())
    assert res["lines"] == [] and res["skipped"] == ["contiguous int8: time budget", "model int8: time budget"]
