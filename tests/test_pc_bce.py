import pytest
import torch

import oracles
from helpers import as_mask_dtype, random_mask
from ncl_fast import reference
from tolerances import SAME_VALUES


def rel_close(got: torch.Tensor, want: float, dtype=torch.float32) -> None:
    rtol, atol = SAME_VALUES[dtype]
    assert abs(got.item() - want) <= atol + rtol * abs(want), f"got {got.item()!r}, want {want!r}"


# (B, H, W, stride): odd sizes, non power-of-two strides, full resolution.
GEOMETRIES = [(2, 24, 40, 8), (1, 21, 15, 3), (2, 16, 12, 4), (2, 13, 9, 1), (1, 20, 20, 2)]


@pytest.mark.parametrize("geom", GEOMETRIES)
@pytest.mark.parametrize("radius", [0, 1, 2, 3])
@pytest.mark.parametrize("kind", ["blobs", "all", "none", "noise"])
def test_pc_bce_matches_oracle(geom, radius, kind, gen):
    B, H, W, s = geom
    mask = random_mask(B, H, W, kind, gen)
    logits = 3 * torch.randn(B, 1, H // s, W // s, generator=gen)
    mu = float(torch.rand(1, generator=gen))
    got = reference.pc_bce(logits, mask, mu, radius)
    assert got.dtype == torch.float32 and got.dim() == 0
    rel_close(got, oracles.pc_bce(logits, mask, mu, radius))


def test_pc_bce_one_pixel_mask(gen):
    mask = torch.zeros(1, 1, 9, 11)
    mask[0, 0, 4, 5] = 1
    logits = torch.randn(1, 1, 9, 11, generator=gen)
    for r in range(4):
        rel_close(reference.pc_bce(logits, mask, 0.9, r), oracles.pc_bce(logits, mask, 0.9, r))
        # mu = 1: the band of radius r is the (2r+1)^2 square around the pixel
        square = logits[0, 0, 4 - r : 5 + r, 5 - r : 6 + r]
        target = mask[0, 0, 4 - r : 5 + r, 5 - r : 6 + r]
        want = torch.nn.functional.binary_cross_entropy_with_logits(square, target) if r else torch.tensor(0.0)
        rel_close(reference.pc_bce(logits, mask, 1.0, r), want.item())


def test_pc_bce_empty_band_term_is_zero(gen):
    logits = torch.randn(2, 1, 8, 8, generator=gen)
    for mask in (torch.zeros(2, 1, 16, 16), torch.ones(2, 1, 16, 16)):
        assert reference.pc_bce(logits, mask, 1.0, 2).item() == 0.0
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, mask[:, :, ::2, ::2])
        torch.testing.assert_close(reference.pc_bce(logits, mask, 0.0, 2), bce)


@pytest.mark.parametrize("dtype", ["bool", "uint8", "soft"])
def test_pc_bce_mask_dtypes(dtype, gen):
    mask = random_mask(2, 24, 16, "blobs", gen)
    logits = torch.randn(2, 1, 6, 4, generator=gen)
    rel_close(reference.pc_bce(logits, as_mask_dtype(mask, dtype, gen), 0.9, 1), oracles.pc_bce(logits, mask, 0.9, 1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pc_bce_half_logits(dtype, gen):
    mask = random_mask(2, 32, 24, "blobs", gen)
    logits = (3 * torch.randn(2, 1, 8, 6, generator=gen)).to(dtype)
    got = reference.pc_bce(logits, mask, 0.9, 2)
    assert got.dtype == torch.float32
    rel_close(got, oracles.pc_bce(logits, mask, 0.9, 2), dtype)


def test_pc_bce_channels_last_and_strided(gen):
    mask = random_mask(2, 32, 24, "blobs", gen)
    logits = torch.randn(2, 1, 8, 6, generator=gen)
    want = oracles.pc_bce(logits, mask, 0.9, 2)
    rel_close(reference.pc_bce(logits.to(memory_format=torch.channels_last), mask, 0.9, 2), want)
    wide = torch.zeros(2, 1, 8, 12)
    wide[..., ::2] = logits
    rel_close(reference.pc_bce(wide[..., ::2], mask, 0.9, 2), want)


def test_pc_loss_sums_the_scales(gen):
    mask = random_mask(2, 32, 32, "blobs", gen)
    preds = [torch.randn(2, 1, 32 // s, 32 // s, generator=gen) for s in (8, 4, 1)]
    want = sum(oracles.pc_bce(z, mask, 0.9, 2) for z in preds)
    rel_close(reference.pc_loss(preds, mask, 0.9, 2), want)


@pytest.mark.parametrize("radius", [0, 2])
def test_pc_bce_gradcheck(radius, gen):
    mask = random_mask(2, 12, 10, "blobs", gen)
    logits = torch.randn(2, 1, 6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: reference.pc_bce(z, mask, 0.7, radius), (logits,))


def test_pc_bce_gradient_formula(gen):
    # dL/dz = (sigmoid(z) - g) * (mu [in band] / |E| + (1 - mu) / n)
    mask = random_mask(2, 16, 16, "blobs", gen)
    z = torch.randn(2, 1, 8, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    mu, r = 0.9, 1
    reference.pc_bce(z, mask, mu, r).backward()
    G = oracles.shrunk_mask(mask, 8, 8)[:, None].double()
    E = oracles.contour_band(G[:, 0].bool(), r)[:, None].double()
    want = (torch.sigmoid(z.detach()) - G) * (mu * E / E.sum() + (1 - mu) / z.numel())
    torch.testing.assert_close(z.grad, want)
