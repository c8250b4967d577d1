"""Resuming an interrupted calibration: the sums of the measuring passes next to the output plan.

`<plan>.calibration.safetensors` holds every site's summed block mass and candidate errors and
how many inputs each pass has finished, with a fingerprint of the model's sites, the options and
the inputs; a checkpoint with another fingerprint, or an unreadable one, is ignored (the run
starts over). Written atomically (vsopt.core.io), at most every `every_s` seconds and at the end
of each pass.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from vsopt.calibration.capture import RecordedCall
from vsopt.calibration.measure import SiteState, build_candidates
from vsopt.calibration.options import CalibrationOptions
from vsopt.core.io import atomic_write_bytes
from vsopt.core.ir import AttentionSite

_SUMS = ("err2", "density", "quant_err2", "norm2")  # the pass-2 tensors of a SiteState


class Checkpoint:
    """Calibration state next to the output plan; see the module docstring."""

    def __init__(self, plan_path: str | os.PathLike, fingerprint: str, every_s: float = 20.0):
        self.path = Path(str(plan_path) + ".calibration.safetensors")
        self.fingerprint = fingerprint
        self.every_s = every_s  # at most one write per every_s seconds, except when forced
        self._last = time.monotonic()

    def load(self, states: dict[tuple[str, int], SiteState]) -> tuple[int, int]:
        """Restore states; returns (inputs measured, inputs error-checked); (0, 0) if no usable file."""
        from safetensors import SafetensorError, safe_open

        if not self.path.exists():
            return 0, 0
        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta = json.loads(f.metadata()["state"])
                if meta.get("fingerprint") != self.fingerprint:
                    print(f"vsopt calibrate: {self.path} is from another model, input set or options; starting over",
                          file=sys.stderr)
                    return 0, 0
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, KeyError, ValueError, SafetensorError) as e:
            print(f"vsopt calibrate: ignoring unreadable checkpoint {self.path}: {e}", file=sys.stderr)
            return 0, 0
        for key, st in states.items():
            name = _state_name(key)
            st.mass_calls = meta["mass_calls"].get(name, 0)
            st.mass = {o: tensors[f"{name}|mass|{o.value}"] for o in st.orders if f"{name}|mass|{o.value}" in tensors}
            if meta["errors_done"]:
                build_candidates(st)
                for attr in _SUMS:
                    setattr(st, attr, tensors[f"{name}|{attr}"])
                st.error_calls = meta["error_calls"][name]
        return meta["measured"], meta["errors_done"]

    def save(self, states: dict[tuple[str, int], SiteState], measured: int, errors_done: int,
             force: bool = False) -> None:
        """Write the state (a big model's sums are large: at most every `every_s` s unless forced)."""
        from safetensors.torch import save

        if not force and time.monotonic() - self._last < self.every_s:
            return
        self._last = time.monotonic()
        tensors, meta = {}, {"fingerprint": self.fingerprint, "measured": measured, "errors_done": errors_done,
                             "mass_calls": {}, "error_calls": {}}
        for key, st in states.items():
            name = _state_name(key)
            meta["mass_calls"][name] = st.mass_calls
            for o, m in st.mass.items():
                tensors[f"{name}|mass|{o.value}"] = m.contiguous()
            if errors_done:
                meta["error_calls"][name] = st.error_calls
                for attr in _SUMS:
                    tensors[f"{name}|{attr}"] = getattr(st, attr).contiguous()
        atomic_write_bytes(self.path, save(tensors, metadata={"state": json.dumps(meta)}))

    def remove(self) -> None:
        if self.path.exists():
            self.path.unlink()


def _state_name(key: tuple[str, int]) -> str:
    return f"{key[0]}@{key[1]}"


def fingerprint(sites: Sequence[AttentionSite], inputs: Sequence[RecordedCall], options: CalibrationOptions) -> str:
    """A hash of the model's sites, the options and the inputs (shapes and cheap statistics of
    every input tensor): a checkpoint is reused only by the same calibration. error_weights (and
    error_weights_probe, how they were measured) are left out: they weigh the search after the
    passes, not what the passes measure and store (so a --sensitivity run resumes though it
    measured the weights again, a last digit apart)."""
    h = hashlib.sha256()
    h.update(json.dumps([s.to_dict() for s in sites], sort_keys=True).encode())
    measured_by = {k: v for k, v in options.fingerprint().items()
                   if k not in ("error_weights", "error_weights_probe")}
    h.update(json.dumps(measured_by, sort_keys=True).encode())
    for call in inputs:
        for x in [*call.args, *call.kwargs.values()]:
            if isinstance(x, torch.Tensor):
                xf = x.detach().double()
                h.update(f"{call.step}:{tuple(x.shape)}:{float(xf.sum()):.12e}:{float(xf.abs().sum()):.12e}".encode())
            else:
                h.update(repr(x).encode())
    return h.hexdigest()
