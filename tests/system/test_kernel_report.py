"""Every kernel compiles ahead of time for sm_90 and sm_80 at the exact arguments a
training step passes (`bench/kernel_report.py`; no GPU needed: Triton's own ptxas and
cuobjdump, and nvcc for the extension), with no spill beyond the known ones listed
here; the stored path's backward keeps two blocks per SM and loads G in 128-bit
vectors; the Hopper builds of the GEMMs use wgmma.

The variants: the report's representative subset (`--subset`: every kernel, p = 8, 4
and 1, fp32 tf32x3 and ieee, bf16, fp16, both layouts, 32-bit and 64-bit offsets, both
architectures). The whole set (every combination; about 11 minutes on 2 cores) runs
with NCL_FAST_KERNEL_REPORT=full."""
import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT

pytestmark = pytest.mark.slow

#: Spills known today, (kernel, variant, arch) -> spill bytes (stores + loads) as ptxas
#: reports them (bench/KERNEL_REPORT.md): a spill elsewhere, or a larger one, fails.
KNOWN_SPILLS: dict[tuple[str, str, str], int] = {
    # none today (the bounded kernels' spills went with their warps and stages: kernels/ncl_bounded.py)
}

#: Every Triton kernel of one NCL forward + backward (and the patch labels'), the bounded
#: path's as a cap of 0 launches them.
TRITON_KERNELS = ("_patch_labels_fwd_kernel", "_patch_lists_fwd_kernel", "_ncl_plan_kernel", "_ncl_stats_fwd_kernel",
                  "_ncl_sim_kernel", "_ncl_rows_kernel", "_ncl_pair_fwd_kernel", "_ncl_anchor_fwd_kernel",
                  "_ncl_coef_kernel", "_ncl_grad_kernel", "_ncl_pair_bwd_kernel", "_ncl_anchor_bwd_kernel",
                  "_ncl_anchor_grad_kernel")


def _report(tmp_path):
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.skip("Triton is not installed")
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        if "aot" in os.environ.get("NCL_FAST_REQUIRE", "").split(","):
            pytest.fail(f"NCL_FAST_REQUIRE lists aot, but Triton ships no ptxas at {ptxas}")
        pytest.skip("Triton's NVIDIA backend (ptxas) is not installed")
    full = os.environ.get("NCL_FAST_KERNEL_REPORT", "") == "full"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "report.json"
    cmd = [sys.executable, os.path.join(ROOT, "bench", "kernel_report.py"), "--json", str(out),
           "--load-lines", "_ncl_grad_kernel", "--jobs", "2"] + ([] if full else ["--subset"])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    assert out.exists(), (proc.stdout + proc.stderr)[-4000:]
    return proc, json.loads(out.read_text()), full


def test_kernels_compile_for_sm90_and_sm80_without_new_spills(tmp_path):
    proc, data, full = _report(tmp_path)
    text = proc.stdout + proc.stderr
    # nothing failed to compile (nvcc included); every spill is a known one, no larger
    failures = [p for p in data["problems"] if ": spills " not in p]
    assert not failures, failures
    for kernel, variant, arch, nbytes in data["spills"]:
        known = KNOWN_SPILLS.get((kernel, variant, arch))
        assert known is not None and nbytes <= known, f"{kernel} [{variant}] {arch} spills {nbytes} B (known: {known})"
    assert proc.returncode == (1 if data["spills"] else 0), text[-4000:]
    # every p, precision and layout, and (below) every kernel of each variant on both
    # architectures
    variants = data["variants"]
    assert len(variants) == (3 * 4 * 4 if full else 10)
    assert {p for *_, p in variants} == {8, 4, 1}
    assert {d for _, d, _, _ in variants} == {"float32", "float32:ieee", "bfloat16", "float16"}
    # both layouts, each with 32-bit and with 64-bit offsets (a map whose image spans past 2^31)
    assert {lay for _, _, lay, _ in variants} == {"contiguous", "channels_last", "contiguous+int64",
                                                  "channels_last+int64"}
    names = {f"{s}, {d}, {lay}" for s, d, lay, _ in variants}
    rows = {(r[0], r[1], r[2]): r for r in data["triton"]}
    for kernel in TRITON_KERNELS:
        for variant in names:
            for arch in ("sm_90", "sm_80"):
                assert (kernel, variant, arch) in rows, (kernel, variant, arch)
    assert {r[1] for r in data["cuda"]} == {"sm_90", "sm_80"}
    # wgmma in the Hopper builds of both GEMM kernels, for every input dtype
    # (ieee: the similarities run on FFMA, the backward's GEMM too)
    for (kernel, variant, arch), r in rows.items():
        if kernel in ("_ncl_sim_kernel", "_ncl_grad_kernel") and arch == "sm_90" and "ieee" not in variant:
            assert r[9].startswith("wgmma"), r
    # the backward: at least two resident blocks per SM (registers and shared memory),
    # on both architectures, in every variant
    grad = [r for (kernel, _, _), r in rows.items() if kernel == "_ncl_grad_kernel"]
    assert len(grad) == 2 * len(names)
    for r in grad:
        assert int(str(r[8]).split()[0]) >= 2, r
    # the head kernel (bf16 features, sm_90 only, 32-bit offsets: images with |P| <= 128): wgmma,
    # one block per SM (by design: up to 255 registers, its sums held across the tiles)
    head = [r for (kernel, _, _), r in rows.items() if kernel == "_ncl_grad_head_kernel"]
    assert sorted(r[1] for r in head) == sorted(n for n in names if "bfloat16" in n and "int64" not in n) and head
    assert {r[2] for r in head} == {"sm_90"}
    for r in head:
        assert r[9].startswith("wgmma") and int(str(r[8]).split()[0]) >= 1, r
    # ... and every load of G (fp32 G, or the half blocks Gc and Gr: rows padded to 16
    # bytes) is a 128-bit load or a 16-byte cp.async
    s_loads = [line for line in text.splitlines() if "tl.load(gc_b +" in line or "tl.load(gr_b +" in line]
    assert len(s_loads) >= 2 * len(grad), s_loads  # both tiles of G, every variant
    for line in s_loads:
        assert " x ld.global.v4.b32 " in line or " x cp.async 16 B " in line, line
