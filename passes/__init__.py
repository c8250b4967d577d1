"""vsopt.passes: graph rewriting on ATen-level FX graphs, pure FX, runs on CPU.

One pass per module, each `run(gm, ctx) -> PassReport` (the contract, the typed PassContext and
the pass manager are in infra.py). DEFAULT_PIPELINE is the order compile and export both run:

    ring_attention       ring-parallel sites of a context-parallel engine -> vsopt.core.ring
                         (sub-tables per shard, LSE merge; docs/PARALLEL.md)
    detect_attention     find the attention sites (the rules in rules/), record their matches
    infer_grid           give each site its video grid (frames x height x width, text tokens)
    rewrite_attention    replace each match with torch.ops.vsopt.attention (the rule's rewrite)
    ulysses_heads        under head-parallel (Ulysses) attention, each rank's plan entry becomes the
                         slice of the heads it computes (docs/PARALLEL.md)
    lower_plan           planned sites -> token permutation + block-sparse attention launches
    cancel_permutations  keep token-wise ops between sites in the permuted order

run_pipeline(gm, ctx, DEFAULT_PIPELINE, PipelineOptions(check_each_pass=True, dump_dir=...))
checks the graph after every pass and writes it to a folder, one file per pass.
"""
from . import (cancel_permutations, detect_attention, infer_grid, lower_plan, rewrite_attention, ring_attention,
               ulysses_heads)
from .infra import PassContext, PassReport, PipelineOptions, PipelineReport, run_pipeline

DEFAULT_PIPELINE = [
    ring_attention,
    detect_attention,
    infer_grid,
    rewrite_attention,
    ulysses_heads,
    lower_plan,
    cancel_permutations,
]

__all__ = ["DEFAULT_PIPELINE", "PassContext", "PassReport", "PipelineOptions", "PipelineReport", "run_pipeline"]
