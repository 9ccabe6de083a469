"""`ncl_fast.testing`: the random masks the op tests and the benchmarks draw, one
generator for both."""
import pytest
import torch

from helpers import random_mask
from ncl_fast.functional import patch_labels
from ncl_fast.testing import MASK_KINDS, ellipse_masks


@pytest.mark.parametrize("area", [(0.05, 0.30), (0.0, 0.02), (0.4, 0.6)])
@pytest.mark.parametrize("size", [(64, 64), (37, 53), (12, 10)])
def test_ellipse_masks_reach_their_area(area, size, gen):
    H, W = size
    masks = ellipse_masks(5, H, W, gen, area=area)
    assert masks.shape == (5, 1, H, W) and masks.dtype == torch.float32
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    # grown one ellipse at a time until the target, drawn from `area`, is covered
    assert (masks.mean((1, 2, 3)) >= area[0]).all()


def test_a_seed_replays_the_masks_and_images_differ():
    a = ellipse_masks(4, 48, 40, 3)
    assert torch.equal(a, ellipse_masks(4, 48, 40, torch.Generator().manual_seed(3)))
    assert not torch.equal(a, ellipse_masks(4, 48, 40, 4))
    assert len({tuple(m.flatten().tolist()) for m in a}) == 4


def test_ellipses_are_irregular_regions_with_a_contour():
    masks = ellipse_masks(8, 128, 128, 0)
    labels = patch_labels(masks, (16, 16), 1, impl="reference")  # 8 px patches: 0 authentic, 1 tampered, 2 mixed
    for row in labels:
        assert {0, 1, 2} <= set(row.tolist())


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_random_mask_kinds(kind, gen):
    mask = random_mask(3, 24, 20, kind, gen, window=(4, 5))
    assert mask.shape == (3, 1, 24, 20) and set(mask.unique().tolist()) <= {0.0, 1.0}
    if kind == "all":
        assert (mask == 1).all()
    if kind == "none":
        assert (mask == 0).all()
    if kind == "aligned":  # constant over each 4 x 5 window
        tiles = mask.unfold(2, 4, 4).unfold(3, 5, 5)
        assert (tiles.amin((-1, -2)) == tiles.amax((-1, -2))).all()
    if kind == "blobs":  # one to three ellipses: never the whole image
        assert (mask.mean((1, 2, 3)) < 1).all()


def test_count_draws_that_many_ellipses():
    one = ellipse_masks(50, 32, 32, 0, radius=(0.1, 0.2), count=(1, 1))
    none = ellipse_masks(3, 32, 32, 0, count=(0, 0))
    assert (none == 0).all()
    # a single ellipse is one connected region, convex: each row's tampered pixels are contiguous
    for m in one[:, 0]:
        for row in m:
            idx = row.nonzero().flatten()
            assert len(idx) == 0 or idx[-1] - idx[0] + 1 == len(idx)
    many = ellipse_masks(50, 32, 32, 0, radius=(0.1, 0.2), count=(5, 5))
    assert many.mean() > one.mean()


@pytest.mark.parametrize("bad, message", [
    (dict(area=(0.3, 0.1)), "area"), (dict(area=(0.0, 1.0)), "area"), (dict(radius=(0.0, 0.1)), "radius"),
    (dict(count=(2, 1)), "count"), (dict(count=(-1, 1)), "count"),
])
def test_bad_arguments_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        ellipse_masks(1, 8, 8, 0, **bad)
    with pytest.raises(TypeError, match="generator"):
        ellipse_masks(1, 8, 8, 0.5)
    with pytest.raises(ValueError, match="kind"):
        random_mask(1, 8, 8, "stripes", 0)
