"""Creating nodes the way every pass must: with shape metadata (meta["val"], computed on fake
tensors, so that later passes can read shapes) and provenance (meta["vsopt_from"]).

    emit(graph, target, args, ...)           a call_function node
    constant(gm, name, value, like=..., ...) a get_attr node of a new buffer (kv tables, permutations)
    with_layout_of(graph, new, old, ...)     `new` copied into the memory layout of `old`
"""
from __future__ import annotations

import functools
from typing import Any

import torch
import torch.fx
from torch._guards import detect_fake_mode
from torch.utils._pytree import tree_map


def _val(a: Any) -> Any:
    return a.meta.get("val") if isinstance(a, torch.fx.Node) else a


def emit(graph: torch.fx.Graph, target, args: tuple, kwargs: dict | None = None, *, pass_name: str,
         replaces: tuple[str, ...] = (), meta_from: torch.fx.Node | None = None) -> torch.fx.Node:
    """Insert call_function(target) at the graph's current insertion point.

    meta["val"] is computed by running target on the fake values of the arguments (inside their
    fake mode); nn_module_stack and stack_trace are copied from meta_from so the node stays
    attributed to the module it belongs to."""
    kwargs = kwargs or {}
    node = graph.call_function(target, args, kwargs)
    vals = tree_map(_val, (args, kwargs))
    fake_mode = detect_fake_mode(list(torch.utils._pytree.tree_leaves(vals)))
    if fake_mode is not None:
        with fake_mode:
            node.meta["val"] = target(*vals[0], **vals[1])
    if meta_from is not None:
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack", "seq_nr"):
            if key in meta_from.meta:
                node.meta[key] = meta_from.meta[key]
    node.meta["vsopt_from"] = (pass_name, tuple(replaces))
    return node


def constant(gm: torch.fx.GraphModule, name: str, value: torch.Tensor, *, like: torch.fx.Node, pass_name: str,
             replaces: tuple[str, ...] = ()) -> torch.fx.Node:
    """A get_attr node, at the graph's insertion point, of a new buffer of gm holding `value` on
    the device of `like`'s value. The buffer is named `name`, or name_1, name_2, ... when taken.
    meta["val"] is a fake tensor with static shapes (a constant must not bring new symbolic
    sizes into Dynamo's shape env), in `like`'s fake mode (the value itself without one)."""
    attr, i = name, 0
    while hasattr(gm, attr):
        i += 1
        attr = f"{name}_{i}"
    like_val = like.meta["val"]
    gm.register_buffer(attr, value.to(like_val.device))
    value = getattr(gm, attr)
    node = gm.graph.get_attr(attr)
    fake_mode = detect_fake_mode([like_val])
    node.meta["val"] = fake_mode.from_tensor(value, static_shapes=True) if fake_mode is not None else value
    node.meta["vsopt_from"] = (pass_name, tuple(replaces))
    return node


def constant_value(gm: torch.fx.GraphModule, node: Any) -> torch.Tensor | None:
    """The tensor a get_attr node names (a constant of the graph), else None."""
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr":
        return None
    try:
        value = functools.reduce(getattr, node.target.split("."), gm)
    except AttributeError:
        return None
    return value if isinstance(value, torch.Tensor) else None


def with_layout_of(graph: torch.fx.Graph, new: torch.fx.Node, old: torch.fx.Node, *, pass_name: str) -> torch.fx.Node:
    """`new`, or a copy of it in the memory layout `old` had, to replace `old` with. A traced graph
    bakes strides into its ops (a later aten.view of an attention output was only valid for the
    layout the replaced op returned, e.g. (B, N, H, D)-major), so a replacement with another
    layout is copied into that one (dims ordered by stride, densely). Inductor fuses the copy into
    the producer or the consumer."""
    want, got = old.meta.get("val"), new.meta.get("val")
    if not isinstance(want, torch.Tensor) or not isinstance(got, torch.Tensor) or want.stride() == got.stride():
        return new
    order = sorted(range(want.dim()), key=lambda d: (-want.stride()[d], d))
    inverse = sorted(range(want.dim()), key=lambda d: order[d])
    x = emit(graph, torch.ops.aten.permute.default, (new, order), pass_name=pass_name, meta_from=new)
    x = emit(graph, torch.ops.aten.clone.default, (x,), {"memory_format": torch.contiguous_format},
             pass_name=pass_name, meta_from=new)
    return emit(graph, torch.ops.aten.permute.default, (x, inverse), pass_name=pass_name, meta_from=new)


def replace_node(graph: torch.fx.Graph, old: torch.fx.Node, new: torch.fx.Node, *made: torch.fx.Node) -> None:
    """`new` takes `old`'s place: it, and the other nodes `made` for it, carry old's site
    (meta["vsopt_site"]), old's uses go to new, and old is erased."""
    if "vsopt_site" in old.meta:
        for n in (new, *made):
            n.meta["vsopt_site"] = old.meta["vsopt_site"]
    old.replace_all_uses_with(new)
    graph.erase_node(old)
