"""Fused quantization of attention inputs: per-block INT8 / FP8 (e4m3) with K smoothing."""
