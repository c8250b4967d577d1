"""Stable site ids from nn_module_stack (a helper of detect_attention, not a pass).

Dynamo and torch.export spell module paths differently; both become "blocks.3.attn1":
    "L['self'].blocks[3].attn1"                                  (Dynamo)
    "L['self']._modules['blocks']._modules['3']._modules['attn1']" (Dynamo, inlined modules)
    "L['self'].__dict__['_modules']['blocks'].3.attn1"             (Dynamo, torch 2.14)
    "L__self___blocks_3_attn1"  (a key, not a path: never used)
    "blocks.3.attn1"                                             (torch.export)

Modules whose forward a hook replaced (diffusers' HookRegistry: context parallelism, caches,
offloading) are reached through their own bound method; those hops name no submodule and are
dropped:
    "L['fn'].forward.__self__.blocks.0.forward.func.__closure__[0].cell_contents.forward.__self__.attn1"
                                                                  -> "blocks.0.attn1"

A graph Dynamo starts in another frame than the compiled module's own (after a graph break it
could not resume, Dynamo compiles a submodule's forward as a frame of its own) names modules from
that frame's locals: "L['self'].attn" in the frame of `transformer_blocks.0`. Such a graph carries
FrameNames (graph_module.meta[FRAME_NAMES], set by the backend from frame_names): per local, the
path of its module in the compiled module, recovered from the graph's lifted parameters (Dynamo
passes the real nn.Parameter objects as the graph's example inputs and names each by its source,
L['self']._modules['norm1']._parameters['weight']; the same parameter's name in the compiled
module, transformer_blocks.0.norm1.weight, gives the prefix). A local it cannot place is never
guessed: the path stays relative and relative_note says so.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch.fx

FRAME_NAMES = "vsopt_frame_names"  # GraphModule.meta key of a Dynamo graph's FrameNames

_LOCAL = re.compile(r"^L\[['\"]([^'\"]*)['\"]\]")
_ROOT = re.compile(r"^L\[['\"][^'\"]*['\"]\]\.?|^self\.?")
_DICT_MODULES = re.compile(r"(?:^|\.)__dict__\[['\"](_modules|_parameters|_buffers)['\"]\]")
_MODULES = re.compile(r"(?:^|\.)_modules\[['\"]([^'\"]*)['\"]\]|\[['\"]([^'\"]*)['\"]\]|\[(\d+)\]")
# a module reached again through its (hook-wrapped) forward: the same module, no path component
_SELF_HOPS = re.compile(r"(?:^|\.)forward(?:\.func\.__closure__\.\d+\.cell_contents\.forward)?\.__self__(?=\.|$)")
_TENSOR_DICTS = re.compile(r"(?:^|\.)_(?:parameters|buffers)\.")
_TENSOR_ACCESS = re.compile(r"_(?:parameters|buffers)['\"]?\]?\[")  # a parameter or buffer of a module


def normalize_module_path(path: str) -> str:
    """'L['self']._modules['blocks']._modules['3'].attn1' -> 'blocks.3.attn1'."""
    path = _DICT_MODULES.sub(r".\1", _ROOT.sub("", path))
    path = _MODULES.sub(lambda m: "." + (m.group(1) or m.group(2) or m.group(3)), path)
    path = _SELF_HOPS.sub("", path.strip("."))
    return path.strip(".").replace("..", ".")


def _local(path: str) -> str | None:
    """The frame local a Dynamo path starts from ('self' for "L['self'].attn"), None for others."""
    m = _LOCAL.match(path)
    return m.group(1) if m else None


@dataclass(frozen=True)
class FrameNames:
    """Where the modules a Dynamo graph's paths start from sit in the compiled module: prefixes
    maps a frame local ('self') to its module's path there ('transformer_blocks.0'; '' for the
    compiled module itself); relative names the locals that could not be placed (their paths are
    relative to a module of unknown position). lifted: per graph input that is a parameter or
    buffer of a local's module, (input index, local, its path under that module), read from the
    graph's sources while Dynamo compiles (Dynamo drops them from the graph afterwards); locals:
    the locals the graph's module paths start from."""

    prefixes: Mapping[str, str] = field(default_factory=dict)
    relative: frozenset[str] = frozenset()
    lifted: tuple[tuple[int, str, str], ...] = ()
    locals: frozenset[str] = frozenset()
    #: every module path of the compiled module (empty where it is unknown): a plan site naming one
    #: of them may sit in another graph of the same compile (after a graph break)
    root_modules: frozenset[str] = frozenset()

    @property
    def inputs(self) -> tuple[int, ...]:
        """The graph inputs that place the frame (its modules' parameters and buffers)."""
        return tuple(i for i, _, _ in self.lifted)

    @property
    def nested(self) -> bool:
        """Whether some local was placed below the compiled module (the graph is a submodule's frame)."""
        return any(self.prefixes.values())

    def at(self, inputs: Sequence[Any], root: torch.nn.Module | None, nested: bool) -> "FrameNames":
        """The frame placed by the graph's inputs `inputs` (real tensors: the parameters and buffers
        of the modules it runs for) in `root`, the module torch.compile was given (None: unknown).
        Each local gets the one prefix all its lifted tensors agree on. nested: the frame was called
        from a module's code (not the compiled callable's own frame), so without a root its locals'
        paths are relative; a root-less frame that is not nested is taken as it is (torch.compile
        of a function: the paths are its own locals')."""
        names: dict[int, list[str]] = {}
        if root is not None:
            for full, t in [*root.named_parameters(remove_duplicate=False),
                            *root.named_buffers(remove_duplicate=False)]:
                names.setdefault(id(t), []).append(full)
        candidates: dict[str, set[str]] = {}
        for i, local, relative in self.lifted:
            found = {full[: len(full) - len(relative)].rstrip(".") for full in names.get(id(inputs[i]), ())
                     if full == relative or full.endswith("." + relative)}
            candidates[local] = candidates[local] & found if local in candidates else found
        prefixes = {local: next(iter(found)) for local, found in candidates.items() if len(found) == 1}
        relative = {loc for loc in self.locals | set(candidates) if loc not in prefixes
                    and (root is not None and loc in candidates or nested)}
        root_modules = frozenset(name for name, _ in root.named_modules()) if root is not None else frozenset()
        return dataclasses.replace(self, prefixes=prefixes, relative=frozenset(relative), root_modules=root_modules)


def frame_names(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], root: torch.nn.Module | None,
                nested: bool) -> FrameNames:
    """FrameNames of Dynamo's graph `gm` (while Dynamo compiles it: its placeholders still carry
    their sources) called with `example_inputs` (FrameNames.at)."""
    lifted = []
    for i, (node, value) in enumerate(zip(gm.graph.find_nodes(op="placeholder"), example_inputs)):
        source = getattr(node.meta.get("grapharg"), "source", None)
        path = source.name() if callable(getattr(source, "name", None)) else getattr(source, "name", None)
        local = _local(path) if isinstance(path, str) else None
        if local is not None and isinstance(value, torch.Tensor) and _TENSOR_ACCESS.search(path):
            lifted.append((i, local, _TENSOR_DICTS.sub(".", "." + normalize_module_path(path)).strip(".")))
    locals_seen = {loc for n in gm.graph.nodes for p, _ in (n.meta.get("nn_module_stack") or {}).values()
                   if (loc := _local(str(p))) is not None}
    return FrameNames(lifted=tuple(lifted), locals=frozenset(locals_seen)).at(example_inputs, root, nested)


def in_other_graphs(gm: torch.fx.GraphModule, site_ids: Sequence[str]) -> list[str]:
    """Those of `site_ids` (absent from gm) that name a module of the compiled module, so another
    graph of the same compile may hold them: a model that graph breaks split is compiled as several
    graphs, each holding only its own sites."""
    names = gm.meta.get(FRAME_NAMES)
    modules = names.root_modules if names is not None else frozenset()
    return [s for s in site_ids if s.split(":")[0] in modules]


def _frame_names_of(node: torch.fx.Node) -> FrameNames | None:
    owner = getattr(node.graph, "owning_module", None)
    return owner.meta.get(FRAME_NAMES) if owner is not None else None


def module_path(node: torch.fx.Node) -> str | None:
    """The path, in the compiled module, of the innermost module the node was traced in (None at
    top level); relative to its frame's module where FrameNames could not place it."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path, _cls = list(stack.values())[-1]
    path = str(path)
    local, names = _local(path), _frame_names_of(node)
    rest = normalize_module_path(path)
    prefix = names.prefixes.get(local, "") if names is not None and local is not None else ""
    return ".".join(p for p in (prefix, rest) if p) or None


def relative_note(node: torch.fx.Node) -> str | None:
    """Why the node's module path is relative (its frame's module could not be placed), or None."""
    stack = node.meta.get("nn_module_stack") or {}
    names = _frame_names_of(node)
    if not stack or names is None:
        return None
    path = str(list(stack.values())[-1][0])
    local = _local(path)
    if local not in names.relative:
        return None
    return (f"site id {normalize_module_path(path)!r} is relative: its graph is a frame Dynamo started in a "
            f"submodule's code (after a graph break), whose local {local!r} could not be placed in the compiled "
            f"module (no lifted parameter of it identifies it); a plan keyed by the full module path does not "
            f"match it: key the plan entry by this id")


def layer_index(site_id: str) -> int | None:
    """The first integer component of the path: 'blocks.3.attn1' -> 3."""
    for part in site_id.split("."):
        if part.isdigit():
            return int(part)
    return None
