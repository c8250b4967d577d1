"""The token dataflow (a helper of passes/infer_grid.py, not a pass): which tokens of a token axis
are which video, at every node reached from a patch embedding (passes/patch_embeddings.py finds
where tokens start; passes/token_state.py defines what a state is).

A forward dataflow over the whole graph (token_states): every node reached from a patch embedding,
or from a placeholder seeded with the tokens an earlier graph carried into it (carried_tokens.py),
gets a TokenState, the axis holding the tokens and what they are, a tuple of segments (Video with
its grid, or Other: tokens of no known grid). A cat along that axis concatenates the segments of
its inputs (inputs from no patch embedding are Other; inputs of a data-dependent count, text cut by
a mask, only after every other: TokenState.data_after); a slice cuts them; elementwise ops,
linears, norms, stacks, reshapes that keep the axis and attention itself keep them; where two
inputs disagree, or the axis is split, reduced or shuffled (roll, flip, gather along it), the
state is dropped. Every path from every patch embedding is followed, so a side branch (a CLS token
sliced off and pooled) cannot hide a concatenation. A reshape that moves a video's outer axes into
another axis (the batch) leaves the inner ones, the folded axes 1 ('(b h w) f': F x 1 x 1). The
frame index of a per-frame Conv2d video, in its batch axis, is followed as a second state
(States.frames, passes/frame_index.py): an attention over it gets F x 1 x 1, and next to the
frame's H x W tokens on one axis it joins them into the whole video.
The grid of a site is then read off the state of its query's token source (infer_grid.py).
"""
from __future__ import annotations

import math
import operator
from dataclasses import replace

import torch
import torch.fx

from .data_sizes import is_data_dependent
from .frame_index import frame_start, joined
from .layout_trace import TraceError, einsum_terms, shape_of
from .patch_embeddings import CONV_OPS, PRODUCTS, RESHAPE_OPS, patch_embeddings
from .token_state import Other, Several, TokenState, Video, cut

aten = torch.ops.aten

SAME_OPS = {aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default,
            aten._to_copy.default, aten.to.dtype, aten.lift_fresh_copy.default}
SHUFFLES = {aten.roll.default, aten.flip.default, aten.sort.default, aten.topk.default, aten.index.Tensor,
            aten._unsafe_index.Tensor, aten.scatter.src, aten.scatter.value}
ALONG_DIM = {aten.index_select.default: 1, aten.gather.default: 1}  # op -> position of its dim argument
REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default, aten.var.correction,
              aten.std.correction}
SDPA_PREFIX = "_scaled_dot_product_"
# norms that return a tuple, with their number of statistics outputs: on CUDA, torch >= 2.11 keeps
# RMSNorm fused as _fused_rms_norm (on the CPU it decomposes), so both forms must be followed
NORMS = {aten.native_layer_norm.default: 2, aten._fused_rms_norm.default: 1}
_c10d = getattr(torch.ops, "_c10d_functional", None)
GATHER_OPS = {getattr(_c10d, n).default for n in ("all_to_all_single", "all_gather_into_tensor")
              if _c10d is not None and hasattr(_c10d, n)}
WAIT_OPS = {_c10d.wait_tensor.default} if _c10d is not None and hasattr(_c10d, "wait_tensor") else set()


# ----------------------------------------------------------------------------- the dataflow


def _shape(n) -> tuple[int, ...] | None:
    try:
        return shape_of(n)
    except TraceError:
        return None


def _reshaped(st: TokenState, shape_in, shape_out) -> TokenState | None:
    """The state after a row-major reshape: the output axis whose flat strides hold the tokens.
    After a collective (st.gathered), merging the rank axis into the shard's tokens as their outer
    index (every rank's shard in rank order) gives back the whole sequence. A reshape that splits
    one video's tokens, the inner part (its last one or two axes in token order) on an axis of its
    own and the outer part moved elsewhere (into the batch: '(b h w) t' of divided space-time
    attention), leaves on that axis a video whose outer axes are 1 (F x 1 x 1 for its frames)."""
    s = math.prod(shape_in[st.dim + 1:])
    tok_stride, tok_span = st.inner * s, st.total * st.inner * s
    for j, size in enumerate(shape_out):
        stride = math.prod(shape_out[j + 1:])
        if tok_stride % stride == 0 and (stride * size) % tok_span == 0 and size > 0:
            outer, inner = (stride * size) // tok_span, tok_stride // stride
            w = st.whole
            if st.gathered and w is not None and st.outer == 1 and outer * st.total == w.total:
                return TokenState(w.segments, j, 1, inner)
            return replace(st, dim=j, outer=outer, inner=inner)
    return _folded(st, s, shape_out)


def _folded(st: TokenState, s: int, shape_out) -> TokenState | None:
    """The inner axes of one video split off onto an axis of their own (_reshaped), or None."""
    if len(st.segments) != 1 or not isinstance(st.segments[0], Video) or st.inner != 1:
        return None
    v = st.segments[0]
    dims = {"f": v.frames, "h": v.height, "w": v.width}
    for j, size in enumerate(shape_out):
        if math.prod(shape_out[j + 1:]) != s or size <= 1 or v.size % size:
            continue  # not an axis whose index steps through the tokens one by one
        for keep in (v.axes[2:], v.axes[1:]):  # the last axis, or the last two, in token order
            if math.prod(dims[a] for a in keep) == size and size < v.size:
                kept = {a: (dims[a] if a in keep else 1) for a in "fhw"}
                # the folded axes are 1: only the kept ones' order matters (frame-major where it agrees)
                axes = "fhw" if "".join(a for a in "fhw" if a in keep) == keep else \
                    "".join(a for a in v.axes if a not in keep) + keep
                return TokenState((replace(v, frames=kept["f"], height=kept["h"], width=kept["w"], axes=axes),), j)
    return None


def _norm(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


AXIS_MOVES = (aten.permute.default, aten.transpose.int, aten.t.default, aten.unsqueeze.default)


def _moved_axis(t, args, rank: int, dim: int) -> int:
    """Where axis `dim` of a rank-`rank` input lands through one of AXIS_MOVES (a view that moves
    or inserts axes and keeps every element of the token axis)."""
    if t is aten.permute.default:
        return [_norm(d, rank) for d in args[1]].index(dim)
    if t is aten.transpose.int:
        d0, d1 = _norm(args[1], rank), _norm(args[2], rank)
        return {d0: d1, d1: d0}.get(dim, dim)
    if t is aten.t.default:
        return rank - 1 - dim
    return dim + (_norm(args[1], rank + 1) <= dim)  # unsqueeze


def _einsum_dim(eq: str, which: int, dim: int) -> int | None:
    """Where axis `dim` of operand `which` goes in an einsum's output (None: contracted, or an
    equation not spelled out)."""
    terms = einsum_terms(eq)
    if terms is None:
        return None
    ins, out = terms
    if which >= len(ins) or dim >= len(ins[which]):
        return None
    letter = ins[which][dim]
    return out.index(letter) if letter in out else None


def _step(n: torch.fx.Node, states: dict) -> TokenState | Several | None:
    """The state of n's output from the states of its inputs (module docstring)."""
    t, args = n.target, n.args
    if t is operator.getitem:
        st = states.get(args[0])
        return st.states[args[1]] if isinstance(st, Several) and args[1] < len(st.states) else None
    x = args[0] if args and isinstance(args[0], torch.fx.Node) else None
    st = states.get(x) if x is not None else None
    if isinstance(st, Several):
        st = None
    if any(isinstance(states.get(a), TokenState) and states[a].data_after for a in n.all_input_nodes):
        return _data_tail_step(n, states)
    out_shape = _shape(n)
    in_shape = _shape(x) if x is not None else None
    if st is not None and in_shape is not None:
        rank = len(in_shape)
        if t in RESHAPE_OPS:
            return _reshaped(st, in_shape, out_shape) if out_shape is not None else None
        if t in SAME_OPS or t in WAIT_OPS:
            return st
        if t in GATHER_OPS:  # dim 0's chunks come from the ranks: the shard's tokens stay inside each
            return replace(st, gathered=True) if st.whole is not None and (st.dim != 0 or st.outer > 1) else None
        if t in AXIS_MOVES:
            return replace(st, dim=_moved_axis(t, args, rank, st.dim))
        if t in (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default):
            if out_shape is None:
                return None
            dims = range(rank) if t is aten.squeeze.default else ([args[1]] if t is aten.squeeze.dim else args[1])
            gone = {_norm(d, rank) for d in dims if in_shape[_norm(d, rank)] == 1}
            return None if st.dim in gone else replace(st, dim=st.dim - sum(d < st.dim for d in gone))
        if t is aten.slice.Tensor:
            d = _norm(args[1] if len(args) > 1 else 0, rank)
            if d != st.dim:
                return st
            start, stop = (args[2] if len(args) > 2 else None), (args[3] if len(args) > 3 else None)
            step = args[4] if len(args) > 4 else 1
            if step != 1 or st.outer != 1 or st.inner != 1:
                return None
            total = st.total
            start = 0 if start is None else max(0, min(total, start + total if start < 0 else start))
            stop = total if stop is None else max(0, min(total, stop + total if stop < 0 else stop))
            return TokenState(cut(st.segments, start, stop), d, whole=st.whole or st) if stop > start else None
        if t in (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int):
            vals = n.meta.get("val")
            count = len(vals) if isinstance(vals, (list, tuple)) else 0
            d = _norm(args[2] if len(args) > 2 else (args[1] if t is aten.unbind.int and len(args) > 1 else 0), rank)
            if t is aten.unbind.int:
                return Several((None,) * count if d == st.dim else
                               (replace(st, dim=st.dim - (d < st.dim)),) * count)
            if d != st.dim:
                return Several((st,) * count)
            if st.outer != 1 or st.inner != 1:
                return None
            if any(not isinstance(v.shape[d], int) and not v.shape[d].node.is_constant() for v in vals):
                return None  # a data-dependent split
            sizes, pos, outs = [int(v.shape[d]) for v in vals], 0, []
            for s in sizes:
                outs.append(TokenState(cut(st.segments, pos, pos + s), d, whole=st.whole or st))
                pos += s
            return Several(tuple(outs))
        if t is aten.select.int:
            d = _norm(args[1], rank)
            return None if d == st.dim else replace(st, dim=st.dim - (d < st.dim))
        if t in REDUCTIONS:
            dims = args[1] if len(args) > 1 and args[1] is not None else range(rank)
            dims = {_norm(d, rank) for d in ([dims] if isinstance(dims, int) else dims)}
            keep = bool(args[2]) if len(args) > 2 else bool(n.kwargs.get("keepdim", False))
            return None if st.dim in dims else replace(st, dim=st.dim - (0 if keep else sum(d < st.dim for d in dims)))
        if t in NORMS:  # (out, stats...): a norm over trailing dims keeps the token axis
            return Several((st,) + (None,) * NORMS[t]) if st.dim < rank - len(args[1]) else None
        if t in SHUFFLES:
            return None
        if t in ALONG_DIM:
            return None if _norm(args[ALONG_DIM[t]], rank) == st.dim else st
        if t is aten.expand.default and out_shape is not None:
            return replace(st, dim=st.dim + len(out_shape) - rank)
        if isinstance(t, torch._ops.OpOverload) and t.__name__.startswith(SDPA_PREFIX):
            # the output (and only it) has q's tokens on q's axis; the op returns a tuple
            vals = n.meta.get("val")
            return Several((st,) + (None,) * (len(vals) - 1)) if isinstance(vals, (list, tuple)) else None
    if t is aten.cat.default:
        return _cat(n, states, out_shape)
    if t is aten.stack.default:
        return _stack(n, states, out_shape)
    if t in PRODUCTS:
        return _product(n, states)
    return _elementwise(n, states, out_shape)


def _sizes(n) -> tuple | None:
    val = n.meta.get("val") if isinstance(n, torch.fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _static_prod(sizes) -> int | None:
    """The product of sizes known to be ints, None if one is not."""
    if not all(isinstance(s, int) or s.node.is_constant() for s in sizes):
        return None
    return math.prod(int(s) for s in sizes)


def _data_tail_step(n: torch.fx.Node, states: dict) -> TokenState | Several | None:
    """The state of n's output where an input's token axis ends in data-dependent tokens
    (TokenState.data_after, from _cat): only ops that provably keep that axis whole carry it (views
    and transposes, row-wise products, reshapes that keep the axis's size, elementwise ops and
    attention); anything else drops it. Sizes are compared as expressions (the same symbol), never
    guarded on."""
    t, args = n.target, n.args
    x = args[0] if args and isinstance(args[0], torch.fx.Node) else None
    st = states.get(x) if x is not None else None
    out, inn = _sizes(n), _sizes(x) if x is not None else None
    data = isinstance(st, TokenState) and st.data_after and inn is not None and st.outer == st.inner == 1
    if data and isinstance(t, torch._ops.OpOverload) and t.__name__.startswith(SDPA_PREFIX):
        vals = n.meta.get("val")  # the output (and only it) has q's tokens on q's axis
        return Several((st,) + (None,) * (len(vals) - 1)) if isinstance(vals, (list, tuple)) else None
    if out is None:
        return None
    if data:
        rank = len(inn)
        if t in SAME_OPS or t in WAIT_OPS:
            return st
        if t in AXIS_MOVES:
            return replace(st, dim=_moved_axis(t, args, rank, st.dim))
        if t in RESHAPE_OPS:  # the axis's size (one expression) on one output axis, the same inner elements
            inner = _static_prod(inn[st.dim + 1:])
            for j, size in enumerate(out):
                if str(size) == str(inn[st.dim]) and inner is not None and _static_prod(out[j + 1:]) == inner \
                        and _static_prod(out[:j]) == _static_prod(inn[:st.dim]):
                    return replace(st, dim=j)
            return None
        if t is aten.slice.Tensor:  # along another axis; along the tokens: their positions depend on the data
            return st if _norm(args[1] if len(args) > 1 else 0, rank) != st.dim else None
        if t is aten.select.int:
            d = _norm(args[1], rank)
            return None if d == st.dim else replace(st, dim=st.dim - (d < st.dim))
    if t in (aten.mm.default, aten.addmm.default):  # the rows of x in x @ W (bias + x @ W) keep their tokens
        a = args[1] if t is aten.addmm.default else args[0]
        sa, shape = states.get(a), _sizes(a)
        ok = isinstance(sa, TokenState) and sa.data_after and shape is not None and len(shape) == 2
        return sa if ok and sa.dim == 0 and sa.outer == sa.inner == 1 else None
    if t in PRODUCTS | RESHAPE_OPS | SHUFFLES | REDUCTIONS or t is aten.cat.default or t in ALONG_DIM:
        return None
    found = []  # elementwise: every input with a state aligned from the right, on an axis of the same size
    for a in n.all_input_nodes:
        sa, shape = states.get(a), _sizes(a)
        if not isinstance(sa, TokenState) or shape is None:
            continue
        d = sa.dim + len(out) - len(shape)
        if not (0 <= d < len(out) and str(out[d]) == str(shape[sa.dim])):
            return None
        found.append(replace(sa, dim=d))
    return _agreed(found)


def _cat(n, states, out_shape) -> TokenState | None:
    val = n.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    tensors = n.args[0]
    d = _norm(n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0), val.dim())
    if out_shape is None and not is_data_dependent(val.shape[d]):
        return None
    segments, along, data_after = [], False, False
    for x in tensors:
        st, shape = states.get(x), _shape(x)
        if shape is None:
            val = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
            if st is None and isinstance(val, torch.Tensor) and val.dim() > d and is_data_dependent(val.shape[d]):
                data_after = True  # tokens of a data-dependent count (trimmed text): only after every other
                continue
            return None
        if data_after:
            return None  # static tokens after data-dependent ones: their positions depend on the data
        if isinstance(st, TokenState) and st.dim == d:
            if st.data_after:
                return None
            if st.outer != 1 or st.inner != 1:
                return None
            segments += st.segments
            along = True
        elif shape[d] > 0:
            segments.append(Other(shape[d]))
    if along:
        merged: list = []
        for s in segments:  # neighbouring Other tokens are one run
            if isinstance(s, Other) and merged and isinstance(merged[-1], Other):
                merged[-1] = Other(merged[-1].size + s.size)
            else:
                merged.append(s)
        return TokenState(tuple(merged), d, data_after=data_after)
    return _elementwise(n, states, out_shape, inputs=list(tensors))


def _stack(n, states, out_shape) -> TokenState | None:
    """stack along a new axis (rotary embeddings stack cos / sin parts): the inputs' one state,
    its axis moved past the new one."""
    if out_shape is None:
        return None
    d = _norm(n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0), len(out_shape))
    found = [states.get(x) for x in n.args[0]]
    if not all(isinstance(st, TokenState) for st in found):
        return None
    st = _agreed(found)
    return None if st is None else replace(st, dim=st.dim + (d <= st.dim))


def _product(n, states) -> TokenState | None:
    """mm / addmm / bmm / baddbmm / matmul / linear / einsum: the rows of the first operand and the
    columns of the second keep their tokens, a contracted axis loses them."""
    t, args = n.target, n.args
    found = []
    if t is aten.einsum.default:
        for which, x in enumerate(args[1]):
            st = states.get(x)
            if isinstance(st, TokenState):
                d = _einsum_dim(args[0], which, st.dim)
                if d is not None:
                    found.append(replace(st, dim=d))
    else:
        a, b = (args[1], args[2]) if t in (aten.addmm.default, aten.baddbmm.default) else (args[0], args[1])
        ro = len(_shape(n) or ())
        for x, is_a in ((a, True), (b, False)):
            st, shape = states.get(x), _shape(x)
            if not isinstance(st, TokenState) or shape is None:
                continue
            r = len(shape)
            if t is aten.linear.default:
                if not is_a:
                    continue
                if st.dim != r - 1:
                    found.append(st)
                continue
            if r < 2 or ro < 2:
                continue
            contracted = r - 1 if is_a else r - 2
            if st.dim != contracted:
                found.append(replace(st, dim=st.dim + ro - r))
    return _agreed(found)


def _elementwise(n, states, out_shape, inputs=None) -> TokenState | None:
    """Any other op: the state of its inputs, aligned from the right (broadcasting), where the
    output keeps the token axis's size; inputs that disagree drop it."""
    if out_shape is None:
        return None
    found = []
    for x in inputs if inputs is not None else n.all_input_nodes:
        st, shape = states.get(x), _shape(x)
        if not isinstance(st, TokenState) or shape is None:
            continue
        d = st.dim + len(out_shape) - len(shape)
        if 0 <= d < len(out_shape) and out_shape[d] == shape[st.dim]:
            found.append(replace(st, dim=d))
    return _agreed(found)


def _agreed(found: list[TokenState]) -> TokenState | None:
    """The one state the inputs of an op agree on, or None. They agree when their tokens do (segments,
    axis, merged indices); where only their history differs (a residual add of the video tokens with
    the video part sliced back out of a joint sequence: one remembers the joint sequence as `whole`,
    the other does not), the history is dropped, not the tokens."""
    if not found or len({(s.segments, s.dim, s.outer, s.inner) for s in found}) != 1:
        return None
    if len(set(found)) == 1:
        return found[0]
    return replace(found[0], whole=None, gathered=False)


class States(dict):
    """token_states' result: node -> TokenState | Several, and in `frames` the same for the frame
    index of per-frame Conv2d videos (a video F x 1 x 1 on the axis holding it: the frames start in
    the batch axis, B*F, where the token dataflow does not follow them)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.frames: dict = {}


def token_states(graph: torch.fx.Graph, seeds: dict | None = None) -> States:
    """The state of every node of the graph reached from a patch embedding (module docstring), or
    from a placeholder in `seeds` (the tokens an earlier graph's output carried into this graph's
    input: passes/carried_tokens.py)."""
    states = States({**patch_embeddings(graph), **(seeds or {})})
    frames = states.frames
    for n, st in list(states.items()):
        if isinstance(st, TokenState) and st.segments[0].per_frame:
            fr = frame_start(n, st)
            if fr is not None:
                frames[n] = fr
    for n in graph.nodes:
        if n.op != "call_function" or n.target in CONV_OPS:
            continue
        if frames and n not in frames and any(a in frames for a in n.all_input_nodes):
            fr = _step(n, frames)
            if fr is not None:
                frames[n] = fr
        if n in states or not any(a in states for a in n.all_input_nodes):
            continue
        st = _step(n, states)
        fr = frames.get(n)
        if isinstance(st, TokenState) and isinstance(fr, TokenState):
            st = joined(st, fr) or st
        if st is not None:
            states[n] = st
    return states
