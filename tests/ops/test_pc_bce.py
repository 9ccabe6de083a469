"""pc_bce / pc_loss: the reference and the C++ extension (its CPU kernel here),
each against the float64 oracle of SPEC section 6."""
import pytest
import torch

import oracles
from helpers import as_mask_dtype, random_mask, require_backend
from ncl_fast import functional
from tolerances import SAME_VALUES


class Impl:
    """`functional.pc_bce` / `pc_loss` bound to one backend."""

    def __init__(self, name: str):
        self.name = name

    def pc_bce(self, logits, mask, mu=0.9, radius=2):
        return functional.pc_bce(logits, mask, mu, radius, impl=self.name)

    def pc_loss(self, logits_list, mask, mu=0.9, radius=2):
        return functional.pc_loss(logits_list, mask, mu, radius, impl=self.name)


@pytest.fixture(params=["reference", "cuda"])
def impl(request):
    require_backend(request.param, "pc_bce")
    return Impl(request.param)


def assert_rel_close(got: torch.Tensor, want: float, dtype=torch.float32) -> None:
    rtol, atol = SAME_VALUES[dtype]
    assert abs(got.item() - want) <= atol + rtol * abs(want), f"got {got.item()!r}, want {want!r}"


# (B, H, W, stride): odd sizes, non power-of-two strides, full resolution.
GEOMETRIES = [(2, 24, 40, 8), (1, 21, 15, 3), (2, 16, 12, 4), (2, 13, 9, 1), (1, 20, 20, 2)]


@pytest.mark.parametrize("geom", GEOMETRIES)
@pytest.mark.parametrize("radius", [0, 1, 2, 3])
@pytest.mark.parametrize("kind", ["blobs", "all", "none", "noise"])
def test_pc_bce_matches_oracle(impl, geom, radius, kind, gen):
    B, H, W, s = geom
    mask = random_mask(B, H, W, kind, gen)
    logits = 3 * torch.randn(B, 1, H // s, W // s, generator=gen)
    mu = float(torch.rand(1, generator=gen))
    got = impl.pc_bce(logits, mask, mu, radius)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert_rel_close(got, oracles.pc_bce(logits, mask, mu, radius))


# Cells that straddle the 32-pixel words of the extension's mask bits (csrc/pc_bits.h): an odd
# stride across word boundaries, strides wider than a word (a cell over 2-3 words), unequal row
# and column strides, a last word of one pixel, and rows of more than 32 words (1,024 pixels),
# which the bits kernel splits into runs of 32 words. (B, H, W, (s_y, s_x))
WORD_GEOMETRIES = [(1, 6, 99, (3, 3)), (2, 4, 100, (2, 50)), (1, 9, 70, (3, 35)), (2, 3, 65, (1, 1)),
                   (1, 4, 1090, (2, 5))]


@pytest.mark.parametrize("geom", WORD_GEOMETRIES)
@pytest.mark.parametrize("kind", ["blobs", "noise"])
def test_pc_bce_cells_across_words(impl, geom, kind, gen):
    B, H, W, (sy, sx) = geom
    mask = random_mask(B, H, W, kind, gen)
    logits = 3 * torch.randn(B, 1, H // sy, W // sx, generator=gen)
    for radius in (0, 1):
        assert_rel_close(impl.pc_bce(logits, mask, 0.8, radius), oracles.pc_bce(logits, mask, 0.8, radius))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.uint8, torch.bool])
def test_pc_loss_mask_dtypes_and_layouts(impl, dtype, gen):
    """Three scales at once against one mask of every dtype the kernels read, contiguous and as
    strided views (a column stride of H, a column stride of 2)."""
    B, H, W = 2, 40, 72
    mask = random_mask(B, H, W, "blobs", gen)
    preds = [3 * torch.randn(B, 1, H // s, W // s, generator=gen) for s in (8, 4, 1)]
    want = sum(oracles.pc_bce(z, mask, 0.9, 2) for z in preds)
    typed = (mask * 255).to(dtype) if dtype == torch.uint8 else mask.to(dtype)
    transposed = typed.transpose(2, 3).contiguous().transpose(2, 3)
    wide = torch.zeros(B, 1, H, 2 * W, dtype=dtype)
    wide[..., ::2] = typed
    for m in (typed, transposed, wide[..., ::2]):
        assert_rel_close(impl.pc_loss(preds, m, 0.9, 2), want)


def test_pc_bce_one_pixel_mask(impl, gen):
    mask = torch.zeros(1, 1, 9, 11)
    mask[0, 0, 4, 5] = 1
    logits = torch.randn(1, 1, 9, 11, generator=gen)
    for r in range(4):
        assert_rel_close(impl.pc_bce(logits, mask, 0.9, r), oracles.pc_bce(logits, mask, 0.9, r))
        # mu = 1: the band of radius r is the (2r+1)^2 square around the pixel
        square = logits[0, 0, 4 - r : 5 + r, 5 - r : 6 + r]
        target = mask[0, 0, 4 - r : 5 + r, 5 - r : 6 + r]
        want = torch.nn.functional.binary_cross_entropy_with_logits(square, target) if r else torch.tensor(0.0)
        assert_rel_close(impl.pc_bce(logits, mask, 1.0, r), want.item())


def test_pc_bce_empty_band_term_is_zero(impl, gen):
    logits = torch.randn(2, 1, 8, 8, generator=gen)
    for mask in (torch.zeros(2, 1, 16, 16), torch.ones(2, 1, 16, 16)):
        assert impl.pc_bce(logits, mask, 1.0, 2).item() == 0.0
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, mask[:, :, ::2, ::2])
        torch.testing.assert_close(impl.pc_bce(logits, mask, 0.0, 2), bce)


@pytest.mark.parametrize("dtype", ["bool", "uint8", "soft"])
def test_pc_bce_mask_dtypes(impl, dtype, gen):
    mask = random_mask(2, 24, 16, "blobs", gen)
    logits = torch.randn(2, 1, 6, 4, generator=gen)
    assert_rel_close(impl.pc_bce(logits, as_mask_dtype(mask, dtype, gen), 0.9, 1), oracles.pc_bce(logits, mask, 0.9, 1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pc_bce_half_logits(impl, dtype, gen):
    mask = random_mask(2, 32, 24, "blobs", gen)
    logits = (3 * torch.randn(2, 1, 8, 6, generator=gen)).to(dtype)
    got = impl.pc_bce(logits, mask, 0.9, 2)
    assert got.dtype == torch.float32
    assert_rel_close(got, oracles.pc_bce(logits, mask, 0.9, 2), dtype)


def test_pc_bce_channels_last_and_strided(impl, gen):
    mask = random_mask(2, 32, 24, "blobs", gen)
    logits = torch.randn(2, 1, 8, 6, generator=gen)
    want = oracles.pc_bce(logits, mask, 0.9, 2)
    assert_rel_close(impl.pc_bce(logits.to(memory_format=torch.channels_last), mask, 0.9, 2), want)
    wide = torch.zeros(2, 1, 8, 12)
    wide[..., ::2] = logits
    assert_rel_close(impl.pc_bce(wide[..., ::2], mask, 0.9, 2), want)


def test_pc_loss_sums_the_scales(impl, gen):
    mask = random_mask(2, 32, 32, "blobs", gen)
    preds = [torch.randn(2, 1, 32 // s, 32 // s, generator=gen) for s in (8, 4, 1)]
    want = sum(oracles.pc_bce(z, mask, 0.9, 2) for z in preds)
    assert_rel_close(impl.pc_loss(preds, mask, 0.9, 2), want)


@pytest.mark.parametrize("radius", [0, 2])
def test_pc_bce_gradcheck(impl, radius, gen):
    mask = random_mask(2, 12, 10, "blobs", gen)
    logits = torch.randn(2, 1, 6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: impl.pc_bce(z, mask, 0.7, radius), (logits,))


def test_pc_bce_gradient_formula(impl, gen):
    # dL/dz = (sigmoid(z) - g) * (mu [in band] / |E| + (1 - mu) / n)
    mask = random_mask(2, 16, 16, "blobs", gen)
    z = torch.randn(2, 1, 8, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    mu, r = 0.9, 1
    impl.pc_bce(z, mask, mu, r).backward()
    G = oracles.shrunk_mask(mask, 8, 8)[:, None].double()
    E = oracles.contour_band(G[:, 0].bool(), r)[:, None].double()
    want = (torch.sigmoid(z.detach()) - G) * (mu * E / E.sum() + (1 - mu) / z.numel())
    torch.testing.assert_close(z.grad, want)


# ---- the extension alone -------------------------------------------------------------------


@pytest.fixture
def ext():
    require_backend("cuda", "pc_bce")
    from ncl_fast import _cuda_ops

    return _cuda_ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("radius", [0, 1, 3])
def test_ext_gradients_match_reference(ext, dtype, radius, gen):
    """Values and gradients at the three training scales, odd sizes, grad_output != 1."""
    mask = random_mask(3, 72, 56, "blobs", gen)
    grad_out = 0.5 + torch.rand((), generator=gen)
    for s in (8, 4, 1):
        z = (3 * torch.randn(3, 1, 72 // s, 56 // s, generator=gen)).to(dtype)
        za = z.clone().requires_grad_()
        zb = z.clone().requires_grad_()
        a = functional.pc_bce(za, mask, 0.9, radius, impl="cuda")
        b = functional.pc_bce(zb, mask, 0.9, radius, impl="reference")
        (a * grad_out).backward()
        (b * grad_out).backward()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert za.grad.dtype == dtype
        # fp32 gradients agree to fp32 rounding: each is a weight times sigmoid(z) - g, which
        # cancels where the prediction is right, so the absolute bound is the rounding of the
        # largest gradient (a few ulps of it), not a fixed number; half ones to one unit of
        # their last place
        big = zb.grad.abs().max().item()
        tol = {torch.float32: (1e-5, 1e-6 * big), torch.bfloat16: (1e-2, 1e-6),
               torch.float16: (2e-3, 1e-7)}[dtype]
        torch.testing.assert_close(za.grad, zb.grad, rtol=tol[0], atol=tol[1])


def test_ext_is_deterministic(ext, gen):
    mask = random_mask(4, 128, 96, "blobs", gen)
    preds = [torch.randn(4, 1, 128 // s, 96 // s, generator=gen) for s in (8, 4, 1)]
    results = []
    for threads in (1, 2, 1):
        torch.set_num_threads(threads)
        results.append(torch.ops.ncl_fast.pc_loss_fwd(preds, mask, 0.9, 2))
    assert all(torch.equal(results[0][0], r[0]) and torch.equal(results[0][1], r[1]) for r in results[1:])


def test_ext_one_call_equals_the_sum_of_scales(ext, gen):
    mask = random_mask(2, 48, 40, "blobs", gen)
    preds = [torch.randn(2, 1, 48 // s, 40 // s, generator=gen, dtype=torch.float64) for s in (8, 4, 2, 1)]
    loss, stats = torch.ops.ncl_fast.pc_loss_fwd(preds, mask, 0.7, 2)
    assert stats.shape == (4, 3) and stats.dtype == torch.float64
    singles = [torch.ops.ncl_fast.pc_loss_fwd([z], mask, 0.7, 2) for z in preds]
    torch.testing.assert_close(loss, sum(x[0] for x in singles))
    torch.testing.assert_close(stats, torch.cat([x[1] for x in singles]))
    # five scales: the wrapper splits them into calls of at most four
    five = preds + [torch.randn(2, 1, 24, 20, generator=gen, dtype=torch.float64)]
    want = sum(oracles.pc_bce(z, mask, 0.7, 2) for z in five)
    assert_rel_close(functional.pc_loss(five, mask, 0.7, 2, impl="cuda"), want)


def test_ext_opcheck(ext, gen):
    mask = random_mask(2, 16, 24, "blobs", gen) > 0.5
    preds = [torch.randn(2, 1, 16 // s, 24 // s, generator=gen, requires_grad=True) for s in (4, 1)]
    torch.library.opcheck(torch.ops.ncl_fast.pc_loss_fwd, (preds, mask, 0.9, 2))
    _, stats = torch.ops.ncl_fast.pc_loss_fwd(preds, mask, 0.9, 2)
    detached = [z.detach() for z in preds]
    torch.library.opcheck(torch.ops.ncl_fast.pc_loss_bwd, (torch.tensor(1.3), detached, mask, stats.detach(), 0.9, 2))


def test_ext_traces_under_torch_compile(ext, gen):
    mask = random_mask(2, 32, 32, "blobs", gen)
    preds = [torch.randn(2, 1, 32 // s, 32 // s, generator=gen, requires_grad=True) for s in (8, 4, 1)]

    def loss_fn(a, b, c, m):
        return functional.pc_loss([a, b, c], m, 0.9, 2, impl="cuda")

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)  # fullgraph: no graph break
    got = compiled(*preds, mask)
    got.backward()
    grads = [p.grad.clone() for p in preds]
    for p in preds:
        p.grad = None
    want = loss_fn(*preds, mask)
    want.backward()
    torch.testing.assert_close(got, want)
    for g, p in zip(grads, preds):
        torch.testing.assert_close(g, p.grad)


def test_ext_errors(ext):
    fwd = lambda z, m, r=2: torch.ops.ncl_fast.pc_loss_fwd(z if isinstance(z, list) else [z], m, 0.9, r)
    mask = torch.zeros(2, 1, 16, 16)
    with pytest.raises(ValueError, match="stride is not an integer"):
        fwd(torch.zeros(2, 1, 5, 8), mask)
    with pytest.raises(ValueError, match="batch sizes differ"):
        fwd(torch.zeros(3, 1, 8, 8), mask)
    with pytest.raises(ValueError, match=r"logits must have shape \(B, 1, h, w\)"):
        fwd(torch.zeros(2, 2, 8, 8), mask)
    with pytest.raises(ValueError, match=r"mask must have shape \(B, 1, H, W\)"):
        fwd(torch.zeros(2, 1, 8, 8), mask[:, 0])
    with pytest.raises(ValueError, match="logits must be floating point"):
        fwd(torch.zeros(2, 1, 8, 8, dtype=torch.int32), mask)
    with pytest.raises(ValueError, match="the mask must be bool, uint8"):
        fwd(torch.zeros(2, 1, 8, 8), mask.to(torch.int32))
    with pytest.raises(ValueError, match="radius must be a non-negative"):
        fwd(torch.zeros(2, 1, 8, 8), mask, -1)
    with pytest.raises(ValueError, match="at least one prediction"):
        fwd([], mask)
    with pytest.raises(ValueError, match="one dtype"):
        fwd([torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 4, 4, dtype=torch.float64)], mask)
    with pytest.raises(ValueError, match="at most 4 predictions"):
        fwd([torch.zeros(2, 1, 8, 8)] * 5, mask)
    with pytest.raises(ValueError, match=r"stats must have shape \(1, 3\)"):
        torch.ops.ncl_fast.pc_loss_bwd(torch.tensor(1.0), [torch.zeros(2, 1, 8, 8)], mask,
                                       torch.zeros(2, 3, dtype=torch.float64), 0.9, 2)
    # through the public API: the same checks as every backend
    with pytest.raises(ValueError, match="different devices"):
        functional.pc_bce(torch.zeros(2, 1, 8, 8, device="meta"), mask, impl="cuda")
    with pytest.raises(ValueError, match="stride along rows is not an integer"):
        functional.pc_bce(torch.zeros(2, 1, 5, 8), mask, impl="cuda")
    # predictions of different dtypes are promoted to one
    mixed = [torch.randn(2, 1, 4, 4).bfloat16(), torch.randn(2, 1, 16, 16)]
    torch.testing.assert_close(functional.pc_loss(mixed, mask, impl="cuda"),
                               functional.pc_loss([z.float() for z in mixed], mask, impl="reference"))


def test_ext_other_mask_dtypes_are_binarized(ext, gen):
    mask = random_mask(2, 16, 16, "blobs", gen)
    z = torch.randn(2, 1, 8, 8, generator=gen)
    want = functional.pc_bce(z, mask, impl="reference")
    for m in (mask.double(), (mask * 3).to(torch.int64)):
        torch.testing.assert_close(functional.pc_bce(z, m, impl="cuda"), want)


def test_ext_build_info(ext):
    info = ext.BUILD_INFO
    assert isinstance(info["with_cuda"], bool) and info["torch_version"]
    assert info["torch_version"] == torch.__version__.split("+")[0]


# ---- per-call overhead: the autograd is in C++, the checks run once per call --------------------


def test_ext_autograd_is_registered_in_cpp(ext, gen):
    """`torch.ops.ncl_fast.pc_loss_fwd` differentiates by itself, through a C++ autograd node."""
    dump = torch._C._dispatch_dump("ncl_fast::pc_loss_fwd")
    autograd = [line for line in dump.splitlines() if line.startswith("Autograd")]
    assert len(autograd) == 1 and ".cpp:" in autograd[0], dump  # not a Python (torch.library) kernel
    mask = random_mask(2, 24, 16, "blobs", gen)
    preds = [torch.randn(2, 1, 24 // s, 16 // s, generator=gen, requires_grad=True) for s in (4, 1)]
    loss, stats = torch.ops.ncl_fast.pc_loss_fwd(preds, mask, 0.8, 1)
    assert "CppNode" in type(loss.grad_fn).__name__ or "CppNode" in loss.grad_fn.name()
    assert stats.grad_fn is None and not stats.requires_grad  # only the loss carries a gradient
    (2.5 * loss).backward()
    leaves = [z.detach().clone().requires_grad_() for z in preds]
    (2.5 * functional.pc_loss(leaves, mask, 0.8, 1, impl="reference")).backward()
    for z, ref in zip(preds, leaves):
        torch.testing.assert_close(z.grad, ref.grad, rtol=1e-5, atol=1e-9)
    # no gradient needed: no graph
    with torch.no_grad():
        assert torch.ops.ncl_fast.pc_loss_fwd(preds, mask, 0.8, 1)[0].grad_fn is None
    # a prediction that needs no gradient gets none, the others do
    frozen = [preds[0].detach(), preds[1].detach().requires_grad_()]
    torch.ops.ncl_fast.pc_loss_fwd(frozen, mask, 0.8, 1)[0].backward()
    assert frozen[0].grad is None and frozen[1].grad is not None


def test_ext_per_call_work_is_bounded(ext, gen):
    """One fwd+bwd of the public API: one op each way and little Python, counted (never timed).

    Before the autograd moved to C++, a call ran ~200 Python functions inside torch
    (torch.library's autograd.Function, pytree) and ~35 in ncl_fast."""
    import collections
    import sys

    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    mask = random_mask(2, 32, 32, "blobs", gen)
    preds = [torch.randn(2, 1, 32 // s, 32 // s, generator=gen, requires_grad=True) for s in (8, 4, 1)]

    def step():
        for z in preds:
            z.grad = None
        functional.pc_loss(preds, mask, 0.9, 2, impl="cuda").backward()

    step()
    with CountOps() as counted:
        step()
    ops = counted.ops
    assert ops["ncl_fast.pc_loss_fwd"] == 1 and ops["ncl_fast.pc_loss_bwd"] == 1, ops
    # the rest is the autograd engine's own: the seed gradient and one detach per leaf with
    # torch 2.14 (6 in all); a margin of 2 for other versions' engines
    assert sum(ops.values()) <= 8, ops
    calls = collections.Counter()

    def count(frame, event, arg):
        if event == "call":
            path = frame.f_code.co_filename.replace("\\", "/")
            calls["ncl_fast" if "/ncl_fast/" in path else "torch" if "/torch/" in path else "other"] += 1

    sys.setprofile(count)
    try:
        step()
    finally:
        sys.setprofile(None)
    assert calls["ncl_fast"] <= 20, calls  # 13 with torch 2.14: the checks once (functional), no cache
    assert calls["torch"] <= 40, calls  # Tensor.backward and torch.autograd.backward; 13 with torch 2.14


def test_ext_checks_run_on_every_call(ext, gen):
    mask = random_mask(2, 16, 16, "blobs", gen)
    z = torch.randn(2, 1, 8, 8, generator=gen)
    functional.pc_bce(z, mask, impl="cuda")  # a valid call, then invalid ones of the same shapes
    with pytest.raises(ValueError, match="mu must be in"):
        functional.pc_bce(z, mask, mu=1.5, impl="cuda")
    with pytest.raises(ValueError, match="radius must be a non-negative"):
        functional.pc_bce(z, mask, radius=-1, impl="cuda")
    with pytest.raises(ValueError, match="different devices"):
        functional.pc_bce(z.to("meta"), mask, impl="cuda")
    with pytest.raises(ValueError, match="batch sizes differ"):
        functional.pc_bce(z[:1], mask, impl="cuda")
    # mixed dtypes are promoted, on every call
    mixed = [z.bfloat16(), torch.randn(2, 1, 16, 16, generator=gen)]
    want = functional.pc_loss([m.float() for m in mixed], mask, impl="reference")
    for _ in range(2):
        torch.testing.assert_close(functional.pc_loss(mixed, mask, impl="cuda"), want)
