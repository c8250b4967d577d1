"""vsopt.calibration.sensitivity.euler_sensitivity on a two-site toy velocity model whose answer is known at
the last step: there the final latents move by (sigma_N - sigma_{N-1}) times the perturbation of
the last site's output, which is the model's output."""
import pytest
import torch

from vsopt.backend import trace_and_rewrite
from vsopt.core.errors import ConfigError
from vsopt.calibration.sensitivity import euler_sensitivity


class Toy(torch.nn.Module):
    """v = attn2(attn1(x)): two self-attention sites, 2 heads of 4, tokens (B, N, 8); no output
    projection after attn2, so the velocity IS the last site's output."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(8, 24)
        self.b = torch.nn.Linear(8, 24)

    @staticmethod
    def _attn(x, proj):
        B, N, _ = x.shape
        q, k, v = proj(x).view(B, N, 3, 2, 4).permute(2, 0, 3, 1, 4)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, 8)

    def forward(self, x, t):
        h = self._attn(x + 0.01 * t[:, None, None], self.a)
        return self._attn(h, self.b)


def _setup(steps=3):
    model = Toy().eval()
    sigmas = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    x, inputs = torch.randn(1, 16, 8, generator=torch.Generator().manual_seed(1)), []
    with torch.no_grad():
        for i in range(steps):
            t = torch.tensor([1000.0 * float(sigmas[i])])
            inputs.append((x, t))
            x = x + float(sigmas[i + 1] - sigmas[i]) * model(x, t)
    gm, report = trace_and_rewrite(model, inputs[0])
    return model, gm, [s.site_id for s in report.sites], inputs, sigmas, x


def test_weights_at_the_last_step_are_exact_and_small_probes_are_linear():
    model, gm, sites, inputs, sigmas, final = _setup()
    assert len(sites) == 2
    noise = {}

    def probe(scale):
        def run(call):
            g = torch.Generator().manual_seed(len(call.site_id))
            d = noise.setdefault(call.site_id, torch.randn(call.out.shape, generator=g))
            return call.out + scale * d
        return run

    with torch.no_grad():
        w = euler_sensitivity(gm, model, inputs, sigmas, sites, probe(1e-3))
        w2 = euler_sensitivity(gm, model, inputs, sigmas, sites, probe(2e-3))
    assert set(w) == set(sites) and all(set(v) == {0, 1, 2} for v in w.values())
    # last site, last step: final error = dsigma * delta, site error = |delta| / |out|
    with torch.no_grad():
        out = model(*inputs[-1])
    dsig = float(sigmas[-1] - sigmas[-2])
    expected = dsig ** 2 * float(out.double().pow(2).sum()) / float(final.double().pow(2).sum())
    assert w[sites[1]][2] == pytest.approx(expected, rel=1e-3)
    for sid in sites:
        for step in range(3):
            assert w[sid][step] > 0
            assert w2[sid][step] == pytest.approx(w[sid][step], rel=0.05)


def test_sigmas_must_match_the_steps():
    model, gm, sites, inputs, sigmas, _ = _setup(steps=2)
    with pytest.raises(ConfigError, match="3 sigmas"):
        euler_sensitivity(gm, model, inputs, sigmas[:2], sites, lambda call: call.out)


def test_a_guided_batch_is_one_trajectory():
    """Classifier-free guidance: the model's batch is [x, x] (the halves told apart here by t, as by
    the text in the sampler) and v = v_u + g (v_c - v_u). At the last site and step the final latents
    move by dsigma * ((1 - g) delta_u + g delta_c): the weight is known exactly, and it is not the
    one of the halves taken as two trajectories."""
    g_scale, steps = 3.0, 3
    model = Toy().eval()
    sigmas = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    x, inputs = torch.randn(1, 16, 8, generator=torch.Generator().manual_seed(2)), []
    with torch.no_grad():
        for i in range(steps):
            t = torch.tensor([1000.0 * float(sigmas[i]), 1000.0 * float(sigmas[i]) + 50.0])  # cond, uncond
            inputs.append((torch.cat([x, x]), t))
            v_cond, v_uncond = model(torch.cat([x, x]), t).chunk(2)
            x = x + float(sigmas[i + 1] - sigmas[i]) * (v_uncond + g_scale * (v_cond - v_uncond))
    gm, report = trace_and_rewrite(model, inputs[0])
    sites = [s.site_id for s in report.sites]
    delta = torch.randn(2, 2, 16, 4, generator=torch.Generator().manual_seed(4)) * 1e-3   # the site's (B, H, N, D)

    def probe(call):
        return call.out + delta if call.site_id == sites[1] else call.out + 1e-3 * torch.ones_like(call.out)

    with torch.no_grad():
        w = euler_sensitivity(gm, model, inputs, sigmas, sites, probe, guidance=g_scale)
        out = model(*inputs[-1])
    dsig = float(sigmas[-1] - sigmas[-2])
    d_cond, d_uncond = delta.double().chunk(2)
    moved = dsig * ((1 - g_scale) * d_uncond + g_scale * d_cond)
    site_err2 = float(delta.double().pow(2).sum() / out.double().pow(2).sum())
    expected = float(moved.pow(2).sum()) / float(x.double().pow(2).sum()) / site_err2
    assert w[sites[1]][2] == pytest.approx(expected, rel=1e-3)
    assert all(w[sid][step] > 0 for sid in sites for step in range(steps))
