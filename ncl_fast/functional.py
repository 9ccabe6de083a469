"""Public functional API. Every op takes `impl = auto | reference | triton | cuda`
(default: the `NCL_FAST_BACKEND` environment variable, else `auto`); the choice
is made in `ncl_fast._backend`.

This is the public boundary: each function checks its inputs here, once
(`ncl_fast._checks`), and the backend it calls trusts them.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from . import _backend, _checks


def patch_labels(
    mask: torch.Tensor, feature_size, patch: int, tol: float = 0.0, *, impl: str | None = None
) -> torch.Tensor:
    """`uint8 (B, L)` patch labels: 0 authentic, 1 tampered, 2 contour (SPEC section 2)."""
    grid = _checks.check_patch_labels_args(mask, feature_size, patch, tol)
    _, fn = _backend.choose("patch_labels", impl, mask.device)
    return fn(mask, grid, tol)


def ncl_terms(
    feat: torch.Tensor,
    labels: torch.Tensor,
    anchor_pos: torch.Tensor,
    anchor_neg: torch.Tensor,
    patch: int,
    tau: float = 0.1,
    *,
    impl: str | None = None,
) -> torch.Tensor:
    """fp32 `(B, 3)` per-image NCL terms `[t1, t2, t3]` (SPEC section 5)."""
    grid = _checks.check_ncl_inputs(feat, labels, anchor_pos, anchor_neg, patch, tau)
    _, fn = _backend.choose("ncl_terms", impl, feat.device)
    return fn(feat, labels, anchor_pos, anchor_neg, grid, tau)


def ncl_loss(
    feat: torch.Tensor,
    mask: torch.Tensor,
    pivot: Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]],
    patch: int,
    tau: float = 0.1,
    tol: float = 0.0,
    *,
    impl: str | None = None,
) -> torch.Tensor:
    """`L_NCL = mean_b (t1 + t2 + t3)`, the scalar NCL loss of a batch.

    `pivot(feat, labels, patch)` returns the anchors `(a+, a-)`, each `(B, D)`
    (see `ncl_fast.model.Pivot`).
    """
    _checks.check_feature_map(feat)
    _checks.check_mask(mask)
    return ncl_loss_after_map_checks(feat, mask, pivot, patch, tau, tol, impl=impl)


def ncl_loss_after_map_checks(feat, mask, pivot, patch: int, tau: float, tol: float, *, impl: str | None) -> torch.Tensor:
    """`ncl_loss` for a caller that has already run `check_feature_map` and `check_mask`
    (`NCLLoss` does, to find the patch size): the other checks, then the ops."""
    grid = _checks.check_ncl_loss_args(feat, mask, patch, tau, tol)
    _, labels_fn = _backend.choose("patch_labels", impl, mask.device)
    labels = labels_fn(mask, grid, tol)
    anchor_pos, anchor_neg = pivot(feat, labels, patch)
    _checks.check_anchors(feat, patch, anchor_pos, anchor_neg)  # the pivot's output: new inputs
    _, terms_fn = _backend.choose("ncl_terms", impl, feat.device)
    terms = terms_fn(feat, labels, anchor_pos, anchor_neg, grid, tau)
    return terms.sum(dim=1).mean()


def pc_bce(
    logits: torch.Tensor, mask: torch.Tensor, mu: float = 0.9, radius: int = 2, *, impl: str | None = None
) -> torch.Tensor:
    """Pivot-consistent BCE of one prediction (SPEC section 6), an fp32 scalar."""
    _checks.check_pc_inputs([logits], mask, mu, radius)
    _, fn = _backend.choose("pc_bce", impl, mask.device)
    return fn(logits, mask, mu, radius)


def pc_loss(
    logits_list: Sequence[torch.Tensor],
    mask: torch.Tensor,
    mu: float = 0.9,
    radius: int = 2,
    *,
    impl: str | None = None,
) -> torch.Tensor:
    """Sum of `pc_bce` over the predictions of every scale."""
    logits_list = list(logits_list)
    _checks.check_pc_inputs(logits_list, mask, mu, radius)
    _, fn = _backend.choose("pc_loss", impl, mask.device)
    return fn(logits_list, mask, mu, radius)
