"""v2 of the reference model: description positions, the training noise levels, resumable stretches
(train + samples sheet + record in one call), the data clips of the preview sheet, calibrate --size."""
import json

import pytest
import torch

from vsopt.models import data, model as model_lib, preview, stretch, train


def test_positions_tell_apart_descriptions_with_the_same_words():
    ref = model_lib.build(model_lib.ReferenceConfig(**train.TINY)).eval()
    a = data.tokenize("checker background; red triangle moving left, steady, fixed; blue square moving still, steady, fixed")
    b = data.tokenize("checker background; blue triangle moving left, steady, fixed; red square moving still, steady, fixed")
    ea, eb = ref.encode(torch.stack([a, b]))
    # the same words in other slots: as sets of vectors the same without positions, different with them
    words = ref.text_embedding.words
    assert torch.equal(torch.sort(words(a), 0).values, torch.sort(words(b), 0).values)
    assert not torch.allclose(torch.sort(ea, 0).values, torch.sort(eb, 0).values)
    with pytest.raises(ValueError, match="at most 16 tokens"):
        ref.text_embedding(torch.zeros(1, 17, dtype=torch.long))


def test_a_checkpoint_without_positions_loads_as_the_bag_of_words_model(tmp_path):
    from safetensors.torch import save_file

    ref = model_lib.build(model_lib.ReferenceConfig(**train.TINY)).eval()
    sd = model_lib.state_dict(ref, torch.float32)
    sd["text_embedding.weight"] = sd.pop("text_embedding.words.weight")
    del sd["text_embedding.positions"]
    save_file(sd, str(tmp_path / "v1.safetensors"), metadata={"config": ref.config.to_json(), "steps": "7"})
    old = model_lib.load(tmp_path / "v1.safetensors")
    tokens = data.sample_scenes(2, 0).tokens
    assert torch.count_nonzero(old.text_embedding.positions) == 0
    assert torch.equal(old.encode(tokens), ref.text_embedding.words(tokens))


def test_training_noise_levels_half_follow_the_sampler_shift():
    z = torch.linspace(-3, 3, 8)
    assert torch.equal(train.train_sigmas(z, 1.0), torch.sigmoid(z))
    s, shifted = torch.sigmoid(z), train.train_sigmas(z, 3.0)
    assert torch.equal(shifted[0::2], s[0::2])
    assert torch.allclose(shifted[1::2], 3 * s[1::2] / (1 + 2 * s[1::2]))
    assert bool((shifted[1::2] > s[1::2]).all()) and bool((shifted < 1).all())


def test_two_stretches_chain_and_write_few_files(tmp_path, monkeypatch):
    seeds, make_batch = [], data.make_batch
    monkeypatch.setattr(data, "make_batch", lambda batch, seed, *a, **k: seeds.append(seed) or make_batch(batch, seed, *a, **k))
    common = ["--no-structure", "--sample-steps", "1", "--batch", "2", "--max-steps", "6", "--probe-steps", "6",
              "--log-every", "3", "--warmup", "2", "--shift", "3"]
    first, second = tmp_path / "a", tmp_path / "b"
    assert stretch.main(["--out", str(first), "--tiny", *common]) == 0
    assert stretch.main(["--out", str(second), "--resume", str(first / "reference.safetensors"), *common]) == 0
    assert sorted(p.name for p in second.iterdir()) == ["reference.safetensors", "samples.png", "stretch.json"]
    doc = json.loads((second / "stretch.json").read_text())
    assert doc["train"]["steps"] == 6 and doc["train"]["steps_total"] == 12
    assert [s for s in seeds if s != 99_999] == list(range(12))  # the second stretch draws new clips
    assert [p["step"] for p in doc["loss_curve"]] == [3, 6]
    assert "shifted by 3.0" in doc["train"]["schedule"]
    assert model_lib.load(second / "reference.safetensors").meta["steps_total"] == "12"
    from PIL import Image

    sheet = Image.open(second / "samples.png")  # a data row and a model row per description
    assert sheet.height == 2 * len(preview.DESCRIPTIONS) * (preview.ROW_PIXELS + 2)


def test_preview_data_scenes_follow_their_descriptions():
    scenes = preview.scenes_for(preview.DESCRIPTIONS, seed=4)
    assert [data.describe(t) for t in scenes.tokens] == [data.describe(data.tokenize(t)) for t in preview.DESCRIPTIONS]
    assert scenes.present.sum(1).tolist() == [1, 1, 1, 2]
    assert data.SHAPES[int(scenes.shape[0, 0])] == "triangle" and data.COLOURS[int(scenes.colour[3, 1])] == "white"
    assert data.MOTIONS[int(scenes.motion[2, 0])] == "right" and float(scenes.spin[0, 0]) == 0.0
    assert preview.data_clips(preview.DESCRIPTIONS[:1], (2, 8, 8)).shape == (1, data.CHANNELS, 2, 8, 8)


def test_calibrate_size_is_checked(capsys):
    from vsopt.cli import main

    assert main(["calibrate", "--reference", "--size", "16x64", "--max-error", "0.05", "--out", "/tmp/x.plan.json"]) == 1
    assert "--size '16x64'" in capsys.readouterr().err
    assert main(["calibrate", "m:f", "--size", "16x64x64", "--max-error", "0.05", "--out", "/tmp/x.plan.json"]) == 1
    assert "--size applies to --reference only" in capsys.readouterr().err


def test_ship_joins_the_stretches_curves_end_to_end():
    from vsopt.models.ship import joined_curve

    docs = [{"train": {"steps": 50}, "loss_curve": [{"step": 25, "loss": 2.0}, {"step": 50, "loss": 1.0}]},
            {"train": {"steps": 30}, "loss_curve": [{"step": 30, "loss": 0.5}]}]
    assert [(p["step"], p["stretch"]) for p in joined_curve(docs)] == [(25, 0), (50, 0), (80, 1)]


def test_shipped_plans_are_looked_up_by_clip_size():
    assert str(model_lib.shipped_plan(16, 32, 32)).endswith("reference.plan.json")
    assert model_lib.shipped_plan(16, 48, 48) is None
