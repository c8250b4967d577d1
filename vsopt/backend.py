"""The torch.compile backend: torch.compile(model, backend="vsopt", options={...}).

The passes run on the ATen-level FX graph, so that torch.compile and torch.export share them:

    Dynamo graph (torch level) --to_aten--> ATen graph --DEFAULT_PIPELINE--> rewritten ATen graph
        --compile_fx--> Inductor

Public functions (calibration, inspect and the graph-diff debugger call the first two):

    to_aten(model_or_gm, example_inputs) -> torch.fx.GraphModule
    trace_and_rewrite(model, example_inputs, config) -> (gm, PipelineReport)
    vsopt_backend(gm, example_inputs, options=None)   the torch_dynamo_backends entry point

An attention before and after (timm, fused_attn=False; ATen, one head group shown):
    before:  bmm(q', k') -> _unsafe_view -> mul(0.125) -> _softmax(-1) -> expand -> view
             -> bmm(p, v') -> _unsafe_view
    after:   vsopt.attention(q, k, v, None, 0.125, False) -> _unsafe_view
"""
from __future__ import annotations

import operator
import dataclasses
from typing import Any, Mapping, Sequence

import torch
import torch.fx
import torch.fx.traceback as fx_traceback
from torch._guards import detect_fake_mode
from torch.fx.experimental.proxy_tensor import make_fx

from vsopt.core.config import VsoptConfig
from vsopt.core.errors import ConfigError
from vsopt.core.steps import step_variants
from vsopt.passes import DEFAULT_PIPELINE, PassContext, PipelineOptions, PipelineReport, run_pipeline


def _is_dynamo_graph(gm: Any) -> bool:
    if not isinstance(gm, torch.fx.GraphModule):
        return False
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return bool(placeholders) and all("example_value" in n.meta for n in placeholders)


def _is_aten_graph(gm: Any) -> bool:
    """A GraphModule whose calls are all ATen/custom op overloads (with shape metadata)."""
    if not isinstance(gm, torch.fx.GraphModule) or _is_dynamo_graph(gm):
        return False
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    return all((isinstance(n.target, torch._ops.OpOverload) or n.target is operator.getitem) and "val" in n.meta
               for n in calls)


def to_aten(model_or_gm: torch.nn.Module, example_inputs: Sequence[Any]) -> torch.fx.GraphModule:
    """An ATen-level FX graph of the model, with nn_module_stack, stack_trace and meta["val"] on
    its nodes.

    - A Dynamo graph (what a backend receives): traced again with make_fx in Dynamo's fake mode,
      through an fx.Interpreter under preserve_node_meta so node metadata survives. The result
      takes the same inputs as the Dynamo graph (parameters lifted as inputs), and the ATen ops
      are post-dispatch (SDPA appears as e.g. _scaled_dot_product_flash_attention_for_cpu).
    - An ExportedProgram: its module() (the export path runs the same passes on it).
    - Any other module: torch.export (non-strict) and ExportedProgram.module(); the result takes
      the model's own (flattened) inputs, parameters are attributes, and ops are export's
      training IR (aten.scaled_dot_product_attention, aten.matmul, aten.einsum kept whole).
    """
    if isinstance(model_or_gm, torch.export.ExportedProgram):  # already exported: use its graph
        model_or_gm = model_or_gm.module()
    elif not isinstance(model_or_gm, torch.nn.Module):
        raise ConfigError(f"to_aten expects an nn.Module or GraphModule, got {type(model_or_gm).__name__}")
    example_inputs = tuple(example_inputs)
    if _is_aten_graph(model_or_gm):
        aten_gm = model_or_gm  # an ATen graph already (e.g. from ExportedProgram.module())
    elif _is_dynamo_graph(model_or_gm):
        gm = model_or_gm
        fake_mode = detect_fake_mode(example_inputs)
        fake_inputs = [n.meta["example_value"] for n in gm.graph.nodes if n.op == "placeholder"]

        def run(*args):
            return torch.fx.Interpreter(gm).run(*args)

        with fx_traceback.preserve_node_meta(), (fake_mode if fake_mode is not None else _null()):
            aten_gm = make_fx(run, tracing_mode="fake" if fake_mode is not None else "real")(*fake_inputs)
    else:
        ep = torch.export.export(model_or_gm, example_inputs, strict=False)
        aten_gm = ep.module()
    aten_gm.graph.eliminate_dead_code()
    aten_gm.recompile()
    return aten_gm


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def trace_and_rewrite(model: torch.nn.Module, example_inputs: Sequence[Any], config: VsoptConfig | None = None,
                      *, options: PipelineOptions | None = None) -> tuple[torch.fx.GraphModule, PipelineReport]:
    """to_aten, then passes.DEFAULT_PIPELINE: the rewritten ATen graph and what the passes found
    (report.passes: each pass's created / removed nodes). With config.rewrite False the graph is
    traced and its sites reported, but left unchanged. options: check the graph after every pass,
    or dump it to a folder (passes.PipelineOptions)."""
    config = config or VsoptConfig()
    gm = to_aten(model, example_inputs)
    report = run_pipeline(gm, PassContext(config=config), DEFAULT_PIPELINE, options)
    return gm, report


def vsopt_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any],
                  options: Mapping[str, Any] | None = None):
    """torch.compile backend: rewrite the attention sites of Dynamo's graph, then Inductor.

    A plan with separate head plans for ranges of denoising steps compiles one graph per segment
    of steps and picks one at each call from vsopt.set_denoising_step (unknown step: the default
    head plans)."""
    from torch._inductor.compile_fx import compile_fx

    config = VsoptConfig.from_options(options)

    def build(plan):
        aten_gm, _report = trace_and_rewrite(gm, example_inputs, dataclasses.replace(config, plan=plan))
        return compile_fx(aten_gm, list(example_inputs))

    # a plan with step ranges: one graph per segment of steps, chosen per call (vsopt.core.steps)
    return step_variants(config.plan, build)
