"""The work model of `bench/work_model.py` against the kernels themselves: every count
of every launch (programs, programs that run a tl.dot, tl.dot multiply-adds by
instruction class, transcendental lanes, bytes loaded, distinct bytes loaded, bytes
stored), counted while Triton's interpreter runs one forward + backward."""
import os
import sys
from collections import defaultdict

import numpy as np
import pytest
import torch

from helpers import ROOT, require_backend

# NaN or inf formed in any lane, masked ones included, is an error (the interpreter
# computes masked lanes too: numpy's warning is how they show)
pytestmark = pytest.mark.filterwarnings(
    "error:invalid value encountered:RuntimeWarning",
    "error:overflow encountered:RuntimeWarning",
    "error:divide by zero encountered:RuntimeWarning",
)

sys.path.insert(0, str(ROOT / "bench"))

#: what the model calls a transcendental: one SFU evaluation per lane
SFU_OPS = ("create_exp", "create_exp2", "create_log", "create_log2", "create_sqrt", "create_precise_sqrt",
           "create_rsqrt", "create_fdiv", "create_precise_divf")


class WorkCounter:
    """Per kernel, what the interpreter executes: programs, the programs that run a
    tl.dot, tl.dot multiply-adds by class ("half" for 16-bit operands, else the
    input precision), lanes of SFU functions, bytes of the active lanes of every load
    and store, and the distinct bytes loaded."""

    def __init__(self, monkeypatch):
        from triton.runtime import interpreter

        self.programs = defaultdict(int)
        self.dot_programs = defaultdict(set)
        self.macs = defaultdict(lambda: defaultdict(int))
        self.sfu = defaultdict(int)
        self.loaded = defaultdict(int)
        self.stored = defaultdict(int)
        self.addresses = defaultdict(list)  # (addresses, element size) of every load
        self.kernel = None
        self.program = None
        counter = self
        cls = interpreter.InterpreterBuilder
        grid_call = interpreter.GridExecutor.__call__
        set_idx, create_dot = cls.set_grid_idx, cls.create_dot
        masked_load, masked_store = cls.create_masked_load, cls.create_masked_store

        def call(executor, *args, **kwargs):
            counter.kernel = executor.fn.__name__
            return grid_call(executor, *args, **kwargs)

        def grid_idx(builder, x, y, z):
            counter.program = (x, y, z)
            counter.programs[counter.kernel] += 1
            return set_idx(builder, x, y, z)

        def dot(builder, a, b, d, precision, *args):
            (m, kk), n = a.data.shape[-2:], b.data.shape[-1]
            half = a.dtype.primitive_bitwidth == 16
            name = "half" if half else str(precision).rsplit(".", 1)[-1].lower()
            counter.macs[counter.kernel][name] += m * n * kk
            counter.dot_programs[counter.kernel].add(counter.program)
            return create_dot(builder, a, b, d, precision, *args)

        def load(builder, ptrs, mask, *args):
            size = ptrs.get_element_ty().primitive_bitwidth // 8
            active = np.broadcast_to(mask.data, ptrs.data.shape).astype(bool)
            counter.loaded[counter.kernel] += int(active.sum()) * size
            counter.addresses[counter.kernel].append((ptrs.data[active].ravel(), size))
            return masked_load(builder, ptrs, mask, *args)

        def store(builder, ptrs, value, mask, *args):
            size = ptrs.get_element_ty().primitive_bitwidth // 8
            counter.stored[counter.kernel] += int(np.broadcast_to(mask.data, ptrs.data.shape).astype(bool).sum()) * size
            return masked_store(builder, ptrs, value, mask, *args)

        def sfu(name):
            original = getattr(cls, name)

            def op(builder, *args):
                out = original(builder, *args)
                counter.sfu[counter.kernel] += out.data.size
                return out

            return op

        monkeypatch.setattr(interpreter.GridExecutor, "__call__", call)
        monkeypatch.setattr(cls, "set_grid_idx", grid_idx)
        monkeypatch.setattr(cls, "create_dot", dot)
        monkeypatch.setattr(cls, "create_masked_load", load)
        monkeypatch.setattr(cls, "create_masked_store", store)
        for name in SFU_OPS:
            monkeypatch.setattr(cls, name, sfu(name))

    def hbm_read(self, kernel: str) -> int:
        """Distinct bytes loaded (addresses of one element size: one buffer's)."""
        by_size = defaultdict(list)
        for addr, size in self.addresses[kernel]:
            by_size[size].append(addr)
        return sum(len(np.unique(np.concatenate(a))) * size for size, a in by_size.items())


# B = 4 images of L = 256 patches, D = 80 (chunks of 64 with a partial last one):
# (|P|, |N|, |K|): t1 defined on several row tiles; |P| = 1 (t1 undefined); |K| = 0
# (t2, t3 undefined); every image's |P| + |N| spans several column tiles.
C, H, PATCH = 5, 64, 4
SIZES = [(40, 150, 66), (90, 100, 66), (1, 200, 55), (70, 186, 0)]


@pytest.mark.slow
@pytest.mark.parametrize("path,dtype,precision,sms,half_coef,panel,group,head", [
    ("stored", torch.float32, "tf32x3", 16, False, 0, 4, 0),
    ("bounded", torch.float32, "tf32x3", 2, False, 0, 4, 0),
    ("mixed", torch.float32, "ieee", 2, False, 0, 4, 0),
    ("mixed", torch.float16, "tf32x3", 16, False, 0, 4, 0),
    # the half coefficients Gc, Gr (bf16 on a GPU; fp16 here, whose dots the interpreter
    # runs as the GPU does); 4 SMs: the half similarity GEMM's larger items split D for
    # some images only
    ("stored", torch.float16, "tf32x3", 4, True, 0, 4, 0),
    # the grad kernel's grouped row tiles with a panel of 64 tampered partners: |P| = 40 on
    # the panel, 90 and 70 streamed; groups of 4 tiles (one group an image), and of 1 (image
    # 0's last tile, contour patches only, makes a group that loads no panel)
    ("stored", torch.float16, "tf32x3", 4, True, 64, 4, 0),
    ("stored", torch.float16, "tf32x3", 4, True, 64, 1, 0),
    # the head kernel (as on sm_90): every image (|P| <= 128, |P| = 1 among them: products on
    # zeros), or of 64 rows (the grouped kernel's tiles of 32) |P| = 40 and 1, the grouped
    # kernel 90 and 70; with both paths, the head kernel's programs of a bounded image
    ("stored", torch.float16, "tf32x3", 4, True, 0, 4, 128),
    ("stored", torch.float16, "tf32x3", 4, True, 0, 4, 64),
    ("mixed", torch.float16, "tf32x3", 2, True, 0, 4, 128),
])
def test_work_model_matches_the_kernels(path, dtype, precision, sms, half_coef, panel, group, head, gen,
                                        monkeypatch):
    require_backend("triton", "ncl_terms")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("counts what Triton's interpreter executes")
    import work_model
    from ncl_fast import functional
    from ncl_fast.kernels import ncl_stored as ks
    from ncl_fast.kernels import ncl_terms as k

    B, L, D = len(SIZES), (H // PATCH) ** 2, C * PATCH * PATCH
    assert all(sum(c) == L for c in SIZES)
    labels = torch.stack([
        torch.tensor([1] * p + [0] * n + [2] * kk, dtype=torch.uint8)[torch.randperm(L, generator=gen)]
        for p, n, kk in SIZES
    ])
    feat = torch.randn(B, C, H, H, generator=gen).to(dtype).requires_grad_()
    a_pos = torch.randn(B, D, generator=gen).to(dtype).requires_grad_()
    a_neg = torch.randn(B, D, generator=gen).to(dtype).requires_grad_()
    # workspace per image (fp32 values): all stored, none (bounded path), or only the
    # blocks of images 0 and 2 (|P| = 1: no block) fit
    cap = {"stored": L * L, "bounded": 0, "mixed": SIZES[0][0] * work_model.ws_ld(*SIZES[0][:2])}[path]
    monkeypatch.setattr(k, "SIM_BUDGET", cap * 4 / 2**20)
    monkeypatch.setattr(k, "FP32_DOT_PRECISION", precision)
    # the SMs the persistent grids are sized for: 16 gives the similarity GEMM split-K
    # parts (and persistent programs without items), 2 several items per program
    monkeypatch.setattr(k, "INTERPRET_SMS", sms)
    if half_coef:
        monkeypatch.setattr(k, "HALF_COEF_DTYPES", (dtype,))
    monkeypatch.setattr(k, "GRAD_PANEL", panel)
    monkeypatch.setattr(ks, "GRAD_GROUP", group)
    if head:  # its tiles are the grouped kernel's row tiles
        monkeypatch.setattr(ks, "GRAD_HEAD", head)
        monkeypatch.setattr(ks, "GRAD_BX", head // 2)
    else:
        monkeypatch.setattr(k, "GRAD_HEAD_MAJORS", ())
    assert k._half_coef(torch.empty(0, dtype=dtype)) == half_coef
    counter = WorkCounter(monkeypatch)
    functional.ncl_terms(feat, labels, a_pos, a_neg, PATCH, impl="triton").sum().backward()
    half = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "")
    model = {x.kernel: x for x in work_model.ncl_work(SIZES, L, D, feat.element_size(), precision, sms=sms, dtype=half,
                                                      patch=PATCH) if x.kernel.startswith("_")}
    shape = work_model.Shape(SIZES, L, D, feat.element_size(), precision, sms=sms, dtype=half, patch=PATCH)
    stored = [x[3] and x[4] for x in shape.images()]
    # split-K where the grid is wide and the slots hold the parts: images of one and of several
    splits = [shape.splits(p, n) for (p, n, u, t1, st) in shape.images() if t1 and st]
    # parts of D
    if path == "stored":
        assert max(splits) > 1 and min(splits) == 1, splits
    assert stored == {"stored": [True, True, False, True], "bounded": [False] * 4, "mixed": [True, False, False, False]}[path]
    assert set(counter.programs) - {"_patch_lists_fwd_kernel"} == set(model)
    for name, x in model.items():
        got = {
            "programs": counter.programs[name],
            "dot_programs": len(counter.dot_programs[name]),
            "macs": {c: v for c, v in counter.macs[name].items() if v},
            "sfu": counter.sfu[name],
            "loaded": counter.loaded[name],
            "hbm_read": counter.hbm_read(name),
            "stored": counter.stored[name],
        }
        want = {"programs": x.programs, "dot_programs": x.dot_programs, "macs": {c: v for c, v in x.macs.items() if v},
                "sfu": x.sfu, "loaded": x.loaded, "hbm_read": x.hbm_read, "stored": x.stored}
        assert got == want, name
    # the half path's dots are the similarities' (16-bit operands); the backward's (its
    # GEMMs and the anchors' sums) are fp32, or half with half coefficients (the bounded
    # path's backward keeps fp32 coefficients)
    classes = {c for x in model.values() for c in x.macs}
    assert classes == ({precision} if dtype == torch.float32 else {"half"} if half_coef and path == "stored"
                       else {"half", "tf32"})
    assert shape.half_coef == half_coef


def test_floor_and_prediction_at_the_paper_shapes():
    # stage 1 at 15 % and 30 % tampered area: the multiply-adds executed stay within 1.6x
    # of the floor's (1.52x backward at [93, 877, 54]: on sm_90 the grad kernel's panel runs
    # the column GEMM at K = 128 for any |P| <= 128, tensor-core work of about 9 us at the
    # bf16 rate that saves 37 MB of L2 re-reads in a launch bound by L2 at 28 us), and the
    # similarity GEMM keeps every SM of an H100/H200 busy; the prediction is at least the floor
    import work_model

    for c in work_model.MASKS:
        counts = [c] * 4
        launches = work_model.ncl_work(counts, 1024, 4096, 2)
        fwd_floor, bwd_floor = work_model.floor_macs(counts, 4096)
        fwd = sum(x.dot_macs for x in launches if x.direction == "fwd")
        bwd = sum(x.dot_macs for x in launches if x.direction == "bwd")
        assert fwd <= 1.6 * fwd_floor and bwd <= 1.6 * bwd_floor, (c, fwd / fwd_floor, bwd / bwd_floor)
        sim = next(x for x in launches if x.kernel == "_ncl_sim_kernel")
        assert sim.working >= work_model.SMS, "the forward keeps every SM busy"
        sm = work_model.summary(launches, counts, 1024, 4096, 2)
        floor = sm["floor_fwd_s"] + sm["floor_bwd_s"]
        used = sum(p + n for p, n, _ in counts)
        if c == (93, 877, 54):  # bound by memory at 15 %: the 21 us
            assert floor == pytest.approx((2 * used + 4 * 1024) * 4096 * 2 / work_model.HBM_BW)
        assert sm["ratio"] >= 1.0


def test_roofline_of_a_launch():
    # the time of a launch is its slowest resource; a program cannot run faster than one
    # SM's share of the rates
    import work_model as wm

    x = wm.Launch("k", "fwd")
    x.add(wm.Prog(sfu=10**9), 1)
    assert x.time() == pytest.approx(wm.SMS * 1e9 / wm.SFU_RATE) and x.bound() == "program"
    y = wm.Launch("k", "fwd")
    y.add(wm.Prog(macs={"tf32x3": 10**6}, loaded=10**4), 10**4)
    assert y.times()["tensor"] == pytest.approx(3 * 1e10 / wm.MAC_RATE["tf32"])
    assert y.times()["hbm"] == 0 and y.times()["l2"] == pytest.approx(1e8 / wm.L2_BW)
    y.hbm_read = 10**8
    assert y.times()["hbm"] == pytest.approx(1e8 / wm.HBM_BW) and y.l2 == 0
