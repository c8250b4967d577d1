"""The Euler flow sampler, against flows whose answer is known exactly."""
import pytest
import torch

from vsopt.models import sampler


def test_sigmas_run_from_one_to_zero_and_shift_spends_steps_at_high_noise():
    for shift in (1.0, 3.0, 5.0):
        s = sampler.sigmas(10, shift)
        assert s.shape == (11,) and s[0] == 1.0 and s[-1] == 0.0
        assert (s[1:] < s[:-1]).all()
    assert torch.allclose(sampler.sigmas(4, 1.0), torch.linspace(1, 0, 5, dtype=torch.float64))
    assert sampler.sigmas(10, 3.0)[5] > sampler.sigmas(10, 1.0)[5]
    with pytest.raises(ValueError, match="steps"):
        sampler.sigmas(0)
    with pytest.raises(ValueError, match="shift"):
        sampler.sigmas(4, 0.0)


class OracleFlow(torch.nn.Module):
    """The exact velocity of the rectified flow towards the fixed clip x0: v = (x - x0) / sigma."""

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0
        self.calls = []

    def forward(self, x, timestep, encoder_hidden_states, return_dict=True):
        self.calls.append((x.shape, timestep.clone(), encoder_hidden_states.shape))
        sigma = (timestep / 1000.0).view(-1, 1, 1, 1, 1)
        return ((x - self.x0) / sigma,)


@pytest.mark.parametrize("steps,shift", [(1, 1.0), (3, 3.0), (7, 5.0)])
def test_euler_lands_on_the_target_of_a_straight_flow(steps, shift):
    shape = (4, 3, 6, 5)
    x0 = torch.randn(2, *shape, dtype=torch.float32)
    model = OracleFlow(x0)
    cond = torch.zeros(2, 5, 8)
    out = sampler.sample(model, cond, shape, steps=steps, seed=11, shift=shift)
    assert torch.allclose(out, x0, atol=1e-5)
    assert len(model.calls) == steps
    assert float(model.calls[0][1][0]) == 1000.0  # first step at pure noise


def test_guidance_combines_cond_and_uncond_in_one_batch():
    shape = (2, 2, 3, 3)
    v_c, v_u = 0.75, -0.5

    def model(x, timestep, encoder_hidden_states, return_dict=True):
        # cond rows carry 1.0, uncond rows 0.0 in their hidden states
        is_cond = encoder_hidden_states[:, 0, 0].view(-1, 1, 1, 1, 1)
        return (torch.where(is_cond > 0.5, torch.full_like(x, v_c), torch.full_like(x, v_u)),)

    cond, uncond = torch.ones(3, 4, 2), torch.zeros(1, 4, 2)
    noise = sampler.initial_noise((3, *shape), seed=5)
    for g in (1.0, 2.5):
        out = sampler.sample(model, cond, shape, steps=4, seed=5, guidance=g, uncond=uncond)
        v = v_c if g == 1.0 else v_u + g * (v_c - v_u)
        assert torch.allclose(out, noise - v, atol=1e-6)  # sigma goes 1 -> 0: x0 = noise - v


def test_same_seed_same_noise_and_clear_errors():
    assert torch.equal(sampler.initial_noise((2, 3), 4), sampler.initial_noise((2, 3), 4))
    assert not torch.equal(sampler.initial_noise((2, 3), 4), sampler.initial_noise((2, 3), 5))
    model = OracleFlow(torch.zeros(1, 1, 2, 2, 2))
    with pytest.raises(ValueError, match="uncond"):
        sampler.sample(model, torch.zeros(1, 2, 3), (1, 2, 2, 2), guidance=2.0)
    with pytest.raises(ValueError, match=r"\(B, L, D\)"):
        sampler.sample(model, torch.zeros(2, 3), (1, 2, 2, 2))
    with pytest.raises(ValueError, match="noise has shape"):
        sampler.sample(model, torch.zeros(1, 2, 3), (1, 2, 2, 2), noise=torch.zeros(1, 1, 2, 2, 3))
