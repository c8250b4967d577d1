"""vsopt.core: the types and ops every layer of vsopt shares. Importing it registers torch.ops.vsopt.*."""
from . import ops  # noqa: F401  (registers the custom ops)
from .config import VsoptConfig
from .errors import ConfigError, KernelInputError, PassError, PlanError, UnsupportedSiteError, VsoptError
from .ir import AttentionSite, GridSource, Layout, SkippedSite, TokenGrid

__all__ = ["AttentionSite", "ConfigError", "GridSource", "KernelInputError", "Layout", "PassError", "PlanError",
           "SkippedSite", "TokenGrid", "UnsupportedSiteError", "VsoptConfig", "VsoptError"]
