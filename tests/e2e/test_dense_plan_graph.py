"""A plan whose entries are all dense compiles to the graph vsopt compiles without a plan: the same
ATen graph handed to Inductor (no extra op, no extra graph), one build for all its step ranges
and no step dispatch per call (vsopt.core.steps), the same output at every step."""
import torch
import torch.nn.functional as F

from vsopt.backend import trace_and_rewrite
from vsopt.core.config import VsoptConfig
from vsopt.core.dynamic import set_denoising_step
from vsopt.core.orders import TokenOrder
from vsopt.core.plan import HeadPlan, Plan, SitePlan, StepPlan
from vsopt.core.steps import StepDispatch, step_variants

GRID = (2, 3, 4)
H, D = 2, 8


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(H * D, 3 * H * D)
        self.out = torch.nn.Linear(H * D, H * D)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, H, D).permute(2, 0, 3, 1, 4)
        return x + self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, H * D))


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(Block() for _ in range(2))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def _dense_plan_with_ranges(sites, order=TokenOrder.FHW):
    """Every site dense, in two step ranges, as the calibration writes a plan it kept all dense."""
    sps = {}
    for s in sites:
        heads = tuple(HeadPlan(order=order, block_m=16, block_n=16) for _ in range(s.heads))
        sp = SitePlan.for_site(s, heads)
        sps[s.site_id] = SitePlan(sp.site_id, sp.num_heads, sp.q_len, sp.kv_len, sp.grid, heads,
                                  steps=(StepPlan(0, 4, heads), StepPlan(4, None, heads)))
    return Plan(sps)


def _compiled_graphs(seen, model, x, options):
    """(the graphs handed to Inductor, appended to `seen` by the inductor_graphs fixture, and the
    outputs at steps 0, 5 and unknown)."""
    start = len(seen)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="vsopt", options=options)
    outs = []
    for step in (0, 5, None):
        set_denoising_step(step)
        outs.append(compiled(x))
    set_denoising_step(None)
    return seen[start:], outs


def test_an_all_dense_plan_compiles_to_the_no_plan_graph(inductor_graphs):
    torch.manual_seed(0)
    model = Model().eval()
    x = torch.randn(2, GRID[0] * GRID[1] * GRID[2], H * D)
    _, report = trace_and_rewrite(model, (x,), VsoptConfig.from_options({"grid": GRID}))
    assert len(report.sites) == 2
    with torch.no_grad():
        plain, plain_outs = _compiled_graphs(inductor_graphs, model, x, {"grid": GRID})
        # FHW: what the calibration writes for a site it keeps dense (HeadPlan's default order)
        plan = _dense_plan_with_ranges(report.sites, TokenOrder.FHW)
        assert plan.step_boundaries() == (0, 4)
        planned, outs = _compiled_graphs(inductor_graphs, model, x, {"grid": GRID, "plan": plan})
        assert len(plain) == len(planned) == 1      # one graph, one build for every step range
        assert planned[0].code == plain[0].code     # node for node the graph without a plan
        for a, b in zip(outs, plain_outs):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_step_variants_of_one_build_dispatch_nothing_per_call():
    sites = {"a": SitePlan("a", 1, 24, 24, None, (HeadPlan(),), steps=(StepPlan(0, 4, (HeadPlan(),)),
                                                                      StepPlan(4, None, (HeadPlan(),))))}
    built = []
    run = step_variants(Plan(sites), lambda p: built.append(p) or (lambda: "graph"))
    assert len(built) == 1 and not isinstance(run, StepDispatch) and run() == "graph"
    # segments that run different heads still dispatch
    other = HeadPlan(block_m=32, block_n=32)
    sites["a"] = SitePlan("a", 1, 24, 24, None, (HeadPlan(),), steps=(StepPlan(0, 4, (HeadPlan(),)),
                                                                     StepPlan(4, None, (other,))))
    built.clear()
    run = step_variants(Plan(sites), lambda p: built.append(p) or (lambda p=p: p))
    assert len(built) == 2 and isinstance(run, StepDispatch)
