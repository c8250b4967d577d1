"""How a calibration tells a failure it did not cause: which step failed (building the model,
tracing it with the example inputs, running it on them), then the cause, in one line; the
original exception stays chained (`vsopt --debug` shows its traceback). Light: no torch."""
from __future__ import annotations

from vsopt.core.errors import ConfigError


def one_line(e: BaseException) -> str:
    """An exception as one line: its type and the first non-empty line of its message."""
    text = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def step_failed(step: str, e: BaseException) -> ConfigError:
    """The error to raise (from e) when `step` failed with e: "<step> failed: <cause>". A
    ConfigError's own message is already its cause (no type name)."""
    if isinstance(e, ConfigError):
        cause = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    else:
        cause = one_line(e)
    return ConfigError(f"{step} failed: {cause}")
