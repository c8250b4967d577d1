"""The kernel spec: everything a block-sparse attention kernel's code depends on, defined once.

The plan (vsopt.core.plan) names a precision with QuantMode, the launcher turns the spec into
the kernel's constexpr arguments, the cost model keys its coefficients by it, and the ONNX /
TensorRT plugins carry the same fields as node attributes. One definition, so a precision never
changes form on its way from a plan to a kernel launch.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import check

if TYPE_CHECKING:  # torch is imported where it is used: `vsopt bench --help` reads QuantMode without it
    import torch


class QuantMode(str, enum.Enum):
    """Precision of the two attention matmuls; the value is the spelling in plans and op arguments."""

    NONE = "none"  # q k^T and p v in the input dtype (bf16/fp16)
    INT8 = "int8"  # q k^T in INT8 (per-block scales, K smoothed), p v in the input dtype
    FP8 = "fp8"  # both matmuls in FP8 e4m3
    INT8_FP8 = "int8_fp8"  # q k^T in INT8, p v in FP8 (SageAttention2)
    INT8_INT8 = "int8_int8"  # q k^T in INT8, p v in INT8 (P per row and key tile, V per channel)

    @property
    def code(self) -> int:
        """The kernel's QUANT constexpr (kernels/block_sparse/kernel.py derives its QK_INT8 /
        PV_FP8 / PV_INT8 flags from it, matching qk_format and pv_format)."""
        return _CODES[self]

    @classmethod
    def parse(cls, value: "QuantMode | str", where: str = "quant") -> "QuantMode":
        """The mode named by value; a clear KernelInputError for anything else."""
        if isinstance(value, cls):
            return value
        check(value in QUANT_MODES, f"{where} must be one of {list(QUANT_MODES)}, got {value!r}")
        return cls(value)

    @property
    def pv_format(self) -> str | None:
        """The 8-bit format of P and V ("fp8": e4m3, "int8"), None when p v stays in the input
        dtype. Either 8-bit format: V per channel, stored transposed; P per row and key tile."""
        return {QuantMode.FP8: "fp8", QuantMode.INT8_FP8: "fp8", QuantMode.INT8_INT8: "int8"}.get(self)

    @property
    def pv_is_8bit(self) -> bool:
        """Whether P and V run in 8 bits (FP8 or INT8; else in the input's 16-bit dtype)."""
        return self.pv_format is not None

    @property
    def pv_is_fp8(self) -> bool:
        """Whether P and V run in FP8 e4m3 (int8_int8 runs them in INT8: pv_is_8bit)."""
        return self.pv_format == "fp8"

    @property
    def qk_format(self) -> str | None:
        """The format Q and K are quantized to ("int8" or "fp8"; kernels/quant/reference.py), None
        when q k^T stays in the input dtype."""
        return {QuantMode.NONE: None, QuantMode.FP8: "fp8"}.get(self, "int8")


_CODES = {QuantMode.NONE: 0, QuantMode.INT8: 1, QuantMode.FP8: 2, QuantMode.INT8_FP8: 3, QuantMode.INT8_INT8: 4}
QUANT_MODES = tuple(m.value for m in QuantMode)


def valid_block(block: int) -> bool:
    """The block sizes the kernels and their tables take: powers of two in [16, 256]."""
    import torch

    return isinstance(block, (int, torch.SymInt)) and 16 <= block <= 256 and block & (block - 1) == 0


@dataclass(frozen=True)
class KernelSpec:
    """One compiled form of the block-sparse attention kernel.

    head_dim: D of q/k/v; dtype: the input dtype (bfloat16/float16; float32 in the interpreter);
    quant: the precision; block_m/block_n: the table's query/key block sizes; layout: the memory
    layout the kernel reads q/k/v in ("bhnd": the op's canonical (B, H, N, D) view, any strides
    with a contiguous head dim); softcap: logit soft-cap, scores -> softcap * tanh(scores / softcap)
    before the softmax (0: none; the kernel compiles the cap in when it is > 0 and takes its value
    at run time). Hashable: the launch cache, the cost model and the plugins key by it.
    """

    head_dim: int
    dtype: torch.dtype
    quant: QuantMode = QuantMode.NONE
    block_m: int = 64
    block_n: int = 64
    layout: str = "bhnd"
    softcap: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "quant", QuantMode.parse(self.quant, "KernelSpec.quant"))
        for name in ("block_m", "block_n"):
            check(valid_block(getattr(self, name)),
                  f"KernelSpec.{name} must be a power of two in [16, 256], got {getattr(self, name)!r}")
        check(isinstance(self.head_dim, int) and self.head_dim > 0,
              f"KernelSpec.head_dim must be a positive int, got {self.head_dim!r}")
        check(isinstance(self.softcap, (int, float)) and math.isfinite(self.softcap) and self.softcap >= 0,
              f"KernelSpec.softcap must be 0 (no cap) or a positive finite number, got {self.softcap!r}")
        object.__setattr__(self, "softcap", float(self.softcap))

    @property
    def key(self) -> str:
        """The name the cost model stores this configuration's coefficients under."""
        return kernel_key(self.quant, self.head_dim, self.block_m, self.block_n)

    def attributes(self) -> dict[str, int | float | str]:
        """The spec as plugin / ONNX node attributes (ints, floats and strings)."""
        return {"head_dim": self.head_dim, "dtype": str(self.dtype).removeprefix("torch."),
                "quant": self.quant.value, "block_m": self.block_m, "block_n": self.block_n, "layout": self.layout,
                "softcap": self.softcap}


def kernel_key(quant: QuantMode | str, head_dim: int, block_m: int, block_n: int) -> str:
    """"<quant>/d<head_dim>/<block_m>x<block_n>": the cost model's key of one configuration."""
    return f"{QuantMode.parse(quant).value}/d{head_dim}/{block_m}x{block_n}"
