"""`vsopt calibrate` and `vsopt bench` on the command line (issue 12 item 8): ./file.py:FACTORY
works; bad option values are rejected before any model is built, in one line naming the option;
failures of the user's factory or inputs say which step failed; --help shows the defaults and
says when MODULE:FACTORY is required."""
import textwrap

import pytest

from vsopt.cli import main
from vsopt.core.plan import Plan

FACTORY_FILE = textwrap.dedent('''
    import pathlib
    import torch
    import torch.nn.functional as F

    class Attention(torch.nn.Module):
        def forward(self, x):
            B, N, _ = x.shape
            q, k, v = x.view(B, N, 3, 2, 16).permute(2, 0, 3, 1, 4)
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, 32)

    class DataDependent(Attention):
        def forward(self, x):
            if x.sum() > 0:  # a branch on a value: torch.export cannot trace it
                x = x * 2
            return super().forward(x)

    def make():
        pathlib.Path("factory_called").touch()  # lets a test see whether the model was built
        g = torch.Generator().manual_seed(0)
        return Attention(), [(torch.randn(1, 128, 96, generator=g),) for _ in range(2)]

    def broken():
        raise ValueError("no weights here")

    def wrong_inputs():
        return Attention(), [(torch.randn(1, 128, 95),)]

    def untraceable():
        return DataDependent(), [(torch.randn(1, 128, 96).abs(),)]
''')


@pytest.fixture
def factory(tmp_path, monkeypatch):
    """A factory file in the current folder (as `vsopt calibrate ./m.py:make` is used)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.py").write_text(FACTORY_FILE)
    return tmp_path


def test_file_path_factory_and_new_output_folder(factory, capsys):
    out = factory / "new" / "deeper" / "m.plan.json"
    assert main(["calibrate", "./m.py:make", "--max-error", "0.1", "--out", str(out), "--quiet"]) == 0
    assert "plan written to" in capsys.readouterr().out
    assert Plan.load(out).sites and (factory / "factory_called").exists()


BAD = [
    (["--block", "48"], "--block 48: a block size must be a power of two"),
    (["--block", "16"], "--block 16: the shipped cost model"),  # it has no 16x16 timings
    (["--step-ranges", "4:2"], "--step-ranges: 4:2 is empty"),
    (["--step-ranges", "0:4,2:"], "--step-ranges: 0:4 and 2: overlap"),
    (["--step-ranges", "four"], "--step-ranges: 'four' is not START:STOP"),
    (["--quant", "int4"], "--quant 'int4'"),
    (["--quant", ","], "--quant ',': no precision"),
    (["--error-inputs", "0"], "--error-inputs 0"),
    (["--site-overhead-us", "-3"], "--site-overhead-us -3"),
    (["--grid", "-4,4,4"], "--grid '-4,4,4'"),
    (["--device", "cuda:7"] , "--device 'cuda:7'"),
    (["--cost-model", "missing.json"], "--cost-model 'missing.json'"),
    (["--steps", "0"], "--steps 0"),
    (["--guidance", "0"], "--guidance 0.0: must be a finite scale > 0"),
    (["--guidance", "nan"], "--guidance nan"),
]


@pytest.mark.parametrize("bad, message", BAD, ids=[" ".join(b) for b, _ in BAD])
def test_bad_options_are_rejected_before_the_model_is_built(factory, capsys, bad, message):
    import torch

    if bad[0] == "--device" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    rc = main(["calibrate", "./m.py:make", "--max-error", "0.1", "--out", "m.plan.json", *bad])
    err = capsys.readouterr().err
    assert rc == 1 and message in err and err.strip().count("\n") == 0, err
    assert err.startswith("vsopt calibrate: error: ")
    assert not (factory / "factory_called").exists()  # nothing was built


@pytest.mark.parametrize("budget, message", [
    (["--max-error", "2"], "--max-error"), (["--density", "0"], "--density"), (["--speedup", "-1"], "--speedup"),
    (["--min-psnr", "nan"], "--min-psnr")])
def test_budgets_out_of_range_are_rejected_before_the_model_is_built(factory, capsys, budget, message):
    rc = main(["calibrate", "./m.py:make", *budget, "--out", "m.plan.json"])
    err = capsys.readouterr().err
    assert rc == 1 and f"error: {message}" in err and err.strip().count("\n") == 0
    assert not (factory / "factory_called").exists()


def test_target_and_output_mistakes(factory, capsys, monkeypatch):
    from vsopt.models import model as model_lib

    def no_model(*a, **k):
        raise AssertionError("the reference model was loaded")

    monkeypatch.setattr(model_lib, "load_shipped", no_model)
    (factory / "plans").mkdir()
    for argv, message in (
            (["--max-error", "0.1", "--out", "m.plan.json"], "give MODULE:FACTORY (the model to calibrate) or "
                                                              "--reference"),
            (["./m.py:make", "--reference", "--max-error", "0.1", "--out", "m.plan.json"], "not both"),
            (["./m.py:make", "--max-error", "0.1", "--out", "plans"], "--out 'plans' is a folder"),
            (["--reference", "--block", "48", "--max-error", "0.1", "--out", "m.plan.json"], "--block 48")):
        assert main(["calibrate", *argv]) == 1
        err = capsys.readouterr().err
        assert message in err and err.strip().count("\n") == 0, err
    assert not (factory / "factory_called").exists()


@pytest.mark.parametrize("target, message", [
    ("./m.py:broken", "building the model failed: ./m.py:broken: calling the factory failed: ValueError: "
                      "no weights here"),
    ("./m.py:wrong_inputs", "running the model on the first calibration input failed: RuntimeError: shape"),
    ("./m.py:untraceable", "tracing the model with the first calibration input (torch.export) failed: "),
    ("no_such_module:make", "building the model failed: 'no_such_module:make': cannot import 'no_such_module'"),
])
def test_factory_and_input_failures_say_which_step_failed(factory, capsys, target, message):
    rc = main(["calibrate", target, "--max-error", "0.1", "--out", "m.plan.json", "--quiet"])
    err = capsys.readouterr().err
    # vsopt's error is one line, the last; (torch.export itself may log warnings before it)
    last = err.strip().splitlines()[-1]
    assert rc == 1 and last.startswith("vsopt calibrate: error: ") and message in last, err
    assert "Traceback" not in err


def test_calibrate_help_shows_defaults_and_when_the_target_is_required(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # one line per option's help
    with pytest.raises(SystemExit):
        main(["calibrate", "--help"])
    text = capsys.readouterr().out
    assert "(MODULE:FACTORY | --reference)" in text and "[MODULE:FACTORY]" not in text
    assert "required unless --reference" in text
    assert "(default: 64)" in text and "(default: none,int8,fp8,int8_fp8,int8_int8)" in text
    assert "(default: None)" not in text and "(default: False)" not in text


def test_bench_help_shows_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = capsys.readouterr().out
    assert "(default: 0.2,0.3,0.5)" in text and "(default: 64)" in text and "(default: bench)" in text
    assert "(default: None)" not in text and "(default: False)" not in text


@pytest.mark.parametrize("bad, message", [
    (["--block", "48"], "--block 48: a block size must be a power of two"),
    (["--steps", "0"], "--steps 0"), (["--clips", "0"], "--clips 0"),
    (["--clip", "0,8,8"], "--clip needs F,H,W"), (["--densities", "0.3,x"], "bad --densities"),
    (["--densities", "1.5"], "bad --densities"), (["--vsopt-speedups", "-1"], "bad --vsopt-speedups"),
    (["--device", "bogus"], "--device 'bogus'"), (["--out", "a_file"], "--out 'a_file' is a file"),
    (["--renorm-every", "1"], "bad --renorm-every"), (["--vsopt-renorm", "2,x"], "bad --vsopt-renorm"),
    (["--vsopt-renorm", "1"], "bad --vsopt-renorm"),
])
def test_bench_rejects_bad_options_before_loading_the_model(tmp_path, monkeypatch, capsys, bad, message):
    from vsopt.models import model as model_lib

    def no_model(*a, **k):
        raise AssertionError("the reference model was loaded")

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("")
    monkeypatch.setattr(model_lib, "load_shipped", no_model)
    assert main(["bench", *bad]) == 1
    err = capsys.readouterr().err
    assert message in err and err.strip().count("\n") == 0, err
