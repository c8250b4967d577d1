"""`vsopt demo` end to end at a reduced size (CPU): the shipped model, sampled eagerly, through
Inductor and through torch.compile(backend="vsopt") with no plan, which must agree to float32
rounding; every graph compiled before the timed runs, every step timed (issue 15 item 1)."""
import json

import pytest

from vsopt.cli import main


def test_demo_runs_end_to_end_and_dense_plan_matches(tmp_path, capsys):
    rc = main(["demo", "--out", str(tmp_path), "--frames", "2", "--size", "8", "--steps", "2", "--seed", "3",
               "--plan", "none"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "blocks.5.attn1" in printed and "plan: none" in printed and "PSNR" in printed
    assert "x vs eager" in printed and "x vs inductor" in printed and "no speedup is expected" in printed
    assert "settings for this device: 2 steps (--steps)" in printed
    doc = json.loads((tmp_path / "demo.json").read_text())
    timing = doc["timing"]
    assert sorted(timing["step_ms"]) == ["eager", "inductor", "vsopt"]
    assert all(len(ms) == 2 and min(ms) > 0 for ms in timing["step_ms"].values())
    assert timing["compile_and_warmup_s"]["vsopt"] > 0 and timing["compile_and_warmup_s"]["inductor"] > 0
    assert timing["graphs_compiled_while_timing"] == 0 and "CPU" in timing["meaning"]
    assert set(timing["speedup"]) == {"vs_eager", "vs_inductor"}
    assert len(doc["sites"]) == 12  # 6 layers x (self, cross)
    assert doc["metrics"]["latent_relative_l2"] < 1e-4
    assert doc["metrics"]["psnr_db"] == "inf" or doc["metrics"]["psnr_db"] > 40
    assert doc["metrics"]["ssim"] > 0.99
    from PIL import Image

    with Image.open(tmp_path / "clip.gif") as gif:
        assert gif.n_frames == 2
    with Image.open(tmp_path / "frames.png") as png:
        assert png.width > 2 * 8 * 6


@pytest.mark.parametrize("argv,message", [
    (["--prompt", "stripes background; red hexagon moving left, steady, fixed"], "unknown words"),
    (["--size", "7"], "--size"),
    (["--steps", "0"], "--steps"),
])
def test_demo_rejects_bad_input_with_a_clear_message(tmp_path, capsys, argv, message):
    assert main(["demo", "--out", str(tmp_path), *argv]) == 1
    assert message in capsys.readouterr().err


def test_demo_fits_the_shipped_plan_to_another_clip_size(tmp_path, capsys):
    """The shipped plan (calibrated at 16x32x32 latents) applies to a 2x8x8 clip, fitted as the
    compile path fits it (vsopt.core.resample), with each site's density change printed."""
    assert main(["demo", "--out", str(tmp_path), "--frames", "2", "--size", "8", "--steps", "1"]) == 0
    printed = capsys.readouterr().out
    from vsopt.core.plan import Plan
    from vsopt.models.model import shipped_plan

    sites = len(Plan.load(str(shipped_plan(16, 32, 32))).sites)
    assert "shipped calibrated plan" in printed and f"fitted to this clip: {sites} site(s) resampled" in printed
    doc = json.loads((tmp_path / "demo.json").read_text())
    assert len(doc["plan_fit"]) == sites
    for line in doc["plan_fit"]:
        assert line.startswith("plan fitted to the site's size") and "grid 16x16x16 fitted to" in line
        assert line.rsplit("fitted to", 1)[1].split(";")[0].strip().endswith("grid 2x4x4")
        assert "site density" in line and line in printed
    assert doc["timing"]["graphs_compiled_while_timing"] == 0


def test_demo_refuses_a_plan_that_cannot_fit(tmp_path, capsys):
    import torch

    import vsopt
    from vsopt.core.plan import HeadPlan, Plan, SitePlan
    from vsopt.models import data, model as model_lib

    ref = model_lib.load_shipped()
    tokens = data.sample_scenes(1, 0).tokens
    cond = torch.cat([ref.encode(tokens), ref.encode(torch.zeros_like(tokens))])
    report = vsopt.inspect(ref.transformer, torch.zeros(2, data.CHANNELS, 2, 8, 8), torch.full((2,), 500.0), cond)
    plan_path = tmp_path / "two_heads.plan.json"
    Plan({s.site_id: SitePlan(s.site_id, 2, s.q_len, s.kv_len, s.grid, (HeadPlan(),) * 2)
          for s in report.sites if s.is_self_attention}).save(plan_path)
    rc = main(["demo", "--out", str(tmp_path), "--frames", "2", "--size", "12", "--plan", str(plan_path)])
    assert rc == 1
    err = capsys.readouterr().err
    assert "does not fit" in err and "blocks.0.attn1" in err and "2 heads" in err


def test_every_step_segment_is_compiled_before_the_timed_runs(tmp_path, capsys):
    """A plan whose head plans change at step 2: its second graph is built and warmed up before
    any clock starts, so nothing compiles while timing; default steps depend on the device."""
    import torch

    import vsopt
    from vsopt.core.plan import HeadPlan, Plan, Quant, SitePlan, StepPlan
    from vsopt.models import data, model as model_lib

    ref = model_lib.load_shipped()
    tokens = data.sample_scenes(1, 0).tokens
    cond = torch.cat([ref.encode(tokens), ref.encode(torch.zeros_like(tokens))])
    report = vsopt.inspect(ref.transformer, torch.zeros(2, data.CHANNELS, 2, 8, 8), torch.full((2,), 500.0), cond)
    late = (HeadPlan(quant=Quant.INT8, block_m=16, block_n=16),) * 4
    plan = Plan({s.site_id: SitePlan.for_site(s, HeadPlan(block_m=16, block_n=16), steps=(StepPlan(2, None, late),))
                 for s in report.sites if s.is_self_attention})
    plan_path = plan.save(tmp_path / "steps.plan.json")
    assert main(["demo", "--out", str(tmp_path), "--frames", "2", "--size", "8", "--steps", "3",
                 "--plan", str(plan_path)]) == 0
    printed = capsys.readouterr().out
    assert "head plans change at step(s) 2" in printed and "2 step segment(s) (first steps 0, 2)" in printed
    timing = json.loads((tmp_path / "demo.json").read_text())["timing"]
    assert timing["warmed_up_segments"] == [0, 2] and timing["graphs_compiled_while_timing"] == 0


def test_device_defaults_are_printed_and_overridable():
    from vsopt.demo import DEVICE_DEFAULTS, add_arguments
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert p.parse_args([]).steps is None and p.parse_args(["--steps", "4"]).steps == 4
    assert DEVICE_DEFAULTS["cpu"]["steps"] >= 5   # both step ranges of the shipped plan (0-3, 4+) run
    assert DEVICE_DEFAULTS["cuda"]["size"] == 64 and DEVICE_DEFAULTS["cpu"]["size"] == 32  # 16384 / 4096 tokens


def test_the_shipped_plan_is_found_and_applies_at_every_clip_size():
    from vsopt.core.plan import Plan
    from vsopt.demo import resolve_plan
    from vsopt.models.model import ReferenceConfig

    cfg = ReferenceConfig()
    path, why = resolve_plan("shipped", cfg.frames, cfg.height, cfg)
    plan = Plan.load(path)  # the JSON and its masks file, both found as package data
    selfs = [f"blocks.{i}.attn1" for i in range(cfg.num_layers)]
    assert set(selfs) <= set(plan.sites) <= set(selfs) | {f"blocks.{i}.attn2" for i in range(cfg.num_layers)}
    assert all(plan.sites[s].q_len == cfg.video_tokens for s in selfs)
    # calibrated on the GPU for the shipped weights (docs/MODEL.md: at 4096 tokens every site stays dense)
    assert plan.meta["calibration"]["cost_model"] == "NVIDIA H200" and 0 < plan.density() <= 1 and "shipped" in why
    other, why = resolve_plan("shipped", 2, 8, cfg)  # a size with no plan of its own: the trained size's, fitted
    assert other == path and "fitted to this clip" in why
    large, _ = resolve_plan("shipped", 16, 64, cfg)  # the GPU default: its own plan once one is shipped, else fitted
    assert large == path or all(sp.q_len == 16384 for sp in Plan.load(large).sites.values())
    assert resolve_plan("none", cfg.frames, cfg.height, cfg)[0] is None
    assert resolve_plan("my.plan.json", 2, 8, cfg)[0] == "my.plan.json"


def test_broken_environment_is_one_clear_error(monkeypatch, capsys):
    """A model that fails to load for any reason (here: a diffusers API mismatch) is reported as an
    environment problem naming the packages, not a traceback (issue 12 item 10)."""
    from vsopt.cli import main
    from vsopt.models import model as model_lib

    def broken(*args, **kwargs):
        raise AttributeError("module 'diffusers' has no attribute 'WanTransformer3DModel'")

    monkeypatch.setattr(model_lib, "load_shipped", broken)
    assert main(["demo", "--steps", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could not be loaded (AttributeError" in err[0] and "diffusers >= 0.35 (found" in err[0]


def test_a_run_sampling_otherwise_than_the_plans_calibration_says_so():
    """The shipped plans record the sampling they were calibrated on (the 16384-token one the
    demo's GPU default, 20 steps at guidance 3); a demo run at other settings prints a note naming
    both and the calibrate command for its own, except for a plan that keeps every site dense (the
    shipped 4096-token one: exact anyway)."""
    import dataclasses

    from vsopt.core.plan import Plan
    from vsopt.demo import sampling_note
    from vsopt.models.model import shipped_plan

    small, large = (Plan.load(str(shipped_plan(*size))) for size in ((16, 32, 32), (16, 64, 64)))
    assert small.meta["calibration"]["sampling"] == {"steps": 8, "guidance": 1.0}
    assert large.meta["calibration"]["sampling"] == {"steps": 20, "guidance": 3.0}
    assert all(sp.is_dense for sp in small.sites.values()) and sampling_note(small, 20, 3.0) is None
    assert sampling_note(large, 20, 3.0) is None
    note = sampling_note(large, 8, 1.0)
    assert "20-step trajectories at guidance 3" in note and "8 steps at guidance 1" in note
    assert "--steps 8 --guidance 1" in note
    unsaid = dataclasses.replace(large, meta={"calibration": {}})
    assert sampling_note(unsaid, 20, 3.0) is None   # a plan that does not say: nothing claimed
