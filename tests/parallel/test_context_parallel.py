"""vsopt inside diffusers' context parallelism, on CPU processes (gloo), spawned by the test:
Ulysses, ring and ring x Ulysses results equal the single-process result of the same plan
(float32, reference tolerance) for a small WanTransformer3DModel whose plan mixes patterns,
orders, skip, dynamic and quantized heads; a token order that crosses ring shards is refused.
The processes run tests/parallel/cp_worker.py (see there)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("diffusers")
from diffusers import ContextParallelConfig  # noqa: E402,F401  (diffusers with context parallelism)

WORKER = os.path.join(os.path.dirname(__file__), "cp_worker.py")
TOL = 1e-5   # float32 reference tolerance (outputs are O(1))


def _run(world: int, cases: list[str]) -> dict[str, dict]:
    proc = subprocess.run([sys.executable, WORKER, "--world", str(world), "--cases", ",".join(cases)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return {r["case"]: r for r in results}


def _check_equal(r: dict, heads_note: str) -> None:
    assert r["max_abs_err"] <= TOL * max(1.0, r["scale"]), r
    assert r["plan_vs_dense"] > 1e-2, r      # the plan changed the output: it was applied on both sides
    assert any(heads_note in n for n in r["notes"]), r["notes"]
    assert not any("attn1" in n and "stays dense" in n for n in r["notes"]), r["notes"]


def test_two_ranks():
    results = _run(2, ["ulysses", "ring", "ring_unaligned", "ring_bad_order"])
    _check_equal(results["ulysses"], "blocks.1.attn1: Ulysses rank 0 of 2 computes heads 0..1 of 4")
    _check_equal(results["ring"], "blocks.1.attn1: ring rank 0 of 2, 32 of 64 tokens, 4 heads")
    _check_equal(results["ring_unaligned"], "blocks.0.attn1: ring rank 0 of 2, 24 of 48 tokens, 4 heads")
    refused = results["ring_bad_order"]["refused"]
    assert "site 'blocks.0.attn1': head 2 runs token order 'hwf'" in refused and "across the ring shards" in refused


@pytest.mark.slow
def test_four_ranks():
    results = _run(4, ["ulysses", "ring", "unified"])
    _check_equal(results["ulysses"], "blocks.0.attn1: Ulysses rank 0 of 4 computes heads 0..0 of 4")
    _check_equal(results["ring"], "blocks.1.attn1: ring rank 0 of 4, 16 of 64 tokens, 4 heads")
    _check_equal(results["unified"], "blocks.0.attn1: Ulysses rank 0 of 2 computes heads 0..1")
