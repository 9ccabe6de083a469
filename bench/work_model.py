"""A work model of the NCL kernels that sees time: per launch, what the programs
execute, and a roofline time at the H200's peaks, against the floor.

Per launch (one function per kernel below, `_k_<kernel>`, written from the kernel's
own loops and masks, so that a redesigned kernel is one new function):

* programs launched, and programs that do work (past their early exits; a persistent
  program with at least one item of its work list, items dealt as the kernel does:
  program pid takes items pid, pid + programs, ..., the grid sized for `sms` SMs, and
  the similarity GEMM's split-K parts as `_ncl_plan_kernel` chooses them);
* multiply-adds by the instruction that runs them: `tl.dot` tiles as executed (padding
  included) at the rate of their class ("half": bf16/fp16 on the tensor cores,
  "tf32", "tf32x3": three tf32 products per multiply-add, "ieee": fp32 FFMA on the
  CUDA cores), plus the elementwise FMAs of the statistics and anchor kernels (`ffma`);
* transcendental evaluations (`sfu`): every lane of exp, log, sqrt and fp32 division
  (rcp) the programs evaluate, masked lanes and both branches of a `where` included
  (the GPU evaluates them, as the interpreter does); a scalar counts once;
* bytes: `loaded` (every load's active lanes), `hbm_read` (distinct bytes loaded: the
  first read of each byte comes from HBM, re-reads from L2, so `l2 = loaded - hbm_read`)
  and `stored` (written once each, to HBM).

The roofline time of a launch is the largest of: tensor-core time, CUDA-core FMA time,
SFU time, HBM time ((hbm_read + stored) / HBM_BW), L2 time ((loaded + stored) /
L2_BW) and the time of its heaviest program on one SM's share of those rates (a launch
cannot finish before its longest program). Launch overhead (`LAUNCH_S` per launch) is
reported apart ("launches excluded" in the targets). Nothing is zero-filled: the
similarity GEMM writes its blocks whole and the statistics pass zeros the rest of the
workspace; the coefficient buffer G is written before it is read. A path that no image
can take (from L and the slot) launches nothing.

The floor, per direction: the fewest bytes (forward: each used patch's features read
once; backward: read once, and the whole feature gradient written once) at HBM_BW,
or the floor's multiply-adds (D |P| (|P| + |N|) per image forward, twice that
backward) at the bf16 tensor-core rate, whichever is longer.

`tests/ops/test_work_model.py` checks every count of every Triton launch (programs,
programs with a tl.dot, tl.dot multiply-adds by class, transcendental lanes, bytes
loaded, distinct bytes loaded, bytes stored) against an instrumented interpreter run
of the real kernels; `ffma` is the model's alone. `python bench/work_model.py` prints
the tables; `bench/kernel_report.py` prints them too.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

# ---- H200 SXM peaks (sm_90), each with its source ---------------------------------------

#: Multiprocessors of the H100/H200 SXM (NVIDIA H100 datasheet; 132 read by PyTorch on the
#: H200 of this project's device machine, /work/.library/device/KINDS.md, 2026-10-28).
SMS = 132
#: HBM3e bandwidth, bytes/s: 4.8 TB/s (NVIDIA H200 datasheet). Measured here: about 4.3 TB/s
#: for a device-to-device copy (KINDS.md, 2026-10-28 and 2026-11-04).
HBM_BW = 4.8e12
#: L2 to the SMs, bytes/s: no datasheet figure. A lead: published microbenchmarks of the
#: H100 put it near 7 TB/s; a GPU run should measure it (a copy that fits in the 60 MB L2).
L2_BW = 7.0e12
#: Multiply-adds per second by instruction class (dense; a FLOP is half a multiply-add),
#: NVIDIA H100/H200 SXM datasheet: bf16/fp16 tensor cores 989.4 TFLOP/s, tf32 494.7, fp32
#: (FFMA on the CUDA cores) 66.9. tf32x3 runs three tf32 products per multiply-add.
#: Measured here: 788 TFLOP/s for an 8192^3 bf16 matmul on random data (KINDS.md).
MAC_RATE = {
    "half": 989.4e12 / 2,
    "tf32": 494.7e12 / 2,
    "tf32x3": 494.7e12 / 2 / 3,
    "ieee": 66.9e12 / 2,
}
TENSOR_CLASSES = ("half", "tf32", "tf32x3")
FFMA_RATE = 66.9e12 / 2
#: Transcendentals per second: 16 results per clock per SM for the 32-bit MUFU functions
#: (reciprocal, rsqrt, log2, exp2; CUDA C++ Programming Guide, "Arithmetic Instructions",
#: throughput table, compute capability 9.0), x 132 SMs x 1.98 GHz (the H100 SXM's boost
#: clock; 1980 MHz read on the device machine under load, KINDS.md). exp and log are one
#: MUFU op plus a multiply; a division or sqrt counts as one (its MUFU op; the Newton
#: steps around it run on the FMA pipes).
SFU_RATE = 16 * SMS * 1.98e9
#: Per-launch overhead, seconds: a lead (about 2 us between dependent launches of one
#: stream in eager PyTorch; less under CUDA graphs), reported apart, never in the roofline.
LAUNCH_S = 2e-6


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def ws_ld(p: int, n: int) -> int:
    """Row stride of an image's block in the workspace: |P| + |N| padded to 16 bytes."""
    from ncl_fast.kernels import ncl_terms as k

    align = k.WS_ALIGN.value  # a tl.constexpr
    return cdiv(p + n, align) * align


def g_ld(p: int, n: int) -> int:
    """Row stride of an image's half coefficient blocks Gc, Gr: |P| + |N| padded to 16 bytes."""
    from ncl_fast.kernels import ncl_stored as k

    align = k.G_ALIGN.value
    return cdiv(p + n, align) * align


def default_slot(L: int) -> int:
    """fp32 values of workspace per image, as `ncl_terms.workspace_slot` computes it."""
    from ncl_fast.kernels import ncl_terms as k

    return int(k.workspace_slot(L))


def chunks(D: int, bd: int) -> list[tuple[int, int]]:
    """(active width, how many) of the chunks of D that programs of width `bd` take."""
    n = cdiv(D, bd)
    last = D - (n - 1) * bd
    groups = [(bd, n - 1), (last, 1)] if last != bd else [(bd, n)]
    return [(w, c) for w, c in groups if c > 0]


# ---- counts ------------------------------------------------------------------------------


@dataclass
class Prog:
    """What one program executes (see the module docstring for each field)."""

    macs: dict = field(default_factory=dict)
    ffma: int = 0
    sfu: int = 0
    loaded: int = 0
    stored: int = 0

    def dot(self, cls: str, n: int) -> None:
        self.macs[cls] = self.macs.get(cls, 0) + n

    def time(self) -> float:
        """Seconds on one SM's share of every rate."""
        return SMS * max(
            sum(v / MAC_RATE[c] for c, v in self.macs.items() if c in TENSOR_CLASSES),
            (self.macs.get("ieee", 0) + self.ffma) / FFMA_RATE,
            self.sfu / SFU_RATE,
            (self.loaded + self.stored) / L2_BW,
        )


@dataclass
class Launch:
    kernel: str
    direction: str  # "fwd" or "bwd"
    programs: int = 0  # launched
    working: int = 0  # past their early exits: they do the kernel's work
    dot_programs: int = 0  # that execute at least one tl.dot
    macs: dict = field(default_factory=dict)  # tl.dot multiply-adds by class
    ffma: int = 0  # elementwise fp32 multiply-adds (model only)
    sfu: int = 0  # transcendental lanes
    loaded: int = 0  # bytes, every load's active lanes
    hbm_read: int = 0  # distinct bytes loaded
    stored: int = 0  # bytes
    crit_s: float = 0.0  # the heaviest program's time on one SM's share

    def add(self, prog: Prog, count: int = 1, working: bool = True) -> None:
        if count <= 0:
            return
        self.programs += count
        if working:
            self.working += count
            if prog.macs:
                self.dot_programs += count
        for c, v in prog.macs.items():
            self.macs[c] = self.macs.get(c, 0) + v * count
        self.ffma += prog.ffma * count
        self.sfu += prog.sfu * count
        self.loaded += prog.loaded * count
        self.stored += prog.stored * count
        self.crit_s = max(self.crit_s, prog.time())

    @property
    def dot_macs(self) -> int:
        return sum(self.macs.values())

    @property
    def l2(self) -> int:
        """Bytes re-read (from L2)."""
        return self.loaded - self.hbm_read

    def times(self) -> dict:
        return {
            "tensor": sum(v / MAC_RATE[c] for c, v in self.macs.items() if c in TENSOR_CLASSES),
            "fma": (self.macs.get("ieee", 0) + self.ffma) / FFMA_RATE,
            "sfu": self.sfu / SFU_RATE,
            "hbm": (self.hbm_read + self.stored) / HBM_BW,
            "l2": (self.loaded + self.stored) / L2_BW,
            "program": self.crit_s,
        }

    def time(self) -> float:
        """Roofline seconds of the launch (overhead excluded)."""
        return max(self.times().values())

    def bound(self) -> str:
        t = self.times()
        return max(t, key=t.get)


@dataclass
class Shape:
    """One NCL forward + backward: per image `(|P|, |N|, |K|)`, L patches of D values,
    features (and anchors, gradients) of `esize` bytes (`dtype` "fp32", "bf16" or "fp16";
    default: fp32 or bf16 by the size), fp32 dots at `precision`, persistent grids sized
    for `sms` multiprocessors."""

    counts: list
    L: int
    D: int
    esize: int
    precision: str = "tf32x3"
    slot: int | None = None  # fp32 values of workspace per image (default: the op's)
    sms: int = SMS
    dtype: str = ""
    patch: int = 8  # side of a patch in cells (default stage 1's): gathers at p = 1, the head kernel's chunk
    channels_last: bool = False

    def __post_init__(self):
        self.dtype = self.dtype or ("fp32" if self.esize == 4 else "bf16")

    @property
    def B(self) -> int:
        return len(self.counts)

    @property
    def up(self) -> bool:
        """fp32 operands (the kernels' UPCAST; the GPU's, not the interpreter's bf16 upcast)."""
        return self.dtype == "fp32"

    @property
    def sim_class(self) -> str:
        return self.precision if self.up else "half"

    @property
    def half_coef(self) -> bool:
        """`ncl_terms._half_coef` on the GPU: the backward's coefficients in the features' half
        type (`HALF_COEF_DTYPES`: bf16)."""
        import torch

        from ncl_fast.kernels import ncl_terms as k

        names = {torch.bfloat16: "bf16", torch.float16: "fp16"}
        return not self.up and self.dtype in {names.get(d) for d in k.HALF_COEF_DTYPES}

    @property
    def coef_class(self) -> str:
        """The stored backward's GEMMs: G x features (bf16: both in bf16; fp16: tf32)."""
        return self.precision if self.up else ("half" if self.half_coef else "tf32")

    @property
    def grad_tiles(self) -> dict:
        """`ncl_stored.grad_tiles`: the grad kernel's tiles, as the op launches them on the
        H200 (sm_90: `ncl_terms._grad_panel`)."""
        from ncl_fast.kernels import ncl_stored as k
        from ncl_fast.kernels import ncl_terms as t

        head = self.grad_head is not None
        panel = t.GRAD_PANEL if 9 in t.GRAD_PANEL_MAJORS and not head else 0
        return k.grad_tiles(self.up, self.half_coef, self.patch == 1 and not self.channels_last, panel,
                            narrow=head and self.patch < 8 and not self.channels_last)

    @property
    def grad_head(self) -> dict | None:
        """`ncl_stored.grad_head_tiles` where the op launches the head kernel on the H200
        (half coefficients, sm_90: `ncl_terms._grad_head`), else None."""
        from ncl_fast.kernels import ncl_stored as k
        from ncl_fast.kernels import ncl_terms as t

        if not (self.half_coef and 9 in t.GRAD_HEAD_MAJORS):
            return None
        return k.grad_head_tiles(self.patch, self.channels_last)

    @property
    def slot_(self) -> int:
        return default_slot(self.L) if self.slot is None else self.slot

    @property
    def log_b(self) -> int:
        return max(0, (self.B - 1).bit_length())

    @property
    def sim_tiles(self) -> tuple[int, int]:
        """`ncl_terms._sim_tiles`: rows and columns of a similarity item."""
        from ncl_fast.kernels import ncl_terms as k

        return k._sim_tiles(self.up)[:2]

    @property
    def sim_bk(self) -> int:
        """`ncl_terms._sim_bk`: the similarity GEMM's K chunk."""
        from ncl_fast.kernels import ncl_stored as k

        if self.up:
            return k.SIM_BK_F32 // 2 if self.precision == "ieee" else k.SIM_BK_F32
        return k.SIM_BK_HALF // 2 if self.patch == 1 and not self.channels_last else k.SIM_BK_HALF

    def paths(self) -> tuple[bool, bool]:
        """`ncl_terms._paths`: which paths are launched (from L and the slot alone)."""
        slot = self.slot_
        return slot > 0, slot <= 0 or slot < self.L * cdiv(self.L, 4) * 4

    def images(self):
        """Per image: (|P|, |N|, used, t1 defined, stored)."""
        slot = self.slot_
        for p, n, _ in self.counts:
            t1 = p >= 2 and n >= 1
            size = p * ws_ld(p, n) if t1 else 0
            yield p, n, p + n, t1, size <= slot and slot > 0

    def splits(self, p: int, n: int) -> int:
        """`_ncl_plan_kernel`: parts of D of an image's similarity GEMM."""
        from ncl_fast.kernels import ncl_stored as k

        u, slot = p + n, self.slot_
        size = p * ws_ld(p, n) if (p >= 2 and n >= 1) else 0
        n_k = cdiv(self.D, self.sim_bk)
        bm, bn = self.sim_tiles
        tiles = cdiv(p, bm) * cdiv(u, bn)
        target = cdiv(k.SIM_PER_SM * self.sms, self.B)
        s = min(max(cdiv(target, max(tiles, 1)), 1), k.SIM_SPLITS)
        s = max(min(s, slot // max(size, 1)), 1)
        s = min(s, n_k)
        return cdiv(n_k, cdiv(n_k, s))


def _rows(x0: int, block: int, hi: int) -> int:
    """Active rows of the tile [x0, x0 + block) below hi."""
    return max(0, min(block, hi - x0))


def _span(c0: int, block: int, lo: int, hi: int) -> int:
    """Columns of [c0, c0 + block) inside [lo, hi)."""
    return max(0, min(c0 + block, hi) - max(c0, lo))


class Work:
    """A work list (`_ncl_plan_kernel`'s prefix sums of one kind): the items of every
    image, the sched entries `_find_image`'s binary search reads, and the persistent
    programs' share (program pid runs items pid, pid + programs, ...)."""

    def __init__(self, s: Shape, per_image: list[int]):
        self.starts = [0]
        for c in per_image:
            self.starts.append(self.starts[-1] + c)
        self.B, self.log_b = s.B, s.log_b
        self.total = self.starts[-1]
        self.read = {self.B}  # sched[B]: the count, every program

    def find(self, t: int, start: bool = True) -> int:
        """The image of item t (`_find_image`), noting the entries read; `start`: the kernel
        then reads the image's own start."""
        lo, hi = 0, self.B
        for _ in range(self.log_b):
            mid = (lo + hi) // 2
            self.read.add(mid)
            if self.starts[mid] <= t:
                lo = mid
            else:
                hi = mid
        if start:
            self.read.add(lo)
        return lo

    @property
    def hbm(self) -> int:
        return 4 * len(self.read)


def _persistent(out: "Launch", items: list[Prog], programs: int) -> None:
    """Programs of a persistent launch, each loading the count (4 bytes), then its items."""
    for pid in range(programs):
        g = Prog(loaded=4)
        mine = items[pid::programs]
        for it in mine:
            g.loaded += it.loaded
            g.stored += it.stored
            g.sfu += it.sfu
            g.ffma += it.ffma
            for c, v in it.macs.items():
                g.dot(c, v)
        out.add(g, working=bool(mine))


def _persistent_programs(s: Shape, per_sm: int, upper: int) -> int:
    return max(1, min(upper, per_sm * s.sms))


# ---- one function per kernel ------------------------------------------------------------


def _k_plan(s: Shape) -> Launch:
    """One program: the plan (B x 3 int64) and seven work lists (7 x (B + 1) int32)."""
    out = Launch("_ncl_plan_kernel", "fwd")
    out.add(Prog(loaded=8 * s.B, stored=7 * 4 + 3 * 8 * s.B + 7 * 4 * s.B))
    out.hbm_read += 8 * s.B
    return out


def _k_stats_fwd(s: Shape) -> Launch:
    from ncl_fast.kernels import ncl_anchors as k

    bx, zb, L, D = k.STATS_BX, k.STATS_ZB, s.L, s.D
    sim = s.paths()[0]  # the similarity GEMM ran: its images' sums are added here
    out = Launch("_ncl_stats_fwd_kernel", "fwd")
    slot, nprog = s.slot_, cdiv(L, bx)
    for b, (p, n, u, t1, st) in enumerate(s.images()):
        done = sim and t1 and st
        splits = s.splits(p, n) if done else 0
        # the workspace's zeros: the slot past the image's blocks (the last image: at least one value)
        lo, hi = (splits * p * ws_ld(p, n) if done else 0), (1 if b == s.B - 1 and slot == 0 else slot)
        for pid in range(nprog):
            x0 = pid * bx
            lanes = _rows(x0, bx, L)
            g = Prog(loaded=8, stored=3 * 4 * lanes)  # counts; nrm, s(a+), s(a-) (zeros past the lists)
            g.loaded += (8 if sim and t1 else 0) + (8 if done else 0)  # the plan's stored flag, splits
            g.stored += sum(4 * min(zb, hi - z0) for z0 in range(lo + pid * zb, hi, nprog * zb))
            g.stored += 2 * 4 * sum(1 for x in range(x0, x0 + lanes) if not (t1 and x < p))  # lam, W zeros
            if pid == 0:
                g.stored += 8  # the anchors' norms
            elif x0 >= u:
                out.add(g, working=False)
                continue
            cnt = _rows(x0, bx, u)
            if done:  # the parts' sums: 3 values per patch and 2 per part
                g.loaded += splits * (3 * 4 * cnt + 2 * 4)
                g.ffma += splits * (3 * bx + 2)
            else:
                g.loaded += cnt * 4 + cnt * D * s.esize + 2 * D * s.esize  # perm, features, both anchors
                g.ffma += 3 * bx * D + 2 * D
            g.sfu += 2 * bx + 4  # sqrt and 1/x per patch; the anchors' sqrt and 1/x
            out.add(g)
        out.hbm_read += 8 + (8 if sim and t1 else 0)
        if done:
            out.hbm_read += 8 + splits * (3 * 4 * u + 2 * 4)
        else:
            out.hbm_read += 4 * u + u * D * s.esize + 2 * D * s.esize
    return out


def _k_sim(s: Shape) -> Launch | None:
    from ncl_fast.kernels import ncl_stored as k

    if not s.paths()[0]:
        return None
    (bm, bn), bk, D = s.sim_tiles, s.sim_bk, s.D
    out = Launch("_ncl_sim_kernel", "fwd")
    imgs = list(s.images())
    per = [cdiv(p, bm) * cdiv(u, bn) * s.splits(p, n) if (t1 and st) else 0 for p, n, u, t1, st in imgs]
    work = Work(s, per)
    items = []
    for t in range(work.total):
        b = work.find(t)
        p, n, u, _, _ = imgs[b]
        splits, n_tn = s.splits(p, n), cdiv(u, bn)
        local = t - work.starts[b]
        n_tiles = cdiv(p, bm) * n_tn
        ks, tile = divmod(local, n_tiles)
        tm, tn = divmod(tile, n_tn)
        chunk = cdiv(cdiv(D, splits), bk) * bk
        k_lo, k_hi = ks * chunk, min(ks * chunk + chunk, D)
        kw = k_hi - k_lo
        rv, cv = _rows(tm * bm, bm, p), _rows(tn * bn, bn, u)
        # the binary search, the image's start, counts, splits; perm; the features and both
        # anchors' values; the offset; the block's rows, padding columns included
        g = Prog(loaded=4 * s.log_b + 4 + 8 + 8 + 4 * (rv + cv) + (rv + cv + 2) * kw * s.esize + 8,
                 stored=4 * rv * _rows(tn * bn, bn, ws_ld(p, n)))
        g.ffma += 3 * bn * cdiv(kw, bk) * bk + 2 * cdiv(kw, bk) * bk  # the columns' statistics
        if tm == 0:  # the columns' statistics of the part (and the anchors' norms: first column tile)
            g.stored += 3 * 4 * cv + (8 if tn == 0 else 0)
        g.dot(s.sim_class, bm * bn * cdiv(kw, bk) * bk)
        items.append(g)
    _persistent(out, items, _persistent_programs(s, k.SIM_PER_SM, s.B * cdiv(s.L, bm) * cdiv(s.L, bn) * k.SIM_SPLITS))
    for (p, n, u, t1, st), c in zip(imgs, per):
        if c:  # counts, plan; perm, features, anchors
            out.hbm_read += 8 + 16 + 4 * u + u * D * s.esize + 2 * D * s.esize
    out.hbm_read += work.hbm
    return out


def _k_rows(s: Shape) -> Launch | None:
    from ncl_fast.kernels import ncl_stored as k

    if not s.paths()[0]:
        return None
    bm, bc = k.ROWS_BM, k.ROWS_BC
    out = Launch("_ncl_rows_kernel", "fwd")
    imgs = list(s.images())
    per = [cdiv(p, bm) if (t1 and st) else 0 for p, n, u, t1, st in imgs]
    work = Work(s, per)
    items = []
    for t in range(work.total):
        b = work.find(t)
        p, n, u, _, _ = imgs[b]
        splits, ld = s.splits(p, n), ws_ld(p, n)
        blk = t - work.starts[b]
        rv = _rows(blk * bm, bm, p)
        # ...; the offset; the rows' norms (and their 1/x); log
        g = Prog(loaded=4 * s.log_b + 4 + 8 + 8 + 8 + 4 * rv, stored=8 * rv + 4, sfu=2 * bm)
        for c0 in range(p // 4 * 4, u, bc):  # 1. the online log-sum-exp over N (S written normalized)
            g.loaded += 4 * rv * _span(c0, bc, 0, ld) * splits + 4 * _span(c0, bc, 0, u)
            g.stored += 4 * rv * _span(c0, bc, p, u)
            g.sfu += bm + bc + bm * bc
        for c0 in range(0, p, bc):  # 2. softplus (exp, log) and sigmoid (exp, 1/x), every lane
            g.loaded += 4 * rv * _span(c0, bc, 0, ld) * splits + 4 * _span(c0, bc, 0, p)
            g.stored += 4 * rv * _span(c0, bc, 0, p)
            g.sfu += bc + 4 * bm * bc
        items.append(g)
    _persistent(out, items, _persistent_programs(s, k.ROWS_PER_SM, s.B * cdiv(s.L, bm)))
    for (p, n, u, t1, st), c in zip(imgs, per):
        if c:
            out.hbm_read += 8 + 16 + 4 * s.splits(p, n) * p * ws_ld(p, n) + 4 * u
    out.hbm_read += work.hbm
    return out


def _k_pair_fwd(s: Shape) -> Launch | None:
    from ncl_fast.kernels import ncl_bounded as k

    if not s.paths()[1]:
        return None
    bm, bn, D = k.BLOCK_M, k.BLOCK_N, s.D
    bk = (k.BLOCK_K_F32_IEEE if s.precision == "ieee" else k.BLOCK_K_F32_BOUNDED) if s.up else k.BLOCK_K
    out = Launch("_ncl_pair_fwd_kernel", "fwd")
    imgs = list(s.images())
    per = [cdiv(p, bm) if (t1 and not st) else 0 for p, n, u, t1, st in imgs]
    work = Work(s, per)
    for t in range(s.B * cdiv(s.L, bm)):
        if t >= work.total:
            out.add(Prog(loaded=4), working=False)
            continue
        b = work.find(t)
        p, n, u, _, _ = imgs[b]
        rv = _rows((t - work.starts[b]) * bm, bm, p)
        g = Prog(loaded=4 + 4 * s.log_b + 4 + 8 + 8 * rv, stored=8 * rv + 4, sfu=bm + bm)  # 1/|f_m|; log
        for lo, hi, per_tile in ((p, u, bm * bn + bm), (0, p, 4 * bm * bn)):
            for c0 in range(lo, hi, bn):
                cv = _rows(c0, bn, hi)
                g.loaded += 8 * cv + (rv + cv) * D * s.esize
                g.sfu += bn + per_tile
                g.dot(s.sim_class, bm * bn * cdiv(D, bk) * bk)
        out.add(g)
    for (p, n, u, t1, st), c in zip(imgs, per):
        if c:
            out.hbm_read += 8 + 8 * u + u * D * s.esize
    out.hbm_read += work.hbm
    return out


def _k_anchor_fwd(s: Shape) -> Launch:
    from ncl_fast.kernels import ncl_bounded as kb
    from ncl_fast.kernels import ncl_stored as ks

    blk = 256
    bounded = s.paths()[1]
    out = Launch("_ncl_anchor_fwd_kernel", "fwd")
    for p, n, u, t1, st in s.images():
        n_s = cdiv(p, ks.ROWS_BM) if (t1 and st) else 0
        n_b = cdiv(p, kb.BLOCK_M) if (t1 and not st and bounded) else 0
        for which, (neg, pos) in enumerate(((n, p), (p, n))):
            g = Prog(loaded=12 + 4 * (neg + pos), stored=12, sfu=1 + 1)  # log of the sum; the mean's 1/x
            g.sfu += cdiv(neg, blk) * 2 * blk + blk + cdiv(pos, blk) * 4 * blk
            if which == 0:  # t1 from the row blocks' sums: counts, the plan's flag (twice), the sums
                g.loaded += 12 + 16 + 4 * (n_s + n_b)
                g.stored += 4
                g.sfu += 1
            out.add(g)
        out.hbm_read += 12 + 8 + 2 * 4 * u + 4 * (n_s + n_b)
    return out


def _row_setup(g: Prog, bx: int, xv: int, rp_t1: int) -> None:
    """ncl_common._row_setup: counts, g, |f_x|, lam_x, W_x, s(a+-, x), lam+-, W+-."""
    g.loaded += 24 + 4 * xv + 8 * rp_t1 + 8 * xv + 16
    g.sfu += 3 + 6 * bx  # k1, k2, k3; both anchors' coefficients (sigmoid and exp, every lane)


def _grad_out(g: Prog, bx: int, bd: int, kw: int, esize: int) -> None:
    """ncl_common._grad_out: both anchors' chunks and norms; 1/|a+-|, 1/|f_x|."""
    g.loaded += 2 * kw * esize + 8
    g.sfu += 2 * bd + bx


def _k_coef(s: Shape) -> Launch | None:
    from ncl_fast.kernels import ncl_stored as k

    if not s.paths()[0]:
        return None
    bm, bn, half = k.COEF_BM, k.COEF_BN, s.half_coef
    out = Launch("_ncl_coef_kernel", "bwd")
    imgs = list(s.images())
    per = [cdiv(p, bm) * cdiv(u, bn) if (t1 and st) else 0 for p, n, u, t1, st in imgs]
    work = Work(s, per)
    items = []
    for t in range(work.total):
        b = work.find(t)
        p, n, u, _, _ = imgs[b]
        tm, tn = divmod(t - work.starts[b], cdiv(u, bn))
        rv, cl, cu = _rows(tm * bm, bm, p), _span(tn * bn, bn, 0, ws_ld(p, n)), _span(tn * bn, bn, 0, u)
        # the search, start, counts, the blocks' offset (twice for fp32 G); S; lam, W
        g = Prog(loaded=4 * s.log_b + 4 + 8 + (8 if half else 16) + 4 * rv * cl + 8 * rv,
                 stored=4 * rv + 4 * cu)
        g.sfu += bm * bn * (1 if tn * bn >= p else 2)  # one exp per element; 1/x on tiles with tampered columns
        if half:  # 1/|f| of the rows and columns; Gc and Gr, padded to their rows' stride
            g.loaded += 4 * rv + 4 * cu
            g.sfu += bm + bn
            g.stored += 2 * 2 * rv * _span(tn * bn, bn, 0, g_ld(p, n))
        else:
            g.stored += 4 * rv * cl
        items.append(g)
    _persistent(out, items, _persistent_programs(s, k.COEF_PER_SM, s.B * cdiv(s.L, bn) * cdiv(s.L, bm)))
    for (p, n, u, t1, st), c in zip(imgs, per):
        if c:
            out.hbm_read += 8 + 8 + 4 * p * ws_ld(p, n) + 8 * p + (4 * u if half else 0)
    out.hbm_read += work.hbm
    return out


def _k_grad(s: Shape) -> Launch | None:
    """The backward GEMMs over the items (row group, listed image, chunk of D) of the stored
    images the head kernel leaves (all of them where it does not run): beside the head
    kernel, persistent programs (GRAD_PER_SM per SM: program pid takes items pid, pid +
    programs, ...); else a grid of every image's items (program pid takes item pid). Items are not
    balanced: a tile of tampered rows runs K = 2|P| + |N| partners, the others |P|; the
    order puts them first. The launch's `program` time (the heaviest program on one SM's
    share) is what would show a binding one. An item takes GROUP row tiles (tx = r, r +
    n_grp, ...) and, with PANEL > 0 (bf16 on sm_90), loads the tampered partners' features
    once for them where |P| <= PANEL."""
    from ncl_fast.kernels import ncl_stored as k

    stored_any = s.paths()[0]
    if not stored_any:
        return None
    tiles, half = s.grad_tiles, s.half_coef
    bx, by, bd, cm, cn, L, D = tiles["BX"], tiles["BY"], tiles["BD"], k.COEF_BM, k.COEF_BN, s.L, s.D
    group, panel = tiles["GROUP"], tiles["PANEL"]
    n_tx = cdiv(L, bx)
    n_grp = cdiv(n_tx, group)
    e = s.esize
    # G: fp32 in S's layout, scaled by 1/|f| in the K loops (the partners' norms loaded there),
    # or Gc and Gr in the features' half type, already scaled
    ge, nb = (e, 0) if half else (4, 4)
    out = Launch("_ncl_grad_kernel", "bwd")
    head = s.grad_head["HEAD"] if s.grad_head else 0
    imgs = list(s.images())
    # the work list (_ncl_plan_kernel's kind 5, or 6 beside the head kernel): the stored images
    # the head kernel leaves, 1 each
    listed = [int(st and not (head and p <= head)) for p, n, u, t1, st in imgs]
    work = Work(s, listed)
    n_td = cdiv(D, bd)
    items = []
    for t in range(n_grp * work.total * n_td):  # row group (slowest), listed image, chunk of D
        td, rest = t % n_td, t // n_td
        b = work.find(rest % work.total, start=False)
        r = rest // work.total
        p, n, u, t1, st = imgs[b]
        ld = g_ld(p, n) if half else ws_ld(p, n)
        on_pan = bool(panel) and t1 and p <= panel
        kw = min(bd, D - td * bd)

        def one(x0: int, kw: int, first: bool) -> tuple[Prog, bool]:
            """One row tile's share of its program (past the program's counts), and whether it works."""
            gi = _rows(x0, bx, L)
            if x0 >= u:  # contour patches only (or past the map: every lane masked off): zeros
                return Prog(loaded=4 * gi, stored=gi * kw * e), False
            xv, rp = _rows(x0, bx, u), _rows(x0, bx, p)
            g = Prog(loaded=4 * gi, stored=gi * kw * e)  # the store's perm
            if t1:
                g.loaded += (0 if half else 8) + 4  # the block's offset (fp32 G); g1
                g.sfu += 1
                if x0 < p:  # 1. row x of G, every partner in P u N
                    for y0 in range(0, u, by):
                        cv = _rows(y0, by, u)
                        g.loaded += ge * rp * _span(y0, by, 0, ld) + (4 + nb) * cv + cv * kw * e
                        g.sfu += by if nb else 0
                        g.dot(s.coef_class, bx * by * bd)
                if on_pan:  # 2. column x of G against the panel: one [BX, PANEL] @ [PANEL, BD] product
                    g.loaded += ge * p * _span(x0, bx, 0, ld)
                    g.dot(s.coef_class, bx * panel * bd)
                else:
                    for m0 in range(0, p, by):  # 2. column x of G, every partner in P, streamed
                        mv = _rows(m0, by, p)
                        g.loaded += ge * mv * _span(x0, bx, 0, ld) + (4 + nb) * mv + mv * kw * e
                        g.sfu += by if nb else 0
                        g.dot(s.coef_class, bx * by * bd)
                g.loaded += 4 * rp * cdiv(u, cn) + 4 * xv * cdiv(p, cm)  # the partial dot sums
            _row_setup(g, bx, xv, rp if t1 else 0)
            g.loaded += 4 * xv + xv * kw * e  # f_x
            # the anchors' sums over the tile (ncl_common._anchor_parts): 1/|f_x|, both
            # rows of the product out; the first chunk's programs also load s(a+-, x) and
            # store the dots
            g.sfu += bx
            # a [16, x] @ [x, D] product: fp32 features at their precision; fp16 (fp32
            # coefficients) in tf32; bf16 (half coefficients) in bf16
            g.dot(s.precision if s.up else ("half" if half else "tf32"), 16 * bx * bd)
            g.stored += 2 * kw * 4
            _grad_out(g, bx, bd, kw, e)
            if first:
                g.loaded += 8 * xv
                g.stored += 8
            return g, True

        g = Prog(loaded=4 * s.log_b + 8)  # the binary search; counts
        if on_pan and r * bx < u:  # the panel (for a group with a listed patch): perm, features
            g.loaded += 4 * p + p * kw * e
        for gi in range(group):
            x, _ = one((r + gi * n_grp) * bx, kw, td == 0)
            g.loaded += x.loaded
            g.stored += x.stored
            g.sfu += x.sfu
            for c, v in x.macs.items():
                g.dot(c, v)
        items.append(g)
    # persistent programs beside the head kernel; else a grid of every image's items
    n_items = n_grp * s.B * n_td
    _persistent(out, items, _persistent_programs(s, k.GRAD_PER_SM, n_items) if head else n_items)
    out.hbm_read += work.hbm
    for (p, n, u, t1, st), on in zip(imgs, listed):
        if on:
            ld = g_ld(p, n) if half else ws_ld(p, n)
            out.hbm_read += 4 * L + (8 if u == 0 else 12 + 12 + 16 + 8 + 4 * u + 8 * u + u * D * e + 2 * D * e)
            if t1:  # (the blocks' offset,) lam and W of P, G (Gc and Gr), the partial sums
                out.hbm_read += (2 * ge * p * ld if half else 8 + 4 * p * ld) + 8 * p
                out.hbm_read += 4 * p * cdiv(u, cn) + 4 * u * cdiv(p, cm)
    return out


def _k_grad_head(s: Shape) -> Launch | None:
    """The head kernel (half coefficients on sm_90, images with |P| <= HEAD): one program per
    (image, chunk of D) over every listed patch in tiles of HEAD / 2 rows: per tile, Gc[P, x]
    feeds the row GEMM's sums ([HEAD, x] @ [x, D]) and the tile's column GEMM ([x, HEAD] @
    [HEAD, D], against the tampered features loaded once a program), then the tile's epilogue;
    the two tiles of rows [0, HEAD) come last (tile 1's G and features loaded twice). The
    dots run in every image's programs (on zeros where t1 is undefined: its G loads are
    masked off)."""
    stored_any, check = s.paths()
    tiles = s.grad_head
    if not stored_any or tiles is None:
        return None
    head, bd, L, D, e = tiles["HEAD"], tiles["BD"], s.L, s.D, s.esize
    xb = head // 2
    cm, cn = k_coef_tiles()
    flag = 8 if check else 0
    out = Launch("_ncl_grad_head_kernel", "bwd")
    for p, n, u, t1, st in s.images():
        if not st or p > head:  # the bounded path's image (the flag), or the grouped kernel's (|P|)
            skip = flag + (4 if st else 0)
            for kw, reps in chunks(D, bd):
                out.add(Prog(loaded=skip), reps, working=False)
            out.hbm_read += skip
            continue
        ld = g_ld(p, n)
        n_t = cdiv(u, xb)
        pm = p if t1 else 0  # the tampered rows G and the panel load
        for ci, (kw, reps) in enumerate(chunks(D, bd)):
            for first in ([True, False] if ci == 0 else [False]):
                count = 1 if first else reps - int(ci == 0)
                # the flag; |P|, |N|; the panel (perm, |f_m|, features); g1
                g = Prog(loaded=flag + 8 + pm * (4 + 4 + kw * e) + 4)
                g.sfu += head + 1  # 1 / |f_m|; k1

                def pdot(x0: int) -> None:  # the partial dot sums
                    if t1:
                        g.loaded += 4 * _rows(x0, xb, p) * cdiv(u, cn) + 4 * _rows(x0, xb, u) * cdiv(p, cm)

                def fx(x0: int) -> None:  # perm and features of the tile's listed patches
                    xv = _rows(x0, xb, u)
                    g.loaded += 4 * xv + xv * kw * e

                def rows_gemm(x0: int) -> None:  # Gc[P, x] (columns below ld); [HEAD, x] @ [x, D]
                    g.loaded += e * pm * _span(x0, xb, 0, ld)
                    g.dot("half", head * xb * bd)

                def col(x0: int) -> None:  # Gc[P, x] again where asked; |f_x|; [x, HEAD] @ [HEAD, D]
                    g.loaded += 4 * _rows(x0, xb, u)
                    g.dot("half", xb * head * bd)

                def epilogue(x0: int) -> None:
                    xv, rp = _rows(x0, xb, u), _rows(x0, xb, p)
                    _row_setup(g, xb, xv, rp if t1 else 0)
                    _grad_out(g, xb, bd, kw, e)
                    gi = _rows(x0, xb, L)
                    g.loaded += 4 * gi  # the store's perm
                    g.stored += gi * kw * e
                    # the anchors' sums (ncl_common._anchor_parts): 1/|f_x|, a [16, x] @ [x, D]
                    # product, rows 0 and 1 stored; the first chunk also s(a+-, x) and the dots
                    g.sfu += xb
                    g.dot("half", 16 * xb * bd)
                    g.stored += 2 * kw * 4
                    if first:
                        g.loaded += 8 * xv
                        g.stored += 8

                for tx in range(n_t - 1, 1, -1):  # 1. the tiles past the head's rows
                    pdot(tx * xb)
                    fx(tx * xb)
                    rows_gemm(tx * xb)
                    col(tx * xb)
                    epilogue(tx * xb)
                fx(xb)  # 2. tile 1's share of the sums; tile 0; tile 1
                rows_gemm(xb)
                fx(0)
                rows_gemm(0)
                col(0)
                pdot(0)
                epilogue(0)
                if u > xb:
                    fx(xb)
                    g.loaded += e * pm * _span(xb, xb, 0, ld)
                    col(xb)
                    pdot(xb)
                    epilogue(xb)
                for x0 in range(max(n_t, 1) * xb, L, xb):  # 3. contour patches: zeros
                    gi = _rows(x0, xb, L)
                    g.loaded += 4 * gi
                    g.stored += gi * kw * e
                out.add(g, count)
        # the flag; |P|, |N|, |K|, g, lam+-, W+-, |a+-|; perm (every cell's, for the stores); |f_x|, s(a+-, x)
        out.hbm_read += flag + 12 + 12 + 16 + 8 + 4 * L + 4 * u + 8 * u + u * D * e + 2 * D * e
        if t1:  # lam and W of P; Gc; the partial sums
            out.hbm_read += 8 * p + e * p * ld + 4 * p * cdiv(u, cn) + 4 * u * cdiv(p, cm)
    return out


def k_coef_tiles() -> tuple[int, int]:
    """(COEF_BM, COEF_BN): the coefficient pass's tiles, whose partial sums the backward adds."""
    from ncl_fast.kernels import ncl_stored as k

    return k.COEF_BM, k.COEF_BN


def _k_pair_bwd(s: Shape) -> Launch | None:
    from ncl_fast.kernels import ncl_bounded as k

    if not s.paths()[1]:
        return None
    bx, bn, L, D, e = k.BLOCK_M, k.BLOCK_N, s.L, s.D, s.esize
    bd = k.BLOCK_D_F32_BOUNDED if s.up else k.BLOCK_D
    bk = (k.BLOCK_K_F32_IEEE if s.precision == "ieee" else k.BLOCK_K_F32_BOUNDED) if s.up else k.BLOCK_K
    coef = s.precision if s.up else "tf32"
    n_tx, n_td = cdiv(L, bx), cdiv(D, bd)
    per_image = n_tx * n_td
    out = Launch("_ncl_pair_bwd_kernel", "bwd")
    imgs = list(s.images())
    work = Work(s, [0 if st else 1 for *_, st in imgs])
    for t in range(s.B * per_image):
        if t >= work.total * per_image:
            out.add(Prog(loaded=4), working=False)
            continue
        b = work.find(t // per_image, start=False)
        p, n, u, t1, _ = imgs[b]
        pid_d, pid_x = divmod(t % per_image, n_tx)
        kw = _rows(pid_d * bd, bd, D)
        x0 = pid_x * bx
        gi = _rows(x0, bx, L)
        g = Prog(loaded=4 + 4 * s.log_b + 8 + 4 * gi, stored=gi * kw * e)  # count, search, counts; the store's perm
        if x0 >= u:
            out.add(g, working=False)
            continue
        xv, rp = _rows(x0, bx, u), _rows(x0, bx, p)
        g.loaded += 8 + 4 * xv
        g.sfu += bx  # 1/|f_x|
        _row_setup(g, bx, xv, rp if t1 else 0)
        if t1:
            y_end = u if x0 < p else p
            for y0 in range(0, y_end, bn):
                cv, cp = _rows(y0, bn, y_end), _rows(y0, bn, min(y_end, p))
                # the tile recomputed over the whole D, then its coefficients and T @ F_y
                g.loaded += 8 * cv + 8 * cp + (xv + cv) * D * e + cv * kw * e
                g.sfu += bn + 4 * bx * bn
                g.dot(s.sim_class, bx * bn * cdiv(D, bk) * bk)
                g.dot(coef, bx * bn * bd)
        g.loaded += xv * kw * e  # f_x
        _grad_out(g, bx, bd, kw, e)
        out.add(g)
    for p, n, u, t1, st in imgs:
        if not st:
            out.hbm_read += 4 * L + (8 if u == 0 else 12 + 12 + 16 + 8 + 4 * u + 8 * u + u * D * e + 2 * D * e)
            if t1:
                out.hbm_read += 8 * p
    out.hbm_read += work.hbm
    return out


def _k_anchor_bwd(s: Shape) -> Launch:
    from ncl_fast.kernels import ncl_anchors as ka
    from ncl_fast.kernels import ncl_bounded as kb

    stored_any, bounded = s.paths()
    if not bounded:  # the stored backward forms the anchors' sums itself
        return None
    rs_n, bx, bd, L, D = ka.ANCHOR_SPLITS, kb.BLOCK_M, kb.BLOCK_D, s.L, s.D
    per_split = cdiv(cdiv(L, rs_n), bx) * bx
    flag = 8 if stored_any else 0  # SKIP_STORED: the plan's stored flag
    out = Launch("_ncl_anchor_bwd_kernel", "bwd")
    for p, n, u, _, st in s.images():
        k = L - u
        used = u if (p >= 1 and n >= 1 and k >= 1 and not (stored_any and st)) else 0
        for kw, reps in chunks(D, bd):
            for rs in range(rs_n):
                lo, hi = rs * per_split, min(rs * per_split + per_split, used)
                g = Prog(loaded=36 + flag, stored=2 * kw * 4, sfu=2)  # counts, g2, g3, lam+-, W+-; k2, k3
                for x0 in range(lo, hi, bx):
                    xv = _rows(x0, bx, hi)
                    g.loaded += 16 * xv + xv * kw * s.esize
                    g.sfu += 7 * bx
                    g.ffma += 2 * bx * bd
                out.add(g, reps, working=hi > lo)
        out.stored += 8 * rs_n  # the splits' dot sums (the first chunk's programs)
        out.hbm_read += 36 + flag + (16 * used + used * D * s.esize)
    return out


def _k_anchor_grad(s: Shape) -> Launch:
    from ncl_fast.kernels import ncl_anchors as k

    stored_any, bounded = s.paths()
    rs_n, blk, D, bx = k.ANCHOR_SPLITS, k.ANCHOR_GRAD_BLOCK, s.D, s.grad_tiles["BX"]
    out = Launch("_ncl_anchor_grad_kernel", "bwd")
    for p, n, u, _, st in s.images():
        n_t = cdiv(u, bx) if (stored_any and st) else 0  # the stored backward's row tiles that wrote sums
        for kw, reps in chunks(D, blk):
            g = Prog(loaded=2 * kw * s.esize + 8, stored=2 * kw * s.esize, sfu=2)  # the anchors, their norms
            if bounded:
                g.loaded += rs_n * (8 * kw + 8)
            if stored_any:
                g.loaded += 8 + 8 + n_t * (8 * kw + 8)  # counts, the plan's flag; the tiles' sums
            out.add(g, reps)
        out.hbm_read += 2 * D * s.esize + 8
        if bounded:
            out.hbm_read += rs_n * (8 * D + 8)
        if stored_any:
            out.hbm_read += 8 + 8 + n_t * (8 * D + 8)
    return out


#: The launches of one forward + backward, in order (`ncl_terms.ncl_terms_fwd`, `_bwd`), each
#: with the kernel it models (module of `ncl_fast.kernels`, name; None: not a Triton kernel).
#: A function returns None where the launcher does not launch its kernel (a path no image
#: can take, from L and the slot). A kernel that a redesign removes drops out, and one it
#: adds is modeled by adding its function here.
KERNELS = (
    (_k_plan, ("ncl_anchors", "_ncl_plan_kernel")),
    (_k_sim, ("ncl_stored", "_ncl_sim_kernel")),
    (_k_stats_fwd, ("ncl_anchors", "_ncl_stats_fwd_kernel")),
    (_k_rows, ("ncl_stored", "_ncl_rows_kernel")),
    (_k_pair_fwd, ("ncl_bounded", "_ncl_pair_fwd_kernel")),
    (_k_anchor_fwd, ("ncl_anchors", "_ncl_anchor_fwd_kernel")),
    (_k_coef, ("ncl_stored", "_ncl_coef_kernel")),
    (_k_grad_head, ("ncl_stored", "_ncl_grad_head_kernel")),
    (_k_grad, ("ncl_stored", "_ncl_grad_kernel")),
    (_k_pair_bwd, ("ncl_bounded", "_ncl_pair_bwd_kernel")),
    (_k_anchor_bwd, ("ncl_anchors", "_ncl_anchor_bwd_kernel")),
    (_k_anchor_grad, ("ncl_anchors", "_ncl_anchor_grad_kernel")),
)


def _exists(kernel) -> bool:
    if kernel is None:
        return True
    import importlib

    module, name = kernel
    try:
        return hasattr(importlib.import_module(f"ncl_fast.kernels.{module}"), name)
    except ImportError:
        return False


def ncl_work(counts, L: int, D: int, esize: int, precision: str = "tf32x3", slot: int | None = None,
             sms: int = SMS, dtype: str = "", patch: int = 8) -> list[Launch]:
    """Every launch of one NCL forward + backward. `counts[b] = (|P|, |N|, |K|)`; `slot`: fp32
    values of workspace per image (default the op's `workspace_slot(L)`); `sms`: the
    multiprocessors the persistent grids are sized for; `dtype`: "fp16" for fp16 features
    (default fp32 or bf16 by `esize`); `patch`: the patch's side in cells of the map (NCHW
    maps at p = 1 take the half similarity GEMM's narrower K chunks)."""
    s = Shape(list(counts), L, D, esize, precision, slot, sms, dtype, patch)
    launches = [f(s) for f, kernel in KERNELS if _exists(kernel)]
    return [x for x in launches if x is not None]


# ---- the floor and the summary ------------------------------------------------------------


def floor_macs(counts, D: int) -> tuple[int, int]:
    """(forward, backward) multiply-adds of the floor: D |P| (|P| + |N|) per image with t1
    defined, once forward and twice backward."""
    fwd = sum(D * p * (p + n) for p, n, _ in counts if p >= 2 and n >= 1)
    return fwd, 2 * fwd


def floor_bytes(counts, L: int, D: int, esize: int) -> tuple[int, int]:
    """(forward, backward) bytes of the floor: the used patches' features read once each way,
    and the whole feature gradient written once."""
    used = sum(p + n for p, n, _ in counts)
    return used * D * esize, used * D * esize + len(counts) * L * D * esize


def floor_time(counts, L: int, D: int, esize: int) -> tuple[float, float]:
    fm, bm = floor_macs(counts, D)
    fb, bb = floor_bytes(counts, L, D, esize)
    return (max(fm / MAC_RATE["half"], fb / HBM_BW), max(bm / MAC_RATE["half"], bb / HBM_BW))


def summary(launches: list[Launch], counts, L: int, D: int, esize: int) -> dict:
    fwd = sum(x.time() for x in launches if x.direction == "fwd")
    bwd = sum(x.time() for x in launches if x.direction == "bwd")
    ff, fb = floor_time(counts, L, D, esize)
    return {"fwd_s": fwd, "bwd_s": bwd, "floor_fwd_s": ff, "floor_bwd_s": fb,
            "ratio": (fwd + bwd) / (ff + fb), "launches": len(launches), "overhead_s": len(launches) * LAUNCH_S}


def report(counts, L, D, esize, precision="tf32x3", slot=None) -> str:
    """A markdown table of every launch, and the prediction against the floor."""
    launches = ncl_work(counts, L, D, esize, precision, slot)
    lines = ["| launch | programs | working (per SM) | dot MACs G (class) | SFU M | HBM MB | L2 MB | "
             "time us | bound |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for x in launches:
        cls = ", ".join(f"{v / 1e9:.3f} {c}" for c, v in x.macs.items() if v) or "-"
        lines.append(f"| {x.kernel} | {x.programs} | {x.working} ({x.working / SMS:.2f}) | {cls} | {x.sfu / 1e6:.2f} | "
                     f"{(x.hbm_read + x.stored) / 1e6:.1f} | {x.l2 / 1e6:.1f} | {x.time() * 1e6:.1f} | {x.bound()} |")
    sm = summary(launches, counts, L, D, esize)
    fm, bm = floor_macs(counts, D)
    lines.append(
        f"\npredicted forward {sm['fwd_s'] * 1e6:.1f} us + backward {sm['bwd_s'] * 1e6:.1f} us = "
        f"{(sm['fwd_s'] + sm['bwd_s']) * 1e6:.1f} us (launches excluded; {sm['launches']} launches, about "
        f"{sm['overhead_s'] * 1e6:.0f} us more); floor {sm['floor_fwd_s'] * 1e6:.1f} + {sm['floor_bwd_s'] * 1e6:.1f} = "
        f"{(sm['floor_fwd_s'] + sm['floor_bwd_s']) * 1e6:.1f} us; predicted / floor = {sm['ratio']:.2f}x"
        + (f" (target {TARGETS[tuple(counts[0])]}x)" if len(set(map(tuple, counts))) == 1 and tuple(counts[0]) in TARGETS
           else "") + ". "
        f"Multiply-adds executed / floor: forward "
        f"{sum(x.dot_macs for x in launches if x.direction == 'fwd') / fm:.2f}x, backward "
        f"{sum(x.dot_macs for x in launches if x.direction == 'bwd') / bm:.2f}x.")
    return "\n".join(lines)


#: (L, D) at 512 x 512 px: the paper's ResNet stages (SPEC.md section 1: 16-pixel windows;
#: stages 1, 2 and 4 share L = 1024 and D = 4096) and a ViT-B token map
STAGES = {"stage 1": (1024, 4096), "stages 2, 4": (1024, 4096), "stage 3": (1024, 2048), "stage 5": (1024, 8192),
          "vit-b": (1024, 768)}
#: the patch's side in cells of each map (SPEC.md section 1: stage 1 at s = 2, p = 8; stage 2
#: at s = 4, p = 4; stages 3-5 at s = 8, p = 2); a ViT's token map holds one token per patch.
#: It decides the chunks of D of the head kernel (128 at p >= 8, else 64) and the gathers at p = 1
STAGE_PATCH = {"stage 1": 8, "stages 2, 4": 4, "stage 3": 2, "stage 5": 2, "vit-b": 1}
#: [|P|, |N|, |K|] per image at L = 1024: 15 % and 30 % tampered area (issue 18's shapes)
MASKS = ((93, 877, 54), (300, 650, 74))
#: issue 18's targets for predicted / floor (forward + backward, launches excluded)
TARGETS = {(93, 877, 54): 1.5, (300, 650, 74): 2.0}
DTYPES = (("bf16", 2, "tf32x3"), ("fp32", 4, "tf32x3"), ("fp32 ieee", 4, "ieee"))


def stage_table(B: int = 4) -> str:
    lines = ["| stage | L | D | dtype | [P, N, K] | forward us | backward us | floor us | predicted / floor | "
             "largest launch (bound) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for stage, (L, D) in STAGES.items():
        for dname, esize, prec in DTYPES:
            for c in MASKS:
                launches = ncl_work([c] * B, L, D, esize, prec, patch=STAGE_PATCH[stage])
                sm = summary(launches, [c] * B, L, D, esize)
                top = max(launches, key=Launch.time)
                lines.append(f"| {stage} | {L} | {D} | {dname} | {list(c)} | {sm['fwd_s'] * 1e6:.1f} | "
                             f"{sm['bwd_s'] * 1e6:.1f} | {(sm['floor_fwd_s'] + sm['floor_bwd_s']) * 1e6:.1f} | "
                             f"{sm['ratio']:.2f}x ({TARGETS[c]}x) | {top.kernel} {top.time() * 1e6:.1f} us ({top.bound()}) |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    print(f"Peaks (H200 SXM): HBM {HBM_BW / 1e12:.1f} TB/s, L2 {L2_BW / 1e12:.1f} TB/s (lead), multiply-adds/s "
          + ", ".join(f"{c} {r / 1e12:.1f} T" for c, r in MAC_RATE.items())
          + f", SFU {SFU_RATE / 1e12:.2f} T/s, {SMS} SMs; launch overhead {LAUNCH_S * 1e6:.0f} us (apart)\n")
    for dname, esize, prec in DTYPES:
        for c in MASKS:
            print(f"Stage 1 (B = {args.batch}, L = 1024, D = 4096), {dname}, [|P|, |N|, |K|] = {list(c)} per image")
            print(report([c] * args.batch, 1024, 4096, esize, prec) + "\n")
    print(stage_table(args.batch))


if __name__ == "__main__":
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
