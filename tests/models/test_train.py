"""The training script end to end on a tiny model (CPU, a few steps)."""
import json

import torch

from vsopt.models import model as model_lib, train


def test_tiny_training_run_writes_a_loadable_checkpoint_and_curve(tmp_path):
    rc = train.main(["--out", str(tmp_path), "--tiny", "--batch", "2", "--max-steps", "8", "--probe-steps", "6",
                     "--log-every", "4", "--warmup", "2", "--lr", "3e-3"])
    assert rc == 0
    for name in ("reference.safetensors", "train_config.json", "loss_curve.json", "loss_curve.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    record = json.loads((tmp_path / "train_config.json").read_text())
    assert record["steps"] == 8 and record["model"]["num_layers"] == 1
    curve = json.loads((tmp_path / "loss_curve.json").read_text())
    assert [p["step"] for p in curve] == [4, 8] and all(p["loss"] > 0 for p in curve)
    ref = model_lib.load(tmp_path / "reference.safetensors")
    assert ref.config == model_lib.ReferenceConfig(**train.TINY)
    # the file holds the EMA weights, rounded to bf16
    assert all(p.dtype == torch.float32 for p in ref.transformer.parameters())


def test_flow_loss_is_zero_for_the_exact_velocity():
    x0, noise = torch.randn(2, 4, 2, 4, 4), torch.randn(2, 4, 2, 4, 4)
    sigma = torch.tensor([0.3, 0.8])

    def oracle(x_t, timestep, states, return_dict=False):
        return (noise - x0,)

    loss = train.flow_loss(oracle, torch.nn.Embedding(3, 2), x0, torch.zeros(2, 1, dtype=torch.long), sigma, noise)
    assert float(loss) == 0.0


def test_training_on_two_sizes_resumes_from_a_checkpoint(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    assert train.main(["--out", str(first), "--tiny", "--batch", "4", "--max-steps", "6", "--probe-steps", "6",
                       "--log-every", "3", "--warmup", "2"]) == 0
    assert train.main(["--out", str(second), "--resume", str(first / "reference.safetensors"), "--sizes",
                       "4x8x8,4x16x16", "--batch", "4", "--max-steps", "6", "--probe-steps", "6",
                       "--log-every", "3", "--warmup", "2"]) == 0
    record = json.loads((second / "train_config.json").read_text())
    # the second size has 4x the tokens, so a quarter of the batch: 3 steps of 4 clips + 3 of 1
    assert record["sizes"] == "4x8x8,4x16x16" and record["batches"] == [4, 1] and record["clips_seen"] == 15
    assert {k.split()[0] for k in record["validation_loss_trained"]} == {"4x8x8", "4x16x16"}
    resumed = model_lib.load(second / "reference.safetensors")
    assert resumed.config == model_lib.ReferenceConfig(**train.TINY)
    assert resumed.meta["resumed_from"] == str(first / "reference.safetensors")
    before = model_lib.load(first / "reference.safetensors")
    moved = [not torch.equal(a, b) for a, b in zip(before.transformer.parameters(), resumed.transformer.parameters())]
    assert any(moved)  # the second stretch trained the first one's weights further


def test_sizes_are_checked():
    import pytest

    assert train.parse_sizes("16x32x32, 16x64x64") == [(16, 32, 32), (16, 64, 64)]
    with pytest.raises(SystemExit, match="not FRAMESxHEIGHTxWIDTH"):
        train.parse_sizes("16x32")
