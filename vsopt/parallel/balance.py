"""Head balancing under Ulysses: which global heads each rank computes, chosen with the cost model.

Under Ulysses degree U, rank r computes heads [r*H/U, (r+1)*H/U) of every site, and each site's
all-to-all waits for the slowest rank; with sparse plans the heads of a site differ a lot in cost
(a dense head against a skipped one), so the rank holding the densest heads sets the pace. A head
order per site (a permutation of its heads) changes which heads share a rank:

    balance = balance_heads(plan, degree=U, head_dim=128, dtype=torch.bfloat16)
    print(balance.report())                        # predicted per-rank time before / after
    apply_head_order(model, balance.orders)        # permute the projections' heads (weights)
    plan = balance.apply(plan)                     # the plan in the same head order

Both must be applied: the model then computes at head slot i the original head order[i], and the
plan's head i is that head's plan, so the output is unchanged (up to float summation order in the
output projection) while rank r computes order[r*H/U:(r+1)*H/U]. The per-rank time of a head set is
semantics.predicted_us of the site restricted to those heads (launch grouping and permutation
costs included), the same prediction calibration optimizes.

Search: longest-processing-time first on each head's own predicted time, then pairwise swaps
between the slowest rank and the others while the pair's slower time drops. Within a rank, heads
are ordered by launch key so that each launch's heads are contiguous (no output gather).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from vsopt.core.costmodel import CostModel
from vsopt.core.errors import ConfigError
from vsopt.core.plan import HeadPlan, Plan, SitePlan
from vsopt.core.semantics import SiteShape, head_densities, predicted_us, select_heads


@dataclass(frozen=True)
class SiteBalance:
    """One site: `order` lists the global heads in the order the model computes them after
    balancing (rank r: order[r*H/U:(r+1)*H/U]); predicted per-rank times in microseconds."""

    site_id: str
    order: tuple[int, ...]
    before_us: tuple[float, ...]
    after_us: tuple[float, ...]


@dataclass(frozen=True)
class HeadBalance:
    degree: int
    sites: Mapping[str, SiteBalance]

    @property
    def orders(self) -> dict[str, tuple[int, ...]]:
        return {sid: s.order for sid, s in self.sites.items()}

    def apply(self, plan: Plan) -> Plan:
        """The plan with each balanced site's heads in its balanced order (semantics.select_heads)."""
        sites = {sid: select_heads(sp, self.sites[sid].order) if sid in self.sites else sp
                 for sid, sp in plan.sites.items()}
        return Plan(sites, {**plan.meta, "head_balance": {"degree": self.degree,
                                                          "orders": {k: list(v) for k, v in self.orders.items()}}})

    def totals(self) -> dict[str, float]:
        """Sum over sites of the slowest rank's time (the pace), before and after, and the ideal
        (sum of the mean rank time: perfect balance), in microseconds."""
        s = self.sites.values()
        return {"before_us": sum(max(b.before_us) for b in s), "after_us": sum(max(b.after_us) for b in s),
                "ideal_us": sum(sum(b.before_us) / self.degree for b in s)}

    def report(self) -> str:
        t = self.totals()
        lines = [f"head balancing over {self.degree} ranks: slowest rank {t['before_us']:.0f} us -> "
                 f"{t['after_us']:.0f} us (balanced ideal {t['ideal_us']:.0f} us)"]
        for sid, b in self.sites.items():
            lines.append(f"  {sid}: per rank {' '.join(f'{x:.0f}' for x in b.before_us)} -> "
                         f"{' '.join(f'{x:.0f}' for x in b.after_us)} us; heads {list(b.order)}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"degree": self.degree, **self.totals(),
                "sites": {sid: {"order": list(b.order), "before_us": list(b.before_us), "after_us": list(b.after_us)}
                          for sid, b in self.sites.items()}}


def balance_heads(plan: Plan, degree: int, *, head_dim: int, dtype: torch.dtype = torch.bfloat16, batch: int = 1,
                  cost: CostModel | None = None, densities: Mapping[str, Sequence[float]] | None = None,
                  step: int | None = None) -> HeadBalance:
    """A balanced head order for every site of `plan` whose heads split over `degree` ranks.
    densities: per site, per head, the fraction of blocks visited (needed for cumulative-mass
    dynamic heads, whose density depends on the input; others come from the plan). step: which
    step range's head plans to balance (None: the default ones)."""
    if degree < 1:
        raise ConfigError(f"head balancing needs a degree >= 1, got {degree}")
    cost = cost or CostModel.default()
    out = {}
    for sid, sp in plan.sites.items():
        if sp.num_heads % degree:
            raise ConfigError(f"site {sid!r}: {sp.num_heads} heads do not split over {degree} ranks")
        heads = sp.heads_at(step)
        dens = list(densities[sid]) if densities and sid in densities else _densities(sp, heads, batch, head_dim, dtype)
        rank_site = SiteShape.of_plan(sp, batch, head_dim, dtype, heads=sp.num_heads // degree)  # one rank's

        def rank_us(group: Sequence[int]) -> float:
            return predicted_us(rank_site, [heads[h] for h in group], cost, [dens[h] for h in group])

        identity = [list(range(r * rank_site.heads, (r + 1) * rank_site.heads)) for r in range(degree)]
        groups = _search(sp.num_heads, degree, rank_us, identity)
        groups = [sorted(g, key=lambda h: (_launch_key(heads[h]), h)) for g in sorted(groups, key=min)]
        out[sid] = SiteBalance(sid, tuple(h for g in groups for h in g), tuple(rank_us(g) for g in identity),
                               tuple(rank_us(g) for g in groups))
    return HeadBalance(degree, out)


def _densities(sp: SitePlan, heads, batch: int, head_dim: int, dtype: torch.dtype) -> list[float]:
    shape = SiteShape.of_plan(sp, batch, head_dim, dtype)
    try:
        return head_densities(shape, heads)
    except ConfigError as e:
        raise ConfigError(f"{e}: pass densities={{site_id: [per-head density]}} (measured, e.g. by "
                          "vsopt.inspect or calibration) to balance it") from None


def _launch_key(hp: HeadPlan) -> str:
    return f"{hp.quant.value}/{hp.block_m}x{hp.block_n}/{hp.dynamic}"


def _search(num_heads: int, degree: int, rank_us, identity: list[list[int]]) -> list[list[int]]:
    """Equal-size head groups minimizing the slowest group's time (heuristic, see module doc)."""
    size = num_heads // degree
    if degree == 1:
        return identity
    alone = {h: rank_us([h]) for h in range(num_heads)}
    groups: list[list[int]] = [[] for _ in range(degree)]
    load = [0.0] * degree
    for h in sorted(range(num_heads), key=lambda h: (-alone[h], h)):
        r = min((r for r in range(degree) if len(groups[r]) < size), key=lambda r: (load[r], r))
        groups[r].append(h)
        load[r] += alone[h]
    times = [rank_us(g) for g in groups]
    for _ in range(20 * num_heads):
        slow = max(range(degree), key=times.__getitem__)
        best = None
        for other in range(degree):
            if other == slow:
                continue
            for i, a in enumerate(groups[slow]):
                for j, b in enumerate(groups[other]):
                    ga = groups[slow][:i] + [b] + groups[slow][i + 1:]
                    gb = groups[other][:j] + [a] + groups[other][j + 1:]
                    ta, tb = rank_us(ga), rank_us(gb)
                    if max(ta, tb) < times[slow] - 1e-9 and (best is None or max(ta, tb) < best[0]):
                        best = (max(ta, tb), other, ga, gb, ta, tb)
        if best is None:
            break
        _, other, ga, gb, ta, tb = best
        groups[slow], groups[other], times[slow], times[other] = ga, gb, ta, tb
    # never worse than the model's own order
    return groups if max(times) <= max(rank_us(g) for g in identity) else identity


def apply_head_order(model: torch.nn.Module, orders: Mapping[str, Sequence[int]]) -> torch.nn.Module:
    """Permute, in place, the heads of each site's attention module (site id = module path) so that
    head slot i computes the original head orders[site][i]: the output rows of the q/k/v
    projections (and of per-channel q/k norms), the input columns of the output projection.
    Supports diffusers' attention modules (to_q, to_k, to_v, to_out[0], norm_q/norm_k, the
    added-KV projections); fused projections (to_qkv) are refused. Returns model."""
    for sid, order in orders.items():
        try:
            attn = model.get_submodule(sid)
        except AttributeError:
            raise ConfigError(f"head order for {sid!r}: the model has no module {sid!r}") from None
        heads = getattr(attn, "heads", None)
        if getattr(attn, "fused_projections", False) or getattr(attn, "to_qkv", None) is not None and \
                getattr(attn, "to_q", None) is None:
            raise ConfigError(f"{sid}: fused q/k/v projections; unfuse them before permuting heads")
        if heads is None or not all(hasattr(attn, n) for n in ("to_q", "to_k", "to_v", "to_out")):
            raise ConfigError(f"{sid}: not an attention module with heads, to_q/to_k/to_v/to_out "
                              f"({type(attn).__name__}): head balancing cannot permute its heads")
        order = [int(h) for h in order]
        if sorted(order) != list(range(heads)):
            raise ConfigError(f"{sid}: head order {order} is not a permutation of its {heads} heads")
        width = attn.to_q.out_features // heads
        idx = torch.cat([torch.arange(h * width, (h + 1) * width) for h in order])
        with torch.no_grad():
            for name in ("to_q", "to_k", "to_v", "add_k_proj", "add_v_proj"):
                lin = getattr(attn, name, None)
                if lin is not None:
                    _permute_rows(lin, idx.to(lin.weight.device))
            for name in ("norm_q", "norm_k", "norm_added_k"):
                norm = getattr(attn, name, None)
                w = getattr(norm, "weight", None)
                if w is not None and w.shape[0] == idx.numel():   # one weight per channel of all heads
                    w.copy_(w[idx.to(w.device)])
            out = attn.to_out[0]
            out.weight.copy_(out.weight[:, idx.to(out.weight.device)])
    return model


def _permute_rows(lin: torch.nn.Linear, idx: torch.Tensor) -> None:
    lin.weight.copy_(lin.weight[idx])
    if lin.bias is not None:
        lin.bias.copy_(lin.bias[idx])
