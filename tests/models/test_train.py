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
