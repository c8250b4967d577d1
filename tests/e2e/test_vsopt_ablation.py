"""benchmarks/vsopt_ablation.py: PlanScorer.with_settings shares the dense clip and the calibration
inputs across variants and refuses settings that would change them; the script runs each variant
on a tiny untrained model and writes its table (the options a variant allows are the ones run)."""
import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest

from vsopt.benchmark import BenchSettings, Method, PlanScorer
from vsopt.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def _tiny():
    from vsopt.models.model import ReferenceConfig, build

    cfg = ReferenceConfig(num_layers=1, num_attention_heads=2, attention_head_dim=32, ffn_dim=64, frames=4,
                          height=16, width=16)
    return build(cfg).eval()


def test_with_settings_shares_the_dense_clip_and_refuses_other_clips():
    base = BenchSettings(methods=(Method.VSOPT,), densities=(0.5,), steps=2, calibration_steps=2, sensitivity=False)
    scorer = PlanScorer(_tiny(), base)
    other = scorer.with_settings(dataclasses.replace(base, vsopt_pooled=False))
    assert other.dense_video is scorer.dense_video and other.settings.vsopt_pooled is False
    assert scorer.settings.vsopt_pooled is True and other._density_plans is not scorer._density_plans
    with pytest.raises(ConfigError, match="steps"):
        scorer.with_settings(dataclasses.replace(base, steps=3))


def test_the_ablation_runs_each_variant_with_only_its_options(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("vsopt_ablation", ROOT / "benchmarks" / "vsopt_ablation.py")
    ablation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablation)
    import vsopt.models.model as model

    monkeypatch.setattr(model, "load_shipped", lambda **kw: _tiny())
    rc = ablation.main(["--densities", "0.5", "--steps", "2", "--clip", "4,16,16", "--calibration-steps", "2",
                        "--variants", "none,pooled", "--out", str(tmp_path)])
    assert rc == 0
    result = json.loads((tmp_path / "ablation.json").read_text())
    none, pooled = (result["variants"][v]["points"][0] for v in ("none", "pooled"))
    assert "pooled remainder 0," in none["options"]
    assert 0.0 < none["density"] <= 0.5 + 1e-6 and 0.0 < pooled["density"] <= 0.5 + 1e-6
    assert ablation.main(["--variants", "nothing"]) == 2
