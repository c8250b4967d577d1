"""Property-based fuzzing of the whole backend (issue 12 item 11): random attention modules, and
random plans on them, compiled with torch.compile(backend="vsopt") on the CPU.

- Without a plan the compiled model must equal eager (NaN where eager has NaN): SDPA and
  matmul-softmax-matmul forms, GQA, cross-attention, every scale placement, additive / boolean /
  causal masks, masked_fill and torch.where fills (-inf, large and small finite values, before or
  after the scale), fully masked rows, a no-op dropout, float32 / float64, and softmaxes over the
  query axis (not attention: vsopt leaves them alone, and Inductor must not fuse them into SDPA).
- With a plan, every rewritten site must match the plan's reference (vsopt.core.semantics.site_output
  on the same q/k/v); sites the plan cannot be lowered on must equal eager.

The example budget is fixed so the test fits CI time (about two minutes on two cores with a cold
Inductor cache, most of it compiling); hypothesis prints the failing example and a
`@reproduce_failure` line, and the seeds (FUZZ_SEED + a test's index, printed with every failure)
make every run draw the same examples.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from vsopt.core import semantics  # noqa: E402
from vsopt.core.semantics import SiteShape  # noqa: E402
from vsopt.core.dynamic import DynamicMethod, DynamicSpec  # noqa: E402
from vsopt.core.ir import TokenGrid  # noqa: E402
from vsopt.core.orders import TokenOrder  # noqa: E402
from vsopt.core.patterns import LocalWindow, TemporalDiagonals, num_blocks  # noqa: E402
from vsopt.core.clustering import ClusterSpec  # noqa: E402
from vsopt.core.plan import HeadPlan, Plan, Quant, SitePlan, Sparsity  # noqa: E402

FUZZ_SEED = 20261201
SETTINGS = dict(deadline=None, derandomize=False, suppress_health_check=[HealthCheck.too_slow],
                print_blob=True)


@dataclass(frozen=True)
class Spec:
    """One random attention module: q/k/v come in (B, H, N, D); the module writes attention its way."""

    form: str  # sdpa | matmul | einsum | bmm_merged | baddbmm
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    q_len: int
    kv_len: int
    scale: str  # default | scores_mul | scores_div | on_q
    mask: str  # none | bool | additive | causal | fill_-inf | fill_finite | where_-inf | where_finite
    fill: float
    mask_first: bool  # the mask is applied to the scores before the scale (scores_mul / scores_div)
    softmax_dim: int  # -1 (over the keys), or -2: over the queries, which is not attention
    dropped: float  # the share of (query, key) pairs the boolean / fill masks drop
    dropout: bool  # an nn.Dropout in eval mode between softmax and @ v (a no-op)
    upcast: bool  # softmax in float32 then cast back (float64 inputs)
    dtype: torch.dtype


class Fuzzed(nn.Module):
    def __init__(self, spec: Spec):
        super().__init__()
        self.s = spec
        self.drop = nn.Dropout(0.25)

    def forward(self, q, k, v, keep):
        s = self.s
        if s.kv_heads != s.heads:  # GQA written as the models do: repeat the kv heads
            k, v = (x.repeat_interleave(s.heads // s.kv_heads, dim=1) for x in (k, v))
        scale = 1.0 / math.sqrt(s.head_dim) if s.scale == "default" else 0.37
        if s.form == "sdpa":
            mask = None
            if s.mask == "bool":
                mask = keep
            elif s.mask == "additive":
                mask = torch.where(keep, 0.0, -3.0).to(q.dtype)
            kwargs = {} if s.scale == "default" else {"scale": scale}
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=s.mask == "causal", **kwargs)
        if s.scale == "on_q":
            q = q * scale
        if s.form == "matmul":
            scores = q @ k.transpose(-1, -2)
        elif s.form == "einsum":
            scores = torch.einsum("bhqd,bhkd->bhqk", q, k)
        else:  # bmm_merged / baddbmm: heads merged into the batch axis
            B, H, N, D = q.shape
            qm, km = q.reshape(B * H, N, D), k.reshape(B * H, -1, D)
            if s.form == "bmm_merged":
                scores = torch.bmm(qm, km.transpose(1, 2)).view(B, H, N, -1)
            else:
                bias = torch.zeros(B * H, N, km.shape[1], dtype=q.dtype)
                scores = torch.baddbmm(bias, qm, km.transpose(1, 2)).view(B, H, N, -1)
        if s.mask_first:
            scores = self.mask(scores, keep)
        if s.scale == "scores_mul" or (s.scale == "default"):
            scores = scores * scale
        elif s.scale == "scores_div":
            scores = scores / (1.0 / scale)
        if not s.mask_first:
            scores = self.mask(scores, keep)
        dim = s.softmax_dim
        probs = scores.float().softmax(dim).to(q.dtype) if s.upcast else scores.softmax(dim=dim)
        if s.dropout:
            probs = self.drop(probs)
        return probs @ v

    def mask(self, scores, keep):
        s = self.s
        if s.mask == "causal":
            keep = torch.ones(s.q_len, s.kv_len, dtype=torch.bool).tril()
        if s.mask in ("bool", "fill_-inf", "causal"):
            return scores.masked_fill(~keep, float("-inf"))
        if s.mask == "additive":
            return scores + torch.where(keep, 0.0, -3.0).to(scores.dtype)
        if s.mask == "fill_finite":
            return scores.masked_fill(~keep, s.fill)
        if s.mask == "where_-inf":
            return torch.where(keep, scores, float("-inf"))
        if s.mask == "where_finite":
            return torch.where(keep, scores, s.fill)
        return scores


FORMS = ["sdpa", "matmul", "einsum", "bmm_merged", "baddbmm"]
MASKS = ["none", "bool", "additive", "causal", "fill_-inf", "fill_finite", "where_-inf", "where_finite"]
SDPA_MASKS = ["none", "bool", "additive", "causal"]


@st.composite
def specs(draw, mask: str) -> Spec:
    form = draw(st.sampled_from(FORMS if mask in SDPA_MASKS else FORMS[1:]))
    heads = draw(st.integers(1, 4))
    kv_heads = draw(st.sampled_from([h for h in (1, 2, 4) if heads % h == 0 and h <= heads]))
    q_len = draw(st.integers(1, 24))
    cross = draw(st.booleans())
    scale = draw(st.sampled_from(["default", "scores_mul", "scores_div", "on_q"]))
    return Spec(form=form, batch=draw(st.integers(1, 2)), heads=heads, kv_heads=kv_heads,
                head_dim=draw(st.sampled_from([4, 8, 12])), q_len=q_len,
                kv_len=draw(st.integers(1, 24)) if cross else q_len, scale=scale,
                mask=mask, fill=draw(st.sampled_from([0.0, -1.0, -1e4, -1e9, 2.5])),
                mask_first=form != "sdpa" and scale in ("scores_mul", "scores_div") and draw(st.booleans()),
                softmax_dim=-1 if form == "sdpa" else draw(st.sampled_from([-1, -1, -1, -2])),
                dropped=draw(st.sampled_from([0.3, 0.8])),
                dropout=draw(st.booleans()), upcast=draw(st.booleans()),
                dtype=draw(st.sampled_from([torch.float32, torch.float64])))


def _inputs(spec: Spec, rng: int):
    g = torch.Generator().manual_seed(rng)
    q = torch.randn(spec.batch, spec.heads, spec.q_len, spec.head_dim, generator=g, dtype=spec.dtype)
    k = torch.randn(spec.batch, spec.kv_heads, spec.kv_len, spec.head_dim, generator=g, dtype=spec.dtype)
    v = torch.randn(spec.batch, spec.kv_heads, spec.kv_len, spec.head_dim, generator=g, dtype=spec.dtype)
    keep = torch.rand(1, 1, spec.q_len, spec.kv_len, generator=g) > spec.dropped  # rows fully masked, at times
    return q, k, v, keep


def _compiled(model, options):
    torch._dynamo.reset()
    return torch.compile(model, backend="vsopt", options=options, dynamic=False)


def _check_without_plan(spec: Spec, rng: int, fuzz_seed: int) -> None:
    model = Fuzzed(spec).eval()
    inputs = _inputs(spec, rng)
    want = model(*inputs)
    event(f"form {spec.form}")
    event(f"softmax dim {spec.softmax_dim}")
    if want.isnan().any():
        event("fully masked rows (NaN in eager)")
    got = _compiled(model, {})(*inputs)
    # float64 models get float64 agreement, unless their softmax runs in float32 (then vsopt's op,
    # which keeps the input dtype, is the more precise of the two)
    tol = 1e-10 if spec.dtype == torch.float64 and not spec.upcast else 1e-5
    torch.testing.assert_close(got, want, atol=tol, rtol=tol, equal_nan=True,
                               msg=lambda m: f"{spec} (seed {fuzz_seed}): {m}")


def _without_plan(mask: str):
    """One test per mask kind, each with its own seed and budget (hypothesis alone clusters its
    examples on a few kinds)."""
    fuzz_seed = FUZZ_SEED + MASKS.index(mask)

    @seed(fuzz_seed)
    @settings(max_examples=5, **SETTINGS)
    @given(spec=specs(mask), rng=st.integers(0, 2**16))
    def test(spec, rng):
        _check_without_plan(spec, rng, fuzz_seed)

    test.__name__ = f"test_compiled_equals_eager_without_plan_mask_{mask.replace('-', 'minus_')}"
    return test


for _test in map(_without_plan, MASKS):
    globals()[_test.__name__] = _test


# ----------------------------------------------------------------------------- with a plan

GRIDS = [TokenGrid(2, 4, 4), TokenGrid(3, 2, 4), TokenGrid(2, 3, 5), TokenGrid(2, 4, 4, text_before=3)]
BLOCK = 16


@st.composite
def head_plans(draw, grid: TokenGrid) -> HeadPlan:
    n = grid.num_tokens
    qb = kb = num_blocks(n, BLOCK)
    sparsity = draw(st.sampled_from(list(Sparsity)))
    order = draw(st.sampled_from(list(TokenOrder)))
    quant = draw(st.sampled_from(list(Quant)))
    common = dict(order=order, quant=quant, block_m=BLOCK, block_n=BLOCK)
    if sparsity is Sparsity.PATTERN:
        pattern = draw(st.sampled_from([LocalWindow(1, 1, 1), LocalWindow(0, 2, 2), TemporalDiagonals(1, 1)]))
        return HeadPlan(sparsity, pattern=pattern, **common)
    if sparsity is Sparsity.MASK:
        bits = draw(st.lists(st.booleans(), min_size=qb * kb, max_size=qb * kb))
        return HeadPlan(sparsity, mask=torch.tensor(bits).view(qb, kb) | torch.eye(qb, kb, dtype=torch.bool),
                        **common)
    if sparsity is Sparsity.DYNAMIC:
        method = draw(st.sampled_from(list(DynamicMethod)))
        value = draw(st.sampled_from([0.3, 0.6, 0.9]))
        return HeadPlan(sparsity, dynamic=DynamicSpec(method, value), **common)
    if sparsity is Sparsity.CLUSTER:  # the clustering gives the order: fhw
        top_p = draw(st.sampled_from([0.5, 0.9, 1.0]))
        spec = ClusterSpec(q_clusters=draw(st.sampled_from([2, 3])), k_clusters=draw(st.sampled_from([2, 5])),
                           top_p=top_p, iterations=3, warm_iterations=1)
        return HeadPlan(sparsity, cluster=spec, **{**common, "order": TokenOrder.FHW})
    return HeadPlan(sparsity, **common)


class SelfAttention(nn.Module):
    """Video self-attention over a grid: q/k/v (B, H, N, D), SDPA or matmul-softmax-matmul."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form

    def forward(self, q, k, v):
        if self.form == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, scale=0.3)
        return ((q @ k.transpose(-1, -2)) * 0.3).softmax(-1) @ v


@seed(FUZZ_SEED + len(MASKS))
@settings(max_examples=20, **SETTINGS)
@given(data=st.data(), grid=st.sampled_from(GRIDS), form=st.sampled_from(["sdpa", "matmul"]),
       heads=st.integers(1, 3), batch=st.integers(1, 2), rng=st.integers(0, 2**16))
def test_compiled_plan_matches_the_plans_reference(data, grid, form, heads, batch, rng):
    heads_plan = tuple(data.draw(head_plans(grid)) for _ in range(heads))
    n = grid.num_tokens
    g = torch.Generator().manual_seed(rng)
    q, k, v = (torch.randn(batch, heads, n, 8, generator=g) for _ in range(3))
    model = SelfAttention(form)
    site_id = _only_site_id(model, q, k, v)
    plan = Plan({site_id: SitePlan(site_id, heads, n, n, grid, heads_plan)})
    got = _compiled(model, {"plan": plan, "grid": grid, "strict": True})(q, k, v)
    site = plan.sites[site_id]
    want = semantics.site_output(site_shape(site, batch), heads_plan, q, k, v, 0.3)
    where = f"{grid} {form} {heads_plan} (seed {FUZZ_SEED + len(MASKS)})"
    # Every head, FP8 P V ones included, to 1e-5: the reference applies the kernel's roundings. (FP8
    # heads were held to 4e-2 while one example differed by 1.6e-2: Inductor's disk cache reused a
    # graph compiled against an older reference, keyed without the ops' code; vsopt.inductor's
    # CACHE_KEY now carries its fingerprint, tests/e2e/test_compile_cache.py.)
    torch.testing.assert_close(got.float(), want, atol=1e-5, rtol=1e-5, msg=lambda m: f"{where}: {m}")


def _only_site_id(model, *inputs) -> str:
    import vsopt

    report = vsopt.inspect(model, *inputs)
    assert len(report.sites) == 1, report.table()
    return report.sites[0].site_id


def site_shape(sp: SitePlan, batch: int) -> SiteShape:
    return SiteShape.of_plan(sp, batch, 8, torch.float32)
