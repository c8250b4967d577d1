"""Capturing what each attention site sees, for calibration.

Two tools:
- run_observing(gm, inputs, observer): run a rewritten GraphModule (every site a
  torch.ops.vsopt.attention node with node.meta["vsopt_site"]) eagerly, and call
  observer(SiteCall) at each site with its q, k, v (B, H, N, D) and dense output, so the observer
  can compute its measurements on the spot instead of keeping every site's tensors alive. An
  observer that returns a tensor replaces the site's output with it (to run a plan's reference
  math inside the real model, e.g. to check a quality floor).
- order_block_mass(call, grid, orders, ...) and choose_orders(mass, density): each head's exact
  block attention mass in each token order, and the order that concentrates it best.
- record_forward_inputs(module): a context manager that records the inputs of each forward call
  of a module, e.g. a diffusion transformer during a sampler run (one call per denoising step, or
  two with classifier-free guidance), so calibration can run over the denoising steps.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.fx
from torch.utils._pytree import tree_map

from vsopt.core.errors import ConfigError
from vsopt.core.ir import TokenGrid
from vsopt.core.metrics import block_attention_mass
from vsopt.core.orders import TokenOrder, order_permutation

ATTENTION_OP = torch.ops.vsopt.attention.default
_ATTENTION_ARGS = ("q", "k", "v", "attn_mask", "scale", "is_causal")
_ATTENTION_DEFAULTS = {"attn_mask": None, "scale": 1.0, "is_causal": False}


@dataclass
class SiteCall:
    """One execution of one attention site. q: (B, Hq, N, D); k, v: (B, Hkv, N, D); out: (B, Hq, N, Dv)."""

    site_id: str
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    attn_mask: torch.Tensor | None
    scale: float
    is_causal: bool
    out: torch.Tensor


class _ObservingInterpreter(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, observer: Callable[[SiteCall], None]):
        super().__init__(gm)
        self.observer = observer
        self.seen: list[str] = []

    def run_node(self, n: torch.fx.Node) -> Any:
        result = super().run_node(n)
        site_id = n.meta.get("vsopt_site")
        if n.op == "call_function" and n.target is ATTENTION_OP and site_id is not None:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            bound = {**_ATTENTION_DEFAULTS, **dict(zip(_ATTENTION_ARGS, args)), **kwargs}
            replacement = self.observer(SiteCall(site_id, bound["q"], bound["k"], bound["v"], bound["attn_mask"],
                                                 float(bound["scale"]), bool(bound["is_causal"]), result))
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


def order_block_mass(call: SiteCall, grid: TokenGrid | None, orders: Sequence[TokenOrder], block_m: int,
                     block_n: int) -> dict[TokenOrder, torch.Tensor]:
    """The exact block attention mass of a self-attention call with its tokens in each of `orders`:
    order -> float64 (H, QB, KB) on the CPU, summed over the batch (rows of one query sum to 1).
    Blockwise (vsopt.core.metrics.block_attention_mass): never the N x N map at once. GQA keys are
    repeated per query head. Orders other than FHW need the site's grid."""
    heads = call.q.shape[1]
    k = call.k.repeat_interleave(heads // call.k.shape[1], dim=1) if call.k.shape[1] != heads else call.k
    out = {}
    for order in orders:
        if order is TokenOrder.FHW:
            qp, kp = call.q, k
        else:
            if grid is None:
                raise ConfigError(f"site {call.site_id!r}: token order {order.value} needs the site's grid")
            perm = order_permutation(grid, order).to(call.q.device)
            qp, kp = call.q[:, :, perm], k[:, :, perm]
        out[order] = block_attention_mass(qp, kp, call.scale, block_m, block_n).sum(0).double().cpu()
    return out


def choose_orders(mass: dict[TokenOrder, torch.Tensor], density: float) -> list[TokenOrder]:
    """Per head, the order whose top `density` share of blocks holds the most mass (PARO's
    criterion, taken at the density the head will run at). mass: order -> (H, QB, KB). Ties
    (within 1e-6) go to the first order in TokenOrder, FHW: no permutation."""
    orders = [o for o in TokenOrder if o in mass]
    flat = {o: mass[o].flatten(1) for o in orders}
    k = max(1, math.ceil(density * next(iter(flat.values())).shape[1]))
    share = torch.stack([flat[o].topk(k, dim=1).values.sum(1) / flat[o].sum(1) for o in orders])  # (O, H)
    best = []
    for h in range(share.shape[1]):
        top = share[:, h].max()
        best.append(next(o for i, o in enumerate(orders) if share[i, h] >= top - 1e-6))
    return best


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
