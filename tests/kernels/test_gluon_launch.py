"""The Gluon kernel's launcher on the CPU: its validation, and the reference its GPU check compares with.

The Gluon kernel itself cannot run here (Triton's interpreter has no TMA, mbarriers, wgmma or warp
specialization); tests/kernels/gpu_check_gluon.py checks it against reference.py on a Hopper GPU, and
tests/kernels/aot_gluon.py compiles it for sm_90a with Triton 3.6 without a GPU."""
from __future__ import annotations

import math

import pytest
import torch

from vsopt.kernels.block_mask import reference as mask_ref
from vsopt.kernels.block_sparse import gluon_launch, reference
from vsopt.kernels.errors import KernelInputError

from .helpers import block_mask, rel_l2


def _inputs(N=300, D=64, Hq=4, Hkv=2, dtype=torch.bfloat16, bn=128, B=1):
    g = torch.Generator().manual_seed(N + D)
    q = torch.randn(B, Hq, N, D, generator=g).to(dtype)
    k, v = (torch.randn(B, Hkv, N, D, generator=g).to(dtype) for _ in range(2))
    idx, cnt = mask_ref.mask_to_table(block_mask(1, Hq, math.ceil(N / 128), math.ceil(N / bn), 0.5, g))
    return q, k, v, idx, cnt


def _error(monkeypatch=None, **overrides) -> str:
    q, k, v, idx, cnt = _inputs(**{k: overrides.pop(k) for k in list(overrides) if k in ("N", "D", "dtype", "bn")})
    args = dict(q=q, k=k, v=v, kv_indices=idx, kv_counts=cnt, scale=0.125, block_m=128, block_n=128)
    args.update(overrides)
    with pytest.raises(KernelInputError) as err:
        gluon_launch.validate(**args)
    return str(err.value)


@pytest.mark.parametrize("overrides, words", [
    ({"quant": "fp8"}, "only quant 'none'"),
    ({"softcap": 2.0}, "soft-capping is not implemented"),
    ({"dtype": torch.float32}, "float16 or bfloat16"),
    ({"D": 32}, "head_dim must be one of (64, 128)"),
    ({"block_m": 64}, None),            # the table no longer matches q: check_inputs names it
    ({"scale": -1.0}, "scale must be positive"),
    ({"config": gluon_launch.GluonConfig(stages=4), "D": 128}, "shared memory"),
    ({"config": (2, True, False)}, "must be a GluonConfig"),
])
def test_validation_names_the_problem(overrides, words):
    message = _error(**overrides)
    assert message.startswith("block_sparse_attention")
    if words:
        assert words in message, message


def test_128x64_tables_pass_the_table_checks():
    q, k, v, idx, cnt = _inputs(bn=64)
    with pytest.raises(KernelInputError, match="interpreter"):   # conftest runs the suite interpreted
        gluon_launch.validate(q, k, v, idx, cnt, 0.125, 128, 64)
    with pytest.raises(KernelInputError, match="table blocks must be 128 x 64 or 128"):
        gluon_launch.validate(q, k, v, *mask_ref.mask_to_table(torch.ones(1, 4, 3, 10, dtype=torch.bool)),
                              0.125, 128, 32)


def test_interpreter_and_cpu_are_refused_with_the_reason(monkeypatch):
    q, k, v, idx, cnt = _inputs()
    with pytest.raises(KernelInputError, match="cannot run in Triton's interpreter"):
        gluon_launch.block_sparse_attention_gluon(q, k, v, idx, cnt, 0.125, 128, 128)
    monkeypatch.setattr(gluon_launch, "interpreting", lambda: False)
    with pytest.raises(KernelInputError, match="needs a CUDA GPU"):
        gluon_launch.block_sparse_attention_gluon(q, k, v, idx, cnt, 0.125, 128, 128)


def test_tma_alignment_is_checked(monkeypatch):
    monkeypatch.setattr(gluon_launch, "interpreting", lambda: False)
    q, k, v, idx, cnt = _inputs()
    assert gluon_launch._tma_ok(q)
    odd = torch.empty(1, 4, 300, 64 + 1, dtype=q.dtype)[..., 1:]        # base 2 bytes off, row stride 65
    assert not gluon_launch._tma_ok(odd)
    with pytest.raises(KernelInputError, match="q must have a contiguous head dim"):
        gluon_launch.validate(odd, k, v, idx, cnt, 0.125, 128, 128)     # checked before the device


def test_configs_fit_shared_memory_where_the_check_uses_them():
    assert all(c in gluon_launch.CONFIGS for c in gluon_launch.DEFAULT_CONFIGS.values())
    assert len(set(gluon_launch.CONFIGS)) == len(gluon_launch.CONFIGS)   # no variant twice
    # 3 stages at head_dim 128 and 128-key blocks: 224 KB, the most that fits (227 KB).
    assert gluon_launch.shared_bytes(128, 128, 3) == 229376 <= 227 * 1024 < gluon_launch.shared_bytes(128, 128, 4)
    assert gluon_launch.GluonConfig(pingpong=True).launch_args()["num_warps"] == 4
    assert gluon_launch.GluonConfig(pingpong=False).launch_args()["num_warps"] == 8
    assert all(not c.ordered or (c.pingpong and c.pipeline) for c in gluon_launch.CONFIGS)


def test_flat_views_map_every_token_to_its_row():
    """The persistent kernel's 2-D views: (b, h, n) lands at row b * rb + h * rh + n, column h * ch,
    for a contiguous tensor and for a (B, N, H, D) view (the layout of a projection's output)."""
    x = torch.randn(2, 3, 5, 16)
    for view in (x, x.transpose(1, 2).contiguous().transpose(1, 2), x[:, :, ::2]):   # the last is copied
        flat, (rb, rh, ch) = gluon_launch._flat(view)
        for b, h, n in [(0, 0, 0), (1, 2, view.shape[2] - 1), (1, 0, 2)]:
            assert torch.equal(flat[b * rb + h * rh + n, h * ch:h * ch + 16], view[b, h, n])
    assert gluon_launch._flat(x.transpose(1, 2).contiguous().transpose(1, 2))[0].data_ptr() != 0


@pytest.mark.parametrize("N, D, bn, dtype", [(300, 64, 128, torch.bfloat16), (777, 128, 64, torch.float16)])
def test_reference_the_gpu_check_uses_is_masked_softmax(N, D, bn, dtype):
    """reference.block_sparse_attention at the Gluon kernel's shapes (odd N, GQA, 128 x 64/128 table,
    an empty row) equals a dense softmax over the table's token mask, computed here in float64."""
    q, k, v, idx, cnt = _inputs(N=N, D=D, Hq=4, Hkv=2, dtype=dtype, bn=bn)
    cnt = cnt.clone()
    cnt[0, 1, 0] = 0                                           # query block 0 of head 1 visits nothing
    out, lse = reference.block_sparse_attention(q.float(), k.float(), v.float(), idx, cnt, D ** -0.5, 128, bn)
    mask = reference.table_to_token_mask(idx, cnt, N, N, 128, bn)[0]
    qd, kd, vd = q.double()[0], k.double()[0].repeat_interleave(2, 0), v.double()[0].repeat_interleave(2, 0)
    s = (qd @ kd.transpose(-1, -2) * D ** -0.5).masked_fill(~mask, float("-inf"))
    want = torch.nan_to_num(torch.softmax(s, -1)) @ vd
    assert rel_l2(out[0], want) < 1e-5
    assert bool(out[0, 1, :128].eq(0).all()) and bool(torch.isinf(lse[0, 1, :128]).all())


def test_fa4_peer_gets_the_same_table(monkeypatch):
    """benchmarks/attention.py hands FlashAttention-4 vsopt's table as 'full' blocks, zero-padded to
    one column per key block and broadcast over the batch (FA4's expected shapes), no partial blocks."""
    import importlib.util
    import pathlib
    import sys

    path = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "attention.py"
    spec = importlib.util.spec_from_file_location("bench_attention", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_attention", bench)   # its dataclasses look their module up
    spec.loader.exec_module(bench)
    seen = {}

    class Tensors(tuple):
        def __new__(cls, **kw):
            seen.update(kw)
            return super().__new__(cls)

    def flash_attn_func(q, k, v, softmax_scale, block_sparse_tensors):
        seen["scale"] = softmax_scale
        return q * 2, None

    N, H, B = 300, 2, 2
    g = torch.Generator().manual_seed(0)
    idx, cnt = mask_ref.mask_to_table(block_mask(1, H, 3, 3, 0.5, g)[..., :2])   # MAXK 2 < 3 key blocks
    qt = torch.randn(B, N, H, 16)
    out = bench._fa4_block_sparse((flash_attn_func, Tensors), qt, qt, qt, idx, cnt, 0.25, N)()
    assert torch.equal(out, qt * 2) and seen["scale"] == 0.25 and seen["block_size"] == (128, 128)
    assert seen["full_block_idx"].shape == (B, H, 3, 3) and seen["full_block_cnt"].shape == (B, H, 3)
    assert torch.equal(seen["full_block_idx"][:, :, :, :2], idx.expand(B, -1, -1, -1))
    assert bool((seen["full_block_idx"][..., 2] == 0).all()) and torch.equal(seen["full_block_cnt"][1], cnt[0])
    assert not seen["mask_block_cnt"].any() and seen["mask_block_idx"].shape == (B, H, 3, 3)


def test_launcher_switch_routes_to_the_gluon_kernel_and_names_its_limits():
    from vsopt.kernels.block_sparse import launch

    q, k, v, idx, cnt = _inputs()
    with pytest.raises(KernelInputError, match="kernel must be one of"):
        launch.block_sparse_attention(q, k, v, idx, cnt, 0.125, 128, 128, kernel="cuda")
    with pytest.raises(KernelInputError, match=r"\(gluon\): only quant 'none'"):
        launch.block_sparse_attention(q, k, v, idx, cnt, 0.125, 128, 128, quant="int8", kernel="gluon")
    with pytest.raises(KernelInputError, match="tile and pv_format are Triton kernel options"):
        launch.block_sparse_attention(q, k, v, idx, cnt, 0.125, 128, 128, tile=(128, 128), kernel="gluon")
    with pytest.raises(KernelInputError, match="cannot run in Triton's interpreter"):
        launch.block_sparse_attention(q, k, v, idx, cnt, 0.125, 128, 128, kernel="gluon")
