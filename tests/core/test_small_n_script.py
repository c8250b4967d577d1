"""benchmarks/small_n_gpu.py's CPU dry run (its ops part): every row written, with the cost model's
prediction beside each measured op (the numbers of a dry run mean nothing; the GPU run is the lead's)."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_small_n_dry_run_writes_every_ops_row(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import small_n_gpu
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    out = tmp_path / "small.json"
    assert small_n_gpu.main(["--dry-run", "--parts", "ops", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["parts"] == {"ops": "ok"} and doc["dry_run"]
    sparse = [r for r in doc["rows"] if r["kind"] == "sparse"]
    assert sorted({(r["density"], r["launches"]) for r in sparse}) == [(d, n) for d in (0.3, 0.5, 1.0) for n in (1, 4)]
    for r in sparse:   # four one-head launches are priced above one launch of the same heads
        if r["launches"] == 4:
            one = next(s for s in sparse if s["density"] == r["density"] and s["launches"] == 1)
            assert r["predicted_us"] > one["predicted_us"] > 0
    kinds = {r["kind"] for r in doc["rows"]}
    assert kinds == {"dense", "sparse", "permute", "host"}
    assert all(r["predicted_us"] > 0 for r in doc["rows"] if "predicted_us" in r)
    assert "cost model" in small_n_gpu.render(doc)
