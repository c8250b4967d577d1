"""Patch embeddings (a helper of the token dataflow, passes/token_segments.py): a node where one axis
first enumerates the patches of a video, found with layout_trace atoms on every reshape of the graph:
- a Conv3d output (B, C, F, H, W), or a per-frame Conv2d output (B*F, C, H, W), rearranged so that
  one axis holds its F, H, W indices (in any order: that order is the grid's axes);
- a patchify reshape (no convolution) of a 5-D video tensor, (B, C, F, H, W), channels-last
  (B, F, H, W, C) or frame-major-with-channels (B, F, C, H, W): one axis holds the outer (patch
  index) parts of three of the axes 1-4, taken as F, H, W in the order the tensor has them; the
  tensor must be floating point, computed from the graph's inputs (not from constants: a RoPE
  coordinate table built with arange is not a video), and the patches must go into a product (the
  embedding's linear) within a few ops.
"""
from __future__ import annotations

import math
from collections import deque

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .layout_trace import TraceError, shape_of, trace_back
from .token_state import TokenState, Video

aten = torch.ops.aten

CONV_OPS = {aten.convolution.default, aten.conv2d.default, aten.conv3d.default, aten.conv2d.padding,
            aten.conv3d.padding}
RESHAPE_OPS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.flatten.using_ints,
               aten.unflatten.int}
PRODUCTS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default, aten.matmul.default,
            aten.linear.default, aten.einsum.default}


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
