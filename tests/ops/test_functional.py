"""The public API: backend choice, and clear errors for bad input."""
import warnings

import pytest
import torch

import ncl_fast
from helpers import random_mask
from ncl_fast import _backend, functional, reference
from ncl_fast.model import Pivot


def test_reference_is_selected_explicitly_and_by_env(gen, monkeypatch):
    mask = random_mask(2, 16, 16, "blobs", gen)
    want = reference.patch_labels(mask, (8, 8), 2)
    assert torch.equal(functional.patch_labels(mask, (8, 8), 2, impl="reference"), want)
    monkeypatch.setenv(_backend.ENV_VAR, "reference")
    assert torch.equal(functional.patch_labels(mask, (8, 8), 2), want)


def test_unknown_impl_is_rejected(monkeypatch):
    mask = torch.zeros(1, 1, 8, 8)
    with pytest.raises(ValueError, match="impl must be one of"):
        functional.patch_labels(mask, 4, 2, impl="fast")
    monkeypatch.setenv(_backend.ENV_VAR, "gpu")
    with pytest.raises(ValueError, match="NCL_FAST_BACKEND"):
        functional.patch_labels(mask, 4, 2)


@pytest.fixture
def missing_backends(monkeypatch):
    """Point the fused backends at modules that do not exist."""
    monkeypatch.setattr(_backend, "_MODULES", {"triton": "ncl_fast._no_triton", "cuda": "ncl_fast._no_cuda"})
    monkeypatch.setattr(_backend, "_loaded", {})
    monkeypatch.setattr(_backend, "_warned", set())


@pytest.mark.parametrize("impl", ["triton", "cuda"])
def test_explicit_unavailable_backend_raises(impl, missing_backends):
    mask = torch.zeros(1, 1, 8, 8)
    with pytest.raises(ncl_fast.BackendUnavailableError, match=f"impl='{impl}' cannot run pc_bce"):
        functional.pc_bce(torch.zeros(1, 1, 8, 8), mask, impl=impl)


def test_auto_falls_back_and_says_so_once(missing_backends, gen):
    mask = random_mask(1, 16, 16, "blobs", gen)
    z = torch.randn(1, 1, 8, 8, generator=gen)
    with pytest.warns(RuntimeWarning, match="pc_bce runs the PyTorch reference"):
        first = functional.pc_bce(z, mask, impl="auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = functional.pc_bce(z, mask, impl="auto")
    assert first.item() == second.item() == reference.pc_bce(z, mask).item()


def test_ncl_loss_is_the_mean_of_the_terms(gen):
    feat = torch.randn(3, 4, 8, 8, generator=gen)
    mask = random_mask(3, 16, 16, "blobs", gen)
    pivot = Pivot(4)
    loss = functional.ncl_loss(feat, mask, pivot, 2, 0.1, 0.0, impl="reference")
    labels = reference.patch_labels(mask, (8, 8), 2)
    a_pos, a_neg = pivot(feat, labels, 2)
    terms = reference.ncl_terms(feat, labels, a_pos, a_neg, 2, 0.1)
    torch.testing.assert_close(loss, terms.sum(1).sum() / 3)


# ---- bad input ---------------------------------------------------------------------------


def test_stride_not_an_integer():
    with pytest.raises(ValueError, match="stride along rows is not an integer"):
        functional.patch_labels(torch.zeros(1, 1, 30, 32), (8, 8), 2)
    with pytest.raises(ValueError, match="stride along columns is not an integer"):
        functional.pc_bce(torch.zeros(1, 1, 8, 7), torch.zeros(1, 1, 32, 32))


def test_patch_bigger_than_the_map():
    with pytest.raises(ValueError, match="smaller than one patch"):
        functional.patch_labels(torch.zeros(1, 1, 8, 8), (4, 4), 8)


def test_batch_sizes_differ(gen):
    with pytest.raises(ValueError, match="batch sizes differ"):
        functional.ncl_loss(torch.randn(2, 4, 8, 8), torch.zeros(3, 1, 16, 16), Pivot(4), 2, impl="reference")
    with pytest.raises(ValueError, match="batch sizes differ"):
        functional.pc_bce(torch.zeros(2, 1, 8, 8), torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="labels must have shape"):
        reference.ncl_terms(torch.randn(2, 4, 8, 8), torch.zeros(3, 16, dtype=torch.uint8),
                            torch.randn(2, 16), torch.randn(2, 16), 2)
    with pytest.raises(ValueError, match="anchor_pos must have shape"):
        reference.ncl_terms(torch.randn(2, 4, 8, 8), torch.zeros(2, 16, dtype=torch.uint8),
                            torch.randn(3, 16), torch.randn(2, 16), 2)


def test_mask_of_the_wrong_rank():
    with pytest.raises(ValueError, match=r"mask must have shape \(B, 1, H, W\)"):
        functional.patch_labels(torch.zeros(1, 16, 16), (8, 8), 2)
    with pytest.raises(ValueError, match=r"mask must have shape \(B, 1, H, W\)"):
        functional.pc_loss([torch.zeros(1, 1, 8, 8)], torch.zeros(1, 3, 16, 16))


def test_empty_batch():
    with pytest.raises(ValueError, match="empty batch"):
        functional.patch_labels(torch.zeros(0, 1, 16, 16), (8, 8), 2)
    with pytest.raises(ValueError, match="empty batch"):
        functional.ncl_terms(torch.zeros(0, 4, 8, 8), torch.zeros(0, 16, dtype=torch.uint8),
                             torch.zeros(0, 16), torch.zeros(0, 16), 2)


def test_bad_scalars():
    with pytest.raises(ValueError, match="tol must be in"):
        functional.patch_labels(torch.zeros(1, 1, 16, 16), (8, 8), 2, tol=0.5)
    with pytest.raises(ValueError, match="patch must be a positive integer"):
        functional.patch_labels(torch.zeros(1, 1, 16, 16), (8, 8), 0)
    with pytest.raises(ValueError, match="mu must be in"):
        functional.pc_bce(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), mu=1.5)
    with pytest.raises(ValueError, match="radius must be"):
        functional.pc_bce(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), radius=-1)
    with pytest.raises(ValueError, match="at least one prediction"):
        functional.pc_loss([], torch.zeros(1, 1, 8, 8), impl="reference")
