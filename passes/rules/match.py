"""What a rewrite rule is, and what its check returns (shared by every rule).

A rule is one class with three methods (DESIGN.md, convention 3):

    pattern(node) -> bool                    does the rule anchor on this node at all (cheap)
    check(node) -> MatchResult               an AttentionMatch, or the reason it does not apply
    rewrite(graph, match) -> node            emit the replacement at the graph's insertion point

check reads only node.meta["val"] (shapes, dtypes), never runs the model, and changes nothing;
what it found is a frozen AttentionMatch: the site's shape fields, the matched nodes and the
rule's own typed record of what to emit (`emit`). rewrite reads only the match; it creates the
nodes and returns the one that replaces match.output; erasing the replaced nodes is the pass's
job (passes/rewrite_attention.py). Variants of a rule are constructor flags, not copies.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch
import torch.fx

from vsopt.core.ir import Layout

aten = torch.ops.aten
PASS_NAME = "rewrite_attention"  # the pass that runs rule.rewrite: named in created nodes' provenance

EmitT = TypeVar("EmitT")


@dataclass(frozen=True, eq=False)  # identity: a match is one find in one graph
class AttentionMatch(Generic[EmitT]):
    """Everything a rule's check learned about one attention: enough to build the AttentionSite
    and, through rule.rewrite, to replace it. Nodes are graph nodes; the shape fields are in the
    canonical (B, H, N, D) sense."""

    rule: "AttentionRule[EmitT]" = field(repr=False)  # the rule whose check found it (and rewrites it)
    anchor: torch.fx.Node  # the node the site is attributed to (softmax, or the SDPA op)
    output: torch.fx.Node  # the node whose value the rewrite replaces
    layout: Layout
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    value_dim: int
    q_len: int
    kv_len: int
    dtype: torch.dtype
    scale: float
    has_mask: bool
    is_causal: bool
    nodes: tuple[str, ...]  # names of the matched nodes (the rewrite replaces them)
    q_token_source: tuple[torch.fx.Node, tuple[int, ...]] | None  # (node, its axes forming q's tokens)
    emit: EmitT = field(repr=False)  # the rule's typed record of what rewrite emits
    softcap: float = 0.0  # > 0: logit soft cap on the scores before the mask and softmax (rules/softcap.py)

    @property
    def rule_name(self) -> str:
        return self.rule.name


@dataclass(frozen=True)
class MatchResult:
    """Outcome of a rule's check on one node: `match` on success, else `reason` (a value, not an
    exception, so the graph-diff debugger can print it)."""

    node: torch.fx.Node
    rule: str
    match: AttentionMatch | None = None
    reason: str = ""
    candidate: bool = True  # False: the node was never an attention (not worth reporting)

    @property
    def ok(self) -> bool:
        return self.match is not None

    @classmethod
    def fail(cls, node: torch.fx.Node, rule: str, reason: str, *, candidate: bool = True) -> "MatchResult":
        return cls(node=node, rule=rule, reason=reason, candidate=candidate)


class AttentionRule(abc.ABC, Generic[EmitT]):
    """One way attention is written in an ATen graph. Subclasses set `name` (the AttentionSite's
    rule) and implement the three methods."""

    name: str

    @abc.abstractmethod
    def pattern(self, node: torch.fx.Node) -> bool:
        """Whether `node` is what this rule anchors on (a cheap test on the target)."""

    @abc.abstractmethod
    def check(self, node: torch.fx.Node) -> MatchResult:
        """Match the attention anchored at `node`, reading only shape metadata; no graph edits."""

    @abc.abstractmethod
    def rewrite(self, graph: torch.fx.Graph, match: AttentionMatch[EmitT]) -> torch.fx.Node:
        """Emit vsopt.attention for `match` at graph's insertion point; the node returned has the
        value of match.output (in whatever memory layout), its users are left to the caller."""

    def matched(self, node: torch.fx.Node, emit: EmitT, **fields: Any) -> MatchResult:
        """A successful MatchResult for `node`, this rule and its emit record."""
        return MatchResult(node=node, rule=self.name, match=AttentionMatch(rule=self, emit=emit, **fields))


def normalize_args(node: torch.fx.Node) -> dict[str, Any]:
    """node's arguments by schema name (defaults filled in)."""
    schema = node.target._schema
    out, pos = {}, list(node.args)
    for i, arg in enumerate(schema.arguments):
        if i < len(pos) and not arg.kwarg_only:
            out[arg.name] = pos[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        else:
            out[arg.name] = arg.default_value if arg.has_default_value() else None
    return out


def users(node: torch.fx.Node) -> list[torch.fx.Node]:
    """node's users, without torch.export's aten._assert_tensor_metadata checks (they read a
    value's metadata but do not consume it; the rewrite erases them with the node)."""
    return [u for u in node.users if u.target is not aten._assert_tensor_metadata.default]
