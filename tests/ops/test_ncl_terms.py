"""ncl_terms: the reference and the Triton kernels (interpreter on the CPU), values
against the float64 oracle of SPEC section 5, gradients against the reference
(itself checked by gradcheck in float64)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import oracles
from helpers import random_mask, relative_error, require_backend
from ncl_fast import functional, reference
from tolerances import GRADS, SAME_VALUES, VS_FP32_INPUT

# NaN or inf formed in any lane, masked ones included, is an error (the interpreter
# computes masked lanes too: numpy's warning is how they show)
pytestmark = pytest.mark.filterwarnings(
    "error:invalid value encountered:RuntimeWarning",
    "error:overflow encountered:RuntimeWarning",
    "error:divide by zero encountered:RuntimeWarning",
)

# (B, C, h, w, p): odd sizes, C not a power of two, patch sizes 1..8, single-patch images.
SHAPES = [
    (2, 5, 13, 11, 3),
    (3, 3, 9, 7, 1),
    (2, 7, 8, 8, 2),
    (1, 6, 4, 4, 4),  # a single patch
    (2, 4, 16, 12, 4),
    (1, 3, 10, 11, 5),
    (2, 2, 12, 13, 6),
    (1, 3, 14, 15, 7),
    (2, 3, 17, 16, 8),
]


# The Triton op's two paths: "stored" keeps each image's similarity block in the
# workspace (a budget far above any test's needs), "bounded" never does (budget 0).
BUDGETS = {"stored": 64.0, "bounded": 0.0}


@pytest.fixture(params=["reference", "triton-stored", "triton-bounded"])
def impl(request, monkeypatch):
    backend, _, path = request.param.partition("-")
    require_backend(backend, "ncl_terms")
    if path:
        from ncl_fast.kernels import ncl_terms as k

        monkeypatch.setattr(k, "SIM_BUDGET", BUDGETS[path])
    return backend


def make_case(shape, kind, gen, dtype=torch.float32, s=2, tol=0.0):
    B, C, h, w, p = shape
    mask = random_mask(B, h * s, w * s, kind, gen, window=(p * s, p * s))
    labels = oracles.patch_labels(mask, h, w, p, tol)
    # A shared offset makes the cosine similarities varied (not all near 0).
    feat = (torch.randn(B, C, h, w, generator=gen) + 0.5 * torch.randn(1, C, 1, 1, generator=gen)).to(dtype)
    D = C * p * p
    a_pos = torch.randn(B, D, generator=gen).to(dtype)
    a_neg = torch.randn(B, D, generator=gen).to(dtype)
    return feat, labels, a_pos, a_neg


def check(got, want, rtol, atol):
    assert got.shape == want.shape
    err = (got.double() - want.double()).abs()
    bad = err > atol + rtol * want.double().abs()
    assert not bad.any(), f"max rel err {relative_error(got, want):.3g}; got {got[bad]}, want {want[bad]}"


def terms_and_grads(impl, feat, labels, a_pos, a_neg, p, tau, grad_out):
    leaves = [t.clone().requires_grad_() for t in (feat, a_pos, a_neg)]
    terms = functional.ncl_terms(leaves[0], labels, leaves[1], leaves[2], p, tau, impl=impl)
    (terms * grad_out).sum().backward()
    return terms.detach(), [t.grad for t in leaves]


def check_grads(got, want, dtype, scale: float = 1.0):
    rtol, atol_scale = (scale * t for t in GRADS[dtype])
    for name, g, r in zip(("feat", "anchor_pos", "anchor_neg"), got, want):
        assert g.dtype == r.dtype and g.shape == r.shape, name
        atol = atol_scale * max(r.abs().max().item(), 1e-30)
        bad = (g.double() - r.double()).abs() > atol + rtol * r.double().abs()
        assert not bad.any(), f"d{name}: {bad.sum().item()} values differ, max rel {relative_error(g, r):.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["blobs", "all", "none", "aligned", "noise"])
def test_ncl_terms_fp32_matches_oracle(impl, shape, kind, gen):
    tau = float(torch.empty(()).uniform_(0.07, 0.5, generator=gen))
    feat, labels, a_pos, a_neg = make_case(shape, kind, gen)
    grad_out = torch.rand(shape[0], 3, generator=gen) + 0.5  # grad_output != 1
    got, grads = terms_and_grads(impl, feat, labels, a_pos, a_neg, shape[-1], tau, grad_out)
    assert got.dtype == torch.float32 and got.shape == (shape[0], 3)
    check(got, oracles.ncl_terms(feat, labels, a_pos, a_neg, shape[-1], tau), *SAME_VALUES[torch.float32])
    if kind in ("all", "none"):  # one of P, N is empty: every term is undefined
        assert (got == 0).all()
        assert all((g == 0).all() for g in grads)
    if kind == "aligned":  # no contour patch: no anchors
        assert (got[:, 1:] == 0).all()
    if impl != "reference":
        _, want = terms_and_grads("reference", feat, labels, a_pos, a_neg, shape[-1], tau, grad_out)
        check_grads(grads, want, torch.float32)


def test_ncl_terms_with_tol(impl, gen):
    shape = (2, 5, 12, 12, 4)
    feat, labels, a_pos, a_neg = make_case(shape, "noise", gen, tol=0.3)
    want = oracles.ncl_terms(feat, labels, a_pos, a_neg, 4)
    check(functional.ncl_terms(feat, labels, a_pos, a_neg, 4, impl=impl), want, *SAME_VALUES[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ncl_terms_half_inputs(impl, dtype, gen):
    shape = (2, 5, 13, 11, 3)
    feat, labels, a_pos, a_neg = make_case(shape, "blobs", gen)
    h = [t.to(dtype) for t in (feat, a_pos, a_neg)]
    grad_out = torch.rand(2, 3, generator=gen) + 0.5
    got, grads = terms_and_grads(impl, h[0], labels, h[1], h[2], 3, 0.1, grad_out)
    assert got.dtype == torch.float32
    check(got, oracles.ncl_terms(h[0], labels, h[1], h[2], 3), *SAME_VALUES[dtype])
    check(got, oracles.ncl_terms(feat, labels, a_pos, a_neg, 3), *VS_FP32_INPUT[dtype])
    assert all(g.dtype == dtype for g in grads)
    if impl != "reference":
        _, want = terms_and_grads("reference", h[0], labels, h[1], h[2], 3, 0.1, grad_out)
        check_grads(grads, want, dtype)


def test_ncl_terms_layouts(impl, gen):
    shape = (2, 5, 13, 11, 3)
    feat, labels, a_pos, a_neg = make_case(shape, "blobs", gen)
    want = oracles.ncl_terms(feat, labels, a_pos, a_neg, 3)
    grad_out = torch.rand(2, 3, generator=gen) + 0.5
    _, want_grads = terms_and_grads("reference", feat, labels, a_pos, a_neg, 3, 0.1, grad_out)
    cl = feat.to(memory_format=torch.channels_last)
    assert not cl.is_contiguous()
    got, grads = terms_and_grads(impl, cl, labels, a_pos, a_neg, 3, 0.1, grad_out)
    check(got, want, *SAME_VALUES[torch.float32])
    assert grads[0].is_contiguous(memory_format=torch.channels_last)  # the map's own layout
    check_grads(grads, want_grads, torch.float32)
    # a non-contiguous view (every other column of a wider map) and strided anchors
    wide = torch.zeros(2, 5, 13, 22)
    wide[..., ::2] = feat
    a_wide = torch.stack([a_pos, a_neg], dim=2)
    got = functional.ncl_terms(wide[..., ::2], labels, a_wide[..., 0], a_wide[..., 1], 3, impl=impl)
    check(got, want, *SAME_VALUES[torch.float32])


def test_ncl_terms_accumulate_in_fp32(impl, gen):
    # bf16 features whose exact values are representable: an fp32 pipeline gives
    # the oracle's numbers to 1e-5, a bf16 one could not (bf16 has 8 bits of mantissa).
    shape = (2, 7, 8, 8, 2)
    feat, labels, a_pos, a_neg = make_case(shape, "blobs", gen, dtype=torch.bfloat16)
    got = functional.ncl_terms(feat, labels, a_pos, a_neg, 2, impl=impl)
    want = oracles.ncl_terms(feat, labels, a_pos, a_neg, 2)
    assert relative_error(got, want) < 1e-5


def test_ncl_terms_zero_feature_patches(impl, gen):
    # |f| < eps: the F.normalize clamp; values and gradients stay finite and agree
    shape = (2, 3, 8, 8, 2)
    feat, labels, a_pos, a_neg = make_case(shape, "noise", gen)
    feat[0, :, :2, :2] = 0  # patch 0 of image 0 is all zeros
    a_pos[1] = 0
    grad_out = torch.rand(2, 3, generator=gen) + 0.5
    got, grads = terms_and_grads(impl, feat, labels, a_pos, a_neg, 2, 0.1, grad_out)
    check(got, oracles.ncl_terms(feat, labels, a_pos, a_neg, 2), *SAME_VALUES[torch.float32])
    _, want = terms_and_grads("reference", feat, labels, a_pos, a_neg, 2, 0.1, grad_out)
    check_grads(grads, want, torch.float32)


class AllocationRecorder(TorchDispatchMode):
    """Records the element count of every tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.numels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.numels += [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


def test_no_l_by_l_buffer(impl, gen):
    # 36 patches: an L x L matrix per image (2 * 1296 values) is larger than the
    # whole feature map (2 * 3 * 12 * 12 = 864), so any such buffer stands out.
    shape = (2, 3, 12, 12, 2)
    feat, labels, a_pos, a_neg = make_case(shape, "noise", gen)
    leaves = [t.clone().requires_grad_() for t in (feat, a_pos, a_neg)]
    with AllocationRecorder() as rec:
        terms = functional.ncl_terms(leaves[0], labels, leaves[1], leaves[2], 2, impl=impl)
        terms.sum().backward()
    L = 36
    quadratic = [n for n in rec.numels if n >= shape[0] * L * L]
    if impl == "reference":
        assert quadratic, "the recorder must see the reference's (B, L, L) similarity matrix"
    else:
        # the stored path's workspace holds one L x ld(L) slot per image (what S can
        # need); nothing else may grow with L^2
        from ncl_fast.kernels import ncl_terms as k

        quadratic = [n for n in quadratic if n != shape[0] * k.workspace_slot(L)]
        assert not quadratic, f"buffers of {quadratic} elements: the fused op must not build L x L matrices"


@pytest.mark.slow
def test_ncl_terms_under_torch_compile(impl, gen):
    shape = (2, 3, 8, 8, 2)
    feat, labels, a_pos, a_neg = make_case(shape, "blobs", gen)

    def loss_fn(f, ap, an):
        return functional.ncl_terms(f, labels, ap, an, 2, 0.1, impl=impl).sum(1).mean()

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)  # fullgraph: no graph break
    leaves = [t.clone().requires_grad_() for t in (feat, a_pos, a_neg)]
    got = compiled(*leaves)
    got.backward()
    ref_leaves = [t.clone().requires_grad_() for t in (feat, a_pos, a_neg)]
    want = loss_fn(*ref_leaves)
    want.backward()
    torch.testing.assert_close(got, want)
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad)


# ---- the reference alone -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["blobs", "noise"])
def test_ncl_terms_gradcheck(kind, gen):
    shape = (2, 3, 6, 5, 2)
    feat, labels, a_pos, a_neg = make_case(shape, kind, gen, dtype=torch.float64)
    inputs = tuple(t.clone().requires_grad_() for t in (feat, a_pos, a_neg))
    fn = lambda f, ap, an: reference.ncl_terms(f, labels, ap, an, 2, 0.5)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


def test_ncl_terms_gradients_only_where_used(gen):
    # Gradients reach tampered and authentic patches only, and no anchor of an image without contour.
    shape = (2, 3, 8, 8, 2)
    feat, labels, a_pos, a_neg = make_case(shape, "blobs", gen)
    labels[1] = torch.where(labels[1] == 2, torch.zeros_like(labels[1]), labels[1])
    labels[1, 0], labels[1, 1] = 1, 1  # image 1: no contour, two tampered patches
    labels[0, 2] = 2  # image 0: at least one contour patch
    for impl in ("reference", "triton-stored", "triton-bounded"):
        backend, _, path = impl.partition("-")
        if backend == "triton":
            require_backend("triton", "ncl_terms")
        with pytest.MonkeyPatch.context() as mp:
            if path:
                from ncl_fast.kernels import ncl_terms as k

                mp.setattr(k, "SIM_BUDGET", BUDGETS[path])
            grad_out = torch.rand(2, 3, generator=gen) + 0.5
            _, (g_feat, g_pos, g_neg) = terms_and_grads(backend, feat, labels, a_pos, a_neg, 2, 0.1, grad_out)
        # contour cells of the feature map: fold the per-patch flag back to (B, C, h, w)
        flags = (labels == 2).float()[:, None, :].expand(2, 3 * 2 * 2, 16)
        cells = torch.nn.functional.fold(flags, output_size=(8, 8), kernel_size=2, stride=2)
        assert (g_feat[cells.expand_as(g_feat) > 0] == 0).all(), impl
        assert (g_pos[1] == 0).all() and (g_neg[1] == 0).all(), impl
        assert g_feat.abs().sum() > 0, impl


# ---- the Triton op's two paths and its inputs ------------------------------------------------


def _fwd_plan(feat, labels, a_pos, a_neg, p):
    """The kernels' own forward: (terms, plan) with plan[b] = [workspace offset, stored]."""
    from ncl_fast.kernels import ncl_terms as k
    from ncl_fast.kernels import patch_labels as kl

    counts, perm = kl.patch_lists_fwd(labels)
    B, C, h, w = feat.shape
    terms, saved = k.ncl_terms_fwd(feat, a_pos, a_neg, counts, perm, p, (h // p, w // p), 0.1)
    return terms, saved.plan, counts


@pytest.mark.slow
def test_mixed_batch_stores_what_fits(gen, monkeypatch):
    # A cap of 200 values per image, below L x ld(L): image 0's block fits its slot and is
    # stored, image 1's (larger) is not, image 2's (small) is. Values and gradients still match.
    require_backend("triton", "ncl_terms")
    from ncl_fast.kernels import ncl_terms as k

    shape = (3, 4, 12, 12, 2)
    feat, labels, a_pos, a_neg = make_case(shape, "blobs", gen)
    # blocks of |P| rows, |P| + |N| padded to a multiple of 4 values (16-byte rows)
    labels[0] = torch.tensor([1] * 4 + [0] * 30 + [2] * 2, dtype=torch.uint8)  # block 4 x 36 = 144
    labels[1] = torch.tensor([1] * 12 + [0] * 20 + [2] * 4, dtype=torch.uint8)  # 12 x 32 = 384
    labels[2] = torch.tensor([1] * 2 + [0] * 30 + [2] * 4, dtype=torch.uint8)  # 2 x 32 = 64
    labels = labels[:, torch.randperm(36, generator=gen)]
    monkeypatch.setattr(k, "SIM_BUDGET", 200 * 4 / 2**20)  # MiB
    assert k.workspace_slot(36) == 200
    terms, plan, _ = _fwd_plan(feat, labels, a_pos, a_neg, 2)
    assert plan[:, :2].tolist() == [[0, 1], [200, 0], [400, 1]]
    check(terms, oracles.ncl_terms(feat, labels, a_pos, a_neg, 2), *SAME_VALUES[torch.float32])
    grad_out = torch.rand(3, 3, generator=gen) + 0.5
    _, grads = terms_and_grads("triton", feat, labels, a_pos, a_neg, 2, 0.1, grad_out)
    _, want = terms_and_grads("reference", feat, labels, a_pos, a_neg, 2, 0.1, grad_out)
    check_grads(grads, want, torch.float32)


def test_workspace_blocks_are_16_byte_aligned(gen, monkeypatch):
    # Every stored block's rows are |P| + |N| padded to a multiple of 4 fp32 values, and
    # every slot is a multiple of 4 values, so every row and every block starts 16 bytes
    # into the workspace: the backward's 128-bit loads of S rely on it.
    require_backend("triton", "ncl_terms")
    from ncl_fast.kernels import ncl_terms as k

    monkeypatch.setattr(k, "SIM_BUDGET", BUDGETS["stored"])
    feat, labels, a_pos, a_neg = make_case((4, 3, 12, 12, 2), "blobs", gen)
    sizes = [(3, 2), (5, 30), (2, 31), (7, 26)]  # |P| + |N| = 5, 35, 33, 33: none a multiple of 4
    labels = torch.stack([
        torch.tensor([1] * np_ + [0] * nn + [2] * (36 - np_ - nn), dtype=torch.uint8)[torch.randperm(36, generator=gen)]
        for np_, nn in sizes
    ])
    _, plan, _ = _fwd_plan(feat, labels, a_pos, a_neg, 2)
    assert plan[:, :2].tolist() == [[b * 36 * 36, 1] for b in range(4)]  # one slot of L x ld(L) per image
    # odd L and caps that are no multiple of 16 bytes: every slot is still a multiple of 4 values
    for budget in (BUDGETS["stored"], 1e-3, 7e-5):
        monkeypatch.setattr(k, "SIM_BUDGET", budget)
        for L in (1, 5, 35, 37, 1023):
            slot = k.workspace_slot(L)
            assert slot % 4 == 0 and slot <= L * (-(-L // 4) * 4) and slot <= budget * 2**20 / 4
            assert slot == min(L * (-(-L // 4) * 4), int(budget * 2**20 / 4) // 4 * 4)


def test_a_slot_off_the_16_byte_grid_is_refused(gen):
    # The kernels' 128-bit accesses of the workspace assume every slot is a multiple of 4
    # fp32 values: any other slot is refused before a launch, naming what to use.
    require_backend("triton", "ncl_terms")
    from ncl_fast.kernels import ncl_terms as k
    from ncl_fast.kernels import patch_labels as kl

    feat, labels, a_pos, a_neg = make_case((2, 3, 8, 8, 2), "blobs", gen)
    counts, perm = kl.patch_lists_fwd(labels)
    for slot in (6, -4):
        with pytest.raises(ValueError, match=f"multiple of 4 fp32 values, >= 0; got {slot}"):
            k.ncl_terms_fwd(feat, a_pos, a_neg, counts, perm, 2, (4, 4), 0.1, slot=slot)
    terms, _ = k.ncl_terms_fwd(feat, a_pos, a_neg, counts, perm, 2, (4, 4), 0.1, slot=8)
    check(terms, oracles.ncl_terms(feat, labels, a_pos, a_neg, 2), *SAME_VALUES[torch.float32])


def test_backward_reads_no_value_from_the_row_padding(gen, monkeypatch):
    # The backward loads S in whole aligned runs of 4 columns, the rows' padding
    # included, and must select its values with the exact mask: padding set to NaN
    # between the forward and the backward changes nothing.
    require_backend("triton", "ncl_terms")
    from ncl_fast.kernels import ncl_terms as k
    from ncl_fast.kernels import patch_labels as kl

    monkeypatch.setattr(k, "SIM_BUDGET", BUDGETS["stored"])

    shape = (2, 3, 16, 16, 2)
    feat, labels, a_pos, a_neg = make_case(shape, "blobs", gen)
    sizes = [(21, 42), (6, 49)]  # |P| + |N| = 63, 55: one padding column per row
    labels = torch.stack([
        torch.tensor([1] * np_ + [0] * nn + [2] * (64 - np_ - nn), dtype=torch.uint8)[torch.randperm(64, generator=gen)]
        for np_, nn in sizes
    ])
    counts, perm = kl.patch_lists_fwd(labels)
    _, saved = k.ncl_terms_fwd(feat, a_pos, a_neg, counts, perm, 2, (8, 8), 0.1)
    plan, ws = saved.plan, saved.ws
    assert plan[:, 1].tolist() == [1, 1]
    for (np_, nn), (off, _, _) in zip(sizes, plan.tolist()):
        ld = -(-(np_ + nn) // 4) * 4
        ws[off: off + np_ * ld].view(np_, ld)[:, np_ + nn:] = float("nan")
    grad_out = torch.rand(2, 3, generator=gen) + 0.5
    grads = k.ncl_terms_bwd(grad_out, feat, a_pos, a_neg, counts, perm, saved, 2, (8, 8), 0.1)
    _, want = terms_and_grads("reference", feat, labels, a_pos, a_neg, 2, 0.1, grad_out)
    assert all(torch.isfinite(g).all() for g in grads)
    check_grads(grads, want, torch.float32)


@pytest.mark.parametrize("path", ["stored", "bounded"])
def test_plan_follows_the_budget(path, gen, monkeypatch):
    require_backend("triton", "ncl_terms")
    from ncl_fast.kernels import ncl_terms as k

    monkeypatch.setattr(k, "SIM_BUDGET", BUDGETS[path])
    feat, labels, a_pos, a_neg = make_case((2, 3, 8, 8, 2), "blobs", gen)
    labels[:, :3] = torch.tensor([1, 1, 0], dtype=torch.uint8)  # t1 defined in both images
    _, plan, _ = _fwd_plan(feat, labels, a_pos, a_neg, 2)
    assert plan[:, 1].tolist() == ([1, 1] if path == "stored" else [0, 0])


def test_uncovered_cells_get_zero_gradient(impl, gen, monkeypatch):
    # h, w not multiples of p: the last rows and columns belong to no patch. The fused
    # backward writes every covered cell itself and zeroes only the uncovered ones:
    # its gradient buffer starts as NaN here, so a cell nobody wrote shows.
    if impl == "triton":
        real_empty_like = torch.empty_like
        monkeypatch.setattr(torch, "empty_like", lambda t, **kw: real_empty_like(t, **kw).fill_(float("nan")))
    shape = (2, 3, 11, 13, 3)
    feat, labels, a_pos, a_neg = make_case(shape, "blobs", gen)
    pattern = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0, 2, 2, 0, 1], dtype=torch.uint8)  # every term defined
    labels = torch.stack([pattern[torch.randperm(12, generator=gen)] for _ in range(2)])
    _, (g_feat, _, _) = terms_and_grads(impl, feat, labels, a_pos, a_neg, 3, 0.1, torch.ones(2, 3))
    assert torch.isfinite(g_feat).all()
    assert (g_feat[:, :, 9:, :] == 0).all() and (g_feat[:, :, :, 12:] == 0).all()
    assert g_feat[:, :, :9, :12].abs().sum() > 0


def test_invalid_labels_are_rejected_on_cpu(impl, gen):
    feat, labels, a_pos, a_neg = make_case((2, 3, 8, 8, 2), "blobs", gen)
    for bad in (3, 255):
        labels_bad = labels.clone()
        labels_bad[1, 5] = bad
        with pytest.raises(ValueError, match=r"labels must be 0 \(authentic\), 1 \(tampered\) or 2"):
            functional.ncl_terms(feat, labels_bad, a_pos, a_neg, 2, impl=impl)


@pytest.mark.parametrize("bad", [3, 7, 255])
def test_patch_lists_put_invalid_labels_last(bad, gen):
    # A caller's label outside {0, 1, 2} (on a GPU the API does not read values) is in
    # no set; the list stays a whole permutation, with such patches after the contour ones.
    require_backend("triton", "ncl_terms")
    from ncl_fast.kernels import patch_labels as kl

    labels = torch.randint(0, 3, (2, 300), generator=gen, dtype=torch.uint8)
    labels[0, torch.randperm(300, generator=gen)[:40]] = bad
    counts, perm = kl.patch_lists_fwd(labels)
    for b in range(2):
        want = [int((labels[b] == v).sum()) for v in (1, 0, 2)]
        assert counts[b].tolist() == want
        assert sorted(perm[b].tolist()) == list(range(300))  # every slot written once
        n = sum(want)
        lab_in_order = labels[b, perm[b].long()]
        assert lab_in_order[: want[0]].eq(1).all() and lab_in_order[want[0]: want[0] + want[1]].eq(0).all()
        assert lab_in_order[want[0] + want[1]: n].eq(2).all() and (lab_in_order[n:] > 2).all()


def test_wide_integer_labels_are_not_wrapped(gen):
    # int64 256 must not become 0 (authentic) on the way to uint8
    from ncl_fast import _triton_ops

    labels = torch.tensor([[0, 1, 2, 256, -1, 3, 258]])
    assert _triton_ops._as_label_codes(labels).tolist() == [[0, 1, 2, 3, 3, 3, 3]]


@pytest.mark.parametrize("budget", ["stored", "cap", "bounded"])
def test_workspace_is_written_everywhere(budget, gen, monkeypatch):
    # The workspace is an output of the op and no memset fills it: the similarity GEMM
    # writes its blocks whole (their padding columns as 0) and the statistics pass zeros
    # the rest of every slot (with no slot, the workspace's one value). Allocated as
    # NaN, it keeps none, and past each image's blocks every value is 0. A mixed batch:
    # stored images with t1 (split into parts of D where the budget allows), one whose
    # t1 is undefined (no authentic patch), and under the cap one that is not stored.
    require_backend("triton", "ncl_terms")
    from ncl_fast.kernels import ncl_terms as k
    from ncl_fast.kernels import patch_labels as kl

    mib = {"stored": BUDGETS["stored"], "cap": 200 * 4 / 2**20, "bounded": 0.0}[budget]
    monkeypatch.setattr(k, "SIM_BUDGET", mib)
    feat, _, a_pos, a_neg = make_case((4, 16, 12, 12, 2), "blobs", gen)  # L = 36, D = 64
    sizes = [(4, 30), (12, 20), (5, 0), (3, 26)]  # |P| + |N| = 34, 32, 5, 29: ld 36, 32, 8, 32
    labels = torch.stack([
        torch.tensor([1] * np_ + [0] * nn + [2] * (36 - np_ - nn), dtype=torch.uint8)[torch.randperm(36, generator=gen)]
        for np_, nn in sizes
    ])
    counts, perm = kl.patch_lists_fwd(labels)
    real_empty = torch.empty
    def poisoned(*a, **kw):
        t = real_empty(*a, **kw)
        return t.fill_(float("nan") if t.is_floating_point() else -1)

    monkeypatch.setattr(torch, "empty", poisoned)
    terms, saved = k.ncl_terms_fwd(feat, a_pos, a_neg, counts, perm, 2, (6, 6), 0.1)
    monkeypatch.setattr(torch, "empty", real_empty)
    ws, plan, slot = saved.ws, saved.plan.tolist(), k.workspace_slot(36)
    assert slot == {"stored": 36 * 36, "cap": 200, "bounded": 0}[budget]
    assert ws.numel() == max(4 * slot, 1) and torch.isfinite(ws).all()
    if slot == 0:
        assert ws.tolist() == [0.0]
    parts = []
    for b, ((np_, nn), (off, stored, splits)) in enumerate(zip(sizes, plan)):
        ld = -(-(np_ + nn) // 4) * 4
        work = slot > 0 and stored == 1 and np_ >= 2 and nn >= 1
        end = splits * np_ * ld if work else 0
        assert end <= slot and (ws[b * slot + end: (b + 1) * slot] == 0).all(), f"image {b}: the slot's tail"
        if work:
            assert off == b * slot
            blocks = ws[off: off + end].view(splits, np_, ld)
            assert (blocks[:, :, np_ + nn:] == 0).all(), f"image {b}: the blocks' padding columns"
            assert (blocks[:, :, : np_ + nn] != 0).any()
            parts.append(splits)
    assert len(parts) == {"stored": 3, "cap": 2, "bounded": 0}[budget]
    if budget == "stored":
        assert max(parts) > 1  # a block in several parts of D
    check(terms, oracles.ncl_terms(feat, labels, a_pos, a_neg, 2), *SAME_VALUES[torch.float32])


def test_every_covered_cell_is_written(impl, gen, monkeypatch):
    # L = 100 patches, only 13 of them tampered or authentic: whole tiles of contour
    # patches (beyond the 64 of one backward tile) must be written with zeros too. Every
    # buffer the op allocates starts as NaN (or -1), so a value nobody wrote shows.
    if impl == "triton":
        real_empty_like, real_empty = torch.empty_like, torch.empty

        def poisoned(t):
            return t.fill_(float("nan") if t.is_floating_point() else -1)

        monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poisoned(real_empty_like(*a, **kw)))
        monkeypatch.setattr(torch, "empty", lambda *a, **kw: poisoned(real_empty(*a, **kw)))
    shape = (2, 2, 20, 20, 2)
    feat, _, a_pos, a_neg = make_case(shape, "blobs", gen)
    pattern = torch.tensor([1] * 3 + [0] * 10 + [2] * 87, dtype=torch.uint8)
    labels = torch.stack([pattern[torch.randperm(100, generator=gen)] for _ in range(2)])
    grad_out = torch.rand(2, 3, generator=gen) + 0.5
    terms, grads = terms_and_grads(impl, feat, labels, a_pos, a_neg, 2, 0.1, grad_out)
    monkeypatch.undo()
    check(terms, oracles.ncl_terms(feat, labels, a_pos, a_neg, 2), *SAME_VALUES[torch.float32])
    if impl == "triton":
        _, want = terms_and_grads("reference", feat, labels, a_pos, a_neg, 2, 0.1, grad_out)
        check_grads(grads, want, torch.float32)
    g_feat = grads[0]
    assert torch.isfinite(g_feat).all()
    flags = (labels == 2).float()[:, None, :].expand(2, 2 * 2 * 2, 100)
    cells = torch.nn.functional.fold(flags, output_size=(20, 20), kernel_size=2, stride=2).expand_as(g_feat) > 0
    assert (g_feat[cells] == 0).all() and (g_feat[~cells] != 0).any()


def test_backward_makes_no_zero_gradients_for_the_saved_outputs(gen, monkeypatch):
    # Only `terms` is differentiable: autograd must not materialize a zero gradient for
    # the workspace (one L x ld(L) slot per image) or the other saved outputs.
    require_backend("triton", "ncl_terms")
    from ncl_fast.kernels import ncl_terms as k

    monkeypatch.setattr(k, "SIM_BUDGET", BUDGETS["stored"])

    class Zeros(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.sizes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (torch.ops.aten.zeros.default, torch.ops.aten.zeros_like.default,
                        torch.ops.aten.new_zeros.default):
                self.sizes += [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            return out

    feat, labels, a_pos, a_neg = make_case((2, 3, 8, 8, 2), "blobs", gen)
    leaves = [t.clone().requires_grad_() for t in (feat, a_pos, a_neg)]
    terms = functional.ncl_terms(leaves[0], labels, leaves[1], leaves[2], 2, impl="triton")
    with Zeros() as z:
        terms.sum().backward()
    assert 2 * k.workspace_slot(16) == 512  # a zero-filled workspace would show
    assert not [n for n in z.sizes if n > 16], f"zero-filled buffers of {z.sizes} elements in the backward"


def test_64bit_offsets_are_chosen_where_an_image_spans_2_to_the_31(gen):
    # A permuted (C, B, h, w) buffer read as (B, C, h, w): the channel stride spans the
    # batch, so one image's offsets pass 2^31 although each image holds few elements.
    from ncl_fast.kernels import patch_labels as kl

    B, C, h, w = 64, 4096, 128, 128  # 2^32 elements in all (meta tensors), 2^26 per image
    contiguous = torch.empty(B, C, h, w, device="meta")
    permuted = torch.empty(C, B, h, w, device="meta").transpose(0, 1)
    assert not kl.needs_64bit_offsets(contiguous)
    assert kl.needs_64bit_offsets(permuted)
    assert kl.needs_64bit_offsets(contiguous, torch.empty(B, C * h * w, device="meta").t().contiguous().t())
    assert not kl.needs_64bit_offsets(contiguous[:, :, :, :1].expand(B, C, h, 2**20))  # stride 0: no span


@pytest.mark.parametrize("path", ["stored", "bounded"])
def test_64bit_offset_kernels_match(path, gen, monkeypatch):
    # The int64 variants of every kernel (forced here with a zero span) give the same
    # values and gradients, labels included.
    require_backend("triton", "ncl_terms")
    from ncl_fast.kernels import ncl_terms as k
    from ncl_fast.kernels import patch_labels as kl

    monkeypatch.setattr(k, "SIM_BUDGET", BUDGETS[path])
    shape = (2, 3, 12, 10, 2)
    feat, labels, a_pos, a_neg = make_case(shape, "blobs", gen)
    mask = random_mask(2, 24, 20, "blobs", gen)
    feat = feat.to(memory_format=torch.channels_last)
    grad_out = torch.rand(2, 3, generator=gen) + 0.5
    want, want_grads = terms_and_grads("triton", feat, labels, a_pos, a_neg, 2, 0.2, grad_out)
    want_labels = functional.patch_labels(mask, (12, 10), 2, impl="triton")
    monkeypatch.setattr(kl, "INT32_SPAN", 0)
    assert kl.needs_64bit_offsets(feat)
    got, grads = terms_and_grads("triton", feat, labels, a_pos, a_neg, 2, 0.2, grad_out)
    assert torch.equal(functional.patch_labels(mask, (12, 10), 2, impl="triton"), want_labels)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    for g, r in zip(grads, want_grads):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("path,patch,layout,dtype,precision", [
    ("bounded", 1, "contiguous", torch.float32, "tf32x3"),
    ("bounded", 1, "contiguous", torch.float16, "tf32x3"),
    ("stored", 1, "contiguous", torch.float32, "ieee"),
    ("stored", 2, "contiguous", torch.float16, "tf32x3"),
], ids=["bounded-p1-fp32", "bounded-p1-fp16", "stored-p1-ieee", "stored-p2-half-coef"])
def test_64bit_offset_tiles(path, patch, layout, dtype, precision, gen, monkeypatch):
    # With 64-bit offsets some launches take other tiles, so that they do not spill: the
    # bounded backward half its chunk of D at p = 1 in NCHW (D = 80: chunks of 32 and 64
    # instead of 64 and 128), the similarity GEMM one stage with ieee, the grouped backward
    # with half coefficients chunks of 64 (D = 68, as the head kernel is left out). Values
    # and gradients against the reference.
    require_backend("triton", "ncl_terms")
    from ncl_fast.kernels import ncl_terms as k
    from ncl_fast.kernels import patch_labels as kl

    monkeypatch.setattr(k, "SIM_BUDGET", BUDGETS[path])
    monkeypatch.setattr(k, "FP32_DOT_PRECISION", precision)
    monkeypatch.setattr(k, "HALF_COEF_DTYPES", (torch.float16,))
    channels = 80 if patch == 1 else 17
    feat, labels, a_pos, a_neg = make_case((2, channels, 18, 18, patch), "blobs", gen, dtype=dtype)
    if layout == "channels_last":
        feat = feat.to(memory_format=torch.channels_last)
    monkeypatch.setattr(kl, "INT32_SPAN", 0)
    assert kl.needs_64bit_offsets(feat)
    tau = 0.15
    grad_out = torch.rand(2, 3, generator=gen) + 0.5
    got, grads = terms_and_grads("triton", feat, labels, a_pos, a_neg, patch, tau, grad_out)
    check(got, oracles.ncl_terms(feat, labels, a_pos, a_neg, patch, tau), *SAME_VALUES[dtype])
    _, want = terms_and_grads("reference", feat, labels, a_pos, a_neg, patch, tau, grad_out)
    check_grads(grads, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("path", ["stored", "bounded"])
def test_several_row_tiles_and_chunks_of_d(path, dtype, gen, monkeypatch):
    # L = 289 > 256 patches, |P| above 128 and |N| above 64 (several row tiles in every
    # kernel: 128 in the half similarity GEMM, 64 in the fp32 one and the stored backward,
    # 32 in the bounded kernels), D = 68 (two
    # 64-wide chunks of D and of K, for fp32 and for the half path's tensor-core dots); a
    # small D keeps the interpreter fast. An index taken within a tile instead of the whole
    # list (e.g. the diagonal j != m), or a K loop that drops its accumulator, shows here.
    require_backend("triton", "ncl_terms")
    from ncl_fast.kernels import ncl_terms as k

    monkeypatch.setattr(k, "SIM_BUDGET", BUDGETS[path])
    assert k._upcast(torch.empty(0, dtype=dtype)) == (dtype == torch.float32)  # fp16: the half path
    shape = (2, 17, 34, 34, 2)
    feat, _, a_pos, a_neg = make_case(shape, "blobs", gen, dtype=dtype)
    n_p = [int(x) for x in torch.randint(130, 180, (2,), generator=gen)]
    labels = torch.stack([
        torch.tensor([1] * p_ + [0] * (250 - p_) + [2] * 39, dtype=torch.uint8)[torch.randperm(289, generator=gen)]
        for p_ in n_p
    ])
    tau = float(torch.empty(()).uniform_(0.07, 0.2, generator=gen))
    grad_out = torch.rand(2, 3, generator=gen) + 0.5
    got, grads = terms_and_grads("triton", feat, labels, a_pos, a_neg, 2, tau, grad_out)
    check(got, oracles.ncl_terms(feat, labels, a_pos, a_neg, 2, tau), *SAME_VALUES[dtype])
    _, want = terms_and_grads("reference", feat, labels, a_pos, a_neg, 2, tau, grad_out)
    check_grads(grads, want, dtype)
    _, plan, _ = _fwd_plan(feat, labels, a_pos, a_neg, 2)
    assert plan[:, 1].tolist() == ([1, 1] if path == "stored" else [0, 0])


@pytest.mark.parametrize("sms", [1, 64], ids=["few-programs", "split-k"])
def test_persistent_work_lists_and_split_k(sms, gen, monkeypatch):
    # The stored path's persistent kernels over a batch that mixes every regime: several
    # row and column tiles (|P| > 64, |P| + |N| > 128: several items of the similarity GEMM,
    # the row pass and the coefficient pass), |P| = 1 (t1 undefined, t2 and t3 defined),
    # |N| = 0 (no term defined), and an image of contour patches only. "few-programs": one
    # SM's worth of programs, each running many items (and finding their images); "split-k":
    # enough SMs that every image with t1 splits D into several parts (partial blocks added
    # by the row pass). D = 68 gives three 32-wide K chunks (fp32).
    require_backend("triton", "ncl_terms")
    from ncl_fast.kernels import ncl_terms as k

    monkeypatch.setattr(k, "SIM_BUDGET", BUDGETS["stored"])
    monkeypatch.setattr(k, "INTERPRET_SMS", sms)
    L = 17 * 17
    shape = (5, 17, 34, 34, 2)
    feat, _, a_pos, a_neg = make_case(shape, "blobs", gen)
    n_p = int(torch.randint(70, 100, (), generator=gen))
    sizes = [(n_p, 160), (1, 200), (40, 0), (0, 0), (3, 9)]  # (|P|, |N|), the rest contour
    labels = torch.stack([
        torch.tensor([1] * p_ + [0] * n_ + [2] * (L - p_ - n_), dtype=torch.uint8)[torch.randperm(L, generator=gen)]
        for p_, n_ in sizes
    ])
    tau = float(torch.empty(()).uniform_(0.07, 0.2, generator=gen))
    grad_out = torch.rand(5, 3, generator=gen) + 0.5
    got, grads = terms_and_grads("triton", feat, labels, a_pos, a_neg, 2, tau, grad_out)
    check(got, oracles.ncl_terms(feat, labels, a_pos, a_neg, 2, tau), *SAME_VALUES[torch.float32])
    _, want = terms_and_grads("reference", feat, labels, a_pos, a_neg, 2, tau, grad_out)
    check_grads(grads, want, torch.float32)
    _, plan, _ = _fwd_plan(feat, labels, a_pos, a_neg, 2)
    splits = plan[:, 2].tolist()
    if sms == 64:
        assert splits[0] > 1 and splits[4] > 1, splits
        n_k = -(-68 // 32)  # the K chunks of D: every part takes cdiv(n_k, splits) of them, none is empty
        assert all((s - 1) * -(-n_k // s) < n_k for s in splits), splits
    else:
        assert splits[0] == 1, splits


def test_work_lists_of_the_grouped_backward(gen, monkeypatch):
    # The plan's work lists of the stored backward's grouped kernel (persistent: it visits only
    # the images listed): kind 5 every stored image, kind 6 those with |P| > GRAD_HEAD (the
    # head kernel takes the rest). A cap of 200 values per image: image 1 (a 12 x 32 block)
    # takes the bounded path; image 3 (|P| = 1, t1 undefined) is stored (an empty block).
    # GRAD_HEAD = 3 here: images 0 (|P| = 4) and 1 (|P| = 12, not stored) are above it.
    require_backend("triton", "ncl_terms")
    from ncl_fast.kernels import ncl_stored as ks
    from ncl_fast.kernels import ncl_terms as k

    monkeypatch.setattr(k, "SIM_BUDGET", 200 * 4 / 2**20)  # MiB
    monkeypatch.setattr(ks, "GRAD_HEAD", 3)  # the head kernel's, which the plan follows
    feat, labels, a_pos, a_neg = make_case((5, 4, 12, 12, 2), "blobs", gen)
    sizes = [(4, 30), (12, 20), (2, 30), (1, 30), (3, 5)]  # (|P|, |N|), the rest contour
    labels = torch.stack([
        torch.tensor([1] * p_ + [0] * n_ + [2] * (36 - p_ - n_), dtype=torch.uint8)[torch.randperm(36, generator=gen)]
        for p_, n_ in sizes
    ])
    from ncl_fast.kernels import patch_labels as kl

    counts, perm = kl.patch_lists_fwd(labels)
    _, saved = k.ncl_terms_fwd(feat, a_pos, a_neg, counts, perm, 2, (6, 6), 0.1)
    assert saved.sched.shape == (k.SCHED_KINDS, 6)
    assert saved.plan[:, 1].tolist() == [1, 0, 1, 1, 1]
    assert saved.sched[5].tolist() == [0, 1, 1, 2, 3, 4]
    assert saved.sched[6].tolist() == [0, 1, 1, 1, 1, 1]


class _Launches:
    """Records the grids of a Triton kernel's launches, and launches it."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.mark.parametrize("capability,head,sim_bn", [(9, True, None), (9, False, None), (8, False, None),
                                                     (9, True, 128)],
                         ids=["sm90-head", "sm90-panel", "sm80-no-panel", "sim-bn-128"])
def test_half_coefficients_path(capability, head, sim_bn, gen, monkeypatch):
    # The backward's coefficients in the features' half type (bf16 on a GPU; run here with
    # fp16, whose tensor-core dots the interpreter computes as the GPU does): Gc and Gr,
    # written by the coefficient pass already scaled by the partners' 1/|f|. Several row
    # tiles (|P| > 64, L = 289) and chunks of D (D = 132 > 128, the half path's chunk).
    # "sm90-head": as on sm_90, the image with |P| = 90 <= GRAD_HEAD takes the head kernel,
    # the one with |P| = 150 the grouped kernel, one row tile a program (no panel: it would
    # serve no image); "sm90-panel": the head kernel left out (GRAD_HEAD_MAJORS empty), the
    # grouped kernel takes several row tiles a program (5 tiles of 64, 4 a group: n_grp = 2,
    # groups of 3 and 2 tiles, the rest past the map), and the column GEMM runs from the
    # panel of tampered features (|P| = 90 <= PANEL) in one image and streams them (|P| =
    # 150 > PANEL) in the other; "sm80-no-panel": as on sm_80, one row tile a program, every
    # partner streamed. "sim-bn-128": the similarity GEMM's candidate of 128 columns per
    # item (|P| + |N| = 250: two column tiles, the second partly padding).
    require_backend("triton", "ncl_terms")
    from ncl_fast.kernels import ncl_stored as ks
    from ncl_fast.kernels import ncl_terms as k

    monkeypatch.setattr(k, "SIM_BUDGET", BUDGETS["stored"])
    monkeypatch.setattr(k, "HALF_COEF_DTYPES", (torch.float16,))
    monkeypatch.setattr(k, "PANEL_CAPABILITY", capability)
    if not head:
        monkeypatch.setattr(k, "GRAD_HEAD_MAJORS", ())
    assert k._grad_head(torch.device("cpu")) == head
    panel = 0 if head else k._grad_panel(torch.device("cpu"))
    assert (panel > 0) == (capability == 9 and not head)
    if sim_bn:
        monkeypatch.setattr(k, "SIM_BN", sim_bn)
    assert k._sim_tiles(False)[1] == (sim_bn or 64)
    assert k._half_coef(torch.empty(0, dtype=torch.float16))
    shape = (2, 33, 34, 34, 2)
    tiles = ks.grad_tiles(False, True, False, panel)
    assert 132 > tiles["BD"] and 70 > tiles["BX"]
    if panel:
        assert 1 < tiles["GROUP"] < -(-289 // tiles["BX"]) and 90 <= tiles["PANEL"] < 150
    if head:
        assert 90 <= ks.grad_head_tiles(2, False)["HEAD"] < 150
    feat, _, a_pos, a_neg = make_case(shape, "blobs", gen, dtype=torch.float16)
    labels = torch.stack([
        torch.tensor([1] * p_ + [0] * (250 - p_) + [2] * 39, dtype=torch.uint8)[torch.randperm(289, generator=gen)]
        for p_ in (150, 90)
    ])
    grad_out = torch.rand(2, 3, generator=gen) + 0.5
    launches = _Launches(k._ncl_grad_head_kernel)
    monkeypatch.setattr(k, "_ncl_grad_head_kernel", launches)
    _, grads = terms_and_grads("triton", feat, labels, a_pos, a_neg, 2, 0.1, grad_out)
    assert len(launches.grids) == int(head)
    _, want = terms_and_grads("reference", feat, labels, a_pos, a_neg, 2, 0.1, grad_out)
    check_grads(grads, want, torch.float16)


@pytest.mark.parametrize("patch,layout,channels", [(2, "contiguous", 33), (1, "contiguous", 40),
                                                   (8, "channels_last", 3), (2, "channels_last", 33)],
                         ids=["p2-nchw", "p1-nchw", "p8-cl", "p2-cl"])
def test_head_kernel_values(patch, layout, channels, gen, monkeypatch):
    # The head kernel (sm_90, half coefficients; fp16 here) on every kind of image it takes,
    # beside one it leaves to the grouped kernel, at each of its chunks of D (p >= 8: 128,
    # p = 1 in NCHW: 32, else 64; D = 192, 40, 132: several chunks, the last partial).
    # L = 289 patches. |P| = 90: tampered rows in both head tiles, tail tiles past them;
    # |P| = 128: the head full; |P| = 40 with |N| = 20: one tile of listed patches (the
    # second head tile holds none), contour patches from row 64; |P| = 1: t1 undefined
    # (its products run on zeros); no listed patch; |P| = 150 > GRAD_HEAD: the grouped kernel;
    # |P| + |N| = 100: both head tiles hold listed patches, no tile past them.
    require_backend("triton", "ncl_terms")
    from ncl_fast.kernels import ncl_stored as ks
    from ncl_fast.kernels import ncl_terms as k

    monkeypatch.setattr(k, "SIM_BUDGET", BUDGETS["stored"])
    monkeypatch.setattr(k, "HALF_COEF_DTYPES", (torch.float16,))
    monkeypatch.setattr(k, "PANEL_CAPABILITY", 9)
    assert k._grad_head(torch.device("cpu"))
    tiles = ks.grad_head_tiles(patch, layout == "channels_last")
    D = channels * patch * patch
    assert D > tiles["BD"] and D % tiles["BD"], (D, tiles)
    assert tiles["BD"] == (128 if patch >= 8 else 32 if patch == 1 and layout == "contiguous" else 64)
    side = 17 * patch
    feat, _, a_pos, a_neg = make_case((7, channels, side, side, patch), "blobs", gen, dtype=torch.float16)
    if layout == "channels_last":
        feat = feat.to(memory_format=torch.channels_last)
    sizes = [(90, 160), (128, 100), (40, 20), (1, 200), (0, 0), (150, 100), (70, 30)]  # (|P|, |N|), the rest contour
    labels = torch.stack([
        torch.tensor([1] * p_ + [0] * n_ + [2] * (289 - p_ - n_), dtype=torch.uint8)[torch.randperm(289, generator=gen)]
        for p_, n_ in sizes
    ])
    tau = float(torch.empty(()).uniform_(0.07, 0.2, generator=gen))
    grad_out = torch.rand(7, 3, generator=gen) + 0.5
    launches = _Launches(k._ncl_grad_head_kernel)
    monkeypatch.setattr(k, "_ncl_grad_head_kernel", launches)
    grouped = _Launches(k._ncl_grad_kernel)
    monkeypatch.setattr(k, "_ncl_grad_kernel", grouped)
    _, grads = terms_and_grads("triton", feat, labels, a_pos, a_neg, patch, tau, grad_out)
    assert launches.grids == [(7 * -(-D // tiles["BD"]),)]
    # the grouped kernel's persistent programs, GRAD_PER_SM per SM (below its 7 x 5 x n_td items
    # at most; its work list holds the image with |P| = 150 alone)
    assert grouped.grids == [(ks.GRAD_PER_SM * k.INTERPRET_SMS,)]
    _, want = terms_and_grads("reference", feat, labels, a_pos, a_neg, patch, tau, grad_out)
    assert all(torch.isfinite(g).all() for g in grads)
    check_grads(grads, want, torch.float16)


@pytest.mark.parametrize("major,sm90", [(9, True), (8, False), (10, False), (12, False)])
def test_head_kernel_and_panel_are_chosen_by_the_devices_architecture(major, sm90, monkeypatch):
    # The head kernel (one block per SM at 255 registers) and the grouped kernel's row groups
    # and panel (two blocks per SM within 128 registers; they spill on sm_80) are compiled
    # for sm_90: the op asks the device, and off a GPU follows PANEL_CAPABILITY (the
    # interpreter and the kernel report).
    from ncl_fast.kernels import ncl_terms as k

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))
    assert k._grad_panel(torch.device("cuda", 0)) == (k.GRAD_PANEL if sm90 else 0)
    assert k._grad_head(torch.device("cuda", 0)) == sm90
    assert k.GRAD_PANEL > 0
    monkeypatch.setattr(k, "PANEL_CAPABILITY", major)
    assert k._grad_panel(torch.device("cpu")) == (k.GRAD_PANEL if sm90 else 0)
    assert k._grad_head(torch.device("cpu")) == sm90


@pytest.mark.parametrize("head", [True, False], ids=["head", "panel"])
@pytest.mark.parametrize("wide", [False, True], ids=["int32", "int64"])
def test_head_kernel_and_panel_are_left_out_with_64_bit_offsets(wide, head, gen, monkeypatch):
    # With 64-bit offsets the head kernel and the grouped kernel's groups are not compiled
    # (they would spill on sm_90): the op launches the grouped kernel, one row tile a
    # program, and the values stay those of the 32-bit launch (where that took the head
    # kernel, whose half-precision rounding falls elsewhere, both meet the reference within
    # fp16's tolerances). Where the head kernel runs, the panel serves no image and is left
    # out too.
    require_backend("triton", "ncl_terms")
    from ncl_fast.kernels import ncl_terms as k
    from ncl_fast.kernels import patch_labels as kl

    monkeypatch.setattr(k, "SIM_BUDGET", BUDGETS["stored"])
    monkeypatch.setattr(k, "HALF_COEF_DTYPES", (torch.float16,))
    if not head:
        monkeypatch.setattr(k, "GRAD_HEAD_MAJORS", ())
    feat, labels, a_pos, a_neg = make_case((2, 5, 20, 20, 2), "blobs", gen, dtype=torch.float16)
    grad_out = torch.rand(2, 3, generator=gen) + 0.5
    _, want = terms_and_grads("triton", feat, labels, a_pos, a_neg, 2, 0.2, grad_out)
    panels = []
    grad_tiles = k.grad_tiles
    monkeypatch.setattr(k, "grad_tiles", lambda *a, **kw: panels.append(a[3]) or grad_tiles(*a, **kw))
    launches = _Launches(k._ncl_grad_head_kernel)
    monkeypatch.setattr(k, "_ncl_grad_head_kernel", launches)
    if wide:
        monkeypatch.setattr(kl, "INT32_SPAN", 0)
    _, got = terms_and_grads("triton", feat, labels, a_pos, a_neg, 2, 0.2, grad_out)
    assert panels == [0 if wide or head else k.GRAD_PANEL]
    assert len(launches.grids) == int(head and not wide)
    if head and wide:  # the head kernel's values against the grouped kernel's: two roundings
        _, ref = terms_and_grads("reference", feat, labels, a_pos, a_neg, 2, 0.2, grad_out)
        check_grads(want, ref, torch.float16)
        check_grads(got, ref, torch.float16)
        return
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-5)


def test_second_backward_of_one_graph(gen, monkeypatch):
    # The coefficients go to their own buffer: S is left as the forward wrote it, so a
    # second backward through the same graph (retain_graph) gives the same gradients.
    require_backend("triton", "ncl_terms")
    from ncl_fast.kernels import ncl_terms as k

    monkeypatch.setattr(k, "SIM_BUDGET", BUDGETS["stored"])
    feat, _, a_pos, a_neg = make_case((2, 3, 12, 12, 2), "blobs", gen)
    pattern = torch.tensor([1] * 9 + [0] * 20 + [2] * 7, dtype=torch.uint8)  # every term defined
    labels = torch.stack([pattern[torch.randperm(36, generator=gen)] for _ in range(2)])
    leaf = feat.clone().requires_grad_()
    terms = functional.ncl_terms(leaf, labels, a_pos, a_neg, 2, impl="triton")
    first, = torch.autograd.grad(terms.sum(), leaf, retain_graph=True)
    second, = torch.autograd.grad(terms.sum(), leaf)
    assert torch.equal(first, second) and first.abs().sum() > 0


def test_small_tau_forms_no_overflow(impl, gen):
    # tau = 0.01 puts s / tau near +-100: every exp the kernels form (the discarded branch of
    # a `where` included) must stay finite. The interpreter's overflow warnings are errors
    # here (pyproject.toml), and the values and gradients match the float64 oracle.
    # Tampered patches near +1, authentic near -1 (a fifth the other way round), contour
    # patches at random; the anchors
    # +1 and -1: cosines near +-1, so a discarded lane's s - lse reaches about 2 / tau.
    B, C, h, p = 2, 4, 12, 2
    _, labels, _, _ = make_case((B, C, h, h, p), "blobs", gen)
    sign = torch.tensor([-1.0, 1.0, 0.0])[labels.long()].view(B, 1, h // p, h // p)
    # a fifth of the patches on the wrong side: their terms (and gradients) are far from 0
    sign = torch.where(torch.rand(sign.shape, generator=gen) < 0.2, -sign, sign)
    sign = sign.repeat_interleave(p, 2).repeat_interleave(p, 3)
    feat = sign + torch.where(sign == 0, 1.0, 0.05) * torch.randn(B, C, h, h, generator=gen)
    a_pos = 1.0 + 0.05 * torch.randn(B, C * p * p, generator=gen)
    a_neg = -a_pos
    tau = 0.01
    grad_out = torch.rand(2, 3, generator=gen) + 0.5
    got, grads = terms_and_grads(impl, feat, labels, a_pos, a_neg, 2, tau, grad_out)
    # fp32 rounds s to a relative 6e-8, which s / tau carries as an absolute error 1 / tau times
    # larger: the bounds (set at tau = 0.1) scale by 0.1 / tau
    scale = 0.1 / tau
    rtol, atol = SAME_VALUES[torch.float32]
    check(got, oracles.ncl_terms(feat.double(), labels, a_pos.double(), a_neg.double(), 2, tau).float(),
          scale * rtol, scale * atol)
    # gradients: the reference in float64 (its gradients are checked by gradcheck)
    _, want = terms_and_grads("reference", feat.double(), labels, a_pos.double(), a_neg.double(), 2, tau,
                              grad_out.double())
    check_grads(grads, [g.float() for g in want], torch.float32, scale)
