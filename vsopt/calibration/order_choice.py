"""Which token order each head runs in: its exact block attention mass in each candidate order,
and the order that concentrates that mass best (PAROAttention's criterion)."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from vsopt.calibration.site_call import SiteCall
from vsopt.core.errors import ConfigError
from vsopt.core.ir import TokenGrid
from vsopt.core.metrics import block_attention_mass
from vsopt.core.orders import TokenOrder, is_model_order, model_order, order_permutation
from vsopt.core.semantics import kv_to_heads


def order_block_mass(call: SiteCall, grid: TokenGrid | None, orders: Sequence[TokenOrder], block_m: int,
                     block_n: int) -> dict[TokenOrder, torch.Tensor]:
    """The exact block attention mass of a self-attention call with its tokens in each of `orders`:
    order -> float64 (H, QB, KB) on the CPU, summed over the batch (rows of one query sum to 1).
    Blockwise (vsopt.core.metrics.block_attention_mass): never the N x N map at once. GQA keys are
    repeated per query head; a soft-capped site's scores are capped. Orders other than the model's own (model_order(grid); FHW without a
    grid) need the site's grid."""
    k = kv_to_heads(call.k, call.q.shape[1])
    out = {}
    for order in orders:
        if is_model_order(order, grid):
            qp, kp = call.q, k
        else:
            if grid is None:
                raise ConfigError(f"site {call.site_id!r}: token order {order.value} needs the site's grid")
            perm = order_permutation(grid, order).to(call.q.device)
            qp, kp = call.q[:, :, perm], k[:, :, perm]
        out[order] = block_attention_mass(qp, kp, call.scale, block_m, block_n,
                                          softcap=call.softcap).sum(0).double().cpu()
    return out


def site_orders(grid: TokenGrid | None, orders: Sequence[TokenOrder]) -> tuple[TokenOrder, ...]:
    """The orders tried at a site over `grid`: the model's own first (model_order: no permutation,
    always tried), then the others of `orders`; a site without a grid stays in FHW."""
    own = model_order(grid)
    return (own,) if grid is None else (own,) + tuple(o for o in orders if o is not own)


def choose_orders(mass: dict[TokenOrder, torch.Tensor], density: float,
                  prefer: TokenOrder = TokenOrder.FHW) -> list[TokenOrder]:
    """Per head, the order whose top `density` share of blocks holds the most mass (PARO's
    criterion, taken at the density the head will run at). mass: order -> (H, QB, KB). Ties
    (within 1e-6) go to `prefer`, the model's own order (model_order(grid)): no permutation; then
    to the first order in TokenOrder."""
    orders = sorted((o for o in TokenOrder if o in mass), key=lambda o: o is not prefer)
    flat = {o: mass[o].flatten(1) for o in orders}
    k = max(1, math.ceil(density * next(iter(flat.values())).shape[1]))
    share = torch.stack([flat[o].topk(k, dim=1).values.sum(1) / flat[o].sum(1) for o in orders])  # (O, H)
    best = []
    for h in range(share.shape[1]):
        top = share[:, h].max()
        best.append(next(o for i, o in enumerate(orders) if share[i, h] >= top - 1e-6))
    return best
