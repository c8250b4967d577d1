"""`vsopt diff` end to end through the real backend (vsopt.backend.trace_and_rewrite and the
default passes): the Python API on a hand-written model, and the CLI on a diffusers Wan model and
on a user's factory module."""
from __future__ import annotations

import json
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import vsopt
import vsopt.backend
from vsopt.backend import to_aten
from vsopt.cli import main


class SdpaBlock(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 2):
        super().__init__()
        self.qkv, self.proj, self.heads = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), heads

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, N, C))


class SdpaModel(nn.Module):
    def __init__(self, layers: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList([SdpaBlock() for _ in range(layers)])

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return x


def test_api_on_hand_written_model_replaces_exactly_the_attention_nodes():
    torch.manual_seed(0)
    model, inputs = SdpaModel().eval(), (torch.randn(1, 11, 16),)
    report = vsopt.diff(model, inputs)
    sdpa = ["scaled_dot_product_attention", "scaled_dot_product_attention_1", "scaled_dot_product_attention_2"]
    assert report.structure.removed == sdpa
    before = to_aten(model, inputs)
    live = {n.name for n in before.graph.nodes if n.op.startswith("call_") and n.users}
    assert set(report.structure.kept) == live - set(sdpa)
    assert [r.site_ids for r in report.structure.regions] == [["blocks.0"], ["blocks.1"], ["blocks.2"]]
    for r in report.structure.regions:
        assert [n.op for n in r.before.nodes] == ["scaled_dot_product_attention"]
        assert "vsopt.attention" in [n.op for n in r.after.nodes]
        assert r.passes == ["rewrite_attention"]
    # the dense rewrite is exact: no error anywhere
    assert report.numerical.first_over_threshold is None
    for s in report.numerical.sites:
        assert s.isolated.rel_l2 < 1e-6 and s.accumulated.rel_l2 < 1e-6 and len(s.heads_isolated) == 2


def test_cli_on_a_diffusers_wan_model_prints_both_views_and_writes_files(tmp_path, capsys):
    out_json, out_html = tmp_path / "wan.json", tmp_path / "wan.html"
    assert main(["diff", "vsopt.debug.targets:wan_tiny", "--json", str(out_json), "--html", str(out_html)]) == 0
    text = capsys.readouterr().out
    assert "STRUCTURE" in text and "NUMERICS" in text and "\x1b[" not in text  # not a tty: no colour
    sites = ["blocks.0.attn1", "blocks.0.attn2", "blocks.1.attn1", "blocks.1.attn2"]
    assert all(s in text for s in sites)
    assert max(len(line) for line in text.splitlines()) <= 80
    data = json.loads(out_json.read_text())
    assert [e["site_id"] for e in data["entries"]] == sites
    assert all(e["status"] == "rewritten" for e in data["entries"])
    assert data["numerical"]["first_over_threshold"] is None
    page = out_html.read_text()
    assert all(f'data-site="{s}"' in page for s in sites)


def test_cli_on_a_user_factory_shows_sites_left_alone_with_reasons(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_video_model.py").write_text(textwrap.dedent('''
        import torch, torch.nn as nn

        class NotAttention(nn.Module):
            """softmax over the query axis: a candidate no rule may accept."""
            def __init__(self):
                super().__init__()
                self.qkv = nn.Linear(8, 24)

            def forward(self, x):
                q, k, v = self.qkv(x).chunk(3, dim=-1)
                return (q @ k.transpose(-1, -2)).softmax(dim=-2) @ v

        def make():
            torch.manual_seed(0)
            return NotAttention().eval(), (torch.randn(1, 6, 8),)
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    out_json = tmp_path / "d.json"
    assert main(["diff", "my_video_model:make", "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    data = json.loads(out_json.read_text())
    assert data["entries"], "the candidate must be reported"
    for e in data["entries"]:
        assert e["status"] == "left alone" and e["reason"]
        assert e["reason"] in " ".join(text.split())  # the reason is printed (possibly wrapped)
        assert e["source"]["file"].endswith("my_video_model.py")
    assert data["structure"]["removed"] == [] and data["structure"]["created"] == []


def test_cli_rejects_bad_input_with_clear_errors(capsys):
    assert main(["diff", "no_colon"]) == 1
    assert "MODULE:FACTORY" in capsys.readouterr().err
    assert main(["diff", "vsopt.debug.targets:wan_tiny", "--threshold", "-1"]) == 1
    assert "--threshold" in capsys.readouterr().err


def skip_plan(model, inputs, site_id: str):
    """A plan that skips every head of one site (its output becomes zero)."""
    from vsopt.core.config import VsoptConfig
    from vsopt.core.plan import HeadPlan, Plan, SitePlan, Sparsity

    _, found = vsopt.backend.trace_and_rewrite(model, inputs, VsoptConfig(rewrite=False))
    site = {s.site_id: s for s in found.sites}[site_id]
    return Plan({site_id: SitePlan.for_site(site, HeadPlan(sparsity=Sparsity.SKIP, block_m=16, block_n=16))})


def test_plan_with_a_large_error_at_one_site_names_that_site_first():
    """A plan that skips every head of blocks.1: the report names blocks.1 first; the sites
    outside the plan stay dense and say why."""
    torch.manual_seed(0)
    model, inputs = SdpaModel().eval(), (torch.randn(1, 40, 16),)
    report = vsopt.diff(model, inputs, plan=skip_plan(model, inputs, "blocks.1"))
    num = report.numerical
    assert num.first_over_threshold == "blocks.1" and num.ranking[0] == "blocks.1"
    errors = {s.site_id: s for s in num.sites}
    assert errors["blocks.1"].isolated.rel_l2 == pytest.approx(1.0)  # a skipped head outputs zeros
    assert errors["blocks.0"].accumulated.rel_l2 < 1e-6 and errors["blocks.2"].isolated.rel_l2 < 1e-6
    assert errors["blocks.2"].accumulated.rel_l2 > 1e-3  # blocks.2 inherits blocks.1's error
    e1 = report.entry("blocks.1")
    assert [n.op for n in e1.region.before.nodes] == ["scaled_dot_product_attention"]
    assert "vsopt.block_sparse_attention" in [n.op for n in e1.region.after.nodes]
    assert [h["sparsity"] for h in e1.plan_heads] == ["skip", "skip"] and e1.plan_heads[0]["density"] == 0.0
    for other in ("blocks.0", "blocks.2"):  # kept dense, with lower_plan's reason
        e = report.entry(other)
        assert e.status == "rewritten" and "plan" in e.reason
        assert [n.op for n in e.region.after.nodes][0] == "vsopt.attention"
    text = report.render_text()
    assert "first site over threshold: blocks.1" in text and report.entry("blocks.0").reason in text


def test_json_through_the_backend_is_stable_across_runs(tmp_path):
    torch.manual_seed(0)
    model, inputs = SdpaModel().eval(), (torch.randn(1, 40, 16),)
    plan = skip_plan(model, inputs, "blocks.2")
    first = vsopt.diff(model, inputs, plan=plan).write_json(tmp_path / "a.json").read_bytes()
    second = vsopt.diff(model, inputs, plan=plan).write_json(tmp_path / "b.json").read_bytes()
    assert first == second
    assert json.loads(first)["numerical"]["first_over_threshold"] == "blocks.2"


def test_reference_model_over_sampler_steps():
    """The shipped reference model (trained diffusers Wan) at a small clip size, with the view
    over its Euler sampler's steps: every site is found with its inferred grid, and a plan that
    skips one self-attention is seen at every step, the trajectory drifting from dense."""
    from vsopt.debug.targets import SAMPLER_STEPS, reference

    from vsopt.core.ir import TokenGrid
    from vsopt.core.plan import HeadPlan, Plan, SitePlan, Sparsity

    model, inputs, sampler = reference(frames=2, height=8, width=8)
    heads = model.config.num_attention_heads  # a plan written by hand: no extra trace to find the site
    skip = SitePlan("blocks.2.attn1", heads, 32, 32, TokenGrid(2, 4, 4),
                    (HeadPlan(sparsity=Sparsity.SKIP, block_m=16, block_n=16),) * heads)
    plan = Plan({"blocks.2.attn1": skip})
    report = vsopt.diff(model, inputs, plan=plan, sampler=sampler)
    layers = model.config.num_layers
    assert [e.site_id for e in report.entries] == [f"blocks.{i}.attn{j}" for i in range(layers) for j in (1, 2)]
    assert all(str(e.site.grid) == "2x4x4" for e in report.entries)
    assert report.numerical.first_over_threshold == "blocks.2.attn1"
    assert len(report.steps) == SAMPLER_STEPS
    assert all(s.numerical.first_over_threshold == "blocks.2.attn1" for s in report.steps)
    assert all(s.state.rel_l2 > 1e-4 for s in report.steps)
