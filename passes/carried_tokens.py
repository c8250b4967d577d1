"""Token states carried into a graph from the graph that produced its inputs (issue 14, class 7).

A model Dynamo splits into several graphs (a graph break, then each block's forward compiled on its
own: HunyuanVideo 1.5) has its patch embedding in one graph and its attention in another; the
tensor goes from the first graph's output through eager code (unchanged) into the second's input.
The backend (vsopt/carried.py) tells, at the second graph's compile, which of its inputs are the
very tensors (the same objects) an earlier graph returned; this module gives the token states of a
graph's outputs (output_states) and seeds a graph's placeholders with the states carried into them
(token_states reads gm.meta[CARRIED]: {placeholder index: TokenState}).
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.fx
from torch.utils._pytree import tree_leaves

from .token_segments import token_states
from .token_state import TokenState, Video

CARRIED = "vsopt_carried_tokens"  # gm.meta key: {placeholder index: TokenState}


def output_states(gm: torch.fx.GraphModule) -> dict[int, TokenState]:
    """The token states of the graph's outputs (by position among its flattened outputs) that hold
    a video, their history (context parallelism) dropped and their sources named as carried."""
    states = token_states(gm.graph, seeded(gm.graph))  # a block's output: the tokens carried into it, onwards
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    found = {}
    for i, n in enumerate(tree_leaves(out.args[0])):
        st = states.get(n) if isinstance(n, torch.fx.Node) else None
        if isinstance(st, TokenState) and not st.data_after and any(isinstance(s, Video) for s in st.segments):
            segments = tuple(replace(s, source=_carried_name(s.source)) if isinstance(s, Video) else s
                             for s in st.segments)
            found[i] = replace(st, segments=segments, whole=None, gathered=False)
    return found


def _carried_name(source: str) -> str:
    """A carried video's source, named once however many graphs it passes (equal states compare equal)."""
    return source if source.startswith("carried:") else f"carried:{source}"


def seeded(graph: torch.fx.Graph) -> dict[torch.fx.Node, TokenState]:
    """The placeholders of `graph` with the states carried into them (gm.meta[CARRIED])."""
    owner = getattr(graph, "owning_module", None)
    carried = getattr(owner, "meta", {}).get(CARRIED) if owner is not None else None
    if not carried:
        return {}
    placeholders = list(graph.find_nodes(op="placeholder"))
    return {placeholders[i]: st for i, st in carried.items() if i < len(placeholders)}
