"""Pass: lower each planned ring-attention site (sequence parallelism) into vsopt's sharded
block-sparse attention (vsopt.core.ring).

Under diffusers' ContextParallelConfig(ring_degree=R), Dynamo traces rank r's ring attention as
one all-gather of the key/value shards and R attention calls that return their log-sum-exp, each
merged into the running result by the engine:

    kv = all_gather_into_tensor(cat(k_r, v_r), R, group) -> wait_tensor -> split(R)
    (o_0, lse_0) = _scaled_dot_product_flash_attention(q_r, k_r, v_r)        # the local shard
    (o_i, lse_i) = _scaled_dot_product_flash_attention(q_r, k_j, v_j)        # k_j: chunk j of kv
    o, lse = merge(o, lse, o_i, lse_i)  ...  (sigmoid / logsigmoid form of the LSE merge)

This pass runs first (before detect_attention, which would leave those calls alone because their
log-sum-exp is used). For a group of calls sharing q whose keys are the local shard and the R - 1
gathered chunks, with a plan entry for the site (site id from nn_module_stack), it emits rank r's
part of the plan, ring.ring_attention over all R shards (sub-tables per query shard x key piece,
empty ones skipped, partials merged through block_sparse_attention_lse), as the first call's
(out, lse), and gives the other calls (0, -inf): the engine's merge of a partial with lse -inf
is the identity, so its merge chain returns vsopt's result unchanged (rows that attend to nothing
get lse 0 instead of -inf, so that no -inf - -inf appears; their output is 0 either way).
The engine's all-gather stays: diffusers' ring only rotates by all-gather, so a sub-table that
is empty saves its kernel launch but not its communication. Under ring x Ulysses (unified) the
site also holds H/U heads, sliced from the plan as passes.ulysses_heads does.

The site is recorded in ctx.sites (rule "ring", q_len = the whole sequence) and removed from the
plan that lower_plan sees. Its grid: inferred from the query's source, else the user's, else the
plan's (the sharded site alone has no grid of its own).
"""
from __future__ import annotations

import dataclasses
import math
import operator
import re

import torch
import torch.fx

from vsopt.core.errors import ConfigError, PassError, PlanError, UnsupportedSiteError
from vsopt.core.ir import AttentionSite, GridSource, Layout, SkippedSite
from vsopt.core.plan import Plan
from vsopt.core.ring import Shards, ring_attention
from vsopt.core.semantics import select_heads

from .graph_edit import constant, emit, with_layout_of
from .infer_grid import infer
from .infra import PassContext, PassReport
from .layout_trace import ORDER_OPS
from .rules.match import normalize_args as named_args
from .site_ids import layer_index, module_path
from .ulysses_heads import all_to_all_group, group_rank

NAME = "ring_attention"
aten = torch.ops.aten
c10d = torch.ops._c10d_functional
# attention ops that return (out, logsumexp, ...): what ring engines call per key shard
LSE_ATTENTION = {aten._scaled_dot_product_flash_attention.default, aten._scaled_dot_product_cudnn_attention.default,
                 aten._scaled_dot_product_efficient_attention.default,
                 aten._scaled_dot_product_flash_attention_for_cpu.default}
SPLIT_OPS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default}
MAX_STEPS = 64


def _source(x: torch.fx.Node) -> torch.fx.Node:
    """The first node behind x that is not a layout-only op."""
    while x.op == "call_function" and x.target in ORDER_OPS and isinstance(x.args[0], torch.fx.Node):
        x = x.args[0]
    return x


def _gathered_chunk(x: torch.fx.Node) -> tuple[str, int, int] | None:
    """(group name, group size, chunk index) when x is a rearranged slice of chunk j of an all-gather
    (the key/value shard of rank j), else None."""
    for _ in range(MAX_STEPS):
        if x.op != "call_function":
            return None
        if x.target is operator.getitem and isinstance(x.args[0], torch.fx.Node) and x.args[0].target in SPLIT_OPS:
            split = x.args[0]
            wait = split.args[0]
            gather = wait.args[0] if wait.target is c10d.wait_tensor.default else wait
            if gather.target is not c10d.all_gather_into_tensor.default:
                return None
            dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
            if dim != 0:
                return None
            return gather.args[2], int(gather.args[1]), int(x.args[1])
        if x.target in ORDER_OPS or x.target is aten.slice.Tensor:
            x = x.args[0]
            continue
        return None
    return None


@dataclasses.dataclass
class _Ring:
    calls: list[torch.fx.Node]   # graph order; calls[0] the local shard's
    chunks: list[int]            # key shard of each call
    group: str
    degree: int


def _find_rings(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, list[torch.fx.Node]]:
    by_query: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in LSE_ATTENTION:
            if any(u.target is operator.getitem and u.args[1] == 1 for u in n.users):
                by_query.setdefault(_source(named_args(n)["query"]), []).append(n)
    return by_query


def _ring_of(calls: list[torch.fx.Node]) -> _Ring | str:
    """The ring these calls form, or why they do not form one."""
    local, gathered = [], []
    for c in calls:
        a = named_args(c)
        kg, vg = _gathered_chunk(a["key"]), _gathered_chunk(a["value"])
        if (kg is None) != (vg is None) or (kg is not None and kg != vg):
            return f"keys and values of {c.name} come from different shards"
        (local if kg is None else gathered).append((c, kg))
    groups = {g[:2] for _, g in gathered}
    if len(local) != 1 or len(groups) != 1:
        return "not one local attention and the gathered shards of one all-gather"
    group, degree = groups.pop()
    chunks = [g[2] for _, g in gathered]
    rank, size = group_rank(group)
    if size != degree or sorted(chunks + [rank]) != list(range(degree)) or len(calls) != degree:
        return f"the {len(calls)} attentions do not cover the {degree} shards of the ring once each"
    return _Ring([local[0][0]] + [c for c, _ in gathered], [rank] + chunks, group, degree)


class _GraphEmitter:
    """ring.Emitter that inserts nodes before `anchor` (with fake values and provenance)."""

    def __init__(self, gm: torch.fx.GraphModule, anchor: torch.fx.Node, site_id: str):
        self.gm, self.anchor, self.site_id = gm, anchor, site_id
        self.query = named_args(anchor)["query"]
        self.prefix = "_vsopt_ring_" + re.sub(r"\W", "_", site_id)
        self.created: list[str] = []

    def op(self, target, *args, **kwargs):
        n = emit(self.gm.graph, target, args, kwargs, pass_name=NAME, replaces=(self.anchor.name,),
                 meta_from=self.anchor)
        n.meta["vsopt_site"] = self.site_id
        self.created.append(n.name)
        return n

    def const(self, label: str, value: torch.Tensor):
        n = constant(self.gm, f"{self.prefix}_{label}", value, like=self.query, pass_name=NAME,
                     replaces=(self.anchor.name,))
        self.created.append(n.name)
        return n


def _hoist(graph: torch.fx.Graph, anchor: torch.fx.Node, needed, calls) -> None:
    """Move the nodes `needed` (and what they depend on) that come after `anchor` before it, in
    their order: the gathered shards' key/value views are traced after the first call."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    todo, move = [n for n in needed if order[n] > order[anchor]], set()
    while todo:
        n = todo.pop()
        if n in move:
            continue
        if n in calls or (n.target is operator.getitem and n.args[0] in calls):
            raise PassError(NAME, f"the keys of the ring depend on an earlier shard's attention ({n.name})")
        move.add(n)
        todo += [a for a in n.all_input_nodes if order[a] > order[anchor]]
    for n in sorted(move, key=order.get):
        anchor.prepend(n)


def _why_not(ring: _Ring) -> str | None:
    for c in ring.calls:
        a = named_args(c)
        if a.get("dropout_p") not in (0, 0.0, None) or a.get("is_causal"):
            return f"{c.name}: dropout or causal attention"
        if a.get("attn_mask") is not None or a.get("attn_bias") is not None:
            return f"{c.name}: an attention mask"
        if any(u.target is not operator.getitem or u.args[1] not in (0, 1) for u in c.users):
            return f"{c.name}: outputs other than (out, logsumexp) are used"
    return None


def run(gm: torch.fx.GraphModule, ctx: PassContext) -> PassReport:
    report = PassReport(NAME)
    plan = ctx.config.plan
    lowered = []
    for qsrc, calls in _find_rings(gm).items():
        ring = _ring_of(calls) if len(calls) > 1 else "a single attention"
        if isinstance(ring, str):
            report.notes.append(f"attentions {[c.name for c in calls]} are not a ring: {ring}")
            continue
        anchor = ring.calls[0]
        sid = module_path(anchor) or f"attention.ring.{anchor.name}"
        a = named_args(anchor)
        q, k = a["query"], a["key"]
        B, Hc, S, D = (int(s) for s in q.meta["val"].shape)
        n = S * ring.degree
        rank, _ = group_rank(ring.group)
        scale = a.get("scale")
        scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
        grid, source = infer(qsrc, B, n), GridSource.INFERRED
        if grid is None:
            grid, source = ctx.config.grid_for(sid), GridSource.USER
        sp = plan.sites.get(sid) if plan is not None else None
        if grid is None and sp is not None and sp.grid is not None and sp.grid.num_tokens == n:
            grid = sp.grid   # the plan's: the local shard alone has no patch embedding of n tokens
        site = AttentionSite(sid, layer_index(sid), "ring", Layout.BHND, B, Hc, int(k.meta["val"].shape[1]), D,
                             int(a["value"].meta["val"].shape[-1]), n, n, q.meta["val"].dtype, scale,
                             grid=grid, grid_source=source if grid is not None else GridSource.UNKNOWN,
                             output_node=anchor.name, nodes=tuple(c.name for c in ring.calls))
        ctx.sites.append(site)
        report.notes.append(f"{sid}: ring rank {rank} of {ring.degree}, {S} of {n} tokens, {Hc} heads")

        def leave(reason: str) -> None:
            if ctx.config.strict:
                raise UnsupportedSiteError(sid, reason)
            ctx.skipped.append(SkippedSite(sid, anchor.name, reason, rule=NAME))
            report.notes.append(f"{sid}: stays as the engine runs it: {reason}")

        if sp is None:
            leave("the plan has no entry for this ring site")
            continue
        if sp.num_heads != Hc:
            group = all_to_all_group(q)
            size = group_rank(group)[1] if group is not None else 1
            if group is None or Hc * size != sp.num_heads:
                leave(f"the plan has {sp.num_heads} heads, the ring site {Hc} (and no Ulysses all-to-all explains it)")
                continue
            u = group_rank(group)[0]
            sp = select_heads(sp, range(u * Hc, (u + 1) * Hc))
            report.notes.append(f"{sid}: Ulysses rank {u} of {size} computes heads {u * Hc}..{(u + 1) * Hc - 1}")
        diffs = Plan({sid: sp}).differences([site])
        reason = "; ".join(diffs) or _why_not(ring)
        if reason:
            leave(f"the plan does not fit the site: {reason}")
            continue
        if sp.steps:
            report.notes.append(f"{sid}: {len(sp.steps)} step range(s); this graph runs the default head plans")
        lowered.append(sid)
        if not ctx.config.rewrite:
            continue
        ks, vs = [None] * ring.degree, [None] * ring.degree
        for c, j in zip(ring.calls, ring.chunks):
            ks[j], vs[j] = named_args(c)["key"], named_args(c)["value"]
        _hoist(gm.graph, anchor, ks + vs, set(ring.calls))
        em = _GraphEmitter(gm, anchor, sid)
        try:
            with gm.graph.inserting_before(anchor):
                out, lse = ring_attention(site, sp.heads_at(None), rank, Shards(n, ring.degree), q, ks, vs, scale,
                                          em, cache_key=f"{id(gm):x}:{sid}")
                lse = em.op(aten.masked_fill.Scalar, lse, em.op(aten.eq.Scalar, lse, float("-inf")), 0.0)
                _replace_outputs(em, anchor, out, lse)
                for c in ring.calls[1:]:
                    _replace_outputs(em, c, None, None)
        except ConfigError as e:
            raise PlanError(f"{NAME}: {e}") from None
        for c in ring.calls:
            for u in list(c.users):
                gm.graph.erase_node(u)
            gm.graph.erase_node(c)
            report.removed.append(c.name)
        report.created += em.created
    if lowered and plan is not None:   # lowered here: lower_plan must not look for them
        ctx.config = dataclasses.replace(ctx.config, plan=Plan({s: p for s, p in plan.sites.items() if s not in lowered},
                                                               plan.meta))
    if report.changed:
        gm.graph.eliminate_dead_code()
    return report


def _replace_outputs(em: _GraphEmitter, call: torch.fx.Node, out, lse) -> None:
    """Point the users of call's (out, lse) at the given values, or at (0, -inf) when None."""
    q = em.query   # defined before the insertion point (the call's own may not be)
    for g in list(call.users):
        want = g.meta["val"]
        if g.args[1] == 0:
            new = out if out is not None else em.op(aten.new_zeros.default, q, list(want.shape), dtype=want.dtype)
            new = with_layout_of(em.gm.graph, new, g, pass_name=NAME)
        else:
            new = lse if lse is not None else em.op(aten.new_full.default, q, list(want.shape), float("-inf"),
                                                     dtype=want.dtype)
            if tuple(new.meta["val"].shape) != tuple(want.shape):   # e.g. cuDNN's (B, H, N, 1)
                new = em.op(aten.view.default, new, list(want.shape))
        g.replace_all_uses_with(new)
