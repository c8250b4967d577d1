"""torch.ops.vsopt.attention: exact, its output layout is the fake's (q's memory layout), and it is
differentiable as soon as it is defined."""
import subprocess
import sys
import textwrap

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import vsopt.core  # noqa: F401  (registers torch.ops.vsopt.*)


def _qkv(dv: int, bnhd: bool):
    g = torch.Generator().manual_seed(dv)
    q = torch.randn(2, 11, 4, 16, generator=g).transpose(1, 2) if bnhd else torch.randn(2, 4, 11, 16, generator=g)
    k = torch.randn(2, 2, 7, 16, generator=g)          # GQA: 4 query heads on 2 kv heads
    v = torch.randn(2, 2, 7, dv, generator=g)
    return q, k, v


@pytest.mark.parametrize("bnhd", [True, False])
@pytest.mark.parametrize("dv", [16, 8])
def test_attention_matches_sdpa_in_the_fakes_layout(dv, bnhd):
    q, k, v = _qkv(dv, bnhd)
    out = torch.ops.vsopt.attention(q, k, v, None, 0.3, False)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double().repeat_interleave(2, 1), v.double().repeat_interleave(2, 1), scale=0.3)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    with FakeTensorMode() as mode:
        fake = torch.ops.vsopt.attention(*(mode.from_tensor(x) for x in (q, k, v)), None, 0.3, False)
    assert out.stride() == fake.stride()
    if dv == 16:
        assert out.stride() == torch.empty_like(q).stride()   # a (B, N, H, D) view stays one


_GRAD_AFTER_IMPORTING_THE_OP = textwrap.dedent("""
    import sys
    import torch
    import vsopt.core.ops  # noqa: F401  (nothing else of vsopt: the op carries its autograd)

    assert not any(name.startswith(("vsopt.passes", "passes")) for name in sys.modules)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 5, 8, generator=g, requires_grad=True) for h in (4, 2, 2))
    torch.ops.vsopt.attention(q, k, v, None, 0.3, False).sum().backward()
    ref = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    torch.nn.functional.scaled_dot_product_attention(
        ref[0], ref[1].repeat_interleave(2, 1), ref[2].repeat_interleave(2, 1), scale=0.3).sum().backward()
    for got, want in zip((q, k, v), ref):
        torch.testing.assert_close(got.grad, want.grad)
""")


def test_the_op_has_autograd_right_after_importing_it():
    """A fresh interpreter: `import vsopt.core.ops` alone makes torch.ops.vsopt.attention differentiable."""
    done = subprocess.run([sys.executable, "-c", _GRAD_AFTER_IMPORTING_THE_OP], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
