"""The CPU path of tests/kernels/gpu_check_pooled.py: its vectorized float64 reference agrees with
the direct one (vsopt.core.pooled.reference_pooled_attention) and --smoke passes."""
import importlib.util
import json
from pathlib import Path

import torch

from vsopt.core.pooled import reference_pooled_attention

_spec = importlib.util.spec_from_file_location("gpu_check_pooled", Path(__file__).with_name("gpu_check_pooled.py"))
check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check)


def test_vectorized_reference_equals_the_direct_one():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 37, 8, generator=g)
    k, v = torch.randn(2, 2, 45, 8, generator=g), torch.randn(2, 2, 45, 8, generator=g)
    masks = torch.rand(2, 4, 3, 3, generator=g) < 0.4
    want = reference_pooled_attention(q, k, v, masks, 0.3, 16, 16)
    torch.testing.assert_close(check.dense_pooled_reference(q, k, v, masks, 0.3, 16, 16), want)


def test_smoke_run_passes(tmp_path, capsys):
    assert check.main(["--smoke", "--out", str(tmp_path / "p.json")]) == 0
    doc = json.loads((tmp_path / "p.json").read_text())
    assert [r["pass"] for r in doc["results"]] == [True, True]
    for r in doc["results"]:  # the remainder recovers mass the plain block-sparse attention drops
        assert r["pooled_rel_l2_vs_exact"] < r["plain_rel_l2_vs_exact"]
