"""The compiled model optimizes every resolution it is called with (issue 15 item 4).

Dynamo's automatic dynamic shapes recompile a frame with symbolic sizes on its second input
shape (and dynamic=True does so from the first): the backend then lowers one graph per concrete
resolution (vsopt.backend.PerResolution), the plan fitted to each grid. Checked: every call is
lowered (last_report, the block-sparse launches in the graph), the output equals the plan's
meaning at that grid (vsopt.core.semantics through tests/e2e/resolution_model.reference), and a
site that stays dense says why in one log line per resolution (strict: an error)."""
import logging

import pytest
import torch

import vsopt
from vsopt.core.errors import UnsupportedSiteError
from vsopt.core.plan import Plan
from vsopt.core.resample import NOTE_PREFIX, fit_site_plan
from vsopt.core.semantics import select_heads

from . import resolution_model as rm

RESOLUTIONS = [rm.CALIBRATION, (6, 8, 8, 5), (4, 10, 6, 9)]


@pytest.fixture(scope="module")
def plan():
    return rm.calibrated_plan()


def launches(report) -> list[str]:
    return [n for p in report.passes if p.name == "lower_plan" for n in p.created if "block_sparse_attention" in n]


@pytest.mark.parametrize("dynamic", [None, True])
def test_every_resolution_is_lowered_and_equals_the_reference(plan, dynamic, caplog):
    torch._dynamo.reset()
    m = rm.model()
    compiled = torch.compile(m, backend="vsopt", options={"plan": plan}, dynamic=dynamic)
    seen = []
    for size in RESOLUTIONS + [RESOLUTIONS[-1]]:  # the last one again: its graph is reused, not rebuilt
        clip, text = rm.inputs(*size, seed=3)
        before = vsopt.last_report()
        with torch.no_grad(), caplog.at_level(logging.INFO, logger="vsopt"):
            got = compiled(clip, text)
        report = vsopt.last_report()
        if size in seen:
            assert report is before, "a resolution already compiled must not be compiled again"
            continue
        seen.append(size)
        assert report is not before, f"{size}: no graph was compiled for this resolution"
        (site,) = report.sites
        assert site.grid == rm.grid_of(*size) and report.lowered == [rm.SITE] and not report.skipped
        assert launches(report), f"{size}: no block-sparse launch in the lowered graph"
        heads = fit_site_plan(plan.sites[rm.SITE], site).plan.heads
        torch.testing.assert_close(got, rm.reference(m, site, heads, clip, text), rtol=1e-5, atol=1e-5)
    fitted = [r.getMessage() for r in caplog.records if NOTE_PREFIX in r.getMessage()]
    assert len(fitted) == 2 and all("density" in line for line in fitted), fitted


def test_a_site_left_dense_at_a_resolution_logs_one_line_and_strict_raises(plan, caplog):
    torch._dynamo.reset()
    m = rm.model()
    two_heads = Plan({rm.SITE: select_heads(plan.sites[rm.SITE], [0, 1])})
    compiled = torch.compile(m, backend="vsopt", options={"plan": two_heads}, dynamic=True)
    for size in RESOLUTIONS[:2]:
        caplog.clear()
        clip, text = rm.inputs(*size)
        with torch.no_grad(), caplog.at_level(logging.WARNING, logger="vsopt"):
            got = compiled(clip, text)
        lines = [r.getMessage() for r in caplog.records if r.name == "vsopt"]
        assert len(lines) == 1 and f"site {rm.SITE!r} runs dense" in lines[0] and "2 heads, the site 4" in lines[0]
        with torch.no_grad():
            torch.testing.assert_close(got, m(*rm.inputs(*size)), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    strict = torch.compile(m, backend="vsopt", options={"plan": two_heads, "strict": True}, dynamic=True)
    with torch.no_grad(), pytest.raises(Exception, match="2 heads, the site 4") as info:
        strict(*rm.inputs(*RESOLUTIONS[1]))
    chain = [info.value] + [e for e in (info.value.__cause__, info.value.__context__) if e is not None]
    assert any(isinstance(e, UnsupportedSiteError) for e in chain), chain
