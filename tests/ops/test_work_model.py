"""The work model of `bench/work_model.py` (programs, tl.dot multiply-adds) against
the kernels themselves, counted while Triton's interpreter runs them."""
import os
import sys
from collections import defaultdict

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


class DotCounter:
    """Counts, per kernel, the multiply-adds of every tl.dot and the programs that run one."""

    def __init__(self, monkeypatch):
        from triton.runtime import interpreter

        self.macs = defaultdict(int)
        self.programs = defaultdict(set)
        self.kernel = None
        self.program = None
        counter = self
        builder_cls = interpreter.InterpreterBuilder
        grid_call = interpreter.GridExecutor.__call__
        set_idx = builder_cls.set_grid_idx
        create_dot = builder_cls.create_dot

        def call(executor, *args, **kwargs):
            counter.kernel = executor.fn.__name__
            return grid_call(executor, *args, **kwargs)

        def grid_idx(builder, x, y, z):
            counter.program = (x, y, z)
            return set_idx(builder, x, y, z)

        def dot(builder, a, b, d, *args):
            (m, kk), n = a.data.shape[-2:], b.data.shape[-1]
            counter.macs[counter.kernel] += m * n * kk
            counter.programs[counter.kernel].add(counter.program)
            return create_dot(builder, a, b, d, *args)

        monkeypatch.setattr(interpreter.GridExecutor, "__call__", call)
        monkeypatch.setattr(builder_cls, "set_grid_idx", grid_idx)
        monkeypatch.setattr(builder_cls, "create_dot", dot)


@pytest.mark.slow
@pytest.mark.parametrize("path", ["stored", "bounded", "mixed"])
def test_work_model_matches_the_kernels(path, gen, monkeypatch):
    require_backend("triton", "ncl_terms")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("counts the interpreter's tl.dot calls")
    import work_model
    from ncl_fast import functional
    from ncl_fast.kernels import ncl_terms as k

    B, C, h, p = 3, 2, 32, 2  # L = 256 patches of D = 8
    L, D = (h // p) ** 2, C * p * p
    sizes = [(40, 150), (90, 100), (7, 200)]  # (|P|, |N|) per image, the rest contour
    labels = torch.stack([
        torch.tensor([1] * np_ + [0] * nn + [2] * (L - np_ - nn), dtype=torch.uint8)[torch.randperm(L, generator=gen)]
        for np_, nn in sizes
    ])
    counts = [(np_, nn, L - np_ - nn) for np_, nn in sizes]
    blocks = [np_ * work_model.ws_ld(np_, nn) for np_, nn in sizes]  # rows padded to 16 bytes
    feat = torch.randn(B, C, h, h, generator=gen, requires_grad=True)
    a_pos = torch.randn(B, D, generator=gen, requires_grad=True)
    a_neg = torch.randn(B, D, generator=gen, requires_grad=True)
    # values per image's slot (MiB below); mixed: image 1's block does not fit its slot
    cap = {"stored": L * L, "bounded": 0, "mixed": max(blocks[0], blocks[2])}[path]
    monkeypatch.setattr(k, "SIM_BUDGET", cap * 4 / 2**20)
    stored = {"stored": [True] * 3, "bounded": [False] * 3, "mixed": [True, False, True]}[path]
    counter = DotCounter(monkeypatch)
    functional.ncl_terms(feat, labels, a_pos, a_neg, p, impl="triton").sum().backward()
    model = {x.kernel: x for x in work_model.ncl_work(counts, L, D, 4, stored=stored, fp32=True)}
    kernels_with_dots = {"_ncl_sim_kernel", "_ncl_pair_fwd_kernel", "_ncl_grad_kernel", "_ncl_pair_bwd_kernel"}
    assert set(counter.macs) <= kernels_with_dots
    for name in kernels_with_dots:
        assert counter.macs.get(name, 0) == model[name].dot_macs, name
        assert len(counter.programs.get(name, ())) == model[name].dot_programs, name
    assert sum(model[n].dot_macs for n in kernels_with_dots) > 0


def test_floor_ratio_at_the_paper_shapes():
    # stage 1 at 15 % and 30 % tampered area: within 1.5x of the floor both ways
    import work_model

    for c in ((93, 877, 54), (300, 650, 74)):
        launches = work_model.ncl_work([c] * 4, 1024, 4096, 2)
        fwd_floor, bwd_floor = work_model.floor_macs([c] * 4, 4096)
        fwd = sum(x.dot_macs for x in launches if x.kernel in ("_ncl_sim_kernel", "_ncl_pair_fwd_kernel"))
        bwd = sum(x.dot_macs for x in launches if x.kernel in ("_ncl_grad_kernel", "_ncl_pair_bwd_kernel"))
        assert fwd <= 1.5 * fwd_floor and bwd <= 1.5 * bwd_floor, (c, fwd / fwd_floor, bwd / bwd_floor)
        sim = next(x for x in launches if x.kernel == "_ncl_sim_kernel")
        assert sim.working >= 132, "the forward keeps every SM of an H100/H200 busy"
