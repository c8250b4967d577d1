"""`vsopt calibrate`'s accuracy-search flags: each reaches CalibrationOptions, defaults follow
off by default, bad values give one line naming the flag."""
import argparse

import pytest

from vsopt.calibration import cli as cal_cli
from vsopt.cli import main

from tests.e2e.test_calibrate_cli import factory  # noqa: F401 - the fixture


def _options(argv):
    p = argparse.ArgumentParser()
    cal_cli.add_arguments(p)
    return cal_cli.check_args(p.parse_args([*argv, "--out", "x.plan.json"])).options


def test_the_search_options_are_off_unless_asked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ref = _options(["--reference", "--max-error", "0.05"])
    assert not ref.pooled_remainder and ref.renorm_every == () and ref.dynamic_top_k == ()
    fac = _options(["m:make", "--max-error", "0.05"])
    assert not fac.pooled_remainder and fac.renorm_every == () and fac.dynamic_top_k == ()


def test_flags_reach_the_options(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    o = _options(["--reference", "--density", "0.3", "--no-pooled-remainder", "--renorm-every", "4,2",
                  "--residual-every", "3", "--step-ranges", "0:1,1:", "--dense-warmup", "1", "--mask-refresh", "2",
                  "--top-k", "0.25"])
    assert (o.pooled_remainder, o.renorm_every, o.residual_every, o.dense_warmup, o.mask_refresh,
            o.dynamic_top_k) == (False, (2, 4), (3,), (1,), (2,), (0.25,))
    assert _options(["--reference", "--max-error", "0.05", "--renorm-every", ""]).renorm_every == ()
    # recorded in the plan's meta (meta.calibration.options is the options' fingerprint)
    assert o.fingerprint()["residual_every"] == [3] and o.fingerprint()["pooled_remainder"] is False


BAD = [
    (["--renorm-every", "1"], "--renorm-every: 1 measures at every step"),
    (["--renorm-every", "x"], "--renorm-every 'x': expected comma-separated ints"),
    (["--residual-every", "0"], "--residual-every: 0 is not an integer >= 1"),
    (["--mask-refresh", "1"], "--mask-refresh: 1 is recomputing"),
    (["--top-k", "1.5"], "--top-k '1.5': fractions must lie in (0, 1]"),
    (["--top-k", "a"], "--top-k 'a'"),
    (["--dense-warmup", "1"], "--dense-warmup: a per-site budget"),
]


@pytest.mark.parametrize("bad, message", BAD, ids=[" ".join(b) for b, _ in BAD])
def test_bad_values_name_the_flag(factory, capsys, bad, message):  # noqa: F811
    rc = main(["calibrate", "./m.py:make", "--max-error", "0.1", "--out", "m.plan.json", *bad])
    err = capsys.readouterr().err
    assert rc == 1 and message in err and err.strip().count("\n") == 0, err
    assert not (factory / "factory_called").exists()


def test_warmup_must_end_a_step_range(factory, capsys):  # noqa: F811
    rc = main(["calibrate", "./m.py:make", "--density", "0.5", "--out", "m.plan.json", "--step-ranges", "0:4,4:",
               "--dense-warmup", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and "--dense-warmup 1: the step ranges" in err and err.strip().count("\n") == 0, err


def test_step_options_need_recorded_steps_from_a_factory(factory, capsys):  # noqa: F811
    rc = main(["calibrate", "./m.py:make", "--max-error", "0.1", "--out", "m.plan.json", "--renorm-every", "2",
               "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and "--renorm-every: needs the inputs of one sampler run" in err, err


def test_reference_run_records_the_search_in_the_plan(tmp_path, monkeypatch):
    """A tiny `calibrate --reference` (128 tokens, 4 steps, CPU): the plan's meta holds the search used."""
    import json

    from vsopt.core.plan import Plan

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "r.plan.json"
    assert main(["calibrate", "--reference", "--size", "2x16x16", "--steps", "4", "--clips", "1", "--density", "0.5",
                 "--step-ranges", "0:1,1:", "--dense-warmup", "1", "--residual-every", "2", "--pooled-remainder",
                 "--renorm-every", "3", "--out", str(out),
                 "--quiet", "--device", "cpu"]) == 0
    meta = json.loads(out.read_text())["meta"]["calibration"]
    o = meta["options"]
    assert (o["pooled_remainder"], o["renorm_every"], o["residual_every"], o["dense_warmup"]) == (True, [3], [2], [1])
    assert meta["dense_warmup"]["chosen"] in (0, 1) and set(meta["dense_warmup"]["tried"]) == {"0", "1"}
    assert Plan.load(out).sites
    sites = json.dumps(json.loads(out.read_text())["sites"])
    assert '"remainder": "pooled"' in sites or '"renorm": {' in sites  # the new candidates can be chosen
