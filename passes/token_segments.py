"""Which tokens of a token axis are which video (a helper of passes/infer_grid.py, not a pass).

1. Patch embeddings (patch_embeddings): a node where one axis first enumerates the patches of a
   video, found with layout_trace atoms on every reshape of the graph:
   - a Conv3d output (B, C, F, H, W), or a per-frame Conv2d output (B*F, C, H, W), rearranged
     so that one axis holds its F, H, W indices (in any order: that order is the grid's axes);
   - a patchify reshape (no convolution) of a 5-D video tensor, (B, C, F, H, W), channels-last
     (B, F, H, W, C) or frame-major-with-channels (B, F, C, H, W): one axis holds the outer
     (patch index) parts of three of the axes 1-4, taken as F, H, W in the order the tensor has
     them; the tensor must be floating point, computed from the graph's inputs (not from
     constants: a RoPE coordinate table built with arange is not a video), and the patches must
     go into a product (the embedding's linear) within a few ops.
2. A forward dataflow over the whole graph (token_states): every node reached from a patch
   embedding gets a TokenState, the axis holding the tokens and what they are, a tuple of
   segments (Video with its grid, or Other: tokens of no known grid). A cat along that axis
   concatenates the segments of its inputs (inputs from no patch embedding are Other); a slice
   cuts them; elementwise ops, linears, norms, reshapes that keep the axis and attention itself
   keep them; where two inputs disagree, or the axis is split, reduced or shuffled (roll, flip,
   gather along it), the state is dropped. Every path from every patch embedding is followed,
   so a side branch (a CLS token sliced off and pooled) cannot hide a concatenation. A reshape
   that moves a video's outer axes into another axis (the batch) leaves the inner ones, the
   folded axes 1 ('(b h w) f': F x 1 x 1). The frame index of a per-frame Conv2d video, in its
   batch axis, is followed as a second state (States.frames): an attention over it gets F x 1 x 1,
   and next to the frame's H x W tokens on one axis it joins them into the whole video.
The grid of a site is then read off the state of its query's token source (infer_grid.py).
"""
from __future__ import annotations

import math
import operator
from collections import deque
from dataclasses import dataclass, replace

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .data_sizes import is_data_dependent
from .layout_trace import TraceError, shape_of, trace_back

aten = torch.ops.aten

CONV_OPS = {aten.convolution.default, aten.conv2d.default, aten.conv3d.default, aten.conv2d.padding,
            aten.conv3d.padding}
RESHAPE_OPS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.flatten.using_ints,
               aten.unflatten.int}
SAME_OPS = {aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default,
            aten._to_copy.default, aten.to.dtype, aten.lift_fresh_copy.default}
PRODUCTS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default, aten.matmul.default,
            aten.linear.default, aten.einsum.default}
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


@dataclass(frozen=True)
class Video:
    """Video tokens of one grid, from the patch embedding `source` (the convolution's or the video
    tensor's node name: every view of the same tokens names the same source)."""

    frames: int
    height: int
    width: int
    axes: str
    source: str
    per_frame: bool = False  # from a per-frame Conv2d whose frames stay in the batch axis (frames 1)

    @property
    def size(self) -> int:
        return self.frames * self.height * self.width


@dataclass(frozen=True)
class Other:
    """Tokens of no known grid (text, CLS, registers, a video cut off mid-way)."""

    size: int


Segments = tuple["Video | Other", ...]


@dataclass(frozen=True)
class TokenState:
    """Axis `dim` of a node's output holds the tokens `segments`; other indices may be merged into
    that axis: it is (outer, tokens, inner) row-major."""

    segments: Segments
    dim: int
    outer: int = 1
    inner: int = 1
    # context parallelism: the state before this rank's shard was cut out of the sequence, and
    # whether a collective has since brought every rank's shard into the rank axis
    whole: "TokenState | None" = None
    gathered: bool = False
    # tokens of a data-dependent count follow the segments on the axis (text cut to its unpadded
    # length by a mask: passes/data_sizes.py); only a cat makes such a state, and any op that
    # needs the axis's size drops it
    data_after: bool = False

    @property
    def total(self) -> int:
        return sum(s.size for s in self.segments)


@dataclass(frozen=True)
class Several:
    """The states of the outputs of a node that returns several tensors (split, unbind, SDPA)."""

    states: tuple[TokenState | None, ...]


# ----------------------------------------------------------------------------- patch embeddings


def _conv_behind(src: torch.fx.Node, depth: int = 3) -> torch.fx.Node | None:
    """The convolution whose output `src` is, or is elementwise of (a bias add), with its shape."""
    want, n = src.meta.get("val"), src
    for _ in range(depth + 1):
        if not isinstance(n, torch.fx.Node) or n.op != "call_function":
            return None
        if n.target in CONV_OPS:
            return n if _same_shape(n.meta["val"], want) else None
        same = [a for a in n.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)
                and _same_shape(a.meta["val"], want)]
        if len(same) != 1:
            return None
        n = same[0]
    return None


def _same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes, known statically (a data-dependent size is never guarded on)."""
    return a.dim() == b.dim() and all(statically_known_true(x == y) for x, y in zip(a.shape, b.shape))


def _from_inputs(node: torch.fx.Node, limit: int = 5000) -> bool:
    """Whether node's values are computed from the graph's inputs (a placeholder or a module
    attribute among its ancestors), not only from constants such as arange."""
    seen, todo = {node}, deque([node])
    while todo and len(seen) < limit:
        n = todo.popleft()
        if n.op in ("placeholder", "get_attr"):
            return True
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return False


def _feeds_a_product(node: torch.fx.Node, depth: int = 4) -> bool:
    todo = deque([(node, 0)])
    while todo:
        n, d = todo.popleft()
        for u in n.users:
            if u.op != "call_function":
                continue
            if u.target in PRODUCTS:
                return True
            if d + 1 < depth:
                todo.append((u, d + 1))
    return False


def _role_order(atoms, roles: dict[str, object]) -> tuple[str, int, int] | None:
    """Given one axis's atoms and, per role (f/h/w), the atom that plays it (None: size 1), the
    axes string of the roles in the order the axis has them, with the product of the atoms
    before (outer) and after (inner) them; None unless the role atoms are consecutive there."""
    ids = {id(a): r for r, a in roles.items() if a is not None}
    pos = [i for i, a in enumerate(atoms) if id(a) in ids]
    if len(pos) != len(ids) or not pos or pos != list(range(pos[0], pos[0] + len(pos))):
        return None
    present = "".join(ids[id(atoms[i])] for i in pos)
    axes = "".join(r for r in "fhw" if r not in present) + present  # size-1 axes: anywhere, say outermost
    outer = math.prod(a.size for a in atoms[:pos[0]])
    inner = math.prod(a.size for a in atoms[pos[-1] + 1:])
    return axes, outer, inner


def _start(node: torch.fx.Node) -> TokenState | None:
    """The state at `node` if it is where a patch embedding's tokens first lie on one axis."""
    try:
        traced = trace_back(node, follow_scale=False)
        src_shape = shape_of(traced.source)
    except TraceError:
        return None
    src, leaves = traced.source, traced.source_atoms
    conv = _conv_behind(src) if src.op == "call_function" else None
    whole = lambda ax: leaves[ax][0] if len(leaves[ax]) == 1 else None  # noqa: E731
    for i, atoms in enumerate(traced.axes):
        on_axis = {a.source_axis for a in atoms if a.source_axis is not None}
        if conv is not None and len(src_shape) == 5:
            if any(src_shape[ax] > 1 and whole(ax) is None for ax in (2, 3, 4)):
                continue
            roles = {"f": whole(2), "h": whole(3), "w": whole(4)}
        elif conv is not None and len(src_shape) == 4:
            if 1 in on_axis or whole(2) is None or whole(3) is None:
                continue
            frame = None  # the per-frame conv's batch axis (B*F): its inner part on the token axis is F
            if 0 in on_axis:
                frame = next(a for a in atoms if a.source_axis == 0)
                if frame is not leaves[0][-1]:
                    continue
            roles = {"f": frame, "h": whole(2), "w": whole(3)}
        elif conv is None and len(src_shape) == 5 and 0 not in on_axis:
            video_axes = sorted(ax for ax in on_axis if ax in (1, 2, 3, 4))
            if len(video_axes) != 3 or any(next(a for a in atoms if a.source_axis == ax) is not leaves[ax][0]
                                           for ax in video_axes):
                continue  # not three patch indices (the outer parts of three axes)
            if not (src.meta["val"].is_floating_point() and _from_inputs(src) and _feeds_a_product(node)):
                continue
            roles = {r: leaves[ax][0] for r, ax in zip("fhw", video_axes)}
        else:
            continue
        if len(on_axis) != sum(a is not None for a in roles.values()):
            continue  # another axis (channels) is merged into the tokens
        got = _role_order(atoms, roles)
        if got is None:
            continue
        axes, outer, inner = got
        size = lambda r: roles[r].size if roles[r] is not None else 1  # noqa: E731
        per_frame = conv is not None and len(src_shape) == 4 and roles["f"] is None
        video = Video(size("f"), size("h"), size("w"), axes, (conv or src).name, per_frame)  # views of it agree
        return TokenState((video,), i, outer, inner)
    return None


def patch_embeddings(graph: torch.fx.Graph) -> dict[torch.fx.Node, TokenState]:
    """Every node of the graph where a patch embedding's tokens first lie on one axis (module docstring)."""
    starts = {}
    for n in graph.nodes:
        if n.op == "call_function" and n.target in RESHAPE_OPS | {aten.permute.default, aten.transpose.int}:
            if any(a in starts for a in n.all_input_nodes):
                continue  # a later view of the same tokens: the dataflow carries them
            st = _start(n)
            if st is not None:
                starts[n] = st
    return starts


# ----------------------------------------------------------------------------- the dataflow


def _shape(n) -> tuple[int, ...] | None:
    try:
        return shape_of(n)
    except TraceError:
        return None


def cut(segments: Segments, start: int, stop: int) -> Segments:
    """The segments of tokens [start, stop). A video cut along its outermost axis stays a video
    (fewer frames of a frame-major one); cut anywhere else it becomes Other."""
    out, pos = [], 0
    for s in segments:
        lo, hi = max(start, pos), min(stop, pos + s.size)
        if lo < hi:
            if (lo, hi) == (pos, pos + s.size):
                out.append(s)
            elif isinstance(s, Video):
                dims = {"f": s.frames, "h": s.height, "w": s.width}
                step = s.size // dims[s.axes[0]]  # tokens per index of the outermost axis
                if (lo - pos) % step == 0 and (hi - pos) % step == 0:
                    dims[s.axes[0]] = (hi - lo) // step
                    out.append(replace(s, frames=dims["f"], height=dims["h"], width=dims["w"]))
                else:
                    out.append(Other(hi - lo))
            else:
                out.append(Other(hi - lo))
        pos += s.size
    return tuple(out)


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


def _einsum_dim(eq: str, which: int, dim: int) -> int | None:
    eq = eq.replace(" ", "")
    if "->" not in eq or "." in eq:
        return None
    ins, out = eq.split("->")
    ins = ins.split(",")
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
        if t is aten.permute.default:
            return replace(st, dim=[_norm(d, rank) for d in args[1]].index(st.dim))
        if t is aten.transpose.int:
            d0, d1 = _norm(args[1], rank), _norm(args[2], rank)
            return replace(st, dim={d0: d1, d1: d0}.get(st.dim, st.dim))
        if t is aten.t.default:
            return replace(st, dim=rank - 1 - st.dim)
        if t is aten.unsqueeze.default:
            d = _norm(args[1], rank + 1)
            return replace(st, dim=st.dim + (d <= st.dim))
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


def _frames_in_batch(conv: torch.fx.Node) -> int | None:
    """F, where a per-frame Conv2d's input (B*F, C, H, W) is a 5-D video with its frame axis merged
    into the batch as its inner part (the other three axes being the image's); None otherwise."""
    try:
        traced = trace_back(conv.args[0], follow_scale=False)
        shape = shape_of(traced.source)
    except TraceError:
        return None
    if len(shape) != 5 or not traced.axes:
        return None
    atoms, leaves = traced.axes[0], traced.source_atoms
    axes = [a.source_axis for a in atoms]
    if axes not in ([0, axes[-1]], [axes[-1]]) or axes[-1] in (0, None) or (len(axes) == 1 and shape[0] != 1):
        return None
    if any(len(leaves[ax]) != 1 or a is not leaves[ax][0] for a, ax in zip(atoms, axes)):
        return None  # not whole axes
    return shape[axes[-1]]


def _frame_start(node: torch.fx.Node, st: TokenState) -> TokenState | None:
    """The frame index of a per-frame video's start `node`: on the axis holding its convolution's
    whole batch axis (B*F), F inner."""
    v = st.segments[0]
    conv = next((c for c in node.graph.nodes if c.name == v.source and c.op == "call_function"
                 and c.target in CONV_OPS), None)
    frames = _frames_in_batch(conv) if conv is not None else None
    if frames is None or frames <= 1:
        return None
    try:
        traced = trace_back(node, follow_scale=False)
    except TraceError:
        return None
    batch = traced.source_atoms[0] if traced.source is conv else None
    for i, atoms in enumerate(traced.axes):
        if batch and len(batch) == 1 and atoms == batch:
            return TokenState((Video(frames, 1, 1, "fhw", v.source),), i, batch[0].size // frames, 1)
    return None


def _joined(st: TokenState, fr: TokenState) -> TokenState | None:
    """A per-frame video's tokens (1 x H x W) and its frame index on one axis, next to each other:
    the whole F x H x W video, frame-major or with the frames innermost."""
    v, f = st.segments[0], fr.segments[0]
    if st.dim != fr.dim or len(st.segments) != 1 or not v.per_frame:
        return None
    spatial = v.axes.replace("f", "")
    whole = dict(frames=f.frames, height=v.height, width=v.width, per_frame=False)
    if st.inner == f.frames * fr.inner and fr.outer == st.outer * st.total:       # (..., h, w, f, ...)
        return TokenState((replace(v, axes=spatial + "f", **whole),), st.dim, st.outer, fr.inner)
    if fr.inner == st.total * st.inner and st.outer == fr.outer * f.frames:        # (..., f, h, w, ...)
        return TokenState((replace(v, axes="f" + spatial, **whole),), st.dim, fr.outer, st.inner)
    return None


def token_states(graph: torch.fx.Graph, seeds: dict | None = None) -> States:
    """The state of every node of the graph reached from a patch embedding (module docstring), or
    from a placeholder in `seeds` (the tokens an earlier graph's output carried into this graph's
    input: passes/carried_tokens.py)."""
    states = States({**patch_embeddings(graph), **(seeds or {})})
    frames = states.frames
    for n, st in list(states.items()):
        if isinstance(st, TokenState) and st.segments[0].per_frame:
            fr = _frame_start(n, st)
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
            st = _joined(st, fr) or st
        if st is not None:
            states[n] = st
    return states
