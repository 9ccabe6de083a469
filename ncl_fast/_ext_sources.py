"""Where the extension's sources are and how to compile them; shared by
`setup.py` and the just-in-time build of `ncl_fast._cuda_ops`."""
from __future__ import annotations

import os
import shutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")

CPU_SOURCES = ["csrc/ops.cpp", "csrc/pc_bce_autograd.cpp", "csrc/cpu/pc_bce_cpu.cpp"]
CUDA_SOURCES = ["csrc/cuda/pc_bce_cuda.cu"]


def extension_config(cuda_home: str | None, absolute: bool = False) -> dict:
    """Sources, macros and flags; CUDA when torch is a CUDA build and nvcc exists."""
    import torch

    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
    if os.environ.get("NCL_FAST_FORCE_CPU", "0") == "1":
        with_cuda, why = False, "NCL_FAST_FORCE_CPU=1"
    elif torch.version.cuda is None:
        with_cuda, why = False, "torch is a CPU build"
    elif not nvcc or not (os.path.exists(nvcc) or shutil.which(nvcc)):
        with_cuda, why = False, "nvcc not found (set CUDA_HOME)"
    else:
        with_cuda, why = True, f"torch CUDA {torch.version.cuda}, nvcc at {nvcc}"
    sources = CPU_SOURCES + (CUDA_SOURCES if with_cuda else [])
    if absolute:
        sources = [os.path.join(ROOT, s) for s in sources]
    return {
        "with_cuda": with_cuda,
        "why": why,
        "sources": sources,
        "define_macros": [("NCL_FAST_WITH_CUDA", None)] if with_cuda else [],
        "cxx_flags": ["-O3"],  # the C++ standard is the one torch asks for
        # --use_fast_math is not used: exp/log1p feed a loss compared at 1e-5.
        "nvcc_flags": ["-O3", "-lineinfo"],
    }
