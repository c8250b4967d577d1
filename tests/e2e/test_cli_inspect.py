"""`vsopt inspect MODULE:FACTORY`: the table, --json (written atomically), --grid, --strict, and
clear errors for bad input."""
from __future__ import annotations

import json
import os

import pytest

from vsopt.cli import main

FACTORIES = os.path.join(os.path.dirname(__file__), "model_factories.py")


def test_inspect_table_and_json(tmp_path, capsys):
    out_json = tmp_path / "sites.json"
    assert main(["inspect", f"{FACTORIES}:videomae", "--json", str(out_json)]) == 0
    table = capsys.readouterr().out
    assert "encoder.layer.0.attention.attention" in table and "2x4x4 (inferred)" in table
    assert "2 attention site(s)" in table
    data = json.loads(out_json.read_text())
    assert [s["site_id"] for s in data["sites"]] == ["encoder.layer.0.attention.attention",
                                                    "encoder.layer.1.attention.attention"]
    assert data["sites"][0]["grid"] == {"frames": 2, "height": 4, "width": 4, "text_before": 0, "text_after": 0}
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".vsopt-")]  # no temp file left


@pytest.mark.parametrize("args,message", [
    (["nope_module_xyz:make"], "cannot import 'nope_module_xyz'"),
    (["just_a_name"], "expected MODULE:FACTORY"),
    ([f"{FACTORIES}:no_such_factory"], "has no callable 'no_such_factory'"),
    (["missing_file.py:make"], "no file 'missing_file.py'"),
    ([f"{FACTORIES}:videomae", "--grid", "2,4"], "expected 3 to 5 integers"),
    ([f"{FACTORIES}:videomae", "--grid", "a,b,c"], "expected integers"),
])
def test_inspect_bad_input(args, message, capsys):
    assert main(["inspect", *args]) == 1
    assert message in capsys.readouterr().err


def test_inspect_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["inspect", "--help"])
    assert e.value.code == 0
    assert "MODULE:FACTORY" in capsys.readouterr().out


def test_negative_grid_is_checked_not_misparsed(capsys):
    """`--grid -4,4,4` reaches the grid check (issue 12 item 8) instead of argparse's
    "expected one argument"."""
    assert main(["inspect", f"{FACTORIES}:videomae", "--grid", "-4,4,4"]) == 1
    err = capsys.readouterr().err
    assert "expected one argument" not in err and "grid" in err and len(err.strip().splitlines()) == 1


def test_json_into_a_missing_folder_is_created(tmp_path, capsys):
    out_json = tmp_path / "new" / "folder" / "sites.json"
    assert main(["inspect", f"{FACTORIES}:videomae", "--json", str(out_json)]) == 0
    assert json.loads(out_json.read_text())["sites"]


def test_module_in_the_current_folder_is_found(tmp_path, monkeypatch, capsys):
    """`vsopt inspect mymod:make` finds ./mymod.py from the console script too."""
    (tmp_path / "vsopt_cwd_target.py").write_text(
        "import torch\n"
        "class M(torch.nn.Module):\n"
        "    def forward(self, q, k, v):\n"
        "        return torch.nn.functional.scaled_dot_product_attention(q, k, v)\n"
        "def make():\n"
        "    x = torch.randn(1, 2, 16, 8)\n"
        "    return M(), (x, x, x)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(tmp_path))])
    assert main(["inspect", "vsopt_cwd_target:make"]) == 0
    assert "1 attention site(s)" in capsys.readouterr().out


def test_factory_failure_names_the_step(tmp_path, capsys):
    (tmp_path / "failing.py").write_text("def make():\n    raise RuntimeError('weights missing')\n")
    assert main(["inspect", f"{tmp_path / 'failing.py'}:make"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "calling the factory failed: RuntimeError: weights missing" in err
