"""A joint site's mask asserted by the user, checked on the device (issue 14, class 3).

Where passes/mask_bounds.py cannot prove from the graph that a joint site's attention mask keeps
every video x video pair (the mask is built in eager code before the site's graph: a graph input,
as in HunyuanVideo 1.5 after its graph break), the option check_masks_on_device=True lets the
split run anyway, with the mask's video x video block checked at run time in the graph:

    ok = all(mask[..., v0:v1, v0:v1])          (boolean mask; an additive one: == 0 everywhere)
    aten._assert_async.msg(ok, "vsopt: ...")   a device-side assert: no host synchronization

A mask that does keep every video pair costs one read of that block per call (N_video^2 bytes for
a full (B, H, N, N) boolean mask; N_video for a key-padding (B, 1, 1, N) one). One that does not
fails the run loudly (on CUDA a device assert, which ends the process's CUDA context; on the CPU
a RuntimeError), never a silently wrong output. Without the option the site stays dense with
mask_bounds' reason, which is what strict mode refuses.
"""
from __future__ import annotations

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from .graph_edit import emit

aten = torch.ops.aten
NAME = "lower_plan"  # the pass whose decision the check belongs to (provenance of the nodes)
MESSAGE = ("vsopt: the attention mask of joint site {site!r} does not keep every video x video pair [{start}, "
           "{stop}) (asserted by the option check_masks_on_device=True); compile without that option: the site "
           "then runs dense")


def check_video_block(gm: torch.fx.GraphModule, mask: torch.fx.Node, start: int, stop: int, site_id: str,
                      before: torch.fx.Node) -> torch.fx.Node:
    """Insert before `before` (the site's node) the device-side assertion that rows and keys
    [start, stop) of `mask` (broadcastable to (B, H, Nq, Nk)) are all-true (boolean) or all zero
    (additive). Returns the assertion's node."""
    val = mask.meta["val"]
    put = lambda target, *args: emit(gm.graph, target, args, pass_name=NAME, meta_from=before)  # noqa: E731
    with gm.graph.inserting_before(before):
        block = mask
        for d in (val.dim() - 2, val.dim() - 1):
            size = val.shape[d]
            if is_concrete_int(size) and int(size) == 1:
                continue  # broadcast over this axis: its one entry is every row's (or key's)
            block = put(aten.slice.Tensor, block, d, start, stop)
        if val.dtype != torch.bool:
            block = put(aten.eq.Scalar, block, 0)
        ok = put(aten.all.default, block)
        return put(aten._assert_async.msg, ok, MESSAGE.format(site=site_id, start=start, stop=stop))
