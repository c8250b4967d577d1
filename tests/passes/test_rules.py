"""A rewrite rule is one class with pattern / check / rewrite: its check returns a frozen match
carrying a typed record of what to emit (no closure), and its rewrite is a method that can be
called directly, or overridden in a subclass that rewrite_attention then runs."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vsopt.backend import to_aten
from vsopt.core.config import VsoptConfig
from vsopt.passes import PassContext, detect_attention, rewrite_attention
from vsopt.passes.rules import (DEFAULT_RULES, AttentionMatch, AttentionRule, SdpaEmit, SdpaRule, SoftmaxAttentionRule,
                                SoftmaxEmit)

from ..conftest import op_names


class Softmax(nn.Module):
    def forward(self, q, k, v):
        return ((q @ k.transpose(-2, -1)) * 0.5).softmax(dim=-1) @ v


class Sdpa(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, scale=0.5)


def _inputs():
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(2, 3, 6, 4, generator=g) for _ in range(3))


def _match(rule: AttentionRule, gm: torch.fx.GraphModule) -> AttentionMatch:
    anchors = [n for n in gm.graph.nodes if rule.pattern(n)]
    assert len(anchors) == 1
    result = rule.check(anchors[0])
    assert result.ok, result.reason
    return result.match


def _rewrite(rule: AttentionRule, gm: torch.fx.GraphModule, match: AttentionMatch) -> None:
    with gm.graph.inserting_before(match.output):
        out = rule.rewrite(gm.graph, match)
    match.output.replace_all_uses_with(out)
    for node in reversed(list(gm.graph.nodes)):
        if node.name in match.nodes and not node.users:
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()


@pytest.mark.parametrize("model, rule, record", [(Softmax(), SoftmaxAttentionRule(), SoftmaxEmit),
                                                  (Sdpa(), SdpaRule("scaled_dot_product_attention"), SdpaEmit)],
                         ids=["softmax", "sdpa"])
def test_a_rule_matches_and_rewrites_directly(model, rule, record):
    inputs = _inputs()
    gm = to_aten(model, inputs)  # export's graph: aten.scaled_dot_product_attention, aten.matmul
    m = _match(rule, gm)
    assert m.rule is rule and isinstance(m.emit, record) and m.scale == 0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.scale = 1.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.emit.scale = 1.0  # type: ignore[misc]
    _rewrite(rule, gm, m)
    ops = op_names(gm)
    assert ops.count("vsopt.attention.default") == 1
    assert not any("softmax" in o or "scaled_dot_product" in o for o in ops)
    torch.testing.assert_close(gm(*inputs), model(*inputs))


def test_a_rule_that_does_not_apply_says_why_and_changes_nothing():
    rule = SoftmaxAttentionRule()
    gm = to_aten(nn.Softmax(dim=-1), (torch.randn(2, 5),))
    before = str(gm.graph)
    (sm,) = [n for n in gm.graph.nodes if rule.pattern(n)]
    result = rule.check(sm)
    assert not result.ok and not result.candidate and "does not come from a matmul" in result.reason
    assert str(gm.graph) == before


def test_rewrite_attention_runs_the_rewrite_of_the_rule_that_matched():
    """A subclass's rewrite (here: the parent's, then a scale by 1.0 to tag it) is what the pass uses."""
    calls = []

    class TaggingRule(SoftmaxAttentionRule):
        def rewrite(self, graph, match):
            calls.append(match.anchor.name)
            out = super().rewrite(graph, match)
            return graph.call_function(torch.ops.aten.mul.Tensor, (out, 1.0))

    inputs = _inputs()
    gm = to_aten(Softmax(), inputs)
    ctx = PassContext(config=VsoptConfig())
    detect_attention.run(gm, ctx)
    (site_id,) = ctx.matches
    ctx.matches[site_id] = dataclasses.replace(ctx.matches[site_id], rule=TaggingRule())
    report = rewrite_attention.run(gm, ctx)
    gm.recompile()
    assert len(calls) == 1 and any(n.startswith("mul") for n in report.created)
    torch.testing.assert_close(gm(*inputs), Softmax()(*inputs))


def test_variants_are_constructor_flags_of_one_class():
    sdpa = [r for r in DEFAULT_RULES if isinstance(r, SdpaRule)]
    assert len({type(r) for r in sdpa}) == 1 and len({r.op for r in sdpa}) == len(sdpa) > 1
    assert all(isinstance(r, AttentionRule) for r in DEFAULT_RULES)
