"""Every Triton kernel compiles ahead of time for sm_90 and sm_80 at the exact
arguments a training step passes, and no default variant spills registers
(`bench/kernel_report.py`; no GPU needed: Triton's own ptxas and cuobjdump). The
stored path's backward keeps two blocks per SM and loads S in 128-bit vectors."""
import os
import subprocess
import sys

import pytest

from helpers import ROOT

pytestmark = pytest.mark.slow


def test_kernels_compile_for_sm90_and_sm80_without_spills():
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.skip("Triton is not installed")
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        if "aot" in os.environ.get("NCL_FAST_REQUIRE", "").split(","):
            pytest.fail(f"NCL_FAST_REQUIRE lists aot, but Triton ships no ptxas at {ptxas}")
        pytest.skip("Triton's NVIDIA backend (ptxas) is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # stage 1 covers every kernel and variant (stage 2 differs only in runtime sizes)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "kernel_report.py"), "--stages", "stage 1", "--no-cuda-ext",
         "--load-lines", "_ncl_grad_kernel"],
        capture_output=True, text=True, env=env, timeout=1800,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "every kernel compiled; no spills" in out
    for kernel in ("_ncl_sim_kernel", "_ncl_grad_kernel", "_ncl_rows_kernel", "_patch_labels_fwd_kernel"):
        assert f"| {kernel} |" in out, kernel
    assert "| sm_90 |" in out and "| sm_80 |" in out
    # wgmma in the Hopper builds of both GEMM kernels, for every input dtype
    for line in out.splitlines():
        if line.startswith(("| _ncl_sim_kernel", "| _ncl_grad_kernel")) and "| sm_90 |" in line:
            assert "wgmma" in line, line
    # the backward: at least two resident blocks per SM (registers and shared memory),
    # on both architectures, in every variant
    header = next(line for line in out.splitlines() if line.startswith("| kernel |"))
    col = [c.strip() for c in header.strip("|").split("|")].index("blocks/SM")
    grad_rows = [line for line in out.splitlines()
                 if line.startswith("| _ncl_grad_kernel |") and ("| sm_90 |" in line or "| sm_80 |" in line)]
    assert len(grad_rows) == 12, grad_rows  # 3 dtypes x 2 layouts x 2 architectures
    for line in grad_rows:
        assert int(line.strip("|").split("|")[col].split()[0]) >= 2, line
    # ... and every load of S (its rows padded to 16 bytes) is a 128-bit load or a
    # 16-byte cp.async
    s_loads = [line for line in out.splitlines() if "tl.load(ws_b +" in line]
    assert len(s_loads) >= 24, s_loads  # both tiles of S, 12 variants
    for line in s_loads:
        assert " x ld.global.v4.b32 " in line or " x cp.async 16 B " in line, line
