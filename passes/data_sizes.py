"""Sizes that come from the data (issue 14, class 1): a helper of the rules and the token dataflow.

Under Dynamo's capture of data-dependent shapes (torch._dynamo.config.capture_dynamic_output_shape_ops
for nonzero, capture_scalar_outputs for .item()), a model that cuts its text to the unpadded tokens
(diffusers Mochi: nonzero of the mask, index, cat after the video) has a joint sequence of length
`static + u0`, u0 an unbacked symbol. Such a site is described by its static part (the video, and
any static tokens before it): q_len is the static count, the grid covers it, and the data-dependent
tokens are text after it (lower_plan's contract for the split, vsopt.core.joint).

Nothing here guards on a data-dependent value (no comparison that would need one): sizes are
split into their static constant and the rest only when the rest is made of unbacked symbols alone.
"""
from __future__ import annotations

import torch
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols, is_concrete_int


def static_part(size) -> int | None:
    """For an int, itself; for a size `c + e` whose expression e holds unbacked symbols only (a
    length from nonzero or .item()), the constant c >= 0; None otherwise (a backed symbol of
    dynamic shapes, a product with one, a non-linear expression)."""
    if isinstance(size, int):
        return size
    if is_concrete_int(size):
        return int(size)
    if not isinstance(size, torch.SymInt) or not free_unbacked_symbols(size):
        return None
    expr = size.node.expr
    const, rest = expr.as_coeff_Add()
    if not rest.free_symbols or rest.free_symbols != set(free_unbacked_symbols(size)):
        return None
    if not const.is_Integer or int(const) < 0:
        return None
    # the rest must be a sum of unbacked symbols with positive integer coefficients (it is >= 0)
    for term in rest.as_ordered_terms():
        coeff, sym = term.as_coeff_Mul()
        if not (sym.is_Symbol and coeff.is_Integer and int(coeff) > 0):
            return None
    return int(const)


def is_data_dependent(size) -> bool:
    """Whether a size is a static part plus unbacked symbols (static_part is not the size)."""
    return not isinstance(size, int) and not is_concrete_int(size) and static_part(size) is not None


def describe(size) -> str:
    """A size for a message: '32 + u0'."""
    return str(size)


_KEEP_TOKENS = {torch.ops.aten.clone.default, torch.ops.aten.contiguous.default, torch.ops.aten.alias.default,
                torch.ops.aten._to_copy.default, torch.ops.aten.detach.default}


def data_tokens_last(node, dim: int) -> bool:
    """Whether axis `dim` of `node` is a cat whose data-dependent inputs all come after its static
    ones (so the static tokens have static positions): the structural proof a user's grid needs on a
    site of data-dependent length (the token dataflow proves it for an inferred grid)."""
    while getattr(node, "op", None) == "call_function" and node.target in _KEEP_TOKENS:
        node = node.args[0]
    if getattr(node, "op", None) != "call_function" or node.target is not torch.ops.aten.cat.default:
        return False
    val = node.meta.get("val")
    d = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if not isinstance(val, torch.Tensor) or d % val.dim() != dim % val.dim():
        return False
    sizes = [x.meta["val"].shape[dim] for x in node.args[0]]
    data = [is_data_dependent(s) for s in sizes]
    static = [not f and is_concrete_int(s) for f, s in zip(data, sizes)]
    first = data.index(True) if True in data else len(data)
    return first < len(data) and all(static[:first]) and all(data[first:])


CAPTURE_CONFIG = "torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True, capture_scalar_outputs=True)"


def dynamo_left_out_data_dependent_code() -> str | None:
    """A note when Dynamo has, in this process, left code out of its graphs at an operator whose output
    shape (or a scalar) depends on the data: a graph break there, or a whole frame run eagerly (a break
    inside a loop skips the frame: diffusers Mochi's attention processor, whose joint attention is then
    in no graph and stays dense). None otherwise. Reads Dynamo's counters only; a backend cannot switch
    the config that would trace it (Dynamo reads it before the backend sees a graph)."""
    from torch._dynamo.utils import counters

    reasons = [r for r in counters.get("unimplemented", {}) if "Dynamic shape operator" in r
               or "capture_scalar_outputs" in r or "Data-dependent" in r]
    if not reasons:
        return None
    skipped = sorted({line.split("frame skipped:", 1)[1].strip() for r in reasons for line in r.splitlines()
                      if "frame skipped:" in line})
    where = f"frames run eagerly: {'; '.join(skipped)}" if skipped else "a graph break there"
    return ("Dynamo left code with data-dependent shapes (nonzero, .item()) out of its graphs "
            f"({where}); any attention there is in no graph and stays dense. Compile under {CAPTURE_CONFIG} "
            "to trace it")
