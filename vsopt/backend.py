"""The torch.compile backend: torch.compile(model, backend="vsopt", options={...}).

The passes run on the ATen-level FX graph, so that torch.compile and torch.export share them:

    Dynamo graph (torch level) --to_aten--> ATen graph --DEFAULT_PIPELINE--> rewritten ATen graph
        --vsopt.inductor.compile_fx--> Inductor (without Inductor's own attention fusion)

Public functions (calibration, inspect and the graph-diff debugger call the first two):

    to_aten(model_or_gm, example_inputs) -> torch.fx.GraphModule
    trace_and_rewrite(model, example_inputs, config) -> (gm, PipelineReport)
    vsopt_backend(gm, example_inputs, options=None)   the torch_dynamo_backends entry point
    last_report() -> PipelineReport | None           what the last compiled graph's passes found

A graph Dynamo starts in a submodule's frame is placed in the compiled module (_place_frame ->
passes/site_ids.FrameNames), so its site ids are full module paths; under a plan, PerModule
compiles it once per module that runs it.

An attention before and after (timm, fused_attn=False; ATen, one head group shown):
    before:  bmm(q', k') -> _unsafe_view -> mul(0.125) -> _softmax(-1) -> expand -> view
             -> bmm(p, v') -> _unsafe_view
    after:   vsopt.attention(q, k, v, None, 0.125, False) -> _unsafe_view
"""
from __future__ import annotations

import dataclasses
import logging
import operator
import sys
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx
import torch.fx.traceback as fx_traceback
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.experimental.proxy_tensor import make_fx

from vsopt.core.config import VsoptConfig
from vsopt.core.errors import ConfigError
from vsopt.core.resample import NOTE_PREFIX as FIT_NOTE
from vsopt.core.steps import step_variants
from vsopt.carried import carry
from vsopt.passes import DEFAULT_PIPELINE, PassContext, PipelineOptions, PipelineReport, run_pipeline
from vsopt.passes.carried_tokens import CARRIED
from vsopt.passes.data_sizes import dynamo_left_out_data_dependent_code
from vsopt.passes.site_ids import FRAME_NAMES, frame_names


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

    - A Dynamo graph (what a backend receives): traced again with make_fx on Dynamo's fake
      inputs (its placeholders' example values, symbolic sizes kept: _retrace), through an
      fx.Interpreter under preserve_node_meta so node metadata survives. to_aten_at(gm, args)
      traces it at the concrete sizes of a call's arguments instead. The result
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
        _specialize_float_inputs(gm)
        if FRAME_NAMES not in gm.meta:  # vsopt_backend placed it already
            _place_frame(gm, example_inputs)
        fake_mode = detect_fake_mode(example_inputs)  # None where Dynamo hands the backend real tensors
        fake_inputs = [n.meta["example_value"] for n in gm.graph.nodes if n.op == "placeholder"]
        aten_gm = _retrace(gm, fake_mode, fake_inputs)
    else:
        ep = torch.export.export(model_or_gm, example_inputs, strict=False)
        aten_gm = ep.module()
    aten_gm.graph.eliminate_dead_code()
    aten_gm.recompile()
    return aten_gm


def _has_symbols(values: Sequence[Any]) -> bool:
    """Whether any value (a FakeTensor's sizes or strides, a SymInt) is symbolic."""
    from torch.fx.experimental.symbolic_shapes import free_symbols

    return any(free_symbols(v) for v in values if isinstance(v, (torch.Tensor, torch.SymInt, torch.SymFloat)))


def _graph_has_symbols(gm: torch.fx.GraphModule) -> bool:
    """Whether Dynamo's graph computes with symbolic sizes anywhere: dynamic input sizes, or the
    unbacked sizes of data-dependent ops (nonzero, .item() under capture_scalar_outputs)."""
    return _has_symbols([v for n in gm.graph.nodes
                         for v in torch.utils._pytree.tree_leaves(n.meta.get("example_value"))])


def _retrace(gm: torch.fx.GraphModule, fake_mode, fake_inputs: Sequence[Any]) -> torch.fx.GraphModule:
    """make_fx of Dynamo's graph, run node by node (an fx.Interpreter under preserve_node_meta, so
    nn_module_stack and stack traces survive), in `fake_mode` on inputs of that mode.

    Symbols stay symbols, as in AOTAutograd's own trace (torch/_functorch/_aot_autograd/
    graph_capture.py): the inputs are already fake tensors of the mode that made Dynamo's graph
    (its ShapeEnv holds every symbol), make_fx runs in that ambient mode, and where the graph has
    symbols the python dispatcher decomposes composite ops with SymInts. Without the python
    dispatcher, the C++ composite kernels demand concrete sizes: F.pad of a tensor whose length
    comes from nonzero or .item() failed with "SymIntArrayRef expected to contain only concrete
    integers" (issue 14, class 1)."""
    from torch._dispatch.python import enable_python_dispatcher

    def run(*args):
        return torch.fx.Interpreter(gm).run(*args)

    dispatcher = enable_python_dispatcher() if _graph_has_symbols(gm) else _null()
    with fx_traceback.preserve_node_meta(), (fake_mode if fake_mode is not None else _null()), dispatcher:
        # fake inputs under "real" tracing run in their own mode (make_fx adds no conversion)
        aten_gm = make_fx(run, tracing_mode="fake" if fake_mode is not None else "real")(*fake_inputs)
    for key in (FRAME_NAMES, CARRIED):  # where the frame sits; the tokens carried into its inputs
        if key in gm.meta:
            aten_gm.meta[key] = gm.meta[key]
    return aten_gm


def _place_frame(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> tuple[torch.nn.Module | None, bool]:
    """Record where the frame of Dynamo's graph sits in the compiled module (passes/site_ids.py:
    FrameNames, so that site ids are full module paths after a graph break), once, while Dynamo
    compiles it: the compiled module is read from the Python stack (the nearest OptimizedModule's
    _orig_mod, or a module compiled in place by module.compile()), and the frame is nested when
    another module's code calls it. Returns (compiled module or None, nested)."""
    root, selves, f = None, [], sys._getframe(1)
    while f is not None and root is None:
        s = f.f_locals.get("self") if "self" in f.f_code.co_varnames else None
        if isinstance(s, torch.nn.Module) and not isinstance(s, torch.fx.GraphModule):
            orig = getattr(s, "_orig_mod", None)
            in_place = getattr(s, "_compiled_call_impl", None) is not None
            root = orig if isinstance(orig, torch.nn.Module) else s if in_place else None
            selves.append(s)
        f = f.f_back
    nested = any(m is not root for m in (selves[:-1] if root is not None else selves))
    if FRAME_NAMES not in gm.meta:
        gm.meta[FRAME_NAMES] = frame_names(gm, example_inputs, root, nested)
    return root, nested


def to_aten_at(gm: torch.fx.GraphModule, args: Sequence[Any], fake_mode=None) -> torch.fx.GraphModule:
    """The ATen graph of Dynamo's graph `gm` specialized to the sizes of `args` (real tensors and
    ints, what the compiled graph is called with): a graph Dynamo traced with symbolic sizes,
    traced again in a fake mode (fake_mode, or a fresh one: concrete_fake_mode) whose inputs have
    these concrete sizes and strides. The data-dependent (unbacked) sizes of the graph stay
    symbolic; every other size is a number, so the passes can build the site's masks and tables
    for this resolution."""
    fake_mode = fake_mode or concrete_fake_mode()
    fakes = [fake_mode.from_tensor(a, static_shapes=True) if isinstance(a, torch.Tensor) else a for a in args]
    aten_gm = _retrace(gm, fake_mode, fakes)
    aten_gm.graph.eliminate_dead_code()
    aten_gm.recompile()
    return aten_gm


def concrete_fake_mode():
    """A fake mode with static input sizes whose ShapeEnv admits the data-dependent ops a Dynamo
    graph can hold (it holds them only where Dynamo's config captured them)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    shape_env = ShapeEnv(allow_scalar_outputs=True, allow_dynamic_output_shape_ops=True)
    return FakeTensorMode(shape_env=shape_env, allow_non_fake_inputs=True, static_shapes=True)


def _specialize_float_inputs(gm: torch.fx.GraphModule) -> None:
    """Make Dynamo specialize the Python floats it passed as 0-d tensors read with .item().

    Dynamo does not specialize every float (a dropout p, a scale or fill value under
    dynamic=True): it passes each as a 0-d tensor, and the value only exists as a symbolic float.
    A re-trace cannot read it (aten._local_scalar_dense fails on fake tensors), and the rules need
    these values as constants anyway (a scale, a mask fill, whether a dropout is a no-op). So ask
    Dynamo to restart its analysis with those floats specialized: the request Inductor's own
    tensorify pass makes for the floats it cannot keep symbolic. Dynamo then guards on their values."""
    try:
        from torch._dynamo.exc import TensorifyScalarRestartAnalysis
        from torch._dynamo.symbolic_convert import TensorifyState
    except ImportError:  # a torch without the mechanism: the graph is traced as it is
        return
    names = []
    for n in gm.graph.find_nodes(op="placeholder"):
        value = n.meta.get("example_value")
        memo = value.item_memo if isinstance(value, FakeTensor) else None
        name = getattr(getattr(getattr(memo, "node", None), "_expr", None), "name", None)
        if isinstance(memo, torch.SymFloat) and name and not TensorifyState.should_specialize(name):
            names.append(name)
    if names:
        for name in names:
            TensorifyState.specialize(name)
        raise TensorifyScalarRestartAnalysis


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

    A plan with separate head plans for ranges of denoising steps compiles one graph per distinct
    segment of steps and picks one at each call from vsopt.set_denoising_step (unknown step: the
    default head plans, compiled on its first call unless a segment runs the same; vsopt.core.steps). options["cudagraphs"]: every graph runs under Inductor's CUDA graphs. What was
    left dense is logged and kept for last_report().

    A graph Dynamo traced with symbolic input sizes (its automatic dynamic shapes on the second
    resolution, or dynamic=True) is lowered once per concrete resolution it is called with
    (PerResolution; docs/RUNTIME.md says why): the plan's tables are built for each grid, the plan
    itself fitted to it (vsopt.core.resample)."""
    config = VsoptConfig.from_options(options)
    if config.cudagraphs:  # options={"cudagraphs": True}: Inductor's CUDA graphs (vsopt/cudagraphs.py)
        from vsopt import cudagraphs

        config = dataclasses.replace(config, plan=cudagraphs.plan_for_cudagraphs(config.plan))
    _specialize_float_inputs(gm)  # may restart Dynamo's analysis: here, never inside a call
    root, nested = _place_frame(gm, example_inputs)  # while Dynamo compiles (PerResolution traces at call time)
    sized = symbolic_input_positions(gm)

    def build(g: torch.fx.GraphModule):
        compiled = PerResolution(g, config, sized) if sized else _compile(g, config, example_inputs,
                                                                          lambda: to_aten(g, example_inputs))
        if config.plan is not None and g.meta[FRAME_NAMES].nested:
            return PerModule(g, config, example_inputs, compiled, root, nested, sized)
        return compiled

    # the video tokens an earlier graph's output carries into this graph's inputs (vsopt/carried.py)
    return carry(gm, example_inputs, build, to_aten)


def _compile(gm: torch.fx.GraphModule, config: VsoptConfig, inputs: Sequence[Any],
             trace: Callable[[], torch.fx.GraphModule]):
    """Dynamo's graph traced to ATen by `trace` (at Dynamo's sizes, or at a call's), rewritten
    and compiled by Inductor with `inputs` as example inputs; one graph per step segment."""
    from vsopt.inductor import compile_fx  # Inductor without its attention fusion (vsopt.inductor says why)
    from vsopt.inductor import prepare as prepare_for_inductor

    reports: list[PipelineReport] = []
    built_up_front: list[bool] = []

    def build(plan):
        aten_gm = trace()
        report = run_pipeline(aten_gm, PassContext(config=dataclasses.replace(config, plan=plan)), DEFAULT_PIPELINE)
        reports.append(report)
        if built_up_front:  # a variant built on its first call (the unknown step's): its log lines now
            _tell(config, [report])
        prepare_for_inductor(aten_gm)   # static permutations as gathers; before cudagraphs names the constants
        if config.cudagraphs:
            from vsopt import cudagraphs

            return cudagraphs.compile_graph(aten_gm, gm, inputs)
        return compile_fx(aten_gm, list(inputs))

    # a plan with step ranges: one graph per segment of steps, chosen per call (vsopt.core.steps)
    compiled = step_variants(config.plan, build)
    _tell(config, reports)
    built_up_front.append(True)
    return compiled


def symbolic_input_positions(gm: torch.fx.GraphModule) -> tuple[int, ...]:
    """Indices of the inputs of Dynamo's graph whose sizes or strides are symbolic (a FakeTensor
    with symbolic sizes, a SymInt, in the placeholders' example values: torch 2.14 hands the
    backend real example tensors): where a call's concrete resolution is read from."""
    return tuple(i for i, n in enumerate(gm.graph.find_nodes(op="placeholder"))
                 if _has_symbols([n.meta.get("example_value")]))


class PerResolution:
    """What the backend returns for a graph with symbolic input sizes: at each call, the graph
    compiled for the concrete sizes of that call's arguments (traced again from Dynamo's graph
    with those sizes: vsopt.backend.to_aten_at), compiled on the first call at a resolution and
    cached by the sizes and strides of the symbolic inputs.

    Why not lower with symbolic sizes: a site's lowering is constant tables (kv indices per query
    block, token permutations) that are functions of the grid, and the grid (frames, height,
    width, text) is what varies; a symbolic table would have to be built inside the graph at
    every call. One graph per resolution is what dynamic=False would give, without Dynamo's
    recompile limit, and one Dynamo graph (one guard set) serves every size."""

    def __init__(self, gm: torch.fx.GraphModule, config: VsoptConfig, positions: Sequence[int]):
        self.gm, self.config, self.positions = gm, config, tuple(positions)
        self.compiled: dict[tuple, Any] = {}

    def key(self, args: Sequence[Any]) -> tuple:
        return tuple((tuple(a.shape), tuple(a.stride())) if isinstance(a, torch.Tensor) else a
                     for a in (args[i] for i in self.positions))

    def __call__(self, *args):
        key = self.key(args)
        fn = self.compiled.get(key)
        if fn is None:
            sizes = ", ".join(str(tuple(k[0])) if isinstance(k, tuple) else str(k) for k in key)
            _log.info("vsopt: compiling for input sizes %s (Dynamo's graph has symbolic sizes: vsopt lowers "
                      "one graph per resolution)", sizes)
            fn = self.compiled[key] = self.compile(args)
        return fn(*args)

    def compile(self, args: Sequence[Any]):
        """The graph at the sizes of `args`. Inductor runs in the same fake mode as the re-trace
        (a TracingContext, as under Dynamo), so it too admits the graph's data-dependent ops."""
        from torch._guards import TracingContext, tracing

        fake_mode = concrete_fake_mode()
        with tracing(TracingContext(fake_mode)):
            return _compile(self.gm, self.config, args, lambda: to_aten_at(self.gm, args, fake_mode))


def placed_at(gm: torch.fx.GraphModule, args: Sequence[Any], root: torch.nn.Module | None,
              nested: bool) -> torch.fx.GraphModule:
    """The graph of a submodule's frame, placed at the module whose parameters `args` holds (its
    site ids: site_ids.FrameNames.at); the graph itself is shared."""
    placed = torch.fx.GraphModule(gm, gm.graph)
    placed.meta.update(gm.meta)
    placed.meta[FRAME_NAMES] = gm.meta[FRAME_NAMES].at(args, root, nested)
    return placed


def module_key(gm: torch.fx.GraphModule, args: Sequence[Any]) -> tuple[int, ...]:
    """Which module a call of a submodule frame's graph runs for: the identities of the inputs that
    placed the frame (its parameters: alive while the module is)."""
    return tuple(id(args[i]) for i in gm.meta[FRAME_NAMES].inputs)


class PerModule:
    """What the backend returns for the graph of a submodule's frame (Dynamo compiled a block's forward
    on its own, after a graph break) under a plan: Dynamo runs that one graph for every module of the
    same code (blocks.0, blocks.1, ...: their parameters are its inputs), but each module's sites have
    their own plan entries. So a call with another module's parameters (module_key) compiles the
    graph again, placed at that module (placed_at: its site ids, hence its plan entries), once per
    module."""

    def __init__(self, gm: torch.fx.GraphModule, config: VsoptConfig, first_args: Sequence[Any], first: Any,
                 root: torch.nn.Module | None, nested: bool, sized: Sequence[int]):
        self.gm, self.config, self.root, self.nested, self.sized = gm, config, root, nested, tuple(sized)
        self.compiled = {module_key(gm, first_args): first}

    def __call__(self, *args):
        key = module_key(self.gm, args)
        fn = self.compiled.get(key)
        if fn is None:
            gm = placed_at(self.gm, args, self.root, self.nested)
            _log.info("vsopt: compiling a submodule's graph again at %s (Dynamo runs one graph for every "
                      "module of this code; each module's sites have their own plan entries)",
                      dict(gm.meta[FRAME_NAMES].prefixes))
            fn = PerResolution(gm, self.config, self.sized)
            fn = self.compiled[key] = fn if self.sized else fn.compile(args)
        return fn(*args)


def report_each_module(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], config: VsoptConfig,
                       reports: list) -> Callable:
    """A report-only backend's body (vsopt.inspect): the passes' report of Dynamo's graph appended to
    `reports`, and the graph returned as it is (uncompiled). A submodule frame's graph that Dynamo
    runs for several modules gets one report per module, placed at it on its first call, as
    PerModule compiles it under a plan: so inspect lists every module's sites, as compile plans them."""
    root, nested = _place_frame(gm, example_inputs)

    def build(g: torch.fx.GraphModule):
        _aten, report = trace_and_rewrite(g, example_inputs, config)
        reports.append(report)
        if not g.meta[FRAME_NAMES].nested or not (report.sites or report.skipped):
            return g.forward  # one module, or no attention to place
        seen = {module_key(g, example_inputs)}

        def run(*args):
            key = module_key(g, args)
            if key not in seen:
                seen.add(key)
                placed = placed_at(g, args, root, nested)
                reports.append(run_pipeline(to_aten_at(placed, args), PassContext(config=config), DEFAULT_PIPELINE))
            return g.forward(*args)

        return run

    return carry(gm, example_inputs, build, to_aten)  # with the tokens carried into its inputs, as compile


_log = logging.getLogger("vsopt")
_last: list[PipelineReport] = []


def last_report() -> PipelineReport | None:
    """What the passes found in the last graph torch.compile(backend="vsopt") compiled in this
    process (None before the first): its sites, report.lowered, report.dense_sites() (every site
    left dense, with why), each pass's changes. A model Dynamo splits into several graphs is
    compiled graph by graph: this is the last one's. With step ranges, the first segment's graph (a
    variant built later, on its first call, replaces it: the unknown step's, when it runs head plans
    no segment runs)."""
    return _last[0] if _last else None


_told_left_out: set[str] = set()   # each note on code Dynamo left out, once per process


def _tell(config: VsoptConfig, reports: Sequence[PipelineReport]) -> None:
    """One log line (logger "vsopt") per site left dense, with why: a warning where a plan was
    given and not applied (its lines are what a plan for another model or other head counts
    produces), info where dense is what was asked for (no plan, a dense entry); and one info line
    per plan entry fitted to another clip size, with its density change."""
    _last[:] = [reports[0]]
    lines = {}
    for report in reports:
        for s in report.skipped:
            level = logging.WARNING if config.plan is not None else logging.INFO
            lines.setdefault(f"site {s.site_id!r} runs dense: {s.reason}", level)
        for site_id, why in report.kept_dense.items():
            lines.setdefault(f"site {site_id!r} runs dense: {why}", logging.INFO)
        for p in report.passes:  # a plan entry made at another size, fitted to this one (vsopt.core.resample)
            for note in p.notes:
                if note.startswith(FIT_NOTE):
                    lines.setdefault(note, logging.INFO)
        if report.absent_plan_sites:  # may be in another graph of the same model (a graph break)
            lines.setdefault(f"plan sites not in this graph: {report.absent_plan_sites}", logging.INFO)
    for line, level in lines.items():
        _log.log(level, "vsopt: %s", line)
    left_out = dynamo_left_out_data_dependent_code()   # Mochi's processor under Dynamo's defaults
    if left_out is not None and left_out not in _told_left_out:
        _told_left_out.add(left_out)
        _log.log(logging.WARNING if config.plan is not None else logging.INFO, "vsopt: %s", left_out)


