"""Logit soft-capping on the attention scores: softmax(cap * tanh(scores / cap)) @ v.

Gemma-style models and several video encoders bound the scores before the softmax. The softmax
rule (softmax.py) follows the score path through one aten.tanh with this module: the scalar
factors before the tanh (the softmax scale and 1 / cap, in any order and spelling: `s / cap`,
`s * (1 / cap)`, a scale folded into q or k) multiply B, those after it multiply A, so the scores
are A * tanh(B * q k^T). vsopt.attention's (scale, softcap) compute
softcap * tanh(scale * q k^T / softcap), hence softcap = A and scale = A * B.

Before (ATen after make_fx):
    bmm -> _unsafe_view -> mul(0.25) -> div(30.0) -> tanh -> mul(30.0) -> _softmax(-1) -> ... bmm
After:
    vsopt.attention(q4, k4, v4, None, 0.25, False, 30.0)

What is not a soft cap, and stays the reason a candidate is left alone: a mask added before the
tanh (tanh(-inf) = -1 would un-mask it), more than one tanh, a non-positive factor on either side.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

aten = torch.ops.aten

TANH_OPS = {aten.tanh.default}


def is_tanh(node: torch.fx.Node) -> bool:
    """Whether node is the tanh of a soft cap (one floating-point input, nothing else)."""
    return node.op == "call_function" and node.target in TANH_OPS and len(node.args) == 1 and not node.kwargs


@dataclass(frozen=True)
class Softcap:
    """The cap as vsopt.attention takes it: scores -> cap * tanh(scale * q k^T / cap)."""

    cap: float
    scale: float


def softcap_of(inner: float, outer: float) -> Softcap | str:
    """The Softcap of outer * tanh(inner * q k^T), or why that is not one (a reason string)."""
    if not outer > 0:
        return f"the factor {outer:g} after the tanh is not a positive soft cap"
    if not inner > 0:
        return f"the scale {inner:g} before the tanh is not positive"
    return Softcap(cap=float(outer), scale=float(inner * outer))
