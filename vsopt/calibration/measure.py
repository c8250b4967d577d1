"""The two measuring passes of a calibration, per site and step range (SiteState):

1. block mass (measure_mass): each head's exact block attention mass in each candidate token
   order, summed over the inputs; then (build_candidates) each head's order is chosen and the
   sparsity candidates are listed in those orders: calibrated masks at several mass shares, the
   static patterns that fit the grid, dynamic masks, skip and dense.
2. errors (measure_errors): every candidate (unquantized) and every precision (dense) is run on
   the site's real q/k/v through the plan's semantics (vsopt.core.semantics: permuted_qkv,
   dynamic_masks, masked_attention), and each head's squared error against exact float32
   attention and the density of its masks are summed.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch

from vsopt.calibration.capture import SiteCall
from vsopt.calibration.options import CalibrationOptions, default_patterns
from vsopt.calibration.order_choice import choose_orders, order_block_mass
from vsopt.core import semantics
from vsopt.core.clustering import ClusterSpec
from vsopt.core.dynamic import DynamicMethod, DynamicSpec
from vsopt.core.errors import ConfigError
from vsopt.core.ir import AttentionSite
from vsopt.core.ops import softcapped_attention
from vsopt.core.orders import TokenOrder, model_order
from vsopt.core.patterns import Pattern, Union, block_mask, calibrated_block_mask, num_blocks
from vsopt.core.plan import HeadPlan, Quant, Sparsity
from vsopt.core.pooled import Remainder
from vsopt.core.rettention import Correction, Renorm


@dataclass
class Candidate:
    """One sparsity choice offered to every head of a site: masks (H, QB, KB) in each head's order
    (None for a dynamic candidate, whose mask depends on the input)."""

    label: str
    sparsity: Sparsity
    masks: torch.Tensor | None = None
    pattern: Pattern | None = None
    dynamic: DynamicSpec | None = None
    model_order: bool = False  # masks in the model's own order (SiteState.own_order) for every head: no permutation
    remainder: Remainder = Remainder.DROP  # pooled: the dropped blocks attended mean-pooled (PSA)
    renorm: Renorm | None = None  # softmax-mass correction (Re-ttention, calibration.renorm)
    cluster: ClusterSpec | None = None  # a cluster candidate (calibration.clusters): no masks, no order


@dataclass
class SiteState:
    """What calibration knows about one site in one step range."""

    site: AttentionSite
    opt: CalibrationOptions
    orders: tuple[TokenOrder, ...]
    mass: dict[TokenOrder, torch.Tensor] = field(default_factory=dict)  # (H, QB, KB) float64, summed
    mass_calls: int = 0
    head_orders: list[TokenOrder] | None = None
    candidates: list[Candidate] | None = None
    err2: torch.Tensor | None = None  # (H, C) squared error of each candidate, quant none
    density: torch.Tensor | None = None  # (H, C) blocks kept / all blocks, summed over calls
    quant_err2: torch.Tensor | None = None  # (H, len(quants)) dense, per quant mode
    norm2: torch.Tensor | None = None  # (H,) squared norm of the exact output
    error_calls: int = 0
    # (head, candidate, quant) -> HeadPlan, filled by choices.head_plan, emptied with the candidates
    plans: dict = field(default_factory=dict, repr=False)
    # mask reuse (calibration.reuse): the refresh intervals offered here, the range's first step,
    # and the reusing candidates' kept masks during pass 2
    refresh: tuple[int, ...] = ()
    range_start: int = 0
    reused: object = field(default=None, repr=False)
    # softmax-mass correction (calibration.renorm): the intervals offered here, the kept statistics
    renorm: tuple[int, ...] = ()
    residual: tuple[int, ...] = ()  # residual sharing's intervals (DiTFastAttn), kept statistics the same way
    renormed: object = field(default=None, repr=False)
    clusters: object = field(default=None, repr=False)  # cluster candidates' layouts (calibration.clusters)
    # how many denoising steps the state's step range runs (its calibration inputs): a model-wide
    # budget counts its blocks, time and error that many times (a range of 3 steps spends 3x)
    steps: int = 1

    @property
    def own_order(self) -> TokenOrder:
        """The model's own token order at this site (orders.model_order: FHW without a grid)."""
        return model_order(self.site.grid)

    @property
    def blocks(self) -> tuple[int, int]:
        return num_blocks(self.site.q_len, self.opt.block_m), num_blocks(self.site.kv_len, self.opt.block_n)

    def ordered_heads(self) -> list[HeadPlan]:
        """Dense heads in the chosen orders: what semantics.permuted_qkv needs to permute."""
        return [HeadPlan(order=o, block_m=self.opt.block_m, block_n=self.opt.block_n) for o in self.head_orders]


def calibratable(site: AttentionSite) -> str | None:
    """Why a site cannot be calibrated (it then gets a dense entry in the plan, "dense on
    purpose", with this reason), or None. The block-sparse kernel takes self-attention with one
    head dim, no mask and no causal flag."""
    why = []
    if site.q_len != site.kv_len:
        why.append(f"cross-attention (q_len {site.q_len} != kv_len {site.kv_len})")
    if site.has_mask:
        why.append("an attention mask")
    if site.is_causal:
        why.append("a causal flag")
    if site.value_dim != site.head_dim:
        why.append(f"value head dim {site.value_dim} != query head dim {site.head_dim}")
    if not why:
        return None
    return "not calibrated, dense: block-sparse attention does not take " + ", ".join(why)


def measure_mass(state: SiteState, call: SiteCall) -> None:
    """Pass 1: add this call's block mass in each candidate order (summed over the batch)."""
    mass = order_block_mass(call, state.site.grid, state.orders, state.opt.block_m, state.opt.block_n)
    for order, m in mass.items():
        state.mass[order] = state.mass[order] + m if order in state.mass else m
    state.mass_calls += call.q.shape[0]


def build_candidates(state: SiteState) -> None:
    """After pass 1: pick each head's order and list the sparsity candidates in those orders."""
    site, (qb, kb), opt = state.site, state.blocks, state.opt
    state.head_orders = choose_orders(state.mass, opt.order_density, prefer=state.own_order)
    mean = torch.stack([state.mass[o][h] for h, o in enumerate(state.head_orders)]) / max(1, state.mass_calls)
    cands = [Candidate("dense", Sparsity.DENSE, torch.ones(site.heads, qb, kb, dtype=torch.bool))]
    seen = {cands[0].masks.numpy().tobytes()}
    for share in sorted(opt.mass_shares):
        masks = _with_text(state, calibrated_block_mask(mean, share))
        if masks.numpy().tobytes() not in seen:
            seen.add(masks.numpy().tobytes())
            cands.append(Candidate(f"mask@{share:g}", Sparsity.MASK, masks))
    if opt.patterns and site.grid is not None:
        for pattern in default_patterns(site.grid):
            masks = torch.stack([block_mask(pattern, site.grid, o, opt.block_m, opt.block_n)
                                 for o in state.head_orders])
            if masks.float().mean() < 0.9 and masks.numpy().tobytes() not in seen:
                seen.add(masks.numpy().tobytes())
                cands.append(Candidate(describe_pattern(pattern), Sparsity.PATTERN, masks, pattern=pattern))
    if opt.dynamic:
        for value in opt.dynamic_values:
            spec = DynamicSpec(DynamicMethod.CUMULATIVE_MASS, value)
            cands.append(Candidate(f"dynamic@{value:g}", Sparsity.DYNAMIC, dynamic=spec))
        for value in opt.dynamic_top_k:
            spec = DynamicSpec(DynamicMethod.TOP_K, value)
            cands.append(Candidate(f"topk@{value:g}", Sparsity.DYNAMIC, dynamic=spec))
        fresh = [c for c in cands if c.sparsity is Sparsity.DYNAMIC]
        for r in state.refresh:  # the same masks, computed every r steps and reused between (AdaSpa)
            cands += [Candidate(f"{c.label}/every{r}", Sparsity.DYNAMIC,
                                dynamic=dataclasses.replace(c.dynamic, reuse_steps=r - 1)) for c in fresh]
    if opt.model_order_candidates and any(o is not state.own_order for o in state.head_orders):
        cands += _model_order_candidates(state, cands)
    if opt.pooled_remainder and not site.softcap:  # every sparse candidate again, its dropped blocks pooled
        # (PSA; not at a soft-capped site: the pooled remainder takes no cap, lower_plan refuses it)
        cands += [dataclasses.replace(c, label=c.label + "+pooled", remainder=Remainder.POOLED) for c in cands
                  if c.sparsity in (Sparsity.MASK, Sparsity.PATTERN, Sparsity.DYNAMIC)]
    corrections = [(r, Correction.MASS, "renorm") for r in state.renorm] + \
        [(r, Correction.RESIDUAL, "residual") for r in state.residual]
    base = [c for c in cands if c.sparsity in (Sparsity.MASK, Sparsity.PATTERN, Sparsity.DYNAMIC)
            and not (c.dynamic is not None and c.dynamic.reuse_steps)]
    for r, kind, tag in corrections if not site.softcap else ():  # every sparse candidate again, its
        # dropped mass restored (Re-ttention) or its error at the measuring step added back (DiTFastAttn's
        # residual sharing); not at a soft-capped site: the corrections take no cap, lower_plan refuses them
        cands += [dataclasses.replace(c, label=f"{c.label}/{tag}{r}", renorm=Renorm(r, kind=kind)) for c in base]
    if opt.clusters and not site.softcap:  # k-means orders and cluster-pair blocks, online (SVG2; no cap:
        # lower_plan leaves a capped site with cluster heads dense)
        from vsopt.calibration.clusters import cluster_label

        cands += [Candidate(cluster_label(s), Sparsity.CLUSTER, cluster=s) for s in opt.clusters]
    if opt.skip:
        cands.append(Candidate("skip", Sparsity.SKIP, torch.zeros(site.heads, qb, kb, dtype=torch.bool)))
    state.candidates = cands
    state.plans = {}
    state.reused = None  # pass 2 (re)starts: no kept masks
    state.renormed = None  # nor kept statistics
    state.clusters = None
    H, C = site.heads, len(cands)
    state.err2 = torch.zeros(H, C, dtype=torch.float64)
    state.density = torch.zeros(H, C, dtype=torch.float64)
    state.quant_err2 = torch.zeros(H, len(opt.quants), dtype=torch.float64)
    state.norm2 = torch.zeros(H, dtype=torch.float64)


def _with_text(state: SiteState, masks: torch.Tensor) -> torch.Tensor:
    """Calibrated masks (H, QB, KB) with the blocks of text rows and columns kept: text tokens are
    global in a joint site (semantics.text_blocks), so the saved mask is what runs."""
    site, opt = state.site, state.opt
    text = semantics.text_blocks(site.grid, site.q_len, site.kv_len, opt.block_m, opt.block_n)
    return masks if text is None else masks | text


def _model_order_candidates(state: SiteState, cands: Sequence[Candidate]) -> list[Candidate]:
    """The sparse candidates again in the model's own token order for every head (labels end in
    "@" + that order, e.g. "@fhw"): calibrated masks from its block mass, patterns and dynamic
    masks in it."""
    site, opt, own = state.site, state.opt, state.own_order
    own_mass = state.mass[own] / max(1, state.mass_calls)
    tag = "@" + own.value
    out = []
    for cand in cands:
        if cand.sparsity is Sparsity.MASK:
            share = float(cand.label.split("@", 1)[1])
            out.append(Candidate(cand.label + tag, Sparsity.MASK, _with_text(state, calibrated_block_mask(own_mass, share)),
                                 model_order=True))
        elif cand.sparsity is Sparsity.PATTERN:
            m = block_mask(cand.pattern, site.grid, own, opt.block_m, opt.block_n)
            out.append(Candidate(cand.label + tag, Sparsity.PATTERN, m[None].expand(site.heads, -1, -1).clone(),
                                 pattern=cand.pattern, model_order=True))
        elif cand.sparsity is Sparsity.DYNAMIC:
            out.append(Candidate(cand.label + tag, Sparsity.DYNAMIC, dynamic=cand.dynamic, model_order=True))
    return out


def describe_pattern(p: Pattern) -> str:
    """Short text of a pattern, e.g. "local_window(1,2,2)" or "union(local_window(1,2,2)+vertical_stripes(0))"."""
    if isinstance(p, Union):
        return "union(" + "+".join(describe_pattern(x) for x in p.parts) + ")"
    values = [getattr(p, f.name) for f in dataclasses.fields(p) if f.name != "text_global"]
    return f"{p.KIND}(" + ",".join("-".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in values) + ")"


def exact_attention(call: SiteCall) -> torch.Tensor:
    """Exact attention in float32, the reference every error is measured against; a soft-capped
    site's scores capped (softcap * tanh(s / softcap)) before the softmax, as the site computes."""
    H = call.q.shape[1]
    q, k, v = call.q.float(), semantics.kv_to_heads(call.k, H).float(), semantics.kv_to_heads(call.v, H).float()
    if call.softcap:
        return softcapped_attention(q, k, v, None, call.scale, False, call.softcap)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=call.scale)


def _head_err2(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return (out.double() - ref.double()).pow(2).sum((0, 2, 3)).cpu()


def _unpermuted(out: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    return out if perm is None else torch.ops.vsopt.unpermute_tokens(out, perm)


def measure_errors(state: SiteState, call: SiteCall, step: int | None = None) -> None:
    """Pass 2: squared error of every candidate (quant none) and every quant mode (dense). The
    q/k/v are permuted once into the heads' orders; each candidate then runs on them (or, for a
    model-order candidate, on the unpermuted ones) with its masks. step: the call's denoising
    step, which a candidate reusing masks (calibration.reuse) needs."""
    from vsopt.calibration.renorm import KeptStatistics
    from vsopt.calibration.clusters import ClusterRuns, measure_cluster
    from vsopt.calibration.reuse import ReusedMasks

    ref = exact_attention(call)
    if state.refresh:
        if step is None:
            raise ConfigError("calibration candidates that reuse masks need each input's denoising step")
        if state.reused is None:
            state.reused = ReusedMasks(state.range_start)
        state.reused.begin(step)
    if state.renorm or state.residual:
        if step is None:
            raise ConfigError("calibration candidates with a softmax-mass correction need each input's denoising step")
        if state.renormed is None:
            state.renormed = KeptStatistics(state.range_start)
        state.renormed.begin(step)
    if state.opt.clusters:
        if state.clusters is None:
            state.clusters = ClusterRuns()
        state.clusters.begin(step)
    opt = state.opt
    blocks = (opt.block_m, opt.block_n)
    perm, qp, kp, vp = semantics.permuted_qkv(state.site.grid, state.ordered_heads(), call.q, call.k, call.v)
    H = call.q.shape[1]
    model_order = (None, call.q, semantics.kv_to_heads(call.k, H), semantics.kv_to_heads(call.v, H))
    for c, cand in enumerate(state.candidates):
        p, qc, kc, vc = model_order if cand.model_order else (perm, qp, kp, vp)
        if cand.renorm is not None:   # measured or corrected as it runs (calibration.renorm)
            fresh = (lambda: semantics.dynamic_masks(qc, kc, cand.dynamic, call.scale, *blocks, grid=state.site.grid)) \
                if cand.sparsity is Sparsity.DYNAMIC else (lambda: cand.masks[None])
            out, done = state.renormed.output(c, cand.label, cand.renorm, cand.remainder, step, qc, kc, vc, fresh,
                                              call.scale, *blocks)
            state.err2[:, c] += _head_err2(_unpermuted(out, p), ref)
            state.density[:, c] += done.sum(0).double().cpu()
            continue
        if cand.sparsity is Sparsity.CLUSTER:
            out, masks = measure_cluster(state, c, cand, call, step)
            state.err2[:, c] += _head_err2(out, ref)
            state.density[:, c] += masks.float().mean((-1, -2)).sum(0).double().cpu()
            continue
        if cand.sparsity is Sparsity.DYNAMIC and cand.dynamic.reuse_steps:
            masks = state.reused.masks(c, cand.label, cand.dynamic, step, lambda: semantics.dynamic_masks(
                qc, kc, cand.dynamic, call.scale, *blocks, grid=state.site.grid))
        elif cand.sparsity is Sparsity.DYNAMIC:
            masks = semantics.dynamic_masks(qc, kc, cand.dynamic, call.scale, *blocks, grid=state.site.grid)
        else:
            masks = cand.masks[None]
        attend = semantics.pooled_masked_attention if cand.remainder is Remainder.POOLED else semantics.masked_attention
        cap = (call.softcap,) if call.softcap else ()   # no capped pooled candidate (build_candidates)
        out = _unpermuted(attend(qc, kc, vc, masks, call.scale, Quant.NONE, *blocks, *cap), p)
        state.err2[:, c] += _head_err2(out, ref)
        state.density[:, c] += masks.float().mean((-1, -2)).expand(call.q.shape[0], -1).sum(0).double().cpu()
    dense = state.candidates[0].masks[None]
    for i, quant in enumerate(opt.quants):
        out = _unpermuted(semantics.masked_attention(qp, kp, vp, dense, call.scale, quant, *blocks, call.softcap),
                          perm)
        state.quant_err2[:, i] += _head_err2(out, ref)
    state.norm2 += ref.double().pow(2).sum((0, 2, 3)).cpu()
    state.error_calls += call.q.shape[0]


def site_plan_output(site: AttentionSite, heads: Sequence[HeadPlan], call: SiteCall) -> torch.Tensor:
    """Deprecated: vsopt.core.semantics.site_output(site, heads, call.q, call.k, call.v, call.scale)."""
    warnings.warn("vsopt.calibration.site_plan_output is deprecated; use vsopt.core.semantics.site_output",
                  DeprecationWarning, stacklevel=2)
    return semantics.site_output(site, heads, call.q, call.k, call.v, call.scale, softcap=call.softcap)
