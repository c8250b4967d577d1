"""How vsopt hands its rewritten graph to Inductor: compile_fx without Inductor's attention fusion.

Inductor's joint-graph pattern matcher rewrites softmax(q @ k^T * s) @ v into SDPA
(torch/_inductor/fx_passes/fuse_attention.py, the "_sfdp_pattern_*" replacements it registers
into joint_graph.patterns). Those patterns match any softmax dimension, so on torch 2.13 and 2.14
they also turn softmax(dim=-2), a softmax over the query axis, into SDPA: wrong numbers with plain
backend="inductor" too (docs/RELIABILITY.md has the repro). vsopt owns attention: every site it
can rewrite is vsopt.attention by the time Inductor sees the graph, and what it left alone it left
for a reason. So for vsopt's compile_fx call the fuse_attention entries are taken out of the
joint-graph pattern passes, and every other pattern there (pad_mm, pointless views and
conversions, ...) still runs. Inductor has no narrower switch: config.pattern_matcher turns off
every pattern pass, pre-grad, joint-graph and post-grad.

Inductor caches compiled graphs on disk, keyed without that filter: an entry compiled with the
fusion (by an older vsopt) would be reused as it is. So the call also adds a joint-graph pass that
changes nothing but Inductor's cache key (_CacheKey), chained with any pass the user set there.

The same keys also miss what vsopt's ops compute. AOTAutograd's cache keys a graph by its nodes,
and a torch.ops.vsopt.* node is its name only; what the op's body traced into (on CPU, the
references of kernels/) is not hashed. So after a change to a reference a graph compiled before
it was reused from disk: the fuzz test's int8_fp8 head ran an older reference without the FP8
rounding of P (1.6e-2 rel L2 from the current one; /tmp/torchinductor_<user> is shared by every
checkout of a machine, so any older checkout's entry). CACHE_KEY therefore carries a fingerprint
of the source of the code those bodies run (kernels/ and vsopt/core/): a changed op misses. The
key also carries the block-sparse route's switch (route.cache_tag: with VSOPT_GLUON=0 the op's body
traces into the Triton kernel, else into the Gluon kernel's opaque op, under the same op name).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

log = logging.getLogger("vsopt")
FUSE_ATTENTION = "torch._inductor.fx_passes.fuse_attention"  # the module whose patterns are left out


def is_attention_fusion(entry: Any) -> bool:
    """Whether a pattern entry is one of Inductor's SDPA fusions (its extra check lives in
    fuse_attention.py, and newer versions name it "_sfdp_pattern_...")."""
    name = getattr(entry, "pattern_name", None) or ""
    check = getattr(entry, "extra_check", None)
    return name.startswith("_sfdp_pattern") or getattr(check, "__module__", None) == FUSE_ATTENTION


class _WithoutAttentionFusion:
    """A joint-graph pattern pass that applies its patterns except the attention fusions. The
    patterns are read when the pass runs (Inductor registers the fusions lazily, on its first
    compile), so a pass wrapped before then is filtered all the same."""

    def __init__(self, inner: Any):
        self.inner = inner

    def apply(self, graph) -> int:
        saved = self.inner.patterns
        kept = defaultdict(list)
        for key, entries in saved.items():
            rest = [e for e in entries if not is_attention_fusion(e)]
            if rest:
                kept[key] = rest
        self.inner.patterns = kept
        try:
            return self.inner.apply(graph)
        finally:
            self.inner.patterns = saved

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def op_source_fingerprint(packages: Sequence[str] = ("vsopt.kernels", "vsopt.core")) -> str:
    """sha256 (16 hex digits) over the .py files (path and contents, sorted) of the packages whose
    code the bodies of vsopt's ops run when Inductor traces them (see the module docstring)."""
    digest = hashlib.sha256()
    for name in packages:
        spec = importlib.util.find_spec(name)
        for root in (spec.submodule_search_locations or []) if spec else []:
            for path in sorted(Path(root).rglob("*.py")):
                digest.update(f"{name}/{path.relative_to(root).as_posix()}\0".encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


CACHE_KEY = f"vsopt: Inductor without its attention fusion, v1; ops {op_source_fingerprint()}"


def _cache_key_pass(user: Any) -> Any:
    """A joint_custom_pre_pass that runs the user's (if any) and adds CACHE_KEY to Inductor's
    cache keys (a user pass without a uuid still turns caching off, as it would alone)."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class _CacheKey(CustomGraphPass):
        def __init__(self, inner: tuple):
            self.inner = inner

        def __call__(self, graph) -> None:
            for p in self.inner:
                p(graph)

        def uuid(self) -> Any:
            inner = []
            for p in self.inner:
                if not isinstance(p, CustomGraphPass) or p.uuid() is None:
                    return None
                inner.append(p.uuid())
            return (CACHE_KEY, _route_tag(), *inner)

    return _CacheKey(tuple(user) if isinstance(user, (list, tuple)) else (() if user is None else (user,)))


def _route_tag() -> str:
    """The block-sparse route's switch and measured choice (kernels/block_sparse/route.py): a graph traced
    with the Gluon route holds another op than one traced without it, under the same op name."""
    from vsopt.kernels.block_sparse import route

    return route.cache_tag()


@contextlib.contextmanager
def without_attention_fusion() -> Iterator[None]:
    """Inductor's joint-graph passes without its SDPA fusion patterns, inside the block (and
    Inductor's cache keys saying so)."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch(joint_custom_pre_pass=_cache_key_pass(inductor_config.joint_custom_pre_pass)), \
            _filtered_pattern_passes():
        yield


@contextlib.contextmanager
def _filtered_pattern_passes() -> Iterator[None]:
    try:
        from torch._inductor.fx_passes import joint_graph
        passes = joint_graph.pass_patterns
        if not all(hasattr(p, "patterns") and hasattr(p, "apply") for p in passes):
            raise AttributeError("pass_patterns")
    except (ImportError, AttributeError):
        # A torch whose pattern passes look otherwise: the only switch left is the broad one.
        log.warning("vsopt: this torch's Inductor pattern passes are not the expected ones; Inductor's "
                    "pattern matching is turned off for vsopt's graphs so that its SDPA fusion cannot run")
        import torch._inductor.config as inductor_config

        with inductor_config.patch(pattern_matcher=False):
            yield
        return
    saved = list(passes)
    passes[:] = [_WithoutAttentionFusion(p) for p in saved]
    try:
        yield
    finally:
        passes[:] = saved


#: What prepare() does (passes/inline_permutations.py and passes/static_work_orders.py say why);
#: False keeps the graph as the pipeline left it (benchmarks/host_overhead.py measures both).
INLINE_PERMUTATIONS = True
STATIC_WORK_ORDERS = True
#: Sites left dense written as ATen SDPA (passes/inline_dense_attention.py). Measured on the H200
#: (benchmarks/small_n_gpu.py, 2026-12-02, reference model at 4096 tokens without CUDA graphs, 60
#: interleaved calls each): one tiny vsopt.attention call costs 48.8 us of host time against
#: 20.2 us for ATen's SDPA. Per forward, pipelined: Inductor 2.96 ms, vsopt without a plan 3.59,
#: inlined 3.03; synchronized per call: 4.29 / 4.79 / 3.96 (docs/MODEL.md).
INLINE_DENSE = True
#: Dynamic masks that nothing reuses written as the torch calls they are made of
#: (passes/inline_dynamic_masks.py says why and what it measured).
INLINE_DYNAMIC_MASKS = True


def prepare(gm: torch.fx.GraphModule) -> list:
    """What vsopt does to a rewritten graph for Inductor alone (an export keeps vsopt's ops in
    their plain form): static token permutations become ATen gathers, launches over constant
    tables get their work order as a constant; with INLINE_DENSE, sites left dense become ATen
    SDPA; with INLINE_DYNAMIC_MASKS, dynamic masks computed afresh become torch calls. Returns the
    passes' reports."""
    from vsopt.passes import inline_dense_attention, inline_dynamic_masks, inline_permutations, static_work_orders

    reports = []
    if INLINE_PERMUTATIONS:
        reports.append(inline_permutations.run(gm))
    if STATIC_WORK_ORDERS:
        reports.append(static_work_orders.run(gm))
    if INLINE_DENSE:
        reports.append(inline_dense_attention.run(gm))
    if INLINE_DYNAMIC_MASKS:
        reports.append(inline_dynamic_masks.run(gm))
    return reports


def compile_fx(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], config_patches: dict | None = None):
    """torch._inductor.compile_fx.compile_fx, without Inductor's attention fusion."""
    from torch._inductor.compile_fx import compile_fx as inductor_compile_fx

    with without_attention_fusion():
        return inductor_compile_fx(gm, list(example_inputs), config_patches=config_patches)
