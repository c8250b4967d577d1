"""Input checks shared by the launchers: a failed check raises KernelInputError with the message."""
from __future__ import annotations


class KernelInputError(ValueError):
    """A kernel launcher was given inputs it cannot run (shape, dtype, device, layout).

    The ops in vsopt.core.ops re-raise it as vsopt.core.errors.KernelInputError (the kernels sit
    below the core and cannot import it)."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise KernelInputError(message)
