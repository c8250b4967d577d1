"""bfloat16 in Triton's interpreter. Triton 3.8's interpreter multiplies the bit patterns of bfloat16
tl.dot operands (it stores bfloat16 as uint16 and converts only 8-bit floats before its matmul;
triton-lang/triton#11584): a kernel-free 16 x 16 tl.dot shows it, so it is the interpreter, not
vsopt's kernel (on the GPU the same bfloat16 calls pass tests/kernels/gpu_check.py). The launcher
asks the interpreter (runtime.interpreter_bf16_dot_ok) and refuses, in one line, the modes whose dots
take bfloat16 operands (none: q k^T and p v; int8: p v) instead of returning ~1e9-times-wrong output;
with an interpreter that gets it right they run and are compared with the reference."""
from __future__ import annotations

import pytest
import torch

from vsopt.kernels import runtime
from vsopt.kernels.block_mask import reference as mask_ref
from vsopt.kernels.block_sparse import launch, reference
from vsopt.kernels.errors import KernelInputError

from .helpers import block_mask, rel_l2

# bfloat16 inputs against the reference on the same (bfloat16-valued) inputs in float32: what is left
# is the output's bfloat16 rounding and, in the 8-bit P V modes, P rounded on the other side of an
# e4m3 / INT8 step (the GPU bound of these modes, tests/kernels/gpu_check.py KERNEL_BOUND).
BF16_BOUND = {"none": 1e-2, "int8": 1e-2, "fp8": 5e-2, "int8_fp8": 5e-2, "int8_int8": 5e-2}


def _dot_error(dtype) -> float:
    g = torch.Generator().manual_seed(1)
    a, b = (torch.randn(16, 16, generator=g).to(dtype) for _ in range(2))
    return rel_l2(runtime.square_dot(a, b), a.float() @ b.float())


def test_the_launcher_asks_what_a_plain_bf16_dot_gives():
    assert _dot_error(torch.float16) < 1e-6                           # the interpreter's float16 dot is right
    assert runtime.interpreter_bf16_dot_ok() == (_dot_error(torch.bfloat16) < 1e-6)


def _case(quant):
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g).to(torch.bfloat16) for _ in range(3))
    idx, cnt = mask_ref.mask_to_table(block_mask(1, 2, 3, 3, 0.5, g))
    out = lambda: launch.block_sparse_attention(q, k, v, idx, cnt, 0.25, 16, 16, quant)[0]  # noqa: E731
    ref, _ = reference.block_sparse_attention(q.float(), k.float(), v.float(), idx, cnt, 0.25, 16, 16, quant)
    return out, ref


@pytest.mark.parametrize("quant", ["none", "int8"])
def test_bf16_dots_are_refused_where_the_interpreter_gets_them_wrong(quant):
    run, ref = _case(quant)
    if runtime.interpreter_bf16_dot_ok():
        assert rel_l2(run(), ref) < BF16_BOUND[quant]
        return
    with pytest.raises(KernelInputError, match=r"interpreter .*bfloat16 operands wrongly.*float16 or float32") as e:
        run()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("quant", ["fp8", "int8_fp8", "int8_int8"])
def test_the_8_bit_p_v_modes_run_bf16_inputs(quant):
    run, ref = _case(quant)     # their dots take int8 / fp8 codes, which the interpreter converts
    out = run()
    assert out.dtype == torch.bfloat16 and rel_l2(out, ref) < BF16_BOUND[quant]
