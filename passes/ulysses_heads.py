"""Pass: give each rank the plan entries of the heads it computes under head-parallel (Ulysses)
attention.

Under diffusers' ContextParallelConfig(ulysses_degree=U) (and xDiT's Ulysses), q, k and v reach
the attention through an all-to-all over the Ulysses group: before it a rank holds N/U tokens of
all H heads, after it all N tokens of H/U heads. Dynamo traces the collective as functional ops,
so the ATen graph of rank u reads

    q_local (B, N/U, H, D) -> view/permute/clone -> _c10d_functional.all_to_all_single(x, s, s, group)
        -> wait_tensor -> view/permute -> attention q (B, H/U, N, D)

The detected site has H/U heads and N tokens while the plan entry (made on one device) has H heads.
The all-to-all sends chunk u of the head axis to rank u (diffusers' TemplatedUlyssesAttention and
SeqAllToAllDim, yunchang's SeqAllToAll4D used by xDiT), so rank u computes the global heads
[u*H/U, (u+1)*H/U): this pass replaces the site's entry in ctx.config.plan by
semantics.select_heads(entry, those heads), and lower_plan lowers that slice. The rank and the
degree are those of the process group the collective names (each rank compiles its own graph).
A head-balanced model (vsopt.parallel.balance) permuted its projections' heads and the plan alike,
so the slice is the balanced assignment.

Runs after rewrite_attention (the sites are vsopt.attention nodes) and before lower_plan. Sites
whose plan entry already has the site's head count, or whose q does not come from an all-to-all,
are left to lower_plan as they are; an all-to-all whose group size does not divide the plan's
heads into the site's is an error naming the site.
"""
from __future__ import annotations

import dataclasses
from collections import deque

import torch
import torch.distributed as dist
import torch.fx

from vsopt.core.errors import PlanError
from vsopt.core.plan import Plan
from vsopt.core.semantics import select_heads

from .infra import PassContext, PassReport
from .layout_trace import ORDER_OPS

NAME = "ulysses_heads"
aten = torch.ops.aten
c10d = torch.ops._c10d_functional
MAX_STEPS = 64  # layout ops between an all-to-all and the attention (diffusers: about ten)


def all_to_all_group(x: torch.fx.Node) -> str | None:
    """The group name of the all-to-all that `x` is a rearrangement of, or None: walks back through
    layout-only ops (views, permutes, copies), wait_tensor and functionalized copies."""
    todo, seen = deque([x]), {x}
    while todo and len(seen) < MAX_STEPS:
        n = todo.popleft()
        if n.op != "call_function":
            continue
        if n.target is c10d.all_to_all_single.default:
            return n.args[3]
        if n.target in ORDER_OPS or n.target is c10d.wait_tensor.default:
            src = n.args[0]
        elif n.target is aten.copy.default:  # dist.all_to_all_single(out, in) functionalized
            src = n.args[1]
        else:
            continue
        if isinstance(src, torch.fx.Node) and src not in seen:
            seen.add(src)
            todo.append(src)
    return None


def group_rank(group_name: str) -> tuple[int, int]:
    """(rank in the group, group size) of the process group a functional collective names."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    pg = _resolve_process_group(group_name)
    return dist.get_rank(pg), dist.get_world_size(pg)


def run(gm: torch.fx.GraphModule, ctx: PassContext) -> PassReport:
    report = PassReport(NAME)
    plan = ctx.config.plan
    if plan is None:
        return report
    sites = {s.site_id: s for s in ctx.sites}
    sliced = {}
    for node in gm.graph.nodes:
        sid = node.meta.get("vsopt_site")
        if node.target is not torch.ops.vsopt.attention.default or sid not in plan.sites or sid not in sites:
            continue
        sp, site = plan.sites[sid], sites[sid]
        if sp.num_heads == site.heads:
            continue
        groups = {all_to_all_group(a) for a in node.args[:3]}
        if len(groups) != 1 or None in groups:
            continue  # not head-parallel: lower_plan reports the head mismatch
        rank, size = group_rank(groups.pop())
        if site.heads * size != sp.num_heads:
            raise PlanError(f"{NAME}: site {sid!r} computes {site.heads} heads on each of {size} ranks of its "
                            f"all-to-all group, but the plan has {sp.num_heads} heads")
        heads = range(rank * site.heads, (rank + 1) * site.heads)
        sliced[sid] = select_heads(sp, heads)
        report.notes.append(f"{sid}: Ulysses rank {rank} of {size} computes heads {heads.start}..{heads.stop - 1} "
                            f"of {sp.num_heads}")
    if sliced:
        ctx.config = dataclasses.replace(ctx.config, plan=Plan({**plan.sites, **sliced}, plan.meta))
    return report
