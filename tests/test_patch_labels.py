import pytest
import torch

import oracles
from helpers import as_mask_dtype, random_mask
from ncl_fast import reference

# (B, h, w, stride_y, stride_x, p): odd sizes, trailing cells not covered by a patch,
# one-patch images, the paper's stage-1 geometry (s=2, p=8) at a small size.
GEOMETRIES = [
    (2, 13, 11, 2, 2, 3),
    (3, 9, 7, 1, 1, 1),
    (1, 8, 8, 2, 2, 8),  # a single patch per image
    (2, 10, 14, 4, 4, 4),
    (2, 16, 16, 2, 2, 8),
    (1, 11, 13, 3, 3, 5),
    (2, 12, 9, 2, 2, 2),
]


@pytest.mark.parametrize("geom", GEOMETRIES)
@pytest.mark.parametrize("kind", ["blobs", "all", "none", "aligned", "noise"])
@pytest.mark.parametrize("tol", [0.0, 0.2])
def test_patch_labels_matches_oracle(geom, kind, tol, gen):
    B, h, w, sy, sx, p = geom
    H, W = h * sy, w * sx
    mask = random_mask(B, H, W, kind, gen, window=(p * sy, p * sx))
    got = reference.patch_labels(mask, (h, w), p, tol)
    want = oracles.patch_labels(mask, h, w, p, tol)
    assert got.dtype == torch.uint8 and got.shape == (B, (h // p) * (w // p))
    assert torch.equal(got, want), f"labels differ at {(got != want).nonzero().tolist()[:10]}"
    if kind == "all":
        assert (got == 1).all()
    if kind == "none":
        assert (got == 0).all()
    if kind == "aligned":
        assert (got != 2).all()


@pytest.mark.parametrize("dtype", ["bool", "uint8", "soft", "float"])
def test_patch_labels_mask_dtypes(dtype, gen):
    mask = random_mask(2, 30, 42, "blobs", gen)
    want = oracles.patch_labels(mask, 15, 21, 4)
    got = reference.patch_labels(as_mask_dtype(mask, dtype, gen), (15, 21), 4)
    assert torch.equal(got, want)


def test_patch_labels_tolerance_boundaries():
    # One 2x2-pixel patch per image (s=1, p=2): 0..4 tampered pixels -> frac 0, .25, .5, .75, 1.
    masks = torch.zeros(5, 1, 2, 2)
    for k in range(5):
        masks[k].view(-1)[:k] = 1
    assert reference.patch_labels(masks, 2, 2, tol=0.0).view(-1).tolist() == [0, 2, 2, 2, 1]
    assert reference.patch_labels(masks, 2, 2, tol=0.25).view(-1).tolist() == [0, 0, 2, 1, 1]
    assert reference.patch_labels(masks, 2, 2, tol=0.49).view(-1).tolist() == [0, 0, 2, 1, 1]


def test_patch_features_order(gen):
    feat = torch.randn(2, 5, 7, 9, generator=gen)
    f = reference.patch_features(feat, 3)  # (B, L, D), R=2, Q=3
    assert f.shape == (2, 6, 45)
    for l in range(6):
        r, c = divmod(l, 3)
        assert torch.equal(f[1, l], feat[1, :, 3 * r : 3 * r + 3, 3 * c : 3 * c + 3].reshape(-1))
