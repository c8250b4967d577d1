"""What each attention site sees, and what the model is called with, for calibration.

- run_observing(gm, inputs, observer): run a rewritten GraphModule (every site a
  torch.ops.vsopt.attention node with node.meta["vsopt_site"]) eagerly, and call
  observer(SiteCall) at each site with its q, k, v (B, H, N, D) and dense output, so the observer
  can compute its measurements on the spot instead of keeping every site's tensors alive. An
  observer that returns a tensor replaces the site's output with it (to run a plan's reference
  math inside the real model, e.g. to check a quality floor).
- record_forward_inputs(module): a context manager that records the inputs of each forward call
  of a module, e.g. a diffusion transformer during a sampler run (one call per denoising step, or
  two with classifier-free guidance), so calibration can run over the denoising steps.

(order_block_mass and choose_orders, once here, are in vsopt.calibration.order_choice; they are
re-exported for the old path vsopt.capture.)
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.fx
from torch.utils._pytree import tree_map

from vsopt.calibration.order_choice import choose_orders, order_block_mass  # noqa: F401  (old vsopt.capture names)
from vsopt.calibration.site_call import SiteCall
from vsopt.core.errors import ConfigError
from vsopt.core.ops import attention_arguments

ATTENTION_OP = torch.ops.vsopt.attention.default


class _ObservingInterpreter(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, observer: Callable[[SiteCall], None]):
        super().__init__(gm)
        self.observer = observer
        self.seen: list[str] = []

    def run_node(self, n: torch.fx.Node) -> Any:
        result = super().run_node(n)
        site_id = n.meta.get("vsopt_site")
        if n.op == "call_function" and n.target is ATTENTION_OP and site_id is not None:
            bound = attention_arguments(*self.fetch_args_kwargs_from_env(n))
            replacement = self.observer(SiteCall(site_id, bound["q"], bound["k"], bound["v"], bound["attn_mask"],
                                                 float(bound["scale"]), bool(bound["is_causal"]), result,
                                                 float(bound["softcap"])))
            self.seen.append(site_id)
            if replacement is not None:
                if replacement.shape != result.shape:
                    raise ConfigError(f"observer replaced site {site_id!r}'s output {tuple(result.shape)} by a "
                                      f"tensor of shape {tuple(replacement.shape)}")
                result = replacement.to(result.dtype)
        return result


def attention_sites_in(gm: torch.fx.GraphModule) -> list[str]:
    """site_ids of the vsopt.attention nodes of gm, in graph order."""
    return [n.meta["vsopt_site"] for n in gm.graph.nodes
            if n.op == "call_function" and n.target is ATTENTION_OP and "vsopt_site" in n.meta]


@torch.no_grad()
def run_observing(gm: torch.fx.GraphModule, inputs: Sequence[Any],
                  observer: Callable[[SiteCall], torch.Tensor | None]) -> Any:
    """Run gm(*inputs) node by node; after each attention site runs, call observer(SiteCall), and
    use its return value, when not None, as the site's output.

    Returns gm's output. Raises ConfigError when gm has no attention site to observe."""
    if not attention_sites_in(gm):
        raise ConfigError("the graph has no torch.ops.vsopt.attention site to observe "
                          "(was it produced by vsopt.backend.trace_and_rewrite?)")
    return _ObservingInterpreter(gm, observer).run(*inputs)


@dataclass
class RecordedCall:
    """The inputs of one forward call: its index among the recorded calls, the denoising step it
    belongs to (index // calls_per_step), positional and keyword args (detached, on `device`)."""

    index: int
    step: int
    args: tuple
    kwargs: dict = field(default_factory=dict)


@contextlib.contextmanager
def record_forward_inputs(module: torch.nn.Module, device: str | torch.device | None = "cpu",
                          every: int = 1, calls_per_step: int = 1) -> Iterator[list[RecordedCall]]:
    """Record the inputs of module's forward calls while the block runs.

        with record_forward_inputs(model.transformer) as calls:
            sampler(model, steps=20)
        # calls[i].args / .kwargs: the transformer's inputs at call i (every `every`-th call kept)

    calls_per_step: forward calls per denoising step (2 with classifier-free guidance run as two
    calls), so that each RecordedCall knows its step. Tensors are detached and copied to `device`
    (None keeps them where they are)."""
    if every < 1 or calls_per_step < 1:
        raise ConfigError(f"record_forward_inputs: every and calls_per_step must be >= 1, got {every}, "
                          f"{calls_per_step}")
    calls: list[RecordedCall] = []
    counter = [0]

    def copy(x):
        if isinstance(x, torch.Tensor):
            x = x.detach()
            return x.to(device, copy=True) if device is not None else x.clone()
        return x

    def hook(_module, args, kwargs):
        if counter[0] % every == 0:
            calls.append(RecordedCall(counter[0], counter[0] // calls_per_step, tree_map(copy, tuple(args)),
                                      tree_map(copy, dict(kwargs))))
        counter[0] += 1

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()
