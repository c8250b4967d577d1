"""The attention probe sees exactly the q/k that Wan's attention uses, and changes nothing."""
import math

import torch

from vsopt.core.metrics import block_attention_mass, topk_block_share
from vsopt.models import data, model as model_lib, structure, train


def _tiny_model_and_inputs(seed=0):
    cfg = model_lib.ReferenceConfig(**train.TINY)
    ref = model_lib.build(cfg, seed=seed).eval()
    x, tokens = data.make_batch(2, seed=seed, frames=cfg.frames, height=cfg.height, width=cfg.width)
    return ref, x, torch.tensor([300.0, 700.0]), ref.encode(tokens)


def test_probe_recomputes_the_q_k_that_reach_sdpa(monkeypatch):
    ref, x, t, cond = _tiny_model_and_inputs()
    seen = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, **kwargs):
        seen.append((query.detach().clone(), key.detach().clone()))
        return real_sdpa(query, key, value, **kwargs)

    recomputed = []
    original = [b.attn1.processor for b in ref.transformer.blocks]

    def grab(inner):
        def call(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, **kw):
            recomputed.append(structure.AttentionProbe.query_key(attn, hidden_states, rotary_emb))
            return inner(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kw)
        return call

    for b, p in zip(ref.transformer.blocks, original):
        b.attn1.processor = grab(p)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        ref.transformer(x, t, cond, return_dict=False)
    self_attn = [qk for qk in seen if qk[1].shape[2] == qk[0].shape[2]]  # attn1 (attn2 has 16 keys)
    assert len(self_attn) == len(recomputed) == ref.config.num_layers
    for (q, k), (q2, k2) in zip(self_attn, recomputed):
        assert torch.allclose(q, q2, atol=1e-6) and torch.allclose(k, k2, atol=1e-6)


def test_probes_leave_outputs_unchanged_and_record_valid_shares():
    ref, x, t, cond = _tiny_model_and_inputs(seed=1)
    with torch.no_grad():
        before = ref.transformer(x, t, cond, return_dict=False)[0]
        shares = {}
        probes = structure.install_probes(ref.transformer, shares)
        for p in probes:
            p.armed, p.block = True, 16  # 64 tokens: 4 x 4 blocks of 16
        after = ref.transformer(x, t, cond, return_dict=False)[0]
    assert torch.equal(before, after)
    q, k = structure.AttentionProbe.query_key(ref.transformer.blocks[0].attn1, torch.randn(1, 64, 64))
    assert q.shape == (1, 2, 64, 32)
    got = shares[0][0]  # (H, 2) for layer 0
    assert got.shape == (ref.config.num_attention_heads, 2)
    # shares lie between the uniform value and 1, and top-20% holds at least top-10%
    assert (got[:, 0] >= 0.1 - 1e-6).all() and (got[:, 1] >= got[:, 0]).all() and (got <= 1 + 1e-6).all()


def test_block_share_of_a_concentrated_map_is_high():
    # the helper the probe relies on, on a map that is exactly block-diagonal: top-25% holds it all
    H, N, D = 2, 64, 8
    groups = torch.arange(N) // 16
    basis = torch.eye(D)[groups % D]  # 4 groups -> 4 orthogonal directions
    q = 30.0 * basis.expand(1, H, N, D)
    mass = block_attention_mass(q, basis.expand(1, H, N, D), 1.0, 16, 16)
    share = topk_block_share(mass, 0.25)
    assert torch.allclose(share, torch.ones_like(share), atol=1e-6)
    assert math.isclose(float(topk_block_share(torch.ones(1, 1, 4, 4) / 4, 0.25)[0, 0]), 0.25, rel_tol=1e-6)
