"""The kernel tests run the Triton kernels on CPU tensors in Triton's interpreter.

Triton decides at decoration time whether a @triton.jit function is interpreted, so the variable
is set here, before any test module imports the launchers (importing vsopt.core does not: its ops
import the launchers on first CUDA use only)."""
import os

os.environ["TRITON_INTERPRET"] = "1"
