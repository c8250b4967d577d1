"""Plans that follow the resolution (issue 15 item 4): a plan calibrated at one clip size runs at
others (frames, height, width, text length), through the passes (trace_and_rewrite, the path of
export, calibration checks and the bench), equal to vsopt.core.semantics' reference of the plan
fitted to the new grid, with the density change in lower_plan's report; a plan that cannot be
fitted leaves the site dense with a one-line reason (strict: an error)."""
import pytest
import torch

from vsopt.backend import trace_and_rewrite
from vsopt.core.config import VsoptConfig
from vsopt.core.errors import UnsupportedSiteError
from vsopt.core.plan import Plan, Sparsity
from vsopt.core.resample import NOTE_PREFIX, fit_site_plan
from vsopt.core.semantics import select_heads

from . import resolution_model as rm

SIZES = {  # frames, height, width, text tokens; the calibration size is rm.CALIBRATION = (4, 8, 8, 5)
    "frames": (6, 8, 8, 5),
    "height": (4, 11, 8, 5),
    "width": (4, 8, 6, 5),
    "text": (4, 8, 8, 12),
    "all": (3, 6, 10, 2),
}


@pytest.fixture(scope="module")
def plan():
    return rm.calibrated_plan()


def lower_notes(report):
    return [n for p in report.passes if p.name == "lower_plan" for n in p.notes]


def run(gm, *args):
    with torch.no_grad():
        out = gm(*args)
    return out[0] if isinstance(out, (tuple, list)) else out


@pytest.mark.parametrize("change", list(SIZES))
def test_a_plan_calibrated_at_one_size_runs_at_another(plan, change):
    m = rm.model()
    size = SIZES[change]
    clip, text = rm.inputs(*size, seed=7)
    gm, report = trace_and_rewrite(m, (clip, text), VsoptConfig(plan=plan))
    (site,) = report.sites
    assert site.grid == rm.grid_of(*size)
    assert report.lowered == [rm.SITE] and not report.skipped
    fit = fit_site_plan(plan.sites[rm.SITE], site)
    assert fit.resampled and fit.plan.grid == site.grid
    # orders unchanged, pattern and dynamic heads as they were, masks at the new block counts
    old, new = plan.sites[rm.SITE].heads, fit.plan.heads
    assert [h.order for h in new] == [h.order for h in old] and new[2:] == old[2:]
    qb = -(-site.q_len // rm.BLOCK)
    assert all(h.mask.shape == (qb, qb) for h in new if h.sparsity is Sparsity.MASK)
    # the density change is in the report, one line
    (note,) = [n for n in lower_notes(report) if n.startswith(NOTE_PREFIX)]
    d0, d1 = fit.mask_density
    assert f"{d0:.3f} -> {d1:.3f}" in note and str(site.grid) in note
    assert d1 < 0.75, "the resampled masks must still be sparse for this test to mean something"
    # the numbers: the lowered graph equals the plan's meaning at the new grid
    got = run(gm, clip, text)
    want = rm.reference(m, site, new, clip, text)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    dense = run(m, clip, text)
    assert (got - dense).abs().max() > 1e-3, "a sparse plan must differ from dense attention"


def test_the_plan_at_its_own_size_is_used_as_it_is(plan):
    m = rm.model()
    clip, text = rm.inputs(*rm.CALIBRATION, seed=7)
    gm, report = trace_and_rewrite(m, (clip, text), VsoptConfig(plan=plan))
    assert report.lowered == [rm.SITE]
    assert not [n for n in lower_notes(report) if n.startswith(NOTE_PREFIX)]
    torch.testing.assert_close(run(gm, clip, text),
                               rm.reference(m, report.sites[0], plan.sites[rm.SITE].heads, clip, text),
                               rtol=1e-5, atol=1e-5)


def test_a_plan_that_cannot_be_fitted_leaves_the_site_dense_with_one_line(plan):
    m = rm.model()
    two_heads = Plan({rm.SITE: select_heads(plan.sites[rm.SITE], [0, 1])})
    clip, text = rm.inputs(*SIZES["frames"])
    gm, report = trace_and_rewrite(m, (clip, text), VsoptConfig(plan=two_heads))
    assert report.lowered == []
    (skipped,) = report.skipped
    assert "the plan has 2 heads, the site 4" in skipped.reason and "\n" not in skipped.reason
    torch.testing.assert_close(run(gm, clip, text), run(m, clip, text), rtol=1e-5, atol=1e-5)
    with pytest.raises(UnsupportedSiteError, match="2 heads, the site 4"):
        trace_and_rewrite(m, (clip, text), VsoptConfig(plan=two_heads, strict=True))


def test_the_bench_prices_the_plan_at_the_size_it_runs(plan):
    """vsopt.benchmark.aggregate at another clip size: the densities of the fitted entry (what
    lower_plan runs), and dense (1) for an entry that cannot be fitted."""
    from vsopt.benchmark.aggregate import plan_density
    from vsopt.core.semantics import head_densities

    m = rm.model()
    _, report = trace_and_rewrite(m, rm.inputs(*SIZES["all"]), VsoptConfig(plan=plan, rewrite=False))
    (site,) = report.sites
    fitted = fit_site_plan(plan.sites[rm.SITE], site).plan
    want = sum(head_densities(site, fitted.heads)) / rm.HEADS
    assert plan_density(plan, [site]) == pytest.approx(want)
    assert want < 0.9
    assert plan_density(Plan({rm.SITE: select_heads(plan.sites[rm.SITE], [0, 1])}), [site]) == 1.0
