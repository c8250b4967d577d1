"""The backend hands Inductor the graph vsopt.inductor.prepare made: no custom-op permutation of a
static order left, every launch over a constant table with its work order, the same output; an
export (trace_and_rewrite) keeps vsopt's ops as they were."""
import torch
import torch.nn.functional as F

from vsopt.backend import trace_and_rewrite
from vsopt.core.config import VsoptConfig
from vsopt.core.orders import TokenOrder
from vsopt.core.patterns import LocalWindow
from vsopt.core.plan import HeadPlan, Plan, Quant, SitePlan, Sparsity

vsopt = torch.ops.vsopt
GRID = (2, 3, 4)
H, D = 4, 8


class Attn(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v) * 2.0


def _plan(site):
    orders = (TokenOrder.HWF, TokenOrder.WHF, TokenOrder.FHW, TokenOrder.HFW)
    quants = (Quant.NONE, Quant.NONE, Quant.INT8, Quant.INT8)
    heads = [HeadPlan(Sparsity.PATTERN, o, qm, 16, 16, pattern=LocalWindow(1, 1, 1)) for o, qm in zip(orders, quants)]
    return Plan({site.site_id: SitePlan.for_site(site, heads)})


def test_the_compiled_graph_is_prepared_and_the_export_is_not(inductor_graphs):
    g = torch.Generator().manual_seed(0)
    n = GRID[0] * GRID[1] * GRID[2]
    q, k, v = (torch.randn(2, H, n, D, generator=g) for _ in range(3))
    model = Attn()
    _, report = trace_and_rewrite(model, (q, k, v), VsoptConfig.from_options({"grid": GRID}))
    plan = _plan(report.sites[0])
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="vsopt", options={"grid": GRID, "plan": plan})
    out = compiled(q, k, v)
    (gm,) = inductor_graphs
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert vsopt.permute_tokens.default not in targets and vsopt.unpermute_tokens.default not in targets
    launches = [n for n in gm.graph.nodes if n.target is vsopt.block_sparse_attention.default]
    assert len(launches) == 2 and all("row_order" in n.kwargs for n in launches)
    exported, _ = trace_and_rewrite(model, (q, k, v), VsoptConfig.from_options({"grid": GRID, "plan": plan}))
    plain = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert plain.count(vsopt.permute_tokens.default) == 3 and plain.count(vsopt.unpermute_tokens.default) == 1
    assert all("row_order" not in n.kwargs for n in exported.graph.nodes if n.target is vsopt.block_sparse_attention.default)
    torch.testing.assert_close(out, exported(q, k, v), rtol=0, atol=0)
