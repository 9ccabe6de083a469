import pytest
import torch

import oracles
from helpers import random_mask, relative_error
from ncl_fast import reference
from tolerances import SAME_VALUES, VS_FP32_INPUT

# (B, C, h, w, p): odd sizes, C not a power of two, single-patch images.
SHAPES = [
    (2, 5, 13, 11, 3),
    (3, 3, 9, 7, 1),
    (2, 7, 8, 8, 2),
    (1, 6, 4, 4, 4),  # a single patch
    (2, 4, 16, 12, 4),
]


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
    err = (got.double() - want).abs()
    bad = err > atol + rtol * want.abs()
    assert not bad.any(), f"max rel err {relative_error(got, want):.3g}; got {got[bad]}, want {want[bad]}"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["blobs", "all", "none", "aligned", "noise"])
@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_ncl_terms_fp32_matches_oracle(shape, kind, tau, gen):
    feat, labels, a_pos, a_neg = make_case(shape, kind, gen)
    got = reference.ncl_terms(feat, labels, a_pos, a_neg, shape[-1], tau)
    assert got.dtype == torch.float32
    want = oracles.ncl_terms(feat, labels, a_pos, a_neg, shape[-1], tau)
    check(got, want, *SAME_VALUES[torch.float32])
    if kind in ("all", "none"):  # one of P, N is empty: every term is undefined
        assert (got == 0).all()
    if kind == "aligned":  # no contour patch: no anchors
        assert (got[:, 1:] == 0).all()


def test_ncl_terms_with_tol(gen):
    shape = (2, 5, 12, 12, 4)
    feat, labels, a_pos, a_neg = make_case(shape, "noise", gen, tol=0.3)
    want = oracles.ncl_terms(feat, labels, a_pos, a_neg, 4)
    check(reference.ncl_terms(feat, labels, a_pos, a_neg, 4), want, *SAME_VALUES[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ncl_terms_half_inputs(dtype, gen):
    shape = (2, 5, 13, 11, 3)
    feat, labels, a_pos, a_neg = make_case(shape, "blobs", gen)
    got = reference.ncl_terms(feat.to(dtype), labels, a_pos.to(dtype), a_neg.to(dtype), 3)
    assert got.dtype == torch.float32
    same = oracles.ncl_terms(feat.to(dtype), labels, a_pos.to(dtype), a_neg.to(dtype), 3)
    check(got, same, *SAME_VALUES[dtype])
    check(got, oracles.ncl_terms(feat, labels, a_pos, a_neg, 3), *VS_FP32_INPUT[dtype])


def test_ncl_terms_layouts(gen):
    shape = (2, 5, 13, 11, 3)
    feat, labels, a_pos, a_neg = make_case(shape, "blobs", gen)
    want = oracles.ncl_terms(feat, labels, a_pos, a_neg, 3)
    cl = feat.to(memory_format=torch.channels_last)
    assert not cl.is_contiguous()
    check(reference.ncl_terms(cl, labels, a_pos, a_neg, 3), want, *SAME_VALUES[torch.float32])
    # a non-contiguous view (every other column of a wider map) and strided anchors
    wide = torch.zeros(2, 5, 13, 22)
    wide[..., ::2] = feat
    a_wide = torch.stack([a_pos, a_neg], dim=2)
    got = reference.ncl_terms(wide[..., ::2], labels, a_wide[..., 0], a_wide[..., 1], 3)
    check(got, want, *SAME_VALUES[torch.float32])


def test_ncl_terms_accumulate_in_fp32(gen):
    # bf16 features whose exact values are representable: an fp32 pipeline gives
    # the oracle's numbers to 1e-5, a bf16 one could not (bf16 has 8 bits of mantissa).
    shape = (2, 7, 8, 8, 2)
    feat, labels, a_pos, a_neg = make_case(shape, "blobs", gen, dtype=torch.bfloat16)
    got = reference.ncl_terms(feat, labels, a_pos, a_neg, 2)
    want = oracles.ncl_terms(feat, labels, a_pos, a_neg, 2)
    assert relative_error(got, want) < 1e-5


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
    feat.requires_grad_()
    a_pos.requires_grad_()
    a_neg.requires_grad_()
    grad_out = torch.rand(2, 3, generator=gen) + 0.5
    (reference.ncl_terms(feat, labels, a_pos, a_neg, 2) * grad_out).sum().backward()
    # contour cells of the feature map: fold the per-patch flag back to (B, C, h, w)
    flags = (labels == 2).float()[:, None, :].expand(2, 3 * 2 * 2, 16)
    cells = torch.nn.functional.fold(flags, output_size=(8, 8), kernel_size=2, stride=2)
    assert (feat.grad[cells.expand_as(feat) > 0] == 0).all()
    assert (a_pos.grad[1] == 0).all() and (a_neg.grad[1] == 0).all()
    assert feat.grad.abs().sum() > 0
