"""The frame index of a per-frame Conv2d video (a helper of passes/token_segments.py): its frames start
in the convolution's batch axis (B*F), where the token dataflow does not follow them, so they are
followed as a second state, a video F x 1 x 1 on the axis holding them (frame_start); next to the
frame's H x W tokens on one axis the two join into the whole F x H x W video (joined)."""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.fx

from .layout_trace import TraceError, shape_of, trace_back
from .patch_embeddings import CONV_OPS
from .token_state import TokenState, Video


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


def frame_start(node: torch.fx.Node, st: TokenState) -> TokenState | None:
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


def joined(st: TokenState, fr: TokenState) -> TokenState | None:
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
