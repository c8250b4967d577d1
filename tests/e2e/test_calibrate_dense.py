"""Sites a calibration keeps dense are in the plan as dense entries ("dense on purpose") with
their reason: strict mode accepts the plan, and the table and the plan say why each site is dense
(issue 12 item 5); a site whose plan is predicted slower than dense stays dense (issue 15 item 3)."""
import pytest
import torch
import torch.nn.functional as F

from vsopt.calibration import CalibrationOptions, SiteErrorBudget, calibrate
from vsopt.core.ir import TokenGrid
from vsopt.core.metrics import relative_l2
from vsopt.core.orders import inverse_permutation, order_permutation
from vsopt.core.plan import Plan, Quant

from . import test_calibrate as planted

HEADS, D, GRID = planted.HEADS, planted.D, planted.GRID
CONTEXT, CONTEXT_DIM = 5, 8  # text tokens of the cross-attention


class SelfAndCrossAttention(torch.nn.Module):
    """The planted self-attention (heads attend to windows in known orders), then a
    cross-attention from its output to a short context, as in a video DiT block."""

    def __init__(self, masked: bool = False):
        super().__init__()
        self.kv = torch.nn.Linear(CONTEXT_DIM, 2 * HEADS * D)
        self.proj = torch.nn.Linear(HEADS * D, HEADS * D, bias=False)
        torch.nn.init.orthogonal_(self.proj.weight)
        keep = torch.ones(GRID.num_tokens, CONTEXT, dtype=torch.bool)
        keep[:, -1] = False  # the last context token is padding
        self.register_buffer("keep", keep if masked else None)

    def forward(self, x, context):
        B, N, _ = x.shape
        q, k, v = x.view(B, N, 3, HEADS, D).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, scale=1.0)
        k2, v2 = self.kv(context).view(B, CONTEXT, 2, HEADS, D).permute(2, 0, 3, 1, 4)
        o = o + F.scaled_dot_product_attention(o, k2, v2, attn_mask=self.keep)
        return self.proj(o.transpose(1, 2).reshape(B, N, HEADS * D))


def inputs(seeds=(0, 1, 2)):
    g = torch.Generator().manual_seed(100)
    return [(planted.planted_input(s), torch.randn(1, CONTEXT, CONTEXT_DIM, generator=g)) for s in seeds]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    torch.manual_seed(0)
    model = SelfAndCrossAttention().eval()
    out = tmp_path_factory.mktemp("dense") / "cross.plan.json"
    result = calibrate(model, inputs(), SiteErrorBudget(0.05), options=planted.OPTIONS, out=out, grid=GRID,
                       progress=False)
    return model, out, result


def test_cross_attention_gets_a_dense_entry_with_its_reason(calibrated):
    model, out, result = calibrated
    plan = Plan.load(out)
    (cross,) = result.left_dense  # the cross-attention site
    (self_site,) = [s.site_id for s in result.sites]
    assert cross in plan.sites and plan[cross].is_dense and not plan[self_site].is_dense
    assert (plan[cross].q_len, plan[cross].kv_len) == (GRID.num_tokens, CONTEXT)
    reason = plan.meta["dense_reasons"][cross]
    assert reason == result.left_dense[cross] and "cross-attention" in reason and f"kv_len {CONTEXT}" in reason
    assert self_site not in plan.meta["dense_reasons"]
    assert f"left dense: {cross}: {reason}" in result.table()


def test_strict_mode_accepts_the_calibrated_plan(calibrated):
    """torch.compile(backend="vsopt") in strict mode with the calibrated plan: no site is left
    dense that the plan did not ask for, so no error; the self-attention site really is sparse."""
    model, out, result = calibrated
    x = inputs(seeds=(0,))[0]
    compiled = torch.compile(model, backend="vsopt", options={"plan": str(out), "grid": GRID, "strict": True})
    with torch.no_grad():
        got, want = compiled(*x), model(*x)
    assert 1e-4 < relative_l2(got, want) < 0.05


def test_a_masked_site_gets_a_dense_entry_with_its_reason(tmp_path):
    torch.manual_seed(0)
    model = SelfAndCrossAttention(masked=True).eval()
    result = calibrate(model, inputs(), SiteErrorBudget(0.05), options=planted.OPTIONS, grid=GRID, progress=False)
    (masked,) = result.left_dense
    assert result.plan[masked].is_dense
    assert "attention mask" in result.plan.meta["dense_reasons"][masked]


def test_version_1_plans_without_dense_reasons_still_load(tmp_path):
    """The reasons are plan metadata: a plan written before them (no "dense_reasons") loads, and
    one with them round-trips."""
    import json

    from pathlib import Path

    doc = json.loads((Path(__file__).parents[1] / "baselines" / "plans" / "window-0.3.plan.json").read_text())
    assert doc["version"] == 1 and "dense_reasons" not in doc["meta"]
    Plan.from_json(doc, {})
    path = tmp_path / "r.plan.json"
    sites = dict(Plan.from_json(doc, {}).sites)
    Plan(sites, {"dense_reasons": {next(iter(sites)): "why"}}).save(path)
    assert Plan.load(path).meta["dense_reasons"] == {next(iter(sites)): "why"}


# -- never slower than dense by choice (issue 15 item 3)

BIG, TINY = TokenGrid(4, 4, 8), TokenGrid(2, 4, 8)  # 128 tokens (8x8 blocks of 16) and 64 (4x4)


def planted_qkv(grid: TokenGrid, seed: int) -> torch.Tensor:
    """(1, N, 3*H*D): each head attends to a narrow window in its planted order (as test_calibrate)."""
    g = torch.Generator().manual_seed(seed)
    n, c = grid.num_tokens, 0.5 / 2.0 ** 2
    x = torch.randn(1, n, 3, HEADS, D, generator=g) * 0.05
    for h, o in enumerate(planted.ORDERS):
        pos = inverse_permutation(order_permutation(grid, o)).float()
        x[:, :, 0, h, 0], x[:, :, 0, h, 1] = 2 * c * pos, 1.0
        x[:, :, 1, h, 0], x[:, :, 1, h, 1] = pos, -c * pos ** 2
        x[:, :, 2, h] = torch.randn(1, n, D, generator=g)
    return x.reshape(1, n, 3 * HEADS * D)


class BigAndTiny(torch.nn.Module):
    """Two planted self-attention sites: a big one where sparsity pays and a tiny one."""

    def attend(self, x):
        B, N, _ = x.shape
        q, k, v = x.view(B, N, 3, HEADS, D).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, scale=1.0).sum()

    def forward(self, big, tiny):
        return self.attend(big) + self.attend(tiny)


def _sites(result):
    by_size = sorted(result.sites, key=lambda s: s.dense_us)
    return by_size[1], by_size[0]  # big, tiny


@pytest.fixture(scope="module")
def big_and_tiny():
    model = BigAndTiny().eval()
    calls = [(planted_qkv(BIG, s), planted_qkv(TINY, s + 10)) for s in range(2)]
    opts = CalibrationOptions(**{**planted.OPTIONS.__dict__, "quants": (Quant.NONE,), "dynamic": False})
    with torch.no_grad():
        from vsopt.backend import trace_and_rewrite
        from vsopt.core.config import VsoptConfig

        _, report = trace_and_rewrite(model, calls[0], VsoptConfig())
    grids = {s.site_id: (BIG if s.q_len == BIG.num_tokens else TINY) for s in report.sites}
    free = calibrate(model, calls, SiteErrorBudget(0.05), options=opts, grids=grids, progress=False)
    return model, calls, opts, grids, free


def test_without_overhead_both_sites_are_sparse_and_the_big_one_saves_more(big_and_tiny):
    *_, free = big_and_tiny
    big, tiny = _sites(free)
    assert big.dense_reason is None and tiny.dense_reason is None
    assert 0 < tiny.dense_us - tiny.predicted_us < big.dense_us - big.predicted_us


def test_a_tiny_site_whose_plan_does_not_pay_for_its_launch_stays_dense(big_and_tiny, tmp_path):
    """With the host's per-launch overhead measured with the cost model (host_overhead=True) set
    between the two sites' savings, the tiny site stays dense, says why (in the plan and the
    table), and the big one stays sparse; under CUDA graphs (host_overhead=False) both are sparse.
    A time budget keeps the tiny site dense too."""
    import dataclasses

    from vsopt.calibration import SpeedupBudget

    model, calls, opts, grids, free = big_and_tiny
    big, tiny = _sites(free)
    launch = ((tiny.dense_us - tiny.predicted_us) + (big.dense_us - big.predicted_us)) / 2
    cost = dataclasses.replace(planted.COST, meta={"host_overhead_us_not_in_model": {f"none/d{D}/16x16": launch}})
    eager = CalibrationOptions(**{**opts.__dict__, "cost_model": cost, "host_overhead": True})
    out = tmp_path / "eager.plan.json"
    result = calibrate(model, calls, SiteErrorBudget(0.05), options=eager, grids=grids, out=out, progress=False)
    big2, tiny2 = _sites(result)
    plan = Plan.load(out)
    assert plan[tiny2.site_id].is_dense and not plan[big2.site_id].is_dense
    reason = plan.meta["dense_reasons"][tiny2.site_id]
    assert reason.startswith("predicted slower than dense: ") and f"vs {tiny2.dense_us:.1f} us" in reason
    assert tiny2.dense_reason == reason and f"kept dense: {tiny2.site_id}: {reason}" in result.table()
    assert big2.overhead_us == pytest.approx(launch) and big2.predicted_us < big2.dense_us
    assert big2.site_id not in plan.meta["dense_reasons"]
    # the same overhead given per site by hand, and a time budget: the same decision
    by_hand = CalibrationOptions(**{**opts.__dict__, "site_overhead_us": launch})
    for budget, options in ((SiteErrorBudget(0.05), by_hand), (SpeedupBudget(1.01), eager)):
        again = calibrate(model, calls, budget, options=options, grids=grids, progress=False)
        big3, tiny3 = _sites(again)
        assert tiny3.dense_reason is not None and big3.dense_reason is None, again.table()
    # under CUDA graphs (no host overhead): the tiny site is sparse again
    graphs = CalibrationOptions(**{**opts.__dict__, "cost_model": cost, "host_overhead": False})
    assert all(s.dense_reason is None for s in calibrate(model, calls, SiteErrorBudget(0.05), options=graphs,
                                                         grids=grids, progress=False).sites)


def test_the_cli_charges_the_host_overhead_unless_cuda_graphs(tmp_path, capsys):
    """`vsopt calibrate` prices a lowered site with the host overhead per launch saved with the cost
    model (torch.compile without CUDA graphs); --cuda-graphs prices GPU time alone."""
    import dataclasses

    from vsopt.cli import main

    cost = dataclasses.replace(planted.COST, meta={"host_overhead_us_not_in_model": {f"none/d{D}/16x16": 1e4}})
    cost.save(tmp_path / "cost.json")
    for extra, dense in (([], True), (["--cuda-graphs"], False)):
        out = tmp_path / f"cli{len(extra)}.plan.json"
        assert main(["calibrate", f"{planted.__name__}:factory", "--max-error", "0.05", "--out", str(out),
                     "--block", "16", "--grid", "3,4,6", "--quant", "none", "--no-dynamic", "--cost-model",
                     str(tmp_path / "cost.json"), "--quiet", *extra]) == 0
        (sp,) = Plan.load(out).sites.values()
        assert sp.is_dense == dense
        assert ("kept dense: " in capsys.readouterr().out) == dense


def test_the_measured_site_overhead_with_and_without_cuda_graphs_decides(big_and_tiny):
    """A cost model with a measured per-site overhead in a compiled model (overhead_us, from
    benchmarks/measure_cost_model.py) charges the one of the mode calibrated for: 'eager' with
    host_overhead (and no per-launch host overhead on top for the measured launch), 'cudagraphs'
    without. Set between the two sites' savings, it keeps the tiny site dense in that mode only,
    and the reason says how the site was priced."""
    import dataclasses

    model, calls, opts, grids, free = big_and_tiny
    big, tiny = _sites(free)
    between = ((tiny.dense_us - tiny.predicted_us) + (big.dense_us - big.predicted_us)) / 2
    host = {"host_overhead_us_not_in_model": {f"none/d{D}/16x16": 1e6}}  # would make both dense if charged
    for host_overhead, mode, words in ((True, "eager", "without CUDA graphs"), (False, "cudagraphs", "under CUDA graphs")):
        other = "cudagraphs" if mode == "eager" else "eager"
        cost = dataclasses.replace(planted.COST, overhead_us={mode: between, other: 0.0}, meta=host)
        options = CalibrationOptions(**{**opts.__dict__, "cost_model": cost, "host_overhead": host_overhead})
        big2, tiny2 = _sites(calibrate(model, calls, SiteErrorBudget(0.05), options=options, grids=grids,
                                       progress=False))
        assert big2.dense_reason is None and big2.overhead_us == pytest.approx(between)
        assert tiny2.dense_reason.startswith("predicted slower than dense") and words in tiny2.dense_reason
        assert f"lowering overhead {between:.1f} us" in tiny2.dense_reason
        # the other mode's overhead (0) leaves both sparse
        options = CalibrationOptions(**{**opts.__dict__, "cost_model": cost, "host_overhead": not host_overhead})
        if host_overhead:  # pricing under graphs: no host table, overhead 0
            again = calibrate(model, calls, SiteErrorBudget(0.05), options=options, grids=grids, progress=False)
            assert all(s.dense_reason is None for s in again.sites), again.table()


def test_never_slower_compares_with_the_measured_dense_path(big_and_tiny):
    """Where the cost model measured SDPA (sdpa_us), a plan is compared with it (what a site left
    dense runs), not with vsopt's kernel at full density: an SDPA faster than the tiny site's plan
    keeps it dense, and the reason and the result give SDPA's predicted time."""
    import dataclasses

    model, calls, opts, grids, free = big_and_tiny
    big, tiny = _sites(free)
    # SDPA priced a little under the tiny site's plan, itself faster than vsopt's kernel at full density
    assert tiny.predicted_us < tiny.dense_us
    target = 0.9 * tiny.predicted_us
    cost = dataclasses.replace(planted.COST, sdpa_us={f"d{D}": {"launch": target}})
    options = CalibrationOptions(**{**opts.__dict__, "cost_model": cost})
    result = calibrate(model, calls, SiteErrorBudget(0.05), options=options, grids=grids, progress=False)
    (big2,) = [s for s in result.sites if grids[s.site_id] == BIG]
    (tiny2,) = [s for s in result.sites if grids[s.site_id] == TINY]
    assert tiny2.dense_us == pytest.approx(target) and big2.dense_us == pytest.approx(target)
    assert tiny2.dense_reason is not None and f"vs {target:.1f} us" in tiny2.dense_reason
    assert (big2.dense_reason is None) == (big2.predicted_us < target)


def test_an_overhead_measured_per_launch_group_replaces_the_eager_op_host_time(big_and_tiny):
    """A cost model whose overhead was measured per launch group through torch.compile
    (benchmarks/host_overhead.py: "<mode>_per_launch", "<mode>_permuted") prices a lowered site
    with those terms (vsopt.core.semantics.lowering_overhead_us), not with an eager op call's host
    time (host_overhead_us_not_in_model, several times a compiled launch): a one-group site pays
    the base, and the huge per-launch table is not charged."""
    import dataclasses

    model, calls, opts, grids, free = big_and_tiny
    big, tiny = _sites(free)
    between = ((tiny.dense_us - tiny.predicted_us) + (big.dense_us - big.predicted_us)) / 2
    host = {"host_overhead_us_not_in_model": {f"none/d{D}/16x16": 1e6}}
    terms = {"eager": between, "eager_per_launch": 1e6, "eager_permuted": 0.0, "cudagraphs": 0.0}
    cost = dataclasses.replace(planted.COST, overhead_us=terms, meta=host)
    options = CalibrationOptions(**{**opts.__dict__, "cost_model": cost, "host_overhead": True})
    result = calibrate(model, calls, SiteErrorBudget(0.05), options=options, grids=grids, progress=False)
    big2, tiny2 = _sites(result)
    assert big2.dense_reason is None and big2.overhead_us == pytest.approx(between)   # one launch group (no quant)
    assert tiny2.dense_reason is not None and f"lowering overhead {between:.1f} us" in tiny2.dense_reason
