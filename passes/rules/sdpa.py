"""SdpaRule: F.scaled_dot_product_attention in each of its ATen spellings.

The op itself appears in torch.export's graphs; under torch.compile it is lowered to the flash /
efficient / cuDNN / CPU-flash op of the backend that would run it. One rule instance per op
(the constructor flag), its argument names read from the op's schema.

Before (ATen after make_fx, CPU):
    _scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=s) -> getitem(0)
After:
    vsopt.attention(q, k, v, None, s, False)
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx

from vsopt.core import ops as vsopt_ops  # noqa: F401  (registers torch.ops.vsopt.*)
from vsopt.core.ir import Layout

from ..graph_edit import emit
from ..data_sizes import is_data_dependent, static_part
from ..layout_trace import TraceError, shape_of
from .match import PASS_NAME, AttentionMatch, AttentionRule, MatchResult, normalize_args, users

aten = torch.ops.aten

SDPA_OPS = {
    # op name -> (mask argument name or None, does it return a tuple)
    "scaled_dot_product_attention": ("attn_mask", False),
    "_scaled_dot_product_flash_attention_for_cpu": ("attn_mask", True),
    "_scaled_dot_product_flash_attention": (None, True),
    "_scaled_dot_product_efficient_attention": ("attn_bias", True),
    "_scaled_dot_product_cudnn_attention": ("attn_bias", True),
}


@dataclass(frozen=True)
class SdpaEmit:
    """What SdpaRule.rewrite emits: vsopt.attention on the SDPA op's own operands, (B, H, N, D)."""

    q: torch.fx.Node
    k: torch.fx.Node
    v: torch.fx.Node
    mask: torch.fx.Node | None
    scale: float
    is_causal: bool


def _bnhd_or_bhnd(q: torch.fx.Node) -> Layout:
    """BNHD when the model transposed a (B, N, H, D) tensor into SDPA's (B, H, N, D)."""
    if q.op == "call_function":
        if q.target is aten.transpose.int and sorted(d % 4 for d in q.args[1:3]) == [1, 2]:
            return Layout.BNHD
        if q.target is aten.permute.default and list(q.args[1]) == [0, 2, 1, 3]:
            return Layout.BNHD
    return Layout.BHND


def _with_static_tokens(x: torch.fx.Node) -> tuple[int, ...] | None:
    """(B, H, N, D) with N the static part of a data-dependent token count (passes/data_sizes.py:
    `static + u0`, the data-dependent tokens after the static ones), every other size an int; None
    otherwise. The rewrite emits vsopt.attention on the op's own operands (no reshape with fixed
    sizes), so it stays exact whatever the length; lower_plan splits such a site only where the
    grid inference proved the data-dependent tokens come after the static ones."""
    val = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
    if not isinstance(val, torch.Tensor) or val.dim() != 4:
        return None
    sizes = [static_part(s) for s in val.shape]
    if any(s is None for s in sizes) or not is_data_dependent(val.shape[2]) or sizes[2] == 0:
        return None
    if any(is_data_dependent(val.shape[d]) for d in (0, 1, 3)):
        return None
    return tuple(sizes)


class SdpaRule(AttentionRule[SdpaEmit]):
    """torch SDPA in one of its ATen spellings (`op_name`, a key of SDPA_OPS)."""

    name = "sdpa"

    def __init__(self, op_name: str):
        self.op = getattr(aten, op_name).default
        self.mask_arg, self.returns_tuple = SDPA_OPS[op_name]

    def __repr__(self) -> str:
        return f"SdpaRule({self.op.__name__.split('.')[0]!r})"

    def pattern(self, node: torch.fx.Node) -> bool:
        return node.op == "call_function" and node.target is self.op

    def check(self, node: torch.fx.Node) -> MatchResult:
        fail = lambda reason: MatchResult.fail(node, self.name, reason)  # noqa: E731
        a = normalize_args(node)
        q, k, v = a["query"], a["key"], a["value"]
        if a.get("dropout_p") not in (0, 0.0, None):
            return fail(f"attention dropout p={a['dropout_p']} is active (training); only p=0 is exact")
        output = node
        if self.returns_tuple:
            outs = [u for u in users(node) if u.target is operator.getitem and u.args[1] == 0]
            if len(outs) != 1 or len(users(node)) != 1:
                return fail("the SDPA op's auxiliary outputs (logsumexp, rng state) are used")
            output = outs[0]
        try:
            qs, ks, vs = shape_of(q), shape_of(k), shape_of(v)
        except TraceError as e:
            # a sequence of data-dependent length (text cut by a mask): the site is its static part
            qs, ks, vs = _with_static_tokens(q), _with_static_tokens(k), _with_static_tokens(v)
            same = qs is not None and str(q.meta["val"].shape[2]) == str(k.meta["val"].shape[2])
            if not same or ks is None or vs is None:
                return fail(str(e) if qs is None or ks is None or vs is None else
                            f"{e}; a data-dependent length is supported for joint self-attention only (the "
                            f"same length for queries and keys), here q {q.meta['val'].shape[2]}, "
                            f"k {k.meta['val'].shape[2]}")
        if len(qs) != 4 or len(ks) != 4 or len(vs) != 4:
            return fail(f"q/k/v must be 4-D (B, H, N, D); got {qs}, {ks}, {vs}")
        if qs[1] % ks[1] or ks[1] != vs[1]:
            return fail(f"query heads {qs[1]} are not a multiple of key/value heads {ks[1]}/{vs[1]}")
        if qs[0] != ks[0] or ks[0] != vs[0]:
            return fail(f"batch sizes differ: q {qs[0]}, k {ks[0]}, v {vs[0]}")
        mask = a.get(self.mask_arg) if self.mask_arg else None
        scale = a.get("scale")
        scale = 1.0 / math.sqrt(qs[-1]) if scale is None else float(scale)
        is_causal = bool(a.get("is_causal"))
        return self.matched(
            node, SdpaEmit(q, k, v, mask, scale, is_causal), anchor=node, output=output, layout=_bnhd_or_bhnd(q),
            batch=qs[0], heads=qs[1], kv_heads=ks[1], head_dim=qs[-1], value_dim=vs[-1], q_len=qs[2], kv_len=ks[2],
            dtype=q.meta["val"].dtype, scale=scale, has_mask=mask is not None, is_causal=is_causal,
            nodes=tuple(dict.fromkeys((node.name, output.name))), q_token_source=(q, (2,)))

    def rewrite(self, graph: torch.fx.Graph, match: AttentionMatch[SdpaEmit]) -> torch.fx.Node:
        e = match.emit
        return emit(graph, torch.ops.vsopt.attention.default, (e.q, e.k, e.v, e.mask, e.scale, e.is_causal),
                    pass_name=PASS_NAME, replaces=(match.anchor.name,), meta_from=match.anchor)
