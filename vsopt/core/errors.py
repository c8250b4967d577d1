"""Errors vsopt raises. Each names what was wrong and where, so a user can act on it."""
from __future__ import annotations


class VsoptError(Exception):
    """Base class of every error vsopt raises on purpose."""


class ConfigError(VsoptError, ValueError):
    """An option given to the backend, the CLI or an API call is invalid."""


class PlanError(VsoptError, ValueError):
    """A plan file is corrupt, from another model, or from an unsupported schema version."""


class UnsupportedSiteError(VsoptError):
    """Strict mode: an attention site (or candidate) was left unoptimized.

    Carries the site id and the reason the rule gave."""

    def __init__(self, site: str, reason: str):
        self.site, self.reason = site, reason
        super().__init__(f"vsopt strict mode: site {site!r} left as it was: {reason}")


class PassError(VsoptError):
    """A graph pass failed. Names the pass, the node it was working on, and the passes that
    had already run (so a pipeline failure can be bisected)."""

    def __init__(self, pass_name: str, message: str, node: str | None = None, ran_before: tuple[str, ...] = ()):
        self.pass_name, self.node, self.ran_before = pass_name, node, ran_before
        where = f" at node {node!r}" if node else ""
        before = f" (passes run before it: {', '.join(ran_before) or 'none'})"
        super().__init__(f"pass {pass_name!r} failed{where}: {message}{before}")


class KernelInputError(VsoptError, ValueError):
    """A kernel launcher was given inputs it cannot run (shape, dtype, device, layout)."""
