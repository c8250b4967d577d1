"""vsopt.passes: graph rewriting on ATen-level FX graphs, pure FX, runs on CPU.

One pass per module (see infra.py for the contract). DEFAULT_PIPELINE is the order compile and
export both run."""
from .infra import PassContext, PassReport, PipelineReport, run_pipeline

DEFAULT_PIPELINE = []  # filled in as passes land (issue 2: detection and rewrite)

__all__ = ["DEFAULT_PIPELINE", "PassContext", "PassReport", "PipelineReport", "run_pipeline"]
