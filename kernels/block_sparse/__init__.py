"""Block-sparse flash-attention forward (bf16/fp16, INT8-QK, FP8) driven by a per-head block table."""
