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
"""
from __future__ import annotations

import re

import torch.fx

_ROOT = re.compile(r"^L\[['\"][^'\"]*['\"]\]\.?|^self\.?")
_DICT_MODULES = re.compile(r"(?:^|\.)__dict__\[['\"]_modules['\"]\]")
_MODULES = re.compile(r"(?:^|\.)_modules\[['\"]([^'\"]*)['\"]\]|\[['\"]([^'\"]*)['\"]\]|\[(\d+)\]")
# a module reached again through its (hook-wrapped) forward: the same module, no path component
_SELF_HOPS = re.compile(r"(?:^|\.)forward(?:\.func\.__closure__\.\d+\.cell_contents\.forward)?\.__self__(?=\.|$)")


def normalize_module_path(path: str) -> str:
    """'L['self']._modules['blocks']._modules['3'].attn1' -> 'blocks.3.attn1'."""
    path = _DICT_MODULES.sub("._modules", _ROOT.sub("", path))
    path = _MODULES.sub(lambda m: "." + (m.group(1) or m.group(2) or m.group(3)), path)
    path = _SELF_HOPS.sub("", path.strip("."))
    return path.strip(".").replace("..", ".")


def module_path(node: torch.fx.Node) -> str | None:
    """The normalized path of the innermost module the node was traced in (None at top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path, _cls = list(stack.values())[-1]
    return normalize_module_path(str(path)) or None


def layer_index(site_id: str) -> int | None:
    """The first integer component of the path: 'blocks.3.attn1' -> 3."""
    for part in site_id.split("."):
        if part.isdigit():
            return int(part)
    return None
