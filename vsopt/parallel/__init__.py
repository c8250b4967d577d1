"""vsopt under context parallelism (several GPUs): diffusers' ContextParallelConfig and xDiT.

The passes do the per-rank work (passes/ring_attention.py, passes/ulysses_heads.py); this package
holds what a user calls around them: `diffusers_cp` (make a diffusers model's context parallelism
compile into one graph, also on CPU processes) and `balance` (head balancing under Ulysses).
See docs/PARALLEL.md."""
