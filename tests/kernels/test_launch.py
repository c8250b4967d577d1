"""The block-sparse launcher as a caller sees it: one validation per call, one autotuner (and its
cache) across direct calls, the Triton object itself launched eagerly and wrap_triton when traced."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import vsopt.core.ops as ops
from vsopt.kernels import runtime
from vsopt.kernels.block_mask import reference as mask_ref
from vsopt.kernels.block_sparse import inputs, launch, reference
from vsopt.kernels.spec import KernelSpec, QuantMode

from .helpers import block_mask, rel_l2


def _case(seed=0, N=40, D=16):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, N, D, generator=g) for _ in range(3))
    idx, cnt = mask_ref.mask_to_table(block_mask(1, 2, 3, 3, 0.5, g))
    return q, k, v, idx, cnt


def _count_calls(monkeypatch, owner, name) -> list:
    calls, real = [], getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(args[0] if args else None)
        return real(*args, **kwargs)
    monkeypatch.setattr(owner, name, counted)
    return calls


def test_direct_calls_reuse_the_autotuner_and_its_cache(monkeypatch):
    """Eager direct calls launch launch._tuned_kernel itself (not through wrap_triton, whose eager
    path rebuilt the pruned autotuner, with an empty cache, on every call): the configurations are
    pruned once per key and the cache entry serves the later calls."""
    wrapped = _count_calls(monkeypatch, torch.library, "wrap_triton")
    prunes = _count_calls(monkeypatch, launch._tuned_kernel, "early_config_prune")
    monkeypatch.setattr(launch._tuned_kernel, "cache", {})
    q, k, v, idx, cnt = _case()
    for quant in ("none", "none", "int8", "int8"):
        launch.block_sparse_attention(q, k, v, idx, cnt, 0.25, 16, 16, quant)
    assert wrapped == []                      # neither the attention kernel nor the quantization kernels
    assert len(prunes) == 2                   # one per key (quant mode): the second call of each hits
    assert len(launch._tuned_kernel.cache) == 2


# Outside the interpreter (as on a GPU) with Autotuner.run replaced by a recorder: which autotuner
# object each direct call launches. Through wrap_triton's eager path it was a new one per call.
_GPU_LIKE_LAUNCHES = textwrap.dedent("""
    import torch
    from triton.runtime import autotuner
    from vsopt.kernels.block_mask import reference as mask_ref
    from vsopt.kernels.block_sparse import launch

    launched = []
    autotuner.Autotuner.run = lambda self, *args, **kwargs: launched.append(self)
    q = k = v = torch.randn(1, 2, 64, 64)
    idx, cnt = mask_ref.mask_to_table(torch.ones(1, 2, 4, 4, dtype=torch.bool))
    for _ in range(3):
        launch.block_sparse_attention(q, k, v, idx, cnt, 0.125, 16, 16)
    assert len(launched) == 3 and all(t is launch._tuned_kernel for t in launched), launched
""")


def test_direct_calls_outside_the_interpreter_launch_the_one_autotuner():
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _GPU_LIKE_LAUNCHES], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_traced_launches_go_through_wrap_triton(monkeypatch):
    wrapped = _count_calls(monkeypatch, torch.library, "wrap_triton")
    q = torch.zeros(1, 2, 8, 16)
    assert runtime.plain_eager(q)
    assert not runtime.plain_eager(torch.nn.Parameter(q))           # a subclass: let torch dispatch it
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(q)
        assert not runtime.plain_eager(fake)
    with FakeTensorMode():
        assert not runtime.plain_eager(q)                           # a mode is active: tracing
    runtime.triton_launcher(launch._tuned_kernel, eager=False)
    assert runtime.triton_launcher(launch._tuned_kernel, eager=True) is launch._tuned_kernel
    assert wrapped == [launch._tuned_kernel]


def test_inputs_are_validated_once_per_call(monkeypatch):
    """The op validates and calls run_checked; a direct call validates itself."""
    checks = _count_calls(monkeypatch, inputs, "check_inputs")
    monkeypatch.setattr(launch, "check_inputs", inputs.check_inputs)     # the launcher's own binding, counted
    monkeypatch.setattr(ops, "_bsa_fallback_reason", lambda q: None)     # the op runs the kernel on the CPU
    kernel_runs = _count_calls(monkeypatch, launch, "run_checked")
    q, k, v, idx, cnt = _case(1)
    out = torch.ops.vsopt.block_sparse_attention(q, k, v, idx, cnt, 0.25, 16, 16, "none")
    assert len(checks) == 1 and len(kernel_runs) == 1
    ref, _ = reference.block_sparse_attention(q, k, v, idx, cnt, 0.25, 16, 16)
    assert rel_l2(out, ref) < 1e-5
    launch.block_sparse_attention(q, k, v, idx, cnt, 0.25, 16, 16)
    assert len(checks) == 2 and len(kernel_runs) == 2


def test_the_spec_fixes_the_constexprs_and_the_tiles():
    spec = KernelSpec(64, torch.bfloat16, QuantMode.INT8_FP8, 128, 64)
    constexprs = launch.spec_constexprs(spec)
    assert constexprs == {"HEAD_DIM": 64, "TABLE_BLOCK_M": 128, "TABLE_BLOCK_N": 64, "QUANT": 3, "SOFTCAP": False}
    assert list(launch._tuned_kernel.keys[:5]) == list(launch.SPEC_CONSTEXPRS)
    out = torch.empty(0, dtype=torch.bfloat16)
    assert launch.spec_of_launch({**constexprs, "Out": out, "softcap_log2": 0.0}) == spec
    capped = KernelSpec(64, torch.bfloat16, QuantMode.INT8_FP8, 128, 64, softcap=30.0)
    assert launch.spec_constexprs(capped)["SOFTCAP"] is True and capped.attributes()["softcap"] == 30.0
    got = launch.spec_of_launch({**launch.spec_constexprs(capped), "Out": out, "softcap_log2": 30.0 * launch.LOG2E})
    assert got.softcap == pytest.approx(30.0) and got.quant is QuantMode.INT8_FP8
    for tile in launch.candidate_tiles(spec, tma_ok=True):
        assert spec.block_m % tile.block_m == 0 and spec.block_n % tile.block_n == 0
