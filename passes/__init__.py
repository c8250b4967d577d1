"""vsopt.passes: graph rewriting on ATen-level FX graphs, pure FX, runs on CPU.

One pass per module (see infra.py for the contract). DEFAULT_PIPELINE is the order compile and
export both run: find the attention sites, give them their video grid, rewrite each into
torch.ops.vsopt.attention. Passes that lower plans are appended after rewrite_attention."""
from . import cancel_permutations, detect_attention, infer_grid, lower_plan, rewrite_attention
from .infra import PassContext, PassReport, PipelineReport, run_pipeline

DEFAULT_PIPELINE = [
    detect_attention,
    infer_grid,
    rewrite_attention,
    lower_plan,
    cancel_permutations,
]

__all__ = ["DEFAULT_PIPELINE", "PassContext", "PassReport", "PipelineReport", "run_pipeline"]
