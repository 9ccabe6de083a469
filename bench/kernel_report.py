"""Compile every GPU kernel of the project ahead of time, with no GPU, and report
what the compiler made of it: registers, spills, shared memory, stack frame, and
which matrix instructions the machine code uses (HGMMA = Hopper's wgmma, HMMA =
mma.sync, none = FFMA only), the global loads by width, and how many blocks of
each kernel fit on one multiprocessor (`blocks_per_sm`: registers, warps and
shared memory, as CUDA's occupancy calculator counts them).

* Triton kernels: the launchers of `ncl_fast.kernels` are run on CPU tensors of
  the exact shapes, dtypes and layouts a training step passes (the paper's stage
  1 and 2, fp32/bf16/fp16, contiguous and channels_last), with every kernel
  launch recorded instead of executed. Each recorded launch goes through
  Triton's own binder (so integer arguments equal to 1 and pointer alignment are
  specialized exactly as at run time), then `triton.compile` for the target
  (`GPUTarget("cuda", 90, 32)` and `("cuda", 80, 32)`). The PTX is assembled
  again with `ptxas -v` (`--gpu-name=sm_90a` for Hopper: Triton's PTX targets it)
  for the resource report, and the cubin is disassembled with the `cuobjdump`
  that Triton ships.
* The extension's CUDA kernels: `nvcc -Xptxas -v` for sm_80 and sm_90.

Variants: p = 8, 4 and 1 (the paper's stages 1 and 2, a ViT-B token map), fp32 (tf32x3 and
ieee dots), bf16 and fp16, contiguous and channels_last, sm_90 and sm_80 (`--subset`: the
representative variants of SUBSET, which tests/system/test_kernel_report.py compiles).

Run: python bench/kernel_report.py [--arch 90,80] [--subset] [--jobs N] [--no-cuda-ext] [--json out.json]
     [--load-lines KERNEL]
Exit status 1 if a kernel fails to compile or any variant spills (the test holds the
variants known to spill to their byte counts).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # real JIT functions, not the interpreter

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TRITON_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def tool(name: str) -> str:
    path = os.path.join(TRITON_BIN, name)
    if os.path.exists(path):
        return path
    found = shutil.which(name) or (os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", name))
    return found


# ---- recording launches ------------------------------------------------------------------


class Recorder:
    """Replaces `kernel[grid](...)` of every JIT function in the given modules with a recorder."""

    def __init__(self, modules):
        self.modules = modules
        self.launches: list[tuple[triton.runtime.jit.JITFunction, tuple, tuple, dict]] = []

    @contextlib.contextmanager
    def active(self):
        kernels = {
            id(obj): obj
            for mod in self.modules
            for obj in vars(mod).values()
            if isinstance(obj, triton.runtime.jit.JITFunction)
        }
        cls = triton.runtime.jit.JITFunction
        original = cls.__getitem__
        recorder = self

        def getitem(kernel, grid):
            if id(kernel) not in kernels:
                return original(kernel, grid)

            def launch(*args, **kwargs):
                recorder.launches.append((kernel, tuple(grid), args, kwargs))

            return launch

        cls.__getitem__ = getitem
        try:
            yield self
        finally:
            cls.__getitem__ = original


def compile_launch(kernel, args, kwargs, arch: int):
    """`triton.compile` of one recorded launch, specialized by Triton's own binder."""
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kw = dict(kwargs)
    kw.setdefault("debug", False)
    bound_args, specialization, options = binder(*args, **kw)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kw, bound_args, specialization, options)
    src = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(src, target=target, options=options.__dict__)


# ---- occupancy ---------------------------------------------------------------------------

# Per multiprocessor, sm_80 (A100) and sm_90 (H100/H200): 64K 32-bit registers in 4
# sub-partitions, allocated per warp in units of 256; at most 64 warps and 32 blocks;
# shared memory 164 KiB (sm_80) / 228 KiB (sm_90) at the largest carve-out, allocated
# per block in units of 128 B, plus 1 KiB the system reserves per block.
SM_REGS = 65536
SM_SUBPARTITIONS = 4
REG_UNIT = 256
SM_MAX_WARPS = 64
SM_MAX_BLOCKS = 32
SM_SMEM = {80: 164 * 1024, 90: 228 * 1024}
SMEM_RESERVED = 1024
SMEM_UNIT = 128


def blocks_per_sm(registers: int, warps: int, smem_bytes: int, arch: int) -> tuple[int, int, int]:
    """(resident blocks per SM, the registers' limit, the shared memory's limit) of a
    kernel using `registers` per thread, `warps` per block and `smem_bytes` of shared
    memory per block (cudaOccupancyMaxActiveBlocksPerMultiprocessor's arithmetic)."""
    per_warp = -(-max(registers, 1) * 32 // REG_UNIT) * REG_UNIT
    by_regs = (SM_REGS // SM_SUBPARTITIONS // per_warp) * SM_SUBPARTITIONS // warps
    per_block = -(-(smem_bytes + SMEM_RESERVED) // SMEM_UNIT) * SMEM_UNIT
    by_smem = SM_SMEM[arch] // per_block
    return min(by_regs, by_smem, SM_MAX_WARPS // warps, SM_MAX_BLOCKS), by_regs, by_smem


def occupancy_cell(registers: int, warps: int, smem_bytes: int, arch: int) -> str:
    n, by_regs, by_smem = blocks_per_sm(registers, warps, smem_bytes, arch)
    return f"{n} (regs {by_regs}, smem {by_smem})"


# ---- reading the machine code ------------------------------------------------------------

PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "smem_static": re.compile(r"(\d+) bytes smem"),
}


def ptxas_report(ptx: str, arch: int) -> dict:
    gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        open(src, "w").write(ptx)
        proc = subprocess.run([tool("ptxas"), "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    if proc.returncode:
        raise RuntimeError(f"ptxas failed: {text[-2000:]}")
    out = {}
    for key, rx in PTXAS_RE.items():
        m = rx.search(text)
        out[key] = int(m.group(1)) if m else 0
    return out


def sass_mma(cubin: bytes) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        open(path, "wb").write(cubin)
        proc = subprocess.run([tool("cuobjdump"), "-sass", path], capture_output=True, text=True)
    sass = proc.stdout
    return {
        "HGMMA": len(re.findall(r"\bHGMMA\b", sass)),
        "HMMA": len(re.findall(r"\bHMMA\b", sass)),
        "FFMA": len(re.findall(r"\bFFMA\b", sass)),
        "LDL/STL": len(re.findall(r"\b(?:LDL|STL)\b", sass)),
        # global loads by width: LDG.E.128 / .64 / 32-bit / 16- and 8-bit; LDGSTS = cp.async
        "LDG128": len(re.findall(r"\bLDG\.E(?:\.\w+)*\.128\b", sass)),
        "LDG64": len(re.findall(r"\bLDG\.E(?:\.\w+)*\.64\b", sass)),
        "LDG16": len(re.findall(r"\bLDG\.E(?:\.\w+)*\.(?:U16|S16|U8|S8)\b", sass)),
        "LDG": len(re.findall(r"\bLDG\.E\b", sass)),
        "LDGSTS": len(re.findall(r"\bLDGSTS\b", sass)),
        # cp.async by width: 16 B (.128), 8 B (.64), 4 B
        "LDGSTS128": len(re.findall(r"\bLDGSTS(?:\.\w+)*\.128\b", sass)),
        "LDGSTS64": len(re.findall(r"\bLDGSTS(?:\.\w+)*\.64\b", sass)),
    }


def ptx_loads_by_line(ptx: str, source: str) -> list[tuple[int, str, int]]:
    """(source line, PTX global load or cp.async with its width, count) from the PTX's
    `.loc` directives: the last one before the load, except that within an inline-asm
    block (where Triton emits one per operand, on successive lines) the first counts."""
    out: dict[tuple[int, str], int] = {}
    line, in_asm, asm_loc = 0, False, False
    name = os.path.basename(source)
    for text in ptx.splitlines():
        if "begin inline asm" in text or "end inline asm" in text:
            in_asm, asm_loc = "begin" in text, False
            continue
        m = re.search(r"\.loc\s.*//\s*([\w.]+):(\d+)", text)
        if m:
            if not asm_loc:
                line = int(m.group(2)) if m.group(1) == name else 0
            asm_loc = in_asm
            continue
        m = re.search(r"\b(ld\.global(?:\.\w+)*)|\bcp\.async\.c[ag]\.shared\.global\b.*,\s*(0x[0-9a-f]+)", text)
        if m:
            op = m.group(1) or f"cp.async {int(m.group(2), 16)} B"
            out[(line, op)] = out.get((line, op), 0) + 1
    return sorted((ln, op, n) for (ln, op), n in out.items())


# ---- the launches of a training step -----------------------------------------------------

# (C, h, p) of the feature map at 512 x 512 px: the paper's stages 1 and 2 (p = 8 and 4),
# and a ViT-B token map (p = 1: one token per patch, D = C)
STAGES = {"stage 1": (64, 256, 8), "stage 2": (256, 128, 4), "vit-b": (768, 32, 1)}
#: Input dtypes, with the fp32 dot precision where it is not the default (`dtype:precision`):
#: float32 runs tf32x3 (NCL_FAST_FP32_DOT_PRECISION's default), float32:ieee plain FFMA.
DTYPES = ("float32", "float32:ieee", "bfloat16", "float16")
#: Layouts, each with 32-bit offsets and with 64-bit ones ("+int64": the launches as the op makes
#: them for a map whose image spans past 2^31 elements, e.g. a permuted (C, B, h, w) buffer)
LAYOUTS = ("contiguous", "channels_last", "contiguous+int64", "channels_last+int64")
#: The variants the report covers unless told otherwise: every p (8, 4, 1), precision and layout.
DEFAULT_STAGES = tuple(STAGES)
#: A representative subset (`--subset`; tests/system/test_kernel_report.py): every kernel, every
#: p, every precision and both layouts at least once each, and the variants that spilled or
#: gathered scalars before (ieee at p = 1; fp32 and bf16 at p = 1 in NCHW).
SUBSET = (
    ("stage 1", "float32", "contiguous"),
    ("stage 1", "bfloat16", "channels_last"),
    ("stage 2", "float16", "contiguous"),
    ("stage 2", "float32:ieee", "channels_last"),
    ("vit-b", "float32:ieee", "contiguous"),
    ("vit-b", "float32", "contiguous"),
    ("vit-b", "bfloat16", "contiguous"),
    ("vit-b", "float16", "contiguous+int64"),
    ("stage 2", "bfloat16", "contiguous+int64"),
    ("stage 1", "float32:ieee", "channels_last+int64"),
)


def record_ncl_launches(stage: str, dtype: torch.dtype, layout: str, B: int = 4, precision: str = "") -> list:
    """Every Triton launch of one NCL forward + backward at the paper's shapes (fp32 dots at
    `precision`, default `NCL_FAST_FP32_DOT_PRECISION`)."""
    from ncl_fast.kernels import ncl_terms as kn
    from ncl_fast.kernels import patch_labels as kl

    if layout.endswith("+int64"):  # every launch with 64-bit offsets
        saved = kn.needs_64bit_offsets, kl.INT32_SPAN
        kn.needs_64bit_offsets, kl.INT32_SPAN = (lambda *tensors: True), 0
        try:
            return record_ncl_launches(stage, dtype, layout.removesuffix("+int64"), B, precision)
        finally:
            kn.needs_64bit_offsets, kl.INT32_SPAN = saved
    if precision:
        default, kn.FP32_DOT_PRECISION = kn.FP32_DOT_PRECISION, precision
        try:
            return record_ncl_launches(stage, dtype, layout, B)
        finally:
            kn.FP32_DOT_PRECISION = default
    C, h, p = STAGES[stage]
    L = (h // p) ** 2
    D = C * p * p
    mask = torch.zeros(B, 1, 512, 512)
    feat = torch.zeros(B, C, h, h, dtype=dtype)
    if layout == "channels_last":
        feat = feat.to(memory_format=torch.channels_last)
    a_pos = torch.zeros(B, D, dtype=dtype)
    a_neg = torch.zeros(B, D, dtype=dtype)
    labels = torch.zeros(B, L, dtype=torch.uint8)
    counts = torch.zeros(B, 3, dtype=torch.int32)
    perm = torch.zeros(B, L, dtype=torch.int32)
    rec = Recorder([kn, kl])
    with rec.active():
        kl.patch_labels_fwd(mask, (p * 512 // h, p * 512 // h), (h // p, h // p), 0.0)
        kl.patch_lists_fwd(labels)
        _, saved = kn.ncl_terms_fwd(feat, a_pos, a_neg, counts, perm, p, (h // p, h // p), 0.1)
        kn.ncl_terms_bwd(torch.ones(B, 3), feat, a_pos, a_neg, counts, perm, saved, p, (h // p, h // p), 0.1)
    # the bounded path runs only past the workspace cap (no image takes it at the default
    # cap): its kernels as a cap of 0 launches them, once each
    seen = {kernel.__name__ for kernel, *_ in rec.launches}
    budget, kn.SIM_BUDGET = kn.SIM_BUDGET, 0
    bounded = Recorder([kn, kl])
    try:
        with bounded.active():
            _, saved = kn.ncl_terms_fwd(feat, a_pos, a_neg, counts, perm, p, (h // p, h // p), 0.1)
            kn.ncl_terms_bwd(torch.ones(B, 3), feat, a_pos, a_neg, counts, perm, saved, p, (h // p, h // p), 0.1)
    finally:
        kn.SIM_BUDGET = budget
    return rec.launches + [launch for launch in bounded.launches if launch[0].__name__ not in seen]


#: The compile jobs of a run (filled before the worker processes fork, which read them by index).
_JOBS: list = []


def _compile_job(i: int) -> dict:
    """Compile job i for its architecture: the row of the table, its spill bytes, and the
    global loads by source line when asked."""
    kernel, args, kwargs, arch, variant, load_lines = _JOBS[i]
    out = {"kernel": kernel.__name__, "variant": variant, "arch": arch, "spills": 0, "error": "", "lines": []}
    try:
        ck = compile_launch(kernel, args, kwargs, arch)
        rep, mma = ptxas_report(ck.asm["ptx"], arch), sass_mma(ck.asm["cubin"])
    except Exception as err:  # report every failure, then fail
        out["error"] = f"{type(err).__name__}: {err}"[:2000]
        out["row"] = [kernel.__name__, variant, f"sm_{arch}", "FAILED", "", "", "", "", "", "", ""]
        return out
    out["spills"] = rep["spill_stores"] + rep["spill_loads"]
    md = ck.metadata
    matrix = ("wgmma" if mma["HGMMA"] else "mma.sync" if mma["HMMA"] else "-")
    cp_other = mma["LDGSTS"] - mma["LDGSTS128"] - mma["LDGSTS64"]
    out["row"] = [
        kernel.__name__, variant, f"sm_{arch}", rep["registers"],
        f"{rep['spill_stores']}/{rep['spill_loads']}", rep["stack"],
        f"{md.shared / 1024:.1f}", f"{md.num_warps}w x{md.num_stages}",
        occupancy_cell(rep["registers"], md.num_warps, md.shared + rep["smem_static"], arch),
        f"{matrix} ({mma['HGMMA']} HGMMA, {mma['HMMA']} HMMA, {mma['FFMA']} FFMA)",
        f"{mma['LDG128']}/{mma['LDG64']}/{mma['LDG']}/{mma['LDG16']}, "
        f"{mma['LDGSTS128']}/{mma['LDGSTS64']}/{cp_other}",
    ]
    if load_lines and load_lines in kernel.__name__:
        src = kernel.fn.__code__.co_filename
        lines = open(src).read().splitlines()
        out["lines"].append(f"{kernel.__name__} [{variant}] sm_{arch}: global loads by source line (PTX)")
        for ln, op, n in ptx_loads_by_line(ck.asm["ptx"], src):
            text = lines[ln - 1].strip()[:80] if 0 < ln <= len(lines) else "?"
            out["lines"].append(f"  {os.path.basename(src)}:{ln}: {n} x {op}   {text}")
    return out


def triton_rows(archs: list[int], only: str = "", variants=None, load_lines: str = "",
                jobs: int = 1) -> tuple[list[list], list[str], list[tuple]]:
    """Rows of the table, problems (failures and spills), and the spills as (kernel,
    variant, arch, bytes). `variants`: (stage, dtype[:precision], layout) triples."""
    variants = variants or [(s, d, lay) for s in DEFAULT_STAGES for d in DTYPES for lay in LAYOUTS]
    _JOBS.clear()
    from ncl_fast.kernels import ncl_terms as kn

    for stage, dname, layout in variants:
        dtype_name, _, precision = dname.partition(":")
        by_arch = []
        for arch in archs:
            # the launches as the op makes them on a device of this architecture (the grad
            # kernel's panel and the head kernel are for sm_90 only: ncl_terms._grad_panel,
            # _grad_head)
            default, kn.PANEL_CAPABILITY = kn.PANEL_CAPABILITY, arch // 10
            try:
                by_arch.append(record_ncl_launches(stage, getattr(torch, dtype_name), layout, precision=precision))
            finally:
                kn.PANEL_CAPABILITY = default
        # side by side by kernel (the head kernel runs on sm_90 only: the others in the same order)
        names = list(dict.fromkeys(k.__name__ for launches in by_arch for k, *_ in launches))
        for kname in names:
            same = [(arch, launch) for arch, launches in zip(archs, by_arch) for launch in launches
                    if launch[0].__name__ == kname]
            for arch, (kernel, grid, args, kwargs) in same:
                if only and not any(name in kernel.__name__ for name in only.split(",")):
                    continue
                _JOBS.append((kernel, args, kwargs, arch, f"{stage}, {dname}, {layout}", load_lines))
    if jobs > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            results = pool.map(_compile_job, range(len(_JOBS)), chunksize=1)
    else:
        results = [_compile_job(i) for i in range(len(_JOBS))]
    rows, problems, spills = [], [], []
    for r in results:
        rows.append(r["row"])
        for line in r["lines"]:
            print(line)
        if r["error"]:
            problems.append(f"{r['kernel']} [{r['variant']}] sm_{r['arch']}: {r['error']}")
        elif r["spills"]:
            problems.append(f"{r['kernel']} [{r['variant']}] sm_{r['arch']}: spills {r['spills']} B")
            spills.append((r["kernel"], r["variant"], f"sm_{r['arch']}", r["spills"]))
    return rows, problems, spills


def demangle(name: str) -> str:
    """`ncl_fast::(anonymous)::pc_loss_stats_kernel<float, bool>` from a mangled entry name."""
    filt = shutil.which("cu++filt") or shutil.which("c++filt") or "c++filt"
    try:
        out = subprocess.run([filt, name], capture_output=True, text=True).stdout.strip()
    except OSError:
        return name
    out = re.sub(r"\(anonymous namespace\)::", "", out or name)
    return re.sub(r"\(.*\)$", "", out)[:70]


def cuda_ext_rows(archs: list[int]) -> tuple[list[list], list[str], list[tuple]]:
    """`nvcc -Xptxas -v` over the extension's CUDA source."""
    from torch.utils import cpp_extension

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = os.path.join(root, "csrc", "cuda", "pc_bce_cuda.cu")
    nvcc = os.path.join(os.environ.get("CUDA_HOME") or "/usr/local/cuda", "bin", "nvcc")
    if not os.path.exists(nvcc):
        return [], [f"nvcc not found at {nvcc}: the extension's kernels were not compiled"], []
    includes = sum((["-I", p] for p in cpp_extension.include_paths(device_type="cuda")), [])
    # every kernel of the extension runs kTileW x kTileH threads per block
    text = open(src).read()
    threads = 1
    for dim in ("kTileW", "kTileH"):
        m = re.search(rf"constexpr int {dim} = (\d+);", text)
        threads *= int(m.group(1)) if m else 1
    rows, problems, spills = [], [], []
    for arch in archs:
        with tempfile.TemporaryDirectory() as tmp:
            # the flags of the real build (torch's BuildExtension adds COMMON_NVCC_FLAGS)
            cmd = [nvcc, "-c", src, "-o", os.path.join(tmp, "k.o"), "-O3", "-lineinfo",
                   f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v", "-std=c++20",
                   "-DNCL_FAST_WITH_CUDA", *cpp_extension.COMMON_NVCC_FLAGS, *includes,
                   f"-I{os.path.join(root, 'csrc')}"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            problems.append(f"nvcc sm_{arch}: {(proc.stdout + proc.stderr)[-1500:]}")
            continue
        current = None
        for line in (proc.stdout + proc.stderr).splitlines():
            m = re.search(r"Compiling entry function '(\w+)'", line)
            if m:
                current = demangle(m.group(1))
            m = re.search(r"Used (\d+) registers", line)
            if m and current:
                smem = re.search(r"(\d+) bytes smem", line)
                regs, static = int(m.group(1)), int(smem.group(1)) if smem else 0
                rows.append([current, f"sm_{arch}", regs, static,
                             occupancy_cell(regs, threads // 32, static, arch) if threads >= 32 else "?"])
            m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
            if m and current and (int(m.group(2)) or int(m.group(3))):
                problems.append(f"{current} sm_{arch}: spills {m.group(2)}/{m.group(3)} B")
                spills.append((current, "extension", f"sm_{arch}", int(m.group(2)) + int(m.group(3))))
    return rows, problems, spills


def main() -> None:
    from _harness import table

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="90,80")
    ap.add_argument("--no-cuda-ext", action="store_true")
    ap.add_argument("--json", default=None, help="also write the rows, problems and spills here")
    ap.add_argument("--kernels", default="", help="only kernels whose names contain one of these (comma-separated)")
    ap.add_argument("--stages", default=",".join(DEFAULT_STAGES), help=f"any of {', '.join(STAGES)}")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="float32[:ieee|tf32|tf32x3], bfloat16, float16")
    ap.add_argument("--subset", action="store_true", help="only the representative variants of SUBSET")
    ap.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    ap.add_argument("--no-work-model", action="store_true", help="leave out the work model's tables")
    ap.add_argument("--load-lines", default="",
                    help="also print the global loads of the kernels whose names contain this, by source line")
    args = ap.parse_args()
    archs = [int(a) for a in args.arch.split(",")]
    if args.subset:
        variants = list(SUBSET)
    else:
        variants = [(s, d, lay) for s in args.stages.split(",") for d in args.dtypes.split(",") for lay in LAYOUTS]
    print(f"Triton {triton.__version__}, torch {torch.__version__}; ptxas and cuobjdump from {TRITON_BIN}\n")
    rows, problems, spills = triton_rows(archs, args.kernels, variants, args.load_lines, args.jobs)
    print(table(["kernel", "variant", "arch", "registers", "spill st/ld B", "stack B", "smem KiB", "warps x stages",
                 "blocks/SM", "matrix instructions", "global loads 128/64/32/16-bit, cp.async 16/8/4 B"], rows))
    ext_rows = []
    if not args.no_cuda_ext:
        ext_rows, ext_problems, ext_spills = cuda_ext_rows(archs)
        problems += ext_problems
        spills += ext_spills
        print()
        print(table(["CUDA kernel (extension)", "arch", "registers", "static smem B",
                     "blocks/SM (static smem only)"], ext_rows))
    if not args.no_work_model:
        import work_model

        print("\nThe work model (bench/work_model.py) at the H200's peaks: "
              f"HBM {work_model.HBM_BW / 1e12:.1f} TB/s, L2 {work_model.L2_BW / 1e12:.1f} TB/s (a lead), "
              "multiply-adds/s " + ", ".join(f"{c} {r / 1e12:.1f} T" for c, r in work_model.MAC_RATE.items())
              + f", SFU {work_model.SFU_RATE / 1e12:.2f} T/s")
        for dname, esize, prec in work_model.DTYPES:
            for c in work_model.MASKS:
                print(f"\nWork of one NCL forward + backward, stage 1 (B = 4, L = 1024, D = 4096), {dname}, "
                      f"[|P|, |N|, |K|] = {list(c)} per image")
                print(work_model.report([c] * 4, 1024, 4096, esize, prec))
        print("\nEvery stage (B = 4, 512 x 512 px):")
        print(work_model.stage_table())
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"variants": [[st, d, lay, STAGES[st][2]] for st, d, lay in variants], "triton": rows,
                       "cuda": ext_rows, "problems": problems, "spills": spills}, f, indent=1)
    if problems:
        print("\nproblems:\n" + "\n".join(f"* {p}" for p in problems))
        sys.exit(1)
    print("\nevery kernel compiled; no spills")


if __name__ == "__main__":
    main()
