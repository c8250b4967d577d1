"""inline_permutations: static token permutations become ATen gathers before Inductor, value for
value what vsopt.permute_tokens / unpermute_tokens return, and the per-site op counts of a
lowered site (what a host-overhead regression would change) stay what they are."""
import copy

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from tests.passes.test_lower_plan import lower, reference, site_for, traced
from vsopt.core.ir import TokenGrid
from vsopt.core.orders import TokenOrder
from vsopt.core.patterns import LocalWindow, Skip, TemporalDiagonals
from vsopt.core.plan import HeadPlan, Plan, Quant, SitePlan, Sparsity
from vsopt.core.semantics import launch_groups
from vsopt.passes import inline_permutations

vsopt = torch.ops.vsopt
aten = torch.ops.aten
PERM_OPS = (vsopt.permute_tokens.default, vsopt.unpermute_tokens.default)


def ops_of(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def inlined(gm):
    out = copy.deepcopy(gm)
    report = inline_permutations.run(out)
    out.graph.lint()
    return out, report


CASES = {
    # per-head orders (H, N), GQA keys split per head, ragged blocks, text before the video
    "per_head_gqa": (TokenGrid(3, 4, 5, text_before=3), 4, 2, [TokenOrder.HWF, TokenOrder.WHF, TokenOrder.FHW,
                                                               TokenOrder.HFW]),
    # one shared order (1, N), odd grid, text after
    "shared": (TokenGrid(3, 3, 5, text_after=2), 3, 3, [TokenOrder.WHF] * 3),
    # per-head orders, no text, prime sizes
    "per_head": (TokenGrid(5, 3, 7), 2, 2, [TokenOrder.WFH, TokenOrder.HWF]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", sorted(CASES))
def test_inlined_permutations_equal_the_ops_and_the_reference(case, dtype):
    grid, H, Hkv, orders = CASES[case]
    g = torch.Generator().manual_seed(sorted(CASES).index(case) + 10 * (dtype is torch.float64))
    n, d = grid.num_tokens, 8
    patterns = [LocalWindow(1, 1, 1), TemporalDiagonals(0), LocalWindow(0, 1, 1), Skip()]
    heads = [HeadPlan(Sparsity.PATTERN, o, block_m=16, block_n=16, pattern=patterns[i % len(patterns)])
             for i, o in enumerate(orders)]
    site = site_for(grid, H, Hkv)
    q = torch.randn(2, H, n, d, generator=g, dtype=dtype)
    k, v = (torch.randn(2, Hkv, n, d, generator=g, dtype=dtype) for _ in range(2))
    plan = Plan({site.site_id: SitePlan.for_site(site, heads)})
    gm, _, _ = lower(traced([site]), (q, k, v), [site], plan)
    before = ops_of(gm)
    assert sum(before.count(t) for t in PERM_OPS) == 4   # q, k, v in, the output back
    new, report = inlined(gm)
    after = ops_of(new)
    assert not any(t in after for t in PERM_OPS)
    assert after.count(aten.index.Tensor) == 4 and report.changed and report.notes
    assert after.count(vsopt.block_sparse_attention.default) == before.count(vsopt.block_sparse_attention.default)
    got, want = new(q, k, v), gm(q, k, v)
    assert got.dtype == want.dtype and got.stride() == want.stride()
    assert torch.equal(got, want)   # a gather moves values: bit-exact
    tol = 1e-5 if dtype is torch.float32 else 1e-10
    torch.testing.assert_close(got.double(), 2.0 * reference(q, k, v, site, heads), rtol=tol, atol=tol)


def test_the_inverse_and_the_head_index_are_made_once_per_order():
    grid = TokenGrid(2, 3, 4)
    heads = [HeadPlan(Sparsity.PATTERN, o, block_m=16, block_n=16, pattern=LocalWindow(1, 1, 1))
             for o in (TokenOrder.HWF, TokenOrder.WHF)]
    site = site_for(grid, 2, 2)
    q, k, v = (torch.randn(1, 2, grid.num_tokens, 8, dtype=torch.float64) for _ in range(3))
    gm, _, _ = lower(traced([site]), (q, k, v), [site], Plan({site.site_id: SitePlan.for_site(site, heads)}))
    new, _ = inlined(gm)
    attrs = [n.target for n in new.graph.nodes if n.op == "get_attr"]
    assert sum(a.endswith("_rows") for a in attrs) == 1 and sum(a.endswith("_inverse") for a in attrs) == 1
    assert sum(a.endswith("_heads") for a in attrs) == 1


def test_an_order_computed_in_the_graph_keeps_the_op():
    def f(x, perm):
        return vsopt.unpermute_tokens(vsopt.permute_tokens(x, perm) * 2.0, perm)

    x = torch.randn(2, 3, 7, 4)
    perm = torch.stack([torch.randperm(7) for _ in range(3)])
    gm = make_fx(f, tracing_mode="fake")(x, perm)
    new, report = inlined(gm)
    assert sum(ops_of(new).count(t) for t in PERM_OPS) == 2 and not report.changed
    assert torch.equal(new(x, perm), f(x, perm))


def test_a_lowered_site_has_one_launch_per_launch_group_and_no_python_permutation():
    """The per-site op budget of the graph Inductor compiles (benchmarks/host_overhead.py counts the
    same on a fake GPU): one block_sparse_attention per launch group, no custom-op permutation
    left, and a bounded number of ATen ops around them."""
    grid = TokenGrid(2, 4, 4)
    quants = [Quant.NONE, Quant.INT8, Quant.FP8, Quant.NONE]
    orders = [TokenOrder.HWF, TokenOrder.FHW, TokenOrder.WHF, TokenOrder.HFW]
    heads = [HeadPlan(Sparsity.PATTERN, o, qm, 16, 16, pattern=LocalWindow(1, 1, 1)) for o, qm in zip(orders, quants)]
    site = site_for(grid, 4, 4)
    q, k, v = (torch.randn(1, 4, grid.num_tokens, 16) for _ in range(3))
    gm, _, _ = lower(traced([site]), (q, k, v), [site], Plan({site.site_id: SitePlan.for_site(site, heads)}))
    new, _ = inlined(gm)
    mine = [n for n in new.graph.nodes if n.op == "call_function" and n.meta.get("vsopt_site") == site.site_id]
    targets = [n.target for n in mine]
    assert targets.count(vsopt.block_sparse_attention.default) == len(launch_groups(heads)) == 3
    assert not any(t in targets for t in PERM_OPS)
    vsopt_ops = [t for t in targets if getattr(t, "namespace", None) == "vsopt"]
    assert len(vsopt_ops) == 3   # the launches are the only vsopt ops (Python) left at the site
    # per group one gather each of q, k, v (its heads, in their orders, from the model's tensors);
    # the outputs concatenated and put back in head and token order by one gather
    assert targets.count(aten.index.Tensor) == 3 * 3 + 1 and targets.count(aten.cat.default) == 1
    assert aten.index_select.default not in targets and len(mine) == 3 * 3 + 1 + 3 + 1, targets
    assert torch.equal(new(q, k, v), gm(q, k, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shared", [False, True], ids=["per_head_orders", "one_order"])
def test_multi_group_sites_fold_their_head_selections_exactly(shared, dtype):
    """Launch groups of mixed block sizes (and GQA keys split per head): the folded gathers give
    bit for bit what index_select after permute_tokens gives, and the reference."""
    grid = TokenGrid(3, 4, 3, text_before=2)   # N = 38: ragged blocks
    orders = [TokenOrder.HWF] * 4 if shared else [TokenOrder.HWF, TokenOrder.WFH, TokenOrder.FHW, TokenOrder.WHF]
    blocks = [(16, 16), (32, 16), (16, 16), (32, 16)]
    heads = [HeadPlan(Sparsity.PATTERN, o, block_m=bm, block_n=bn, pattern=LocalWindow(1, 1, 1))
             for o, (bm, bn) in zip(orders, blocks)]
    site = site_for(grid, 4, 2)
    g = torch.Generator().manual_seed(11 + shared)
    q = torch.randn(2, 4, grid.num_tokens, 8, generator=g, dtype=dtype)
    k, v = (torch.randn(2, 2, grid.num_tokens, 8, generator=g, dtype=dtype) for _ in range(2))
    gm, _, _ = lower(traced([site]), (q, k, v), [site], Plan({site.site_id: SitePlan.for_site(site, heads)}))
    assert ops_of(gm).count(aten.index_select.default) >= 6   # two groups select their heads
    new, report = inlined(gm)
    after = ops_of(new)
    assert aten.index_select.default not in after and "folded" in report.notes[0]
    assert after.count(aten.index.Tensor) == 2 * 3 + 1
    got = new(q, k, v)
    assert torch.equal(got, gm(q, k, v))
    tol = 1e-5 if dtype is torch.float32 else 1e-10
    torch.testing.assert_close(got.double(), 2.0 * reference(q, k, v, site, heads), rtol=tol, atol=tol)


def test_static_tables_get_their_work_order_once_and_the_output_is_unchanged():
    from vsopt.core.ops import row_order
    from vsopt.passes import static_work_orders

    grid = TokenGrid(2, 3, 5, text_before=1)
    heads = [HeadPlan(Sparsity.PATTERN, o, qm, 16, 16, pattern=LocalWindow(1, 1, 1))
             for o, qm in zip((TokenOrder.HWF, TokenOrder.FHW, TokenOrder.WHF), (Quant.NONE, Quant.INT8, Quant.NONE))]
    site = site_for(grid, 3, 3)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 3, grid.num_tokens, 16, generator=g, dtype=torch.float64) for _ in range(3))
    gm, _, _ = lower(traced([site]), (q, k, v), [site], Plan({site.site_id: SitePlan.for_site(site, heads)}))
    new = copy.deepcopy(gm)
    report = static_work_orders.run(new)
    launches = [n for n in new.graph.nodes if n.target is vsopt.block_sparse_attention.default]
    assert len(launches) == 2 and report.changed
    for n in launches:
        order = getattr(new, n.kwargs["row_order"].target)
        counts = getattr(new, n.args[4].target)
        assert order.dtype == torch.int32 and torch.equal(order, row_order(counts, 2))
        assert sorted(order.tolist()) == list(range(2 * counts.shape[1] * counts.shape[2]))   # every row once
    assert torch.equal(new(q, k, v), gm(q, k, v))
    assert not static_work_orders.run(new).changed   # idempotent


def test_a_table_computed_in_the_graph_keeps_its_per_call_order():
    from vsopt.passes import static_work_orders

    def f(q, k, v, mask):
        idx, counts = vsopt.mask_to_table(mask)
        return vsopt.block_sparse_attention(q, k, v, idx, counts, 0.5, 16, 16, "none")

    q, k, v = (torch.randn(1, 2, 32, 8) for _ in range(3))
    gm = make_fx(f, tracing_mode="fake")(q, k, v, torch.ones(1, 2, 2, 2, dtype=torch.bool))
    assert not static_work_orders.run(gm).changed
