"""The shipped checkpoint: found through importlib.resources, small, and it reproduces a stored
output. Regenerate the stored output (only after retraining) with
    python tests/models/test_checkpoint.py --write
Tolerance: float32 on the CPU, 3 Euler steps; relative L2 <= 1e-4 and max abs error <= 1e-3
(summation order differs between CPUs and thread counts, nothing else should)."""
import importlib.resources
import json
import sys
from pathlib import Path

import torch

from vsopt.models import data, model as model_lib, sampler

STORED = Path(__file__).with_name("reference_output.safetensors")
SETTINGS = dict(seed=5, frames=4, size=16, steps=3, guidance=3.0)


def reference_output() -> torch.Tensor:
    ref = model_lib.load_shipped("cpu", torch.float32)
    tokens = data.sample_scenes(1, SETTINGS["seed"]).tokens
    shape = (data.CHANNELS, SETTINGS["frames"], SETTINGS["size"], SETTINGS["size"])
    return sampler.sample(ref.transformer, ref.encode(tokens), shape, steps=SETTINGS["steps"], seed=SETTINGS["seed"],
                          guidance=SETTINGS["guidance"], uncond=ref.encode(torch.zeros_like(tokens)))


def test_checkpoint_is_package_data_found_by_importlib_resources():
    ref = importlib.resources.files("vsopt.models") / "assets" / model_lib.CHECKPOINT_NAME
    assert ref.is_file()
    assert model_lib.shipped_checkpoint() == ref
    with importlib.resources.as_file(ref) as path:
        size = Path(path).stat().st_size
    assert 1_000_000 < size < 16 * 2 ** 20  # bf16, under the 16 MiB transfer limit (issue: <= 20 MB)


def test_shipped_model_is_the_documented_one():
    from safetensors import safe_open

    with importlib.resources.as_file(model_lib.shipped_checkpoint()) as path, safe_open(str(path), "pt") as f:
        meta = f.metadata()
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    cfg = model_lib.ReferenceConfig.from_json(meta["config"])
    assert dtypes == {"BF16"}
    assert cfg.video_tokens >= 4096 and cfg.attention_head_dim in (64, 128)
    assert cfg.num_layers >= 4 and cfg.num_attention_heads >= 2
    ref = model_lib.load_shipped()
    assert type(ref.transformer).__name__ == "WanTransformer3DModel"
    assert not ref.transformer.training


def test_loaded_checkpoint_reproduces_the_stored_output():
    from safetensors.torch import load_file

    stored = load_file(str(STORED))
    assert json.loads(Path(STORED).with_suffix(".json").read_text()) == SETTINGS
    out = reference_output()
    expected = stored["latents"]
    assert out.shape == expected.shape
    rel = float((out - expected).norm() / expected.norm())
    assert rel <= 1e-4, rel
    assert float((out - expected).abs().max()) <= 1e-3


def test_loading_a_bad_file_names_the_problem(tmp_path):
    import pytest
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError, match="no reference checkpoint"):
        model_lib.load(tmp_path / "missing.safetensors")
    bad = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(bad))
    with pytest.raises(ValueError, match="not a vsopt reference checkpoint"):
        model_lib.load(bad)


if __name__ == "__main__" and "--write" in sys.argv:
    from safetensors.torch import save_file

    save_file({"latents": reference_output().contiguous()}, str(STORED))
    STORED.with_suffix(".json").write_text(json.dumps(SETTINGS))
    print(f"wrote {STORED}")
