"""Whether a softmax is an attention at all (a helper of SoftmaxAttentionRule), decided before any
of the rule's own checks, so that only real attentions become candidates (SkippedSite; strict
mode raises on them) and every other softmax is ignored.

An attention, here, has the shape

    scores = A @ B^T   a batched product of two per-sample token tensors (q and k),
                       reaching the softmax through ops that keep the scores' size
                       (scale, mask, bias, casts, reshapes, soft-capping, ...)
    p = softmax(scores)
    out = p @ V        p (through casts, dropout, reshapes, fills, a head mask) is the operand
                       of a second product, contracted over the softmax axis

Not attention, whatever the rule would say about it:
- a softmax whose input does not come from such a product (a classifier head fed by a pooled
  attention output: mean -> linear -> softmax; the product behind the pooling does not count,
  because the pooling changes the size of the values);
- the product of the tokens with a weight shared by every sample (x @ W: a router or a per-token
  classifier): its columns are the weight's features, not the sample's key tokens;
- probabilities that are never multiplied with values (a softmax thresholded into a keep mask,
  a softmax returned as class probabilities).

Reads only shapes (node.meta["val"]); changes nothing.
"""
from __future__ import annotations

import operator
from collections import deque

import torch
import torch.fx

from ..layout_trace import ORDER_OPS, TraceError, shape_of
from .operands import operands

aten = torch.ops.aten

PRODUCT_OPS = {aten.bmm.default, aten.baddbmm.default, aten.matmul.default, aten.einsum.default}
VALUE_PRODUCT_OPS = PRODUCT_OPS | {aten.mm.default}
# ops the probabilities may go through on their way to the value product
PROB_OPS = ORDER_OPS | {aten._to_copy.default, aten.to.dtype, aten.dropout.default, aten.native_dropout.default,
                        operator.getitem, aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.where.self,
                        aten.where.ScalarOther, aten.where.ScalarSelf, aten.mul.Tensor, aten.mul.Scalar,
                        aten.div.Tensor, aten.div.Scalar, aten.nan_to_num.default}
MAX_STEPS = 8  # ops between the product and the softmax, or between the softmax and the value product


def _val(n) -> torch.Tensor | None:
    v = n.meta.get("val") if isinstance(n, torch.fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _numel(n) -> str | None:
    """n's element count, as text: symbolic sizes (dynamic shapes) compare by their expression."""
    v = _val(n)
    return None if v is None else str(v.numel())


def scores_product(x: torch.fx.Node) -> torch.fx.Node | None:
    """The product whose values become the softmax input `x`: searched back from x through
    floating-point inputs of x's size (elementwise ops and reshapes of the scores; a mask or bias
    of the scores' size is searched too, the nearest product wins), at most MAX_STEPS ops."""
    size = _numel(x)
    if size is None:
        return None
    seen, todo = {x}, deque([(x, 0)])
    while todo:
        n, depth = todo.popleft()
        if n.op != "call_function":
            continue
        if n.target in PRODUCT_OPS:
            return n
        if depth == MAX_STEPS:
            continue
        for a in n.all_input_nodes:
            v = _val(a)
            if a not in seen and v is not None and v.is_floating_point() and _numel(a) == size:
                seen.add(a)
                todo.append((a, depth + 1))
    return None


def _keys_are_a_weight(product: torch.fx.Node) -> bool:
    """Whether the product's second operand (the keys) is the same for every sample while the
    first one is not: a weight (x @ W), not the sample's key tokens. Unknown layouts: False."""
    got = operands(product)
    if isinstance(got, str):
        return False
    oq, ok_ = got[0], got[1]
    q_batch = [a for a in oq.batch if not a.is_broadcast and a.size > 1]
    if q_batch and all(a.is_broadcast for a in ok_.batch):
        return True
    try:  # batch 1: no batch atoms on either side, tell a weight by its rank
        return len(shape_of(ok_.traced.source)) <= 2 < len(shape_of(oq.traced.source))
    except TraceError:
        return False


def _value_product(sm: torch.fx.Node, keys: str) -> torch.fx.Node | None:
    """The product that contracts the probabilities (sm's values, through PROB_OPS) over an axis of
    `keys` elements (as text, see _numel), at most MAX_STEPS ops after the softmax; None if there is none."""
    seen, todo = {sm}, deque([(sm, 0)])
    while todo:
        n, depth = todo.popleft()
        for u in n.users:
            if u in seen or u.op != "call_function":
                continue
            seen.add(u)
            if u.target in VALUE_PRODUCT_OPS:
                if u.target is aten.einsum.default:
                    if n in u.args[1]:
                        return u
                    continue
                first = u.args[1] if u.target is aten.baddbmm.default else u.args[0]
                shape = _val(n).shape if _val(n) is not None else ()
                if first is n and shape and str(shape[-1]) == keys:
                    return u
                continue
            v = _val(u)
            if depth + 1 < MAX_STEPS and u.target in PROB_OPS and (v is None or v.is_floating_point()):
                todo.append((u, depth + 1))  # a tuple (native_dropout) has no tensor val: follow it
    return None


def not_attention(sm: torch.fx.Node) -> str | None:
    """Why the softmax `sm` is not an attention (module docstring), or None when it has the shape
    of one (the rule then decides whether it can be rewritten)."""
    x = sm.args[0]
    product = scores_product(x) if isinstance(x, torch.fx.Node) else None
    if product is None:
        return "softmax input does not come from a matmul of two token tensors"
    if _keys_are_a_weight(product):
        return (f"softmax over {product.name}, a product of the tokens with a weight shared by every sample "
                "(not queries with keys)")
    shape = _val(x).shape if _val(x) is not None else ()
    dim = sm.args[1] if len(sm.args) > 1 else sm.kwargs.get("dim", -1)
    keys = str(shape[dim % len(shape)]) if shape else "1"
    if _value_product(sm, keys) is None:
        users = ", ".join(f"{u.name} ({u.target})" for u in sm.users) or "nothing"
        return f"the softmax output is not multiplied with values (it goes to {users})"
    return None
