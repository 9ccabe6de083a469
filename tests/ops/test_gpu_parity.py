"""Parity of the fused ops with the reference at the paper's full sizes, on a CUDA
device (skipped without one; `bench/gpu_check.sh` runs these)."""
import pytest
import torch

from ncl_fast import functional, reference
from ncl_fast.testing import ellipse_masks

pytestmark = pytest.mark.gpu


def masks(B, size, seed, device="cuda"):
    """The benchmarks' masks (5-30 % tampered, irregular)."""
    return ellipse_masks(B, size, size, seed, device=device)


# stored: the default workspace (every image of these masks fits); bounded: none.
PATHS = {"stored": None, "bounded": 0.0}


@pytest.mark.parametrize("stage", [(64, 256, 8), (256, 128, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("path", ["stored", "bounded"])
def test_ncl_full_size(stage, dtype, layout, path, monkeypatch):
    from ncl_fast.kernels import ncl_terms as k

    if PATHS[path] is not None:
        monkeypatch.setattr(k, "SIM_BUDGET", PATHS[path])
    if path == "bounded" and (stage[0] == 256 or layout == "channels_last"):
        pytest.skip("the bounded path is checked at stage 1, contiguous (it is slow by design)")
    C, h, p = stage
    B = 4
    mask = masks(B, 512, 0)
    lab_t = functional.patch_labels(mask, (h, h), p, impl="triton")
    lab_r = functional.patch_labels(mask, (h, h), p, impl="reference")
    assert torch.equal(lab_t, lab_r)
    g = torch.Generator(device="cuda").manual_seed(0)
    feat = torch.randn(B, C, h, h, device="cuda", generator=g).to(dtype)
    if layout == "channels_last":
        feat = feat.to(memory_format=torch.channels_last)
    D = C * p * p
    anchors = [torch.randn(B, D, device="cuda", generator=g).to(dtype) for _ in range(2)]
    # dL/dterms of a training step: omega / B (0.0025), times a GradScaler's 2^16 in fp16
    grad_out = (torch.rand(B, 3, device="cuda", generator=g) + 0.5) * (0.0025 * 2**16 if dtype == torch.float16 else 1)
    outs = {}
    for impl in ("triton", "reference"):
        leaves = [t.detach().clone().requires_grad_() for t in (feat, *anchors)]
        terms = functional.ncl_terms(leaves[0], lab_r, leaves[1], leaves[2], p, 0.1, impl=impl)
        (terms * grad_out).sum().backward()
        outs[impl] = (terms.detach(), [t.grad for t in leaves])
    if path == "stored":  # every image's block fits its slot of the workspace: the stored kernels ran
        counts = torch.stack([(lab_r == v).sum(1) for v in (1, 0)], 1).long()
        blocks = counts[:, 0] * ((counts.sum(1) + 3) // 4 * 4)
        assert (blocks <= k.workspace_slot((h // p) ** 2)).all()
    torch.testing.assert_close(outs["triton"][0], outs["reference"][0], rtol=1e-4, atol=1e-5)
    for name, a, b in zip(("feat", "anchor_pos", "anchor_neg"), outs["triton"][1], outs["reference"][1]):
        scale = b.abs().max().item()
        assert scale > 0, name
        # fp32: tf32x3 products (near fp32); bf16/fp16: the gradient is rounded to the input dtype
        tol = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * scale, msg=lambda m: f"d{name}: {m}")


def stressed_case(B, C, h, p, dtype, device, seed):
    """tau = 0.02 and every patch's feature one of 4 random directions plus a little noise,
    tampered and authentic patches alike: cosines near 1 within a direction make |s|
    reach about 50, so exp(s - lam) spans e^-100 .. 1 while the terms stay of order one.
    Returns (feat, labels, a_pos, a_neg, tau)."""
    g = torch.Generator().manual_seed(seed)
    mask = masks(B, h * 2, seed, device="cpu")
    labels = functional.patch_labels(mask, (h, h), p, impl="reference")
    D, L = C * p * p, (h // p) ** 2
    directions = torch.randn(4, D, generator=g)
    pick = torch.randint(0, 4, (B, L), generator=g)
    patches = directions[pick] + 0.05 * torch.randn(B, L, D, generator=g)  # (B, L, D)
    feat = torch.nn.functional.fold(patches.transpose(1, 2), (h, h), p, stride=p)
    anchors = [directions[torch.randint(0, 4, (B,), generator=g)] + 0.05 * torch.randn(B, D, generator=g)
               for _ in range(2)]
    return (feat.to(device, dtype), labels.to(device), anchors[0].to(device, dtype), anchors[1].to(device, dtype),
            0.02)


def close_per_element(got, want, rtol, atol, patch=None):
    """|got - want| <= rtol |want| + atol x (the largest |want| of the element's own patch,
    or of its own row for a (B, D) anchor gradient) + the smallest normal number of
    got's dtype (below it a half gradient is subnormal or 0): each element against its
    own scale, not the largest gradient of the tensor. Returns the number outside."""
    floor = torch.finfo(got.dtype).tiny
    got, want = got.double(), want.double()
    if patch is not None:  # (B, C, h, w) -> (B, D, L): one column per patch
        got, want = (torch.nn.functional.unfold(t, patch, stride=patch) for t in (got, want))
        scale = want.abs().amax(dim=1, keepdim=True)
    else:
        scale = want.abs().amax(dim=1, keepdim=True)
    return int(((got - want).abs() > rtol * want.abs() + atol * scale + floor).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", ["stored", "bounded"])
def test_ncl_large_similarities(dtype, path, monkeypatch):
    # stage 1 with |s| up to about 50, against the reference in float64 fed the same
    # (rounded) inputs, element by element
    from ncl_fast.kernels import ncl_terms as k

    if PATHS[path] is not None:
        monkeypatch.setattr(k, "SIM_BUDGET", PATHS[path])
    C, h, p = 64, 256, 8
    feat, labels, a_pos, a_neg, tau = stressed_case(4, C, h, p, dtype, "cuda", seed=3)
    grad_out = torch.rand(4, 3, device="cuda") + 0.5
    outs = {}
    for impl, cast in (("triton", dtype), ("reference", torch.float64)):
        leaves = [t.detach().to(cast).clone().requires_grad_() for t in (feat, a_pos, a_neg)]
        terms = functional.ncl_terms(leaves[0], labels, leaves[1], leaves[2], p, tau, impl=impl)
        (terms * grad_out.to(terms.dtype)).sum().backward()
        outs[impl] = (terms.detach(), [t.grad for t in leaves])
    f = torch.nn.functional.normalize(reference.patch_features(feat.double(), p), dim=-1)
    assert (f @ f.transpose(1, 2)).abs().max().item() / tau > 45  # the stress this test is for
    torch.testing.assert_close(outs["triton"][0].double(), outs["reference"][0], rtol=1e-4, atol=1e-5)
    # fp32: tf32x3 products (near fp32; s carries ~1e-6 x 50 of error into every exp);
    # bf16/fp16: the gradient rounded to the input dtype, coefficients as tf32
    tol = {torch.float32: 2e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    for name, a, b, patch in zip(("feat", "anchor_pos", "anchor_neg"), outs["triton"][1], outs["reference"][1],
                                 (p, None, None)):
        assert b.abs().max() > 0, name
        bad = close_per_element(a, b, tol, tol, patch)
        assert bad == 0, f"d{name}: {bad} elements outside {tol} of their own patch's (row's) scale"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.uint8, torch.bool])
def test_pc_loss_full_size(dtype, mask_dtype):
    B = 4
    mask = masks(B, 512, 1).to(mask_dtype)
    g = torch.Generator(device="cuda").manual_seed(0)
    preds = [torch.randn(B, 1, 512 // s, 512 // s, device="cuda", generator=g).to(dtype) for s in (8, 4, 1)]
    outs = {}
    for impl in ("cuda", "reference"):
        leaves = [z.detach().clone().requires_grad_() for z in preds]
        loss = functional.pc_loss(leaves, mask, 0.9, 2, impl=impl)
        (1.7 * loss).backward()
        outs[impl] = (loss.detach(), [z.grad for z in leaves])
    torch.testing.assert_close(outs["cuda"][0], outs["reference"][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(outs["cuda"][1], outs["reference"][1]):
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * b.abs().max().item())


def test_pc_loss_is_deterministic_on_gpu():
    from ncl_fast import _cuda_ops  # noqa: F401  (registers torch.ops.ncl_fast.*)

    mask = masks(4, 512, 2)
    preds = [torch.randn(4, 1, 512 // s, 512 // s, device="cuda") for s in (8, 4, 1)]
    first = torch.ops.ncl_fast.pc_loss_fwd(preds, mask, 0.9, 2)
    for _ in range(5):
        again = torch.ops.ncl_fast.pc_loss_fwd(preds, mask, 0.9, 2)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
