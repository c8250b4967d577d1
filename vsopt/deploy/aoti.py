"""aoti: an AOTInductor package (torch._inductor.aoti_compile_and_package) of the rewritten program.

On a GPU the package carries the Triton kernels: the block-sparse ops are torch.library.triton_ops
whose CUDA path launches through wrap_triton, so Inductor compiles the kernels into the package.
On the CPU the same ops' bodies take their PyTorch reference path (they branch on the device), so
Inductor decomposes them into plain ATen and compiles C++; the dense vsopt.attention and the token
permutations are opaque custom ops that the package calls back through torch's op registry, which
is why loading needs the ops registered (vsopt.deploy.load / register_ops do it).

Known: on torch 2.11 with CUDA (the H100 in November, the H200 on 2026-12-01) aoti_load_package
segfaults inside torch's own loader even for a plain two-layer MLP; the package still builds.
load_problem() says so for that combination, and the check loads in a subprocess so a crash is
reported, not fatal.
"""
from __future__ import annotations

from pathlib import Path

import torch

from vsopt.core.io import atomic_output

from .program import RewrittenProgram
from .progress import Report, step

KNOWN_CUDA_LOAD_CRASH = ("torch {version} with CUDA: aoti_load_package is known to segfault inside torch's loader "
                         "(even for a plain MLP; seen with torch 2.11 on H100 and H200); the package is built, "
                         "loading it may crash this process: load it in a separate process, or use torch >= 2.12")


def load_problem(device: torch.device) -> str | None:
    """A known reason loading a package on this device and torch may fail, or None."""
    if device.type == "cuda" and torch.__version__.startswith("2.11"):
        return KNOWN_CUDA_LOAD_CRASH.format(version=torch.__version__)
    return None


def write(prog: RewrittenProgram, path: Path, progress: Report | None = None) -> list[Path]:
    from torch._inductor import aoti_compile_and_package

    with step(progress, f"compiling the AOTInductor package on {prog.device.type} (a minute or more)"), \
            atomic_output(path) as tmp, torch.no_grad():
        aoti_compile_and_package(prog.program, package_path=str(tmp))
    return [path]


def load(path: str | Path):
    """The package as a callable (aoti_load_package)."""
    from . import register_ops

    register_ops()
    return torch._inductor.aoti_load_package(str(path))
