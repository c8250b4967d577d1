"""diffusers' context parallelism, ready for torch.compile(backend="vsopt").

    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=U))   # or enable_context_parallel
    prepare_for_compile(model)
    model = torch.compile(model, backend="vsopt", options={"plan": "wan.plan.json"})

Dynamo must trace the whole transformer into one graph for vsopt to see every attention with its
module path; two things in diffusers' hooks break the graph (diffusers 0.36-0.42):
  - the split hooks read the forward's signature with inspect.signature on their first call;
  - a split hook logs (logger.warning_once) when an input has fewer dims than its plan says (Wan
    2.1's 1-D timestep against Wan 2.2's per-token timestep entry).
prepare_for_compile fills the hooks' signature caches ahead of time and has Dynamo skip that log
call. Without it the graph breaks inside the blocks and the attention sites get ids relative to a
block ("attn1" instead of "blocks.0.attn1"), so the plan would not find them.
"""
from __future__ import annotations

import contextlib
import inspect

import torch


def prepare_for_compile(model: torch.nn.Module) -> torch.nn.Module:
    """Make the context-parallel hooks of `model` traceable by Dynamo in one graph (see module
    doc). Call after enable_parallelism and before the first compiled call; returns model."""
    from diffusers.hooks import context_parallel as cp

    torch._dynamo.config.ignore_logging_functions.add(cp.logger.warning_once)
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        for hook in (getattr(registry, "hooks", None) or {}).values():
            meta = getattr(hook, "module_forward_metadata", None)
            if meta is not None and meta.cached_parameter_indices is None and meta._cls is not None:
                names = list(inspect.signature(meta._cls.forward).parameters)[1:]   # without self
                meta.cached_parameter_indices = {name: i for i, name in enumerate(names)}
    return model


@contextlib.contextmanager
def _one_device_without_accelerator():
    """diffusers picks the rank's device as rank % torch.accelerator.device_count(), which divides
    by zero in CPU-only processes (gloo): count the CPU as one device there."""
    count = torch.accelerator.device_count
    if count() > 0:
        yield
        return
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = count


def enable_context_parallel(model: torch.nn.Module, config) -> torch.nn.Module:
    """model.enable_parallelism(config=config), also in CPU-only processes, then
    prepare_for_compile(model). torch.distributed must be initialized (torchrun, or
    init_process_group); config: a diffusers ContextParallelConfig / ParallelConfig."""
    with _one_device_without_accelerator():
        model.enable_parallelism(config=config)
    return prepare_for_compile(model)
