"""The GPU scripts of the context-parallel work, on the CPU: benchmarks/parallel_wan.py (argument
parsing, a one-process gloo dry run) and tests/kernels/gpu_check_ring.py (its --smoke sizes)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "benchmarks", "parallel_wan.py")
CHECK = os.path.join(ROOT, "tests", "kernels", "gpu_check_ring.py")


def _load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_parallel_wan_arguments():
    pw = _load(BENCH, "parallel_wan")
    args = pw.parse_args([])
    assert args.model == "14b" and args.methods == list(pw.METHODS) and args.iters == 5
    args = pw.parse_args(["--dry-run", "--methods", "dense, ring-vsopt"])
    assert (args.model, args.block, args.iters, args.methods) == ("tiny", 16, 1, ["dense", "ring-vsopt"])
    with pytest.raises(SystemExit):
        pw.parse_args(["--methods", "dense,fast"])
    with pytest.raises(SystemExit):
        pw.parse_args(["--iters", "0"])
    assert os.environ["NCCL_NVLS_ENABLE"] == "0" and os.environ["NVSHMEM_DISABLE_NVLS"] == "1"
    plan = pw.synthetic_plan(args, _grid(), 4, 2)
    assert sorted(plan.sites) == ["blocks.0.attn1", "blocks.1.attn1"]
    assert [sorted(p.sites) for p in pw.block_plans(plan, 2)] == [["attn1"], ["attn1"]]


def _grid():
    from vsopt.core.ir import TokenGrid

    return TokenGrid(4, 4, 4)


def test_parallel_wan_one_process_dry_run(tmp_path):
    out = tmp_path / "r.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, BENCH, "--dry-run", "--methods", "vsopt,ring-vsopt", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env={**env, "MASTER_PORT": "29617"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["world"] == 1 and r["tokens"] == 64
    assert r["methods"]["vsopt"]["planned_sites_left"] == [] and r["methods"]["vsopt"]["median_ms"] > 0
    assert r["methods"]["ring-vsopt"] == {"skipped": "needs several ranks"}
    assert r["head_balance"]["degree"] == 2 and r["head_balance"]["after_us"] <= r["head_balance"]["before_us"]


def test_ring_check_smoke(capsys):
    assert _load(CHECK, "gpu_check_ring").main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "ALL PASS" in out and "FAIL" not in out.replace("ALL PASS", "")
