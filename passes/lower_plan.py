"""lower_plan: rewrite each planned vsopt.attention into token permutation + block-sparse attention.

With config.plan set, every torch.ops.vsopt.attention node carrying node.meta["vsopt_site"] whose
site has a non-dense SitePlan becomes (one head group shown; heads are grouped by launch key
(quant, block_m, block_n, dynamic spec), one kernel launch per group):

    before:  out = vsopt.attention(q, k, v, None, scale, False)
    after:   qp = vsopt.permute_tokens(q, _vsopt_perm_q)           # only if some head reorders
             kp = vsopt.permute_tokens(k, _vsopt_perm_kv); vp = ... (v)
             o  = vsopt.block_sparse_attention(qp, kp, vp, _vsopt_kv_indices, _vsopt_kv_counts,
                                               scale, block_m, block_n, quant)
             out = vsopt.unpermute_tokens(o, _vsopt_perm_q)

Static masks (dense, skip, pattern, calibrated mask) become kv tables stored as constant buffers
(_vsopt_* attributes of the GraphModule, on the device of the site's inputs), built from the
block masks in each head's token order. A dynamic group computes its mask at run time:
vsopt.dynamic_block_mask(qp, kp, ...) -> vsopt.mask_to_table -> block_sparse_attention.
Several groups: heads are selected with index_select, and the outputs concatenated back in head
order. GQA keys/values are repeated to one per query head only when query heads of one kv group
are in different launches or orders.

What the plan means for the site (which heads share a launch, LaunchKey; the token orders as
gather indices; each head's static block mask) is vsopt.core.semantics' launch_groups,
permutations and static_mask, the same the calibration and the bench price: this pass only
turns it into nodes. vsopt.attention's arguments are read with core.ops.attention_arguments;
constants are made with graph_edit.constant.

A joint site with the model's attention mask, or whose length is data-dependent (text cut to its
unpadded length), is split (vsopt.core.joint, its meaning semantics.joint_plan): video rows x
video keys through vsopt.block_sparse_attention_lse per launch group, the text keys dense under the
mask, merged by log-sum-exp, the text rows vsopt.attention. A mask must be proved all-true (or all
zero) over video x video from the graph (passes/mask_bounds.py), or, with the option
check_masks_on_device, checked in the graph by a device-side assert (passes/mask_checks.py), else
the site stays dense with the reason. A dynamic group's runtime mask gets the text blocks OR-ed in (text is global).

A site whose plan is entirely dense (every head dense, model order, no quantization) stays
vsopt.attention: dense on purpose (ctx.kept_dense), which satisfies strict mode whatever the site
(a mask, a causal flag), as long as the entry fits the site. Sites left as they were (not in the
plan, a plan that does not fit, a mask that cannot be split off, a causal flag) are
recorded in ctx.skipped with the reason; in strict mode they are errors, as are plan sites the
graph does not have (ctx.absent_plan_sites otherwise). Decisions are made for the sites of
ctx.sites that are vsopt.attention nodes or detection's matches (so with rewrite off, inspect
reports the same and strict raises the same errors; sites an earlier pass lowered, such as
ring_attention's, are its business); lowered sites go into ctx.lowered.

Step-dependent plans (SitePlan.steps) are lowered with their default head plans: the backend
applies step ranges by lowering Plan.at_step(...) once per segment of steps and choosing the
graph at run time (vsopt.core.steps.step_variants); a graph lowered here directly notes it.

Renormalized heads (HeadPlan.renorm, Re-ttention; vsopt.core.rettention) are lowered at the phase
Plan.at_step resolved for this graph: a measuring launch runs the kept blocks and the dropped
part (the complement blocks through block_sparse_attention_lse, or the pooled remainder) as two
partials, merges them, and writes its heads' statistics (and a dynamic head's mask) into the
site's state buffers with index_copy_; a correcting launch runs the kept blocks (a dynamic head's
mask read from the state) and applies rho o + r from the buffers. The buffers are the same
tensors in every graph of the site (rettention.RENORM_STATE), constants of each graph; no host
decision or synchronization happens in a graph. Residual sharing (Renorm kind "residual",
vsopt.core.residual) is lowered the same way: measuring, the kept and complement partials merged
(exact) and R = exact - sparse written; correcting, the sparse launch (kept blocks, plus the
pooled remainder of a PSA head) plus R read from the buffer.

Every node created carries meta["vsopt_from"] = ("lower_plan", (replaced node,)),
meta["vsopt_site"] and, on the attention launches, meta["vsopt_heads"] (head indices) and
meta["vsopt_plan"] (the launch key and the static density).
"""
from __future__ import annotations

import operator
import re

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from vsopt.core import ops as vsopt_ops  # noqa: F401  (registers torch.ops.vsopt.*)
from vsopt.core.errors import ConfigError, PlanError, UnsupportedSiteError
from vsopt.core.ir import AttentionSite, SkippedSite
from vsopt.core.ops import attention_arguments
from vsopt.core.orders import is_model_order
from vsopt.core.plan import HeadPlan, Plan, SitePlan
from vsopt.core.joint import joint_attention
from vsopt.core.lse import sparse_partial
from vsopt.core.pooled import Remainder, pooled_attention, pooled_remainder
from vsopt.core.resample import fit_site_plan
from vsopt.core import residual
from vsopt.core.rettention import RENORM_STATE, Correction, Phase, correct, measure
from vsopt.core.semantics import (LaunchKey, cluster_span, joint_plan, launch_groups, permutations, static_mask,
                                  text_blocks, video_range)

from .graph_edit import constant, emit, with_layout_of
from .infra import GraphChanges, PassContext, PassReport
from .mask_bounds import video_part_kept
from .mask_checks import check_video_block
from .site_ids import in_other_graphs

NAME = "lower_plan"
aten = torch.ops.aten
vsopt = torch.ops.vsopt


def _is_attention(n: torch.fx.Node) -> bool:
    return n.op == "call_function" and n.target in (vsopt.attention.default, vsopt.attention)


def _why_not(site: AttentionSite, sp: SitePlan, node: torch.fx.Node | None, split: bool = False) -> str | None:
    """The reason this site cannot be lowered with this plan, or None. Read from the site (and its
    vsopt.attention node, where the graph has one: with rewrite off it has none). A split site
    (a masked joint site, _why_not_split) has its mask handled by the split."""
    diffs = _site_differences(site, sp)
    if diffs:
        return "the plan does not fit the site: " + "; ".join(diffs)
    has_mask, is_causal = site.has_mask, site.is_causal
    if node is not None:
        a = attention_arguments(node.args, node.kwargs)
        has_mask, is_causal = a["attn_mask"] is not None, bool(a["is_causal"])
    if has_mask and not split:
        return "the site has an attention mask, which block-sparse attention does not take"
    if is_causal:
        return "the site is causal, which block-sparse attention does not take"
    if site.softcap and split:
        return "the site's logits are soft-capped, which the joint split's dense text part does not apply"
    if site.softcap and any(h.cluster is not None for h in sp.all_heads()):
        return "the site's logits are soft-capped, which the clustering launch does not apply"
    if site.softcap and any(h.remainder is Remainder.POOLED for h in sp.all_heads()):
        return "the site's logits are soft-capped, which the pooled remainder does not apply"
    if any(h.renorm is not None for h in sp.all_heads()):
        if site.softcap:
            return "the site's logits are soft-capped, which the softmax-mass correction (renorm) does not apply"
        if node is not None and not _static_sizes(node):
            return "the softmax-mass correction (renorm) keeps statistics of a static batch and length"
    if site.value_dim != site.head_dim:
        return f"value head dim {site.value_dim} differs from query head dim {site.head_dim}"
    if site.q_len != site.kv_len and any(not is_model_order(h.order, site.grid) for h in sp.all_heads()):
        return "token orders need self-attention (q_len == kv_len)"
    return None


def _static_sizes(node: torch.fx.Node) -> bool:
    q = attention_arguments(node.args, node.kwargs)["q"].meta["val"]
    v = attention_arguments(node.args, node.kwargs)["v"].meta["val"]
    return all(is_concrete_int(s) for s in (*q.shape, *v.shape))


def _site_mask(site: AttentionSite, node: torch.fx.Node | None, ctx: PassContext) -> torch.fx.Node | None:
    """The site's attention mask node: vsopt.attention's argument, or (rewrite off) the SDPA
    match's mask; None without one."""
    if node is not None:
        return attention_arguments(node.args, node.kwargs)["attn_mask"]
    match = ctx.matches.get(site.site_id)
    mask = getattr(getattr(match, "emit", None), "mask", None)
    return mask if isinstance(mask, torch.fx.Node) else None


def _symbolic_length(node: torch.fx.Node | None) -> bool:
    """Whether the site's sequence length is not a static int (data-dependent text)."""
    if node is None:
        return False
    q = attention_arguments(node.args, node.kwargs)["q"].meta["val"]
    k = attention_arguments(node.args, node.kwargs)["k"].meta["val"]
    return not (is_concrete_int(q.shape[2]) and is_concrete_int(k.shape[2]))


def _why_not_split(gm: torch.fx.GraphModule, site: AttentionSite, sp: SitePlan, mask: torch.fx.Node | None,
                   symbolic: bool = False, checked: bool = False) -> str | None:
    """Why a masked site, or one of data-dependent length, cannot be split into video x video (the
    plan) and text (dense, under the mask; vsopt.core.joint), or None. The mask must be provably
    all-true over video x video. A site of data-dependent length describes its static part: q_len
    == kv_len == grid.num_tokens (text_before + video), grid.text_after 0; the rest is text."""
    if symbolic and (site.grid is None or site.grid.text_after or site.q_len != site.grid.num_tokens):
        return (f"the site's length is data-dependent, and its grid {site.grid} does not describe the static part "
                f"of its sequence (text_before + video tokens = q_len {site.q_len}, the data-dependent text after it)")
    if site.grid is None:
        return ("the site has an attention mask and no video grid, so its text part cannot be split off "
                "(give the site's grid in the `grid` option)")
    if site.q_len != site.kv_len:
        return "the site has an attention mask and is not self-attention (q_len != kv_len): no joint split"
    try:
        joint_plan(site, sp.heads_at(None))
    except ConfigError as e:
        return str(e)
    start, stop = video_range(site)
    if mask is None and symbolic:
        return None
    if mask is None:
        return "the site has an attention mask that is not a graph node (a softmax-form mask), which cannot be checked"
    why = video_part_kept(gm, mask, start, stop)
    readable = isinstance(mask.meta.get("val"), torch.Tensor)  # the device check slices its video block
    return None if why is not None and checked and readable else why


def _asserted(gm: torch.fx.GraphModule, site: AttentionSite, mask: torch.fx.Node, ctx: PassContext) -> bool:
    """Whether the split runs on the user's word that the mask keeps video x video (unproved)."""
    return ctx.config.checks_mask_of(site.site_id) and video_part_kept(gm, mask, *video_range(site)) is not None


def _site_differences(site: AttentionSite, sp: SitePlan) -> list[str]:
    return Plan({sp.site_id: sp}).differences([site])


class _Lowering:
    """Emits the lowered form of one site before its vsopt.attention node: the launches, orders
    and masks vsopt.core.semantics gives the site's head plans, as graph nodes."""

    def __init__(self, gm: torch.fx.GraphModule, node: torch.fx.Node, site: AttentionSite, sp: SitePlan):
        self.gm, self.node, self.site, self.sp = gm, node, site, sp
        a = attention_arguments(node.args, node.kwargs)
        self.q, self.k, self.v, self.scale = a["q"], a["k"], a["v"], a["scale"]
        self.prefix = "_vsopt_" + re.sub(r"\W", "_", site.site_id)

    def constant(self, label: str, value: torch.Tensor) -> torch.fx.Node:
        """A get_attr node for a new buffer of the GraphModule holding `value` on the site's device."""
        return constant(self.gm, f"{self.prefix}_{label}", value, like=self.q, pass_name=NAME,
                        replaces=(self.node.name,))

    def emit(self, target, args, **meta) -> torch.fx.Node:
        n = emit(self.gm.graph, target, tuple(args), pass_name=NAME, replaces=(self.node.name,), meta_from=self.node)
        n.meta["vsopt_site"] = self.site.site_id
        n.meta.update(meta)
        return n

    # the vsopt.core.lse.Emitter protocol (joint attention is written against it)
    def op(self, target, *args, **kwargs) -> torch.fx.Node:
        n = emit(self.gm.graph, target, tuple(args), kwargs, pass_name=NAME, replaces=(self.node.name,),
                 meta_from=self.node)
        if n.meta.get("val") is None:   # arithmetic on sizes (no fake tensor among the arguments)
            vals = [a.meta.get("val") if isinstance(a, torch.fx.Node) else a for a in args]
            n.meta["val"] = target(*vals, **kwargs)
        n.meta["vsopt_site"] = self.site.site_id
        return n

    def const(self, label: str, value: torch.Tensor) -> torch.fx.Node:
        return self.constant(label, value)

    def lower_joint(self, mask: torch.fx.Node | None) -> torch.fx.Node:
        """The split of a masked (or data-dependent text) joint site: semantics.joint_plan computed
        by vsopt.core.joint over these nodes."""
        jp = joint_plan(self.site, self.sp.heads_at(None))
        return joint_attention(jp, self.q, self.k, self.v, mask, float(self.scale), self,
                               cache_key=f"{id(self.gm):x}:{self.site.site_id}")

    def lower(self) -> torch.fx.Node:
        heads = self.sp.heads_at(None)
        H, Hkv = self.q.meta["val"].shape[1], self.k.meta["val"].shape[1]
        groups = launch_groups(heads)
        orders = [hp.order for hp in heads]
        q, k, v = self.q, self.k, self.v
        rep = H // Hkv
        kv_split = Hkv != H and (len(groups) > 1 or any(len(set(orders[g * rep:(g + 1) * rep])) > 1
                                                         for g in range(Hkv)))
        if kv_split:  # one key/value head per query head
            k = self.emit(aten.repeat_interleave.self_int, (k, rep, 1))
            v = self.emit(aten.repeat_interleave.self_int, (v, rep, 1))
            Hkv = H
        perm_q = None
        perms = permutations(self.site.grid, heads)  # (1, N) when every head shares one order
        if perms is not None:
            perm_q = self.constant("perm_q", perms)
            perm_kv = perm_q if perms.shape[0] == 1 or Hkv == H else self.constant("perm_kv", perms[::rep])
            q = self.emit(vsopt.permute_tokens.default, (q, perm_q))
            k = self.emit(vsopt.permute_tokens.default, (k, perm_kv))
            v = self.emit(vsopt.permute_tokens.default, (v, perm_kv))
        outs, head_order = [], []
        for key, idx in groups.items():
            qg, kg, vg = q, k, v
            if len(groups) > 1:
                sel = self.constant("heads", torch.tensor(idx, dtype=torch.int64))
                qg, kg, vg = (self.emit(aten.index_select.default, (x, 1, sel)) for x in (q, k, v))
            outs.append(self.launch(key, idx, [heads[h] for h in idx], qg, kg, vg))
            head_order += idx
        out = outs[0] if len(outs) == 1 else self.emit(aten.cat.default, (outs, 1))
        if head_order != sorted(head_order):
            inverse = torch.argsort(torch.tensor(head_order, dtype=torch.int64))
            out = self.emit(aten.index_select.default, (out, 1, self.constant("head_order", inverse)))
        if perm_q is not None:
            out = self.emit(vsopt.unpermute_tokens.default, (out, perm_q))
        return out

    def launch(self, key: LaunchKey, idx: list[int], heads: list[HeadPlan], q, k, v) -> torch.fx.Node:
        meta = {"vsopt_heads": tuple(idx)}
        if key.renorm is not None:
            return self.renormed(key, idx, heads, q, k, v, meta)
        if key.cluster is not None:
            return self.clustered(key, idx, q, k, v, meta)
        if key.dynamic is None:
            masks = torch.stack([static_mask(self.site, hp) for hp in heads])
            kv_indices, kv_counts = vsopt.mask_to_table(masks[None])
            width = max(1, int(kv_counts.max()))  # the table needs no wider rows than the fullest one
            kv_indices, kv_counts = self.constant("kv_indices", kv_indices[..., :width].contiguous()), \
                self.constant("kv_counts", kv_counts)
            meta["vsopt_plan"] = {"quant": key.quant.value, "block": (key.block_m, key.block_n),
                                  "density": float(masks.float().mean())}
        else:
            spec = key.dynamic
            # one cache entry per graph, site and head group: two compiled models never share masks
            cache_key = f"{id(self.gm):x}:{self.site.site_id}/heads{idx[0]}"
            mask = self.emit(vsopt.dynamic_block_mask.default,
                             (q, k, float(self.scale), key.block_m, key.block_n, spec.method.value, spec.value,
                              spec.reuse_steps, cache_key))
            text = text_blocks(self.site.grid, self.site.q_len, self.site.kv_len, key.block_m, key.block_n)
            if text is not None:   # text rows and columns are global in a dynamic mask too
                mask = self.emit(aten.bitwise_or.Tensor, (mask, self.constant("text_blocks", text)))
            table = self.emit(vsopt.mask_to_table.default, (mask,))
            kv_indices = self.emit(operator.getitem, (table, 0))
            kv_counts = self.emit(operator.getitem, (table, 1))
            meta["vsopt_plan"] = {"quant": key.quant.value, "block": (key.block_m, key.block_n),
                                  "dynamic": spec.to_dict()}
        softcap = attention_arguments(self.node.args, self.node.kwargs)["softcap"]   # the site's logit cap
        if key.remainder is Remainder.POOLED:
            return self.pooled(key, q, k, v, masks if key.dynamic is None else mask, kv_indices, kv_counts, meta)
        return self.emit(vsopt.block_sparse_attention.default,
                         (q, k, v, kv_indices, kv_counts, float(self.scale), key.block_m, key.block_n,
                          key.quant.value, *((float(softcap),) if softcap else ())), **meta)

    def clustered(self, key: LaunchKey, idx: list[int], q, k, v, meta) -> torch.fx.Node:
        """A clustering group (vsopt.core.clustering, what semantics.site_output runs): the
        layout op computes per sample and head the k-means orders of q and k and the block mask
        over the permuted sequences (kept and warm-started across steps on the device), then the
        same permute_tokens -> block-sparse attention -> unpermute_tokens path as the axis orders,
        with per-sample permutations (B, H, N)."""
        spec = key.cluster
        H, Hkv = q.meta["val"].shape[1], k.meta["val"].shape[1]
        if Hkv != H:   # one key head per query head: each query head clusters its own keys
            k = self.emit(aten.repeat_interleave.self_int, (k, H // Hkv, 1))
            v = self.emit(aten.repeat_interleave.self_int, (v, H // Hkv, 1))
        nq, nk = q.meta["val"].shape[2], k.meta["val"].shape[2]
        (q0, q1), (k0, k1) = cluster_span(self.site, nq), cluster_span(self.site, nk)
        cache_key = f"{id(self.gm):x}:{self.site.site_id}/heads{idx[0]}"
        lay = self.emit(vsopt.cluster_layout.default,
                        (q, k, float(self.scale), key.block_m, key.block_n, spec.q_clusters, spec.k_clusters,
                         spec.top_p, spec.refresh, spec.iterations, spec.warm_iterations, spec.warm_start, q0, q1, k0,
                         k1, cache_key))
        perm_q, perm_k, mask = (self.emit(operator.getitem, (lay, i)) for i in range(3))
        qp = self.emit(vsopt.permute_tokens.default, (q, perm_q))
        kp = self.emit(vsopt.permute_tokens.default, (k, perm_k))
        vp = self.emit(vsopt.permute_tokens.default, (v, perm_k))
        table = self.emit(vsopt.mask_to_table.default, (mask,))
        kv_indices, kv_counts = self.emit(operator.getitem, (table, 0)), self.emit(operator.getitem, (table, 1))
        meta["vsopt_plan"] = {"quant": key.quant.value, "block": (key.block_m, key.block_n),
                              "cluster": spec.to_dict()}
        out = self.emit(vsopt.block_sparse_attention.default,
                        (qp, kp, vp, kv_indices, kv_counts, float(self.scale), key.block_m, key.block_n,
                         key.quant.value), **meta)
        return self.emit(vsopt.unpermute_tokens.default, (out, perm_q))

    def pooled(self, key: LaunchKey, q, k, v, masks, kv_indices, kv_counts, meta) -> torch.fx.Node:
        """The kept blocks by block_sparse_attention_lse plus the pooled remainder, merged
        (vsopt.core.pooled: the ops semantics runs), back in q's dtype."""
        em = _LoweringEmitter(self)
        if isinstance(masks, torch.Tensor):
            masks = self.constant("pool_masks", masks[None])
        meta["vsopt_plan"]["remainder"] = key.remainder.value
        out = pooled_attention(em, q, k, v, masks, kv_indices, kv_counts, float(self.scale), key.block_m,
                               key.block_n, key.quant.value)
        out = em.op(aten._to_copy.default, out, dtype=q.meta["val"].dtype)
        out.meta.update(meta)
        return out

    def renorm_buffers(self, key: LaunchKey) -> dict[str, torch.fx.Node]:
        """The site's statistics buffers (rettention.RENORM_STATE: the same tensors in every graph
        of the site) as constants of this graph: rho (B, H, N) float32 (mass correction only),
        resid (B, H, N, Dv) in q's dtype, and for dynamic heads their kept masks (B, H, QB, KB)."""
        qv, vv = self.q.meta["val"], self.v.meta["val"]
        B, H, N, Dv = qv.shape[0], qv.shape[1], qv.shape[2], vv.shape[-1]
        dev, sid = qv.device, self.site.site_id
        shapes = {"resid": ((B, H, N, Dv), qv.dtype)}
        if not heads_residual(key):
            shapes["rho"] = ((B, H, N), torch.float32)
        if key.dynamic is not None:
            qb, kb = -(-N // key.block_m), -(-self.k.meta["val"].shape[2] // key.block_n)
            shapes["mask"] = ((B, H, qb, kb), torch.bool)
        return {what: self.constant(f"renorm_{what}", RENORM_STATE.buffer(sid, what, shape, dtype, dev))
                for what, (shape, dtype) in shapes.items()}

    def renormed(self, key: LaunchKey, idx: list[int], heads: list[HeadPlan], q, k, v, meta) -> torch.fx.Node:
        """A renormalized launch group (vsopt.core.rettention) at its phase: measuring, the kept and
        dropped partials merged and the statistics written to the site's buffers; correcting, the
        kept blocks corrected from them. Back in q's dtype."""
        em = _LoweringEmitter(self)
        phase = heads[0].renorm.effective_phase()
        bufs = self.renorm_buffers(key)
        sel = self.constant("renorm_heads", torch.tensor(idx, dtype=torch.int64))
        scale, bm, bn, quant = float(self.scale), key.block_m, key.block_n, key.quant.value
        meta["vsopt_plan"] = {"quant": quant, "block": (bm, bn), "renorm": phase.value,
                              "remainder": key.remainder.value, "correction": key.correction.value}
        shared = heads_residual(key)
        masks = None
        if key.dynamic is None:
            static = torch.stack([static_mask(self.site, hp) for hp in heads])[None]
            meta["vsopt_plan"]["density"] = float(static.float().mean())
        if phase is Phase.CORRECT:
            if key.dynamic is None:
                kv_indices, kv_counts = self.table_constants("kv", static)
            else:   # the measuring step's mask
                masks = em.op(aten.index_select.default, bufs["mask"], 1, sel)
                kv_indices, kv_counts = self.table_nodes(em, masks)
            resid = em.op(aten.index_select.default, bufs["resid"], 1, sel)
            if shared and key.remainder is Remainder.POOLED:   # S is PSA's output (the masks as a node)
                if masks is None:
                    masks = self.constant("pool_masks", static)
                o = pooled_attention(em, q, k, v, masks, kv_indices, kv_counts, scale, bm, bn, quant)
            else:
                o = em.op(vsopt.block_sparse_attention.default, q, k, v, kv_indices, kv_counts, scale, bm, bn, quant)
            if shared:
                out = residual.correct(em, o, resid)
            else:
                rho = em.op(aten.index_select.default, bufs["rho"], 1, sel)
                out = correct(em, o, rho, resid)
        else:
            if key.dynamic is None:
                kv_indices, kv_counts = self.table_constants("kv", static)
                drop_indices, drop_counts = self.table_constants("drop", ~static)
                masks = self.constant("renorm_masks", static)
            else:
                masks = self.dynamic_mask(key, q, k)
                meta["vsopt_plan"]["dynamic"] = key.dynamic.to_dict()
                kv_indices, kv_counts = self.table_nodes(em, masks)
                drop_indices, drop_counts = self.table_nodes(em, em.op(aten.logical_not.default, masks))
            kept = sparse_partial(em, q, k, v, kv_indices, kv_counts, scale, bm, bn, quant)
            if shared:   # residual sharing: exact output, R = exact - sparse
                dropped = sparse_partial(em, q, k, v, drop_indices, drop_counts, scale, bm, bn, quant)
                pooled = pooled_remainder(em, q, k, v, masks, scale, bm, bn) \
                    if key.remainder is Remainder.POOLED else None
                out, resid = residual.measure(em, kept, dropped, pooled)
            else:
                if key.remainder is Remainder.POOLED:
                    dropped = pooled_remainder(em, q, k, v, masks, scale, bm, bn)
                else:
                    dropped = sparse_partial(em, q, k, v, drop_indices, drop_counts, scale, bm, bn, quant)
                out, rho, resid = measure(em, kept, dropped)
                em.op(aten.index_copy_.default, bufs["rho"], 1, sel, rho)
            em.op(aten.index_copy_.default, bufs["resid"], 1, sel,
                  em.op(aten._to_copy.default, resid, dtype=self.q.meta["val"].dtype))
            if key.dynamic is not None:
                em.op(aten.index_copy_.default, bufs["mask"], 1, sel, masks)
        out = em.op(aten._to_copy.default, out, dtype=q.meta["val"].dtype)
        out.meta.update(meta)
        return out

    def table_constants(self, label: str, masks: torch.Tensor) -> tuple[torch.fx.Node, torch.fx.Node]:
        kv_indices, kv_counts = vsopt.mask_to_table(masks)
        width = max(1, int(kv_counts.max()))
        return (self.constant(f"{label}_indices", kv_indices[..., :width].contiguous()),
                self.constant(f"{label}_counts", kv_counts))

    def table_nodes(self, em, masks) -> tuple[torch.fx.Node, torch.fx.Node]:
        table = em.op(vsopt.mask_to_table.default, masks)
        return em.op(operator.getitem, table, 0), em.op(operator.getitem, table, 1)

    def dynamic_mask(self, key: LaunchKey, q, k) -> torch.fx.Node:
        """A dynamic group's mask predicted on this step's q/k, text blocks kept."""
        spec = key.dynamic
        mask = self.emit(vsopt.dynamic_block_mask.default,
                         (q, k, float(self.scale), key.block_m, key.block_n, spec.method.value, spec.value,
                          spec.reuse_steps, f"{id(self.gm):x}:{self.site.site_id}/renorm"))
        text = text_blocks(self.site.grid, self.site.q_len, self.site.kv_len, key.block_m, key.block_n)
        if text is not None:
            mask = self.emit(aten.bitwise_or.Tensor, (mask, self.constant("text_blocks", text)))
        return mask


def heads_residual(key: LaunchKey) -> bool:
    """Whether a renormalized launch group shares residuals (vsopt.core.residual) rather than
    correcting the softmax mass."""
    return key.correction is Correction.RESIDUAL


class _LoweringEmitter:
    """ring.Emitter over a _Lowering: ops become nodes before the site, constants its buffers."""

    def __init__(self, low: _Lowering):
        self.low = low

    def op(self, target, *args, **kwargs):
        n = emit(self.low.gm.graph, target, tuple(args), kwargs, pass_name=NAME, replaces=(self.low.node.name,),
                 meta_from=self.low.node)
        n.meta["vsopt_site"] = self.low.site.site_id
        return n

    def const(self, label: str, value: torch.Tensor):
        return self.low.constant(label, value)


def run(gm: torch.fx.GraphModule, ctx: PassContext) -> PassReport:
    report = PassReport(NAME)
    plan = ctx.config.plan
    if plan is None:
        report.notes.append("no plan: every site stays vsopt.attention (dense)")
        ctx.kept_dense.update({s.site_id: "no plan" for s in ctx.sites})
        return report
    sites = {s.site_id: s for s in ctx.sites}  # what detection found (with rewrite off, no nodes exist)
    absent = sorted(set(plan.sites) - set(sites))
    if absent:
        msg = f"plan sites not in this graph: {absent} (graph sites: {sorted(sites)})"
        elsewhere = in_other_graphs(gm, absent)
        if elsewhere:
            msg += f"; {elsewhere} name modules of the compiled model, so other graphs of this compile may hold them"
        if ctx.config.strict and len(elsewhere) < len(absent):  # a site of no module: another model's plan, or a typo
            raise PlanError(f"{NAME}: {msg}")
        ctx.absent_plan_sites.extend(absent)
        report.notes.append(msg)
    nodes = {n.meta["vsopt_site"]: n for n in gm.graph.nodes if _is_attention(n) and "vsopt_site" in n.meta}

    changes = GraphChanges(gm.graph)

    def leave(site: AttentionSite, reason: str) -> None:
        if ctx.config.strict:
            raise UnsupportedSiteError(site.site_id, reason)
        node = nodes.get(site.site_id)
        ctx.skipped.append(SkippedSite(site.site_id, node.name if node is not None else site.output_node, reason,
                                       rule=NAME))
        report.notes.append(f"site {site.site_id!r} stays dense: {reason}")

    for site in ctx.sites:
        site_id, node = site.site_id, nodes.get(site.site_id)
        if node is None and site_id not in ctx.matches:
            continue  # not a vsopt.attention site: an earlier pass handled it (ring_attention)
        sp = plan.sites.get(site_id)
        if sp is None:
            leave(site, "the plan has no entry for this site")
            continue
        fit = fit_site_plan(sp, site)  # a plan made at another clip size, at this site's (vsopt.core.resample)
        if fit.plan is None:
            leave(site, f"the plan does not fit the site: {fit.reason}")
            continue
        if fit.resampled:
            report.notes.append(fit.line())
        sp = fit.plan
        mask = _site_mask(site, node, ctx) if site.has_mask or node is not None else None
        symbolic = _symbolic_length(node)
        split = mask is not None or site.has_mask or symbolic
        reason = _why_not(site, sp, node, split)
        if reason is None and split:
            reason = _why_not_split(gm, site, sp, mask, symbolic, ctx.config.checks_mask_of(site_id))
        if sp.is_dense and not _site_differences(site, sp):
            # dense on purpose: what the plan asks for, whatever the site (a mask, causal...)
            ctx.kept_dense[site_id] = "the plan keeps it dense"
            report.notes.append(f"site {site_id!r}: dense plan, stays vsopt.attention")
            continue
        if reason is not None:
            leave(site, reason)
            continue
        if split:
            what = "data-dependent text length" if symbolic else "masked joint site"
            report.notes.append(f"site {site_id!r}: {what}, split: video x video by the plan, text dense "
                                "under the mask")
        if node is None:
            report.notes.append(f"site {site_id!r}: would be lowered (the graph has no vsopt.attention node for it)")
            continue
        if sp.steps:
            report.notes.append(f"site {site_id!r}: {len(sp.steps)} step range(s); this graph runs the default "
                                "head plans (the backend compiles one graph per step segment)")
        if split and mask is not None and _asserted(gm, site, mask, ctx):   # the user's word, checked on device
            check_video_block(gm, mask, *video_range(site), site_id, before=node)
            report.notes.append(f"site {site_id!r}: its mask is checked on the device (check_masks_on_device)")
        low = _Lowering(gm, node, site, sp)
        with gm.graph.inserting_before(node):
            new = low.lower_joint(mask) if split else low.lower()
            out = with_layout_of(gm.graph, new, node, pass_name=NAME)   # e.g. a permuted order's output
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        ctx.lowered.append(site_id)
    return changes.record(report)
