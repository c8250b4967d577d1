"""The calibration inputs: as RecordedCalls, as the positional calls the traced graph takes, by
denoising-step range, and the shipped reference model's over a sampler run; and the tensor a
model's output stands for."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from vsopt.calibration.capture import RecordedCall, record_forward_inputs
from vsopt.core.errors import ConfigError


class KeptPerRun:
    """What the candidates of one site state keep from one calibration input to the next (`kept`:
    candidate -> what it kept), within one sampler run: a run's inputs come in growing steps, so a
    step that does not grow, or an unknown one (None), starts a new run with nothing kept."""

    def __init__(self):
        self.kept: dict = {}
        self.last: int | None = None

    def begin(self, step: int | None) -> None:
        """A call at `step` is measured."""
        if step is None or (self.last is not None and step <= self.last):
            self.kept = {}
        self.last = step


@dataclass(frozen=True)
class Signature:
    """How calibration inputs with keyword arguments become positional ones: the traced graph
    takes positional inputs only, so tensor kwargs (`keys`) follow the `n_args` positional args,
    and non-tensor kwargs (`fixed`, e.g. return_dict=False) are bound."""

    n_args: int
    keys: tuple[str, ...] = ()
    fixed: dict = field(default_factory=dict)

    @contextlib.contextmanager
    def bound(self, model: torch.nn.Module) -> Iterator[None]:
        """While active, model(*positional) calls the original forward with the keywords put back.
        The forward is replaced on the instance (not wrapped in another module) so that module
        paths, and with them the site ids, stay the model's own."""
        if not self.keys and not self.fixed:
            yield
            return
        previous = model.__dict__.get("forward")
        original = model.forward

        def forward(*flat):
            return original(*flat[:self.n_args], **dict(zip(self.keys, flat[self.n_args:])), **self.fixed)

        model.forward = forward
        try:
            yield
        finally:
            if previous is not None:
                model.forward = previous
            else:
                del model.forward


def as_recorded(x: Any, i: int) -> RecordedCall:
    """Calibration input i as a RecordedCall (a tuple or list of positional inputs, or one tensor,
    is call i at step i)."""
    if isinstance(x, RecordedCall):
        return x
    if isinstance(x, torch.Tensor):
        return RecordedCall(i, i, (x,), {})
    if isinstance(x, (tuple, list)):
        return RecordedCall(i, i, tuple(x), {})
    raise ConfigError(f"calibration input {i}: expected a tuple of positional inputs, a tensor or a RecordedCall, "
                      f"got {type(x).__name__}")


def positional(model: torch.nn.Module, calls: Sequence[RecordedCall]) -> tuple[Signature, list[tuple]]:
    """The calls' shared Signature and each call as positional inputs; calls of different
    signatures raise ConfigError."""
    first = calls[0]
    for c in calls:
        if len(c.args) != len(first.args) or sorted(c.kwargs) != sorted(first.kwargs):
            raise ConfigError(f"calibration input {c.index} has a different signature from input {first.index}")
    keys = tuple(sorted(k for k, v in first.kwargs.items() if isinstance(v, torch.Tensor)))
    fixed = {k: v for k, v in first.kwargs.items() if not isinstance(v, torch.Tensor)}
    return Signature(len(first.args), keys, fixed), [(*c.args, *(c.kwargs[k] for k in keys)) for c in calls]


def range_of(step: int, ranges: Sequence[tuple[int, int | None]] | None) -> int | None:
    """Index of the step range holding `step` (0 without ranges), None when no range does."""
    if ranges is None:
        return 0
    for r, (a, b) in enumerate(ranges):
        if a <= step and (b is None or step < b):
            return r
    return None


def model_output(out: Any) -> torch.Tensor:
    """The first tensor of a model's output (diffusers returns tuples or dataclasses)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ConfigError(f"cannot take a tensor from the model output of type {type(out).__name__}")


def reference_conditioning(ref, clips: int, seed: int, guidance: float):
    """What a sampler run of the shipped reference model over `clips` random descriptions (seed
    `seed`) takes, on the model's device: (cond, uncond (the empty description; None without
    guidance, guidance == 1), the latent clip shape (C, F, H, W))."""
    from vsopt.models import data

    device = next(ref.transformer.parameters()).device
    _, tokens = data.make_batch(clips, seed)
    cond = ref.encode(tokens.to(device))
    uncond = ref.encode(torch.zeros_like(tokens[:1]).to(device)) if guidance != 1.0 else None
    return cond, uncond, (data.CHANNELS, ref.config.frames, ref.config.height, ref.config.width)


def reference_model_inputs(ref, *, clips: int = 2, steps: int = 8, seed: int = 0, every: int = 1,
                           guidance: float = 1.0) -> list[RecordedCall]:
    """Inputs of the shipped reference model's transformer at each denoising step of a sampler run
    over `clips` random descriptions (vsopt.models): RecordedCalls whose `step` is the sampler step,
    on the model's device. With guidance != 1 each step's call holds the cond and uncond batch."""
    from vsopt.models import sampler

    cond, uncond, shape = reference_conditioning(ref, clips, seed, guidance)
    with record_forward_inputs(ref.transformer, device=None, every=every) as calls:
        sampler.sample(ref.transformer, cond, shape, steps=steps, seed=seed, guidance=guidance, uncond=uncond)
    for c in calls:  # one forward per step: index == step (every-th call kept)
        c.step = c.index
    return calls
