"""patch_labels: the reference and the Triton kernel (interpreter on the CPU)
against the float64 oracle of SPEC section 2; the Triton patch lists."""
import pytest
import torch

import oracles
from helpers import as_mask_dtype, random_mask, require_backend
from ncl_fast import functional, reference

# NaN or inf formed in any lane, masked ones included, is an error (the interpreter
# computes masked lanes too: numpy's warning is how they show)
pytestmark = pytest.mark.filterwarnings(
    "error:invalid value encountered:RuntimeWarning",
    "error:overflow encountered:RuntimeWarning",
    "error:divide by zero encountered:RuntimeWarning",
)


@pytest.fixture(params=["reference", "triton"])
def impl(request):
    require_backend(request.param, "patch_labels")
    return request.param

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
    (1, 12, 13, 1, 1, 6),
    (2, 15, 14, 2, 2, 7),
]


@pytest.mark.parametrize("geom", GEOMETRIES)
@pytest.mark.parametrize("kind", ["blobs", "all", "none", "aligned", "noise"])
@pytest.mark.parametrize("tol", [0.0, 0.2])
def test_patch_labels_matches_oracle(impl, geom, kind, tol, gen):
    B, h, w, sy, sx, p = geom
    H, W = h * sy, w * sx
    mask = random_mask(B, H, W, kind, gen, window=(p * sy, p * sx))
    got = functional.patch_labels(mask, (h, w), p, tol, impl=impl)
    want = oracles.patch_labels(mask, h, w, p, tol)
    assert got.dtype == torch.uint8 and got.shape == (B, (h // p) * (w // p))
    assert torch.equal(got, want), f"labels differ at {(got != want).nonzero().tolist()[:10]}"
    if kind == "all":
        assert (got == 1).all()
    if kind == "none":
        assert (got == 0).all()
    if kind == "aligned":
        assert (got != 2).all()


@pytest.mark.parametrize("dtype", ["bool", "uint8", "soft", "float", "bf16"])
def test_patch_labels_mask_dtypes(impl, dtype, gen):
    mask = random_mask(2, 30, 42, "blobs", gen)
    want = oracles.patch_labels(mask, 15, 21, 4)
    m = mask.to(torch.bfloat16) if dtype == "bf16" else as_mask_dtype(mask, dtype, gen)
    got = functional.patch_labels(m, (15, 21), 4, impl=impl)
    assert torch.equal(got, want)


def test_patch_labels_strided_mask(impl, gen):
    mask = random_mask(2, 24, 40, "blobs", gen)
    wide = torch.zeros(2, 1, 24, 80)
    wide[..., ::2] = mask
    got = functional.patch_labels(wide[..., ::2], (12, 20), 3, impl=impl)
    assert torch.equal(got, oracles.patch_labels(mask, 12, 20, 3))


def test_patch_labels_tolerance_boundaries(impl):
    # One 2x2-pixel patch per image (s=1, p=2): 0..4 tampered pixels -> frac 0, .25, .5, .75, 1.
    masks = torch.zeros(5, 1, 2, 2)
    for k in range(5):
        masks[k].view(-1)[:k] = 1
    labels = lambda tol: functional.patch_labels(masks, 2, 2, tol=tol, impl=impl).view(-1).tolist()
    assert labels(0.0) == [0, 2, 2, 2, 1]
    assert labels(0.25) == [0, 0, 2, 1, 1]
    assert labels(0.49) == [0, 0, 2, 1, 1]


@pytest.mark.parametrize("kind", ["blobs", "all", "none", "noise"])
def test_patch_lists(kind, gen):
    require_backend("triton", "patch_labels")
    from ncl_fast.kernels import patch_labels as kl

    labels = reference.patch_labels(random_mask(3, 40, 36, kind, gen), (20, 18), 2)
    counts, perm = kl.patch_lists_fwd(labels)
    for b in range(3):
        lab = labels[b].long()
        want = [torch.nonzero(lab == v).view(-1) for v in (1, 0, 2)]  # P, N, K, ascending
        assert counts[b].tolist() == [len(x) for x in want]
        assert torch.equal(perm[b].long(), torch.cat(want))


def test_patch_features_order(gen):
    feat = torch.randn(2, 5, 7, 9, generator=gen)
    f = reference.patch_features(feat, 3)  # (B, L, D), R=2, Q=3
    assert f.shape == (2, 6, 45)
    for l in range(6):
        r, c = divmod(l, 3)
        assert torch.equal(f[1, l], feat[1, :, 3 * r : 3 * r + 3, 3 * c : 3 * c + 3].reshape(-1))


def test_float64_masks_are_binarized_in_float64(impl):
    # 0.50000001 is > 0.5 in float64 but rounds to 0.5 in float32: the label must follow
    # SPEC's M > 0.5 in the mask's own dtype (the reference's comparison).
    mask = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    mask[0, 0, :4, :4] = 0.50000001  # patch 0 tampered
    mask[0, 0, :4, 4:] = 0.5  # patch 1 authentic (not > 0.5)
    got = functional.patch_labels(mask, (4, 4), 2, impl=impl)
    assert got.tolist() == [[1, 0, 0, 0]]
    assert torch.equal(got, oracles.patch_labels(mask, 4, 4, 2))
