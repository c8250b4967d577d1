"""Dense warm-up steps: the plan's step ranges that run the first k steps dense
(Plan.with_dense_warmup, Plan.dense_warmup, the "dense_warmup" JSON field), and the search over k
(vsopt.calibration.warmup) under the model-wide budgets."""
import json

import pytest
import torch

from vsopt.calibration import CalibrationOptions, DensityBudget, SiteErrorBudget, SpeedupBudget
from vsopt.calibration.choices import dense_choices
from vsopt.calibration.result import assemble
from vsopt.calibration.warmup import decide_at_warmup, decide_with_warmup, objective
from vsopt.core.errors import ConfigError, PlanError
from vsopt.core.ir import TokenGrid
from vsopt.core.patterns import LocalWindow
from vsopt.core.plan import HeadPlan, Plan, SitePlan, Sparsity, StepPlan

from tests.core.test_calibrate_search import COST, _state_with_errors, make_site

GRID = TokenGrid(2, 4, 8)
WINDOW = HeadPlan(Sparsity.PATTERN, pattern=LocalWindow(0, 1, 1), block_m=16, block_n=16)
SKIP = HeadPlan(Sparsity.SKIP, block_m=16, block_n=16)


def _plan():
    a, b = make_site(GRID, 2, site_id="a"), make_site(GRID, 2, site_id="b")
    return Plan({"a": SitePlan.for_site(a, WINDOW, steps=(StepPlan(1, 3, (SKIP, SKIP)), StepPlan(5, None, (SKIP, WINDOW)))),
                 "b": SitePlan.for_site(b, HeadPlan(block_m=16, block_n=16))})  # b: dense everywhere


def test_with_dense_warmup_runs_the_first_steps_dense_and_keeps_the_rest():
    plan = _plan()
    assert plan.dense_warmup == 0
    warm = plan.with_dense_warmup(2)
    assert warm.dense_warmup == 2 and warm.meta["dense_warmup"] == 2
    for step in (0, 1):
        assert all(h.sparsity is Sparsity.DENSE for h in warm.at_step(step)["a"].heads)
    # from step 2 on, what the plan ran before
    for step in (2, 3, 4, 5, 9, None):
        assert warm["a"].heads_at(step) == plan["a"].heads_at(step), step
    assert warm["b"] == plan["b"]  # a site dense at every step gets no step ranges
    assert warm.step_boundaries() == (0, 2, 3, 5)
    assert plan.with_dense_warmup(0) is plan
    with pytest.raises(ValueError, match="integer >= 0"):
        plan.with_dense_warmup(-1)


def test_dense_warmup_is_what_the_step_ranges_say():
    a = make_site(GRID, 2, site_id="a")
    dense = (HeadPlan(block_m=16, block_n=16),) * 2
    gap = Plan({"a": SitePlan.for_site(a, WINDOW, steps=(StepPlan(1, 3, dense),))})  # step 0 sparse: no warm-up
    assert gap.dense_warmup == 0
    chained = Plan({"a": SitePlan.for_site(a, WINDOW, steps=(StepPlan(0, 1, dense), StepPlan(1, 3, dense)))})
    assert chained.dense_warmup == 3
    int8 = (HeadPlan(quant="int8", block_m=16, block_n=16),) * 2  # quantized is not the model's own attention
    assert Plan({"a": SitePlan.for_site(a, WINDOW, steps=(StepPlan(0, 2, int8),))}).dense_warmup == 0
    assert Plan({}).dense_warmup == 0


def test_dense_warmup_round_trips_and_a_wrong_field_is_a_one_line_error(tmp_path):
    warm = _plan().with_dense_warmup(3)
    path = warm.save(tmp_path / "w.plan.json")
    doc = json.loads(path.read_text())
    assert doc["dense_warmup"] == 3
    back = Plan.load(path)
    assert back.dense_warmup == 3 and back["a"].steps == warm["a"].steps
    doc["dense_warmup"] = 2
    path.write_text(json.dumps(doc))
    with pytest.raises(PlanError, match=r"\"dense_warmup\" is 2 but the sites' step ranges run the first 3") as e:
        Plan.load(path)
    assert "\n" not in str(e.value)
    doc["dense_warmup"] = "2"
    path.write_text(json.dumps(doc))
    with pytest.raises(PlanError, match="non-negative integer"):
        Plan.load(path)
    del doc["dense_warmup"]  # plans written before the field: read as before
    path.write_text(json.dumps(doc))
    assert Plan.load(path).dense_warmup == 3


@pytest.mark.parametrize("fields, message", [
    (dict(dense_warmup=(1,)), "needs step_ranges"),
    (dict(dense_warmup=(2,), step_ranges=((0, 1), (1, None))), "do not cover steps 0..1"),
    (dict(dense_warmup=(1,), step_ranges=((1, 2), (2, None))), "do not cover steps 0..0"),
    (dict(dense_warmup=(0,), step_ranges=((0, 1), (1, None))), "is not an integer >= 1"),
    (dict(dense_warmup=(1.5,), step_ranges=((0, 1), (1, None))), "is not an integer >= 1"),
])
def test_warmup_options_are_checked(fields, message):
    with pytest.raises(ConfigError, match=message):
        CalibrationOptions(**fields)


RANGES = ((0, 1), (1, 2), (2, None))


@pytest.fixture(scope="module")
def states():
    """Two sites x three step ranges of measured synthetic attention."""
    out = {}
    for s, sid in enumerate(("x", "y")):
        for r in range(3):
            st, _ = _state_with_errors(seed=10 * s + r, patterns=False, dynamic=False, step_ranges=RANGES)
            st.site = make_site(GRID, st.site.heads, site_id=sid)
            out[(sid, r)] = st
    return out


def _density(states, decisions):
    blocks = {k: st.blocks[0] * st.blocks[1] for k, st in states.items()}
    return sum(sum(c.density for c in decisions[k].choices) / len(decisions[k].choices) * blocks[k]
               for k in states) / sum(blocks.values())


@pytest.mark.parametrize("budget", [DensityBudget(0.5), DensityBudget(0.75), SpeedupBudget(1.3)])
def test_warmup_search_keeps_the_budget_and_picks_the_least_error(states, budget):
    weights = {k: (20.0 if k[1] == 0 else 1.0) for k in states}
    decisions, record = decide_with_warmup(states, COST, budget, weights, RANGES, (1, 2))
    assert set(record["tried"]) == {"0", "1", "2"}
    feasible = {int(k): v for k, v in record["tried"].items() if v is not None}
    best = min(feasible.values())
    assert feasible[record["chosen"]] <= best + 1e-9 * max(1.0, best)  # the least error (ties: the smaller k)
    assert all(feasible[k] > best + 1e-12 * max(1.0, best) for k in feasible if k < record["chosen"])
    for k, value in feasible.items():
        d = decide_at_warmup(states, COST, budget, weights, RANGES, k)
        assert objective(states, d, weights) == pytest.approx(value)
        for key in states:  # the warm-up ranges are dense, the rest not all dense
            if key[1] < k:
                assert d[key].choices == dense_choices(states[key]) and "dense warm-up" in d[key].dense_reason
        if isinstance(budget, DensityBudget):
            assert _density(states, d) <= budget.density + 1e-6, k
    assert objective(states, decisions, weights) == pytest.approx(feasible[record["chosen"]])


def test_a_warmup_that_spends_the_whole_budget_is_infeasible(states):
    _, record = decide_with_warmup(states, COST, DensityBudget(0.3), None, RANGES, (1,))
    assert record["tried"]["1"] is None and record["chosen"] == 0  # 1 of 3 ranges dense is > 0.3 alone
    assert decide_at_warmup(states, COST, DensityBudget(0.3), None, RANGES, 1) is None


def test_site_error_budget_never_warms_up(states):
    decisions, record = decide_with_warmup(states, COST, SiteErrorBudget(0.05), None, RANGES, (1, 2))
    assert record["chosen"] == 0 and set(record["tried"]) == {"0"} and "gains nothing" in record["why"]


def test_assembled_warmup_decisions_make_a_plan_with_that_warmup(states):
    opts = next(iter(states.values())).opt
    d = decide_at_warmup(states, COST, DensityBudget(0.8), None, RANGES, 2)
    plan, results = assemble(states, d, opts, COST, DensityBudget(0.8))
    assert plan.dense_warmup == 2
    for sid in ("x", "y"):
        assert all(h.sparsity is Sparsity.DENSE for s in (0, 1) for h in plan.at_step(s)[sid].heads)
        assert plan.meta["dense_reasons"][f"{sid}@0"].startswith("dense warm-up")
    late = [r for r in results if r.steps == (2, None)]
    assert all(r.density < 1.0 for r in late)  # the budget left is spent on the last range
