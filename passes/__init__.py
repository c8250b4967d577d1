"""vsopt.passes: graph rewriting on ATen-level FX graphs, pure FX, runs on CPU.

One pass per module (see infra.py for the contract). DEFAULT_PIPELINE is the order compile and
export both run: find the attention sites, give them their video grid, rewrite each into
torch.ops.vsopt.attention. Passes that lower plans are appended after rewrite_attention.
Under context parallelism, ring_attention lowers ring sites first and ulysses_heads gives each
rank the plan of its heads before lower_plan (docs/PARALLEL.md)."""
from . import (cancel_permutations, detect_attention, infer_grid, lower_plan, rewrite_attention, ring_attention,
               ulysses_heads)
from .infra import PassContext, PassReport, PipelineReport, run_pipeline

DEFAULT_PIPELINE = [
    ring_attention,
    detect_attention,
    infer_grid,
    rewrite_attention,
    ulysses_heads,
    lower_plan,
    cancel_permutations,
]

__all__ = ["DEFAULT_PIPELINE", "PassContext", "PassReport", "PipelineReport", "run_pipeline"]
