"""kernels/spec.py: a precision's one definition, from its spelling in a plan to the kernel's flags."""
from __future__ import annotations

import pytest
import torch

from vsopt.kernels.errors import KernelInputError
from vsopt.kernels.spec import QUANT_MODES, KernelSpec, QuantMode


def test_each_mode_names_its_formats_and_its_kernel_code():
    table = {m.value: (m.code, m.qk_format, m.pv_format, m.pv_is_8bit, m.pv_is_fp8) for m in QuantMode}
    assert table == {"none": (0, None, None, False, False), "int8": (1, "int8", None, False, False),
                     "fp8": (2, "fp8", "fp8", True, True), "int8_fp8": (3, "int8", "fp8", True, True),
                     "int8_int8": (4, "int8", "int8", True, False)}
    assert QUANT_MODES == tuple(table)
    assert QuantMode.parse("fp8") is QuantMode.FP8 and QuantMode.parse(QuantMode.INT8) is QuantMode.INT8
    with pytest.raises(KernelInputError, match="quant must be one of"):
        QuantMode.parse("int4")


def test_the_spec_is_frozen_hashable_and_parses_its_quant():
    spec = KernelSpec(128, torch.bfloat16, "int8", 128, 64)
    assert spec.quant is QuantMode.INT8 and spec == KernelSpec(128, torch.bfloat16, QuantMode.INT8, 128, 64)
    assert len({spec, KernelSpec(128, torch.bfloat16, QuantMode.INT8, 128, 64)}) == 1
    assert spec.key == "int8/d128/128x64"
    with pytest.raises(KernelInputError, match="block_n"):
        KernelSpec(128, torch.bfloat16, "none", 128, 48)
