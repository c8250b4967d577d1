"""Grids carried across graphs (issue 14, class 7): the backend's half of passes/carried_tokens.py.

When Dynamo splits a model into several graphs and the tensor holding the video tokens goes from
one graph's output through eager code, unchanged, into a later graph's input (HunyuanVideo 1.5:
its patch embedding in the first graph, each block compiled on its own after a graph break), the
later graph has no patch embedding, so its sites' grids would be unknown. So:

- every graph the backend (or inspect) returns whose outputs hold video tokens (the token states of
  its outputs, carried_tokens.output_states of its ATen graph, read once when it is compiled)
  records, at each call, which of those tensors it returned (weak references: id -> (tensor,
  producer, output position); nothing is kept alive); a graph returning no video tokens records
  nothing and costs nothing per call;
- when a later graph is compiled, its example inputs (real tensors: what this call passes) that are
  the very objects an earlier graph returned take that graph's output token state;
- the graph compiled with carried tokens runs only for calls whose inputs at those positions again
  carry the same token state (an output of an earlier graph with that state: Carrying, a few dict
  lookups per call, no host sync); any other call runs the graph compiled without them (built on
  first need).
  A grid is never assumed for a tensor that did not come from where it was inferred.
"""
from __future__ import annotations

import logging
import weakref
from typing import Any, Callable, Sequence

import torch
import torch.fx
from torch.utils._pytree import tree_leaves

from vsopt.passes.carried_tokens import CARRIED, output_states

_log = logging.getLogger("vsopt")
# id(tensor) -> (weakref to it, producer key, flattened output position): the last outputs of every graph
_RETURNED: dict[int, tuple[weakref.ref, int, int]] = {}


class _Producer:
    """A graph whose outputs may carry tokens: its Dynamo graph (weakly) and, once a later graph
    asked, the token states of its outputs (from its ATen graph, traced then)."""

    def __init__(self, gm: torch.fx.GraphModule, trace: Callable):
        self.gm, self.trace = weakref.ref(gm), trace
        self.states: dict | None = None

    def output_states(self) -> dict:
        if self.states is None:
            gm = self.gm()
            try:
                self.states = output_states(self.trace(gm, ())) if gm is not None else {}
            except Exception as e:  # noqa: BLE001 - no carried grid then (the site's note says how to give it)
                _log.info("vsopt: the token states of an earlier graph's outputs could not be read (%s: %s)",
                          type(e).__name__, (str(e).splitlines() or [""])[0][:120])
                self.states = {}
        return self.states


# producer key -> _Producer (removed with its graph)
_PRODUCERS: dict[int, _Producer] = {}


def _forget(key: int, ref: weakref.ref) -> None:
    entry = _RETURNED.get(key)
    if entry is not None and entry[0] is ref:
        del _RETURNED[key]


def _may_hold_tokens(gm: torch.fx.GraphModule) -> bool:
    """Whether any output of Dynamo's graph could hold video tokens at all (a tensor of 2 dims or
    more: (B, N, C), (N, C)): the graphs that return none are not traced for their outputs' states."""
    out = next((n for n in reversed(gm.graph.nodes) if n.op == "output"), None)
    if out is None:
        return False
    for n in tree_leaves(out.args[0]):
        val = n.meta.get("example_value", n.meta.get("val")) if isinstance(n, torch.fx.Node) else None
        if val is None and isinstance(n, torch.fx.Node):
            return True   # unknown: let the trace decide
        if isinstance(val, torch.Tensor) and val.dim() >= 2:
            return True
    return False


def recording(fn: Callable, gm: torch.fx.GraphModule, trace: Callable) -> Callable:
    """fn (a compiled graph of Dynamo's graph gm), recording at each call the tensors it returns that
    hold video tokens (the token states of gm's outputs, from its ATen graph trace(gm, ()), read now,
    once): a later graph could take the token state of those only. A graph none of whose outputs
    holds video tokens is fn itself, recording nothing (nothing added to its calls)."""
    producer = _Producer(gm, trace)
    states = producer.output_states() if _may_hold_tokens(gm) else {}
    if not states:
        return fn
    key, positions = id(gm), frozenset(states)
    _PRODUCERS[key] = producer
    weakref.finalize(gm, _PRODUCERS.pop, key, None)

    def run(*args):
        out = fn(*args)
        for i, t in enumerate(tree_leaves(out)):
            if i in positions and isinstance(t, torch.Tensor):
                k = id(t)
                ref = weakref.ref(t, lambda r, k=k: _forget(k, r))
                _RETURNED[k] = (ref, key, i)
        return out

    run.__wrapped__, run.graph = fn, gm  # type: ignore[attr-defined]  (the graph lives as long as this)
    return run


def _origin(t: Any) -> tuple[int, int] | None:
    """(producer key, output position) of a tensor an earlier graph returned, or None."""
    entry = _RETURNED.get(id(t)) if isinstance(t, torch.Tensor) else None
    return entry[1:] if entry is not None and entry[0]() is t else None


def _carried_state(t: Any):
    """The token state a tensor carries: that of the output of the earlier graph that returned it."""
    origin = _origin(t)
    producer = _PRODUCERS.get(origin[0]) if origin is not None else None
    return producer.output_states().get(origin[1]) if producer is not None else None


def carried_into(args: Sequence[Any]) -> dict[int, Any]:
    """{input position: TokenState} for the inputs that are outputs of an earlier graph holding
    video tokens."""
    found = {}
    for i, t in enumerate(args):
        st = _carried_state(t)
        if st is not None:
            found[i] = st
    return found


class Carrying:
    """A graph compiled with tokens carried into its inputs (`with_carried`), run only while those
    inputs carry the same tokens (outputs of an earlier graph with the same token state: the graph
    compiled then, or the block before in a graph shared by blocks); otherwise the graph compiled
    without them."""

    def __init__(self, carried: dict, with_carried: Callable, without: Callable[[], Callable]):
        self.carried = dict(carried)
        self.with_carried, self.build_without, self.without = with_carried, without, None

    def __call__(self, *args):
        if all(_carried_state(args[i]) == st for i, st in self.carried.items()):
            return self.with_carried(*args)
        if self.without is None:
            _log.info("vsopt: a graph compiled with video tokens carried from an earlier graph is called with "
                      "inputs that do not come from it: compiling it without them (no carried grid)")
            self.without = self.build_without()
        return self.without(*args)


def carry(gm: torch.fx.GraphModule, example_inputs: Sequence[Any],
          build: Callable[[torch.fx.GraphModule], Callable], trace: Callable) -> Callable:
    """The backend's (and inspect's) graph `gm` built by `build` with the tokens carried into its
    inputs (gm.meta[CARRIED], read by the token dataflow), guarded by Carrying; each variant records
    its own outputs (with the token states that variant's inputs give them) for later graphs.
    trace(gm, ()) is the backend's ATen trace of a Dynamo graph (backend.to_aten)."""
    carried = carried_into(example_inputs)
    if not carried:
        return recording(build(gm), gm, trace)
    gm.meta[CARRIED] = carried

    def without():
        plain = torch.fx.GraphModule(gm, gm.graph)
        plain.meta.update(gm.meta)
        plain.meta.pop(CARRIED, None)
        return recording(build(plain), plain, trace)  # its outputs carry only what it infers itself

    return Carrying(carried, recording(build(gm), gm, trace), without)
