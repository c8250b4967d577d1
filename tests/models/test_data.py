"""The procedural clip generator: deterministic, well-formed, descriptions round-trip."""
import pytest
import torch

from vsopt.models import data


def test_same_seed_same_clips_different_seed_different():
    a, ta = data.make_batch(3, seed=7, frames=8, height=16, width=16)
    b, tb = data.make_batch(3, seed=7, frames=8, height=16, width=16)
    c, tc = data.make_batch(3, seed=8, frames=8, height=16, width=16)
    assert torch.equal(a, b) and torch.equal(ta, tb)
    assert not torch.equal(a, c)
    assert a.shape == (3, data.CHANNELS, 8, 16, 16) and a.dtype == torch.float32
    assert ta.shape == (3, data.DESCRIPTION_LEN) and ta.dtype == torch.long


@pytest.mark.parametrize("frames,height,width", [(2, 4, 4), (9, 12, 20), (16, 32, 32)])
def test_shapes_values_and_motion(frames, height, width):
    clips, _ = data.make_batch(4, seed=frames, frames=frames, height=height, width=width)
    assert clips.shape == (4, data.CHANNELS, frames, height, width)
    assert torch.isfinite(clips).all() and clips.abs().max() <= 2.0 * data.DATA_SCALE
    # things move: consecutive frames differ (background drift, shapes)
    assert (clips[:, :, 1:] - clips[:, :, :-1]).abs().amax(dim=(1, 2, 3, 4)).min() > 0


def test_front_shape_occludes_back_shape():
    scenes = data.sample_scenes(1, seed=3)
    # two big shapes, same place, no motion: where they overlap the front one's colour shows
    fields = dict(scenes.__dict__)
    fields["present"] = torch.tensor([[True, True, False]])
    fields["shape"] = torch.tensor([[1, 1, 0]])  # squares
    fields["motion"] = torch.zeros(1, 3, dtype=torch.long)
    fields["size"] = torch.zeros(1, 3, dtype=torch.long)
    fields["start"] = torch.zeros(1, 3, 2)
    fields["scale0"] = torch.full((1, 3), 0.5)
    fields["colour"] = torch.tensor([[0, 2, 0]])  # red behind blue
    clip = data.render(data.Scenes(**fields), frames=2, height=16, width=16)
    centre = clip[0, :, 0, 8, 8] / data.DATA_SCALE
    blue = data._PALETTE[2]
    # the pixel is blue times the stripe texture (0.44..1), never red
    ratio = centre / blue
    assert torch.allclose(ratio, ratio[0].expand(4), rtol=1e-4) and 0.4 < float(ratio[0]) <= 1.0


def test_describe_tokenize_round_trip():
    tokens = data.sample_scenes(20, seed=1).tokens
    for row in tokens:
        text = data.describe(row)
        assert torch.equal(data.tokenize(text), row), text
    assert data.describe(torch.zeros(data.DESCRIPTION_LEN, dtype=torch.long)) == "(empty)"


@pytest.mark.parametrize("text,message", [
    ("stripes background; red hexagon moving left, steady, fixed", "unknown words"),
    ("red square moving left, steady, fixed", "starts with a background"),
    ("waves background; red square moving left", "needs 5 words"),
    ("waves background; square red moving left, steady, fixed", "expected one of"),
])
def test_tokenize_rejects_bad_descriptions(text, message):
    with pytest.raises(ValueError, match=message):
        data.tokenize(text)


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="batch"):
        data.sample_scenes(0, seed=0)
    with pytest.raises(ValueError, match="clip size"):
        data.render(data.sample_scenes(1, 0), frames=1)
    with pytest.raises(ValueError, match="clip"):
        data.latent_to_rgb(torch.zeros(3, 2, 4, 4))
