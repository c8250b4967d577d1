"""vsopt.kernels: Triton kernels, one folder per family (kernel.py: @triton.jit code; launch.py:
validation, allocation, grid; reference.py: pure PyTorch). Knows nothing of plans or graphs."""
