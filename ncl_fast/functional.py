"""Public functional API. Every op takes `impl = auto | reference | triton | cuda`
(default: the `NCL_FAST_BACKEND` environment variable, else `auto`); the choice
is made in `ncl_fast._backend`.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from . import _backend, _checks


def patch_labels(
    mask: torch.Tensor, feature_size, patch: int, tol: float = 0.0, *, impl: str | None = None
) -> torch.Tensor:
    """`uint8 (B, L)` patch labels: 0 authentic, 1 tampered, 2 contour (SPEC section 2)."""
    _checks.check_mask(mask)
    _, fn = _backend.choose("patch_labels", impl, mask.device)
    return fn(mask, feature_size, patch, tol)


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
    _checks.check_feature_map(feat)
    _, fn = _backend.choose("ncl_terms", impl, feat.device)
    return fn(feat, labels, anchor_pos, anchor_neg, patch, tau)


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
    _checks.check_same_batch(feat=feat, mask=mask)
    _checks.check_same_device(feat=feat, mask=mask)
    labels = patch_labels(mask, feat.shape[-2:], patch, tol, impl=impl)
    anchor_pos, anchor_neg = pivot(feat, labels, patch)
    terms = ncl_terms(feat, labels, anchor_pos, anchor_neg, patch, tau, impl=impl)
    return terms.sum(dim=1).mean()


def pc_bce(
    logits: torch.Tensor, mask: torch.Tensor, mu: float = 0.9, radius: int = 2, *, impl: str | None = None
) -> torch.Tensor:
    """Pivot-consistent BCE of one prediction (SPEC section 6), an fp32 scalar."""
    _checks.check_mask(mask)
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
    _checks.check_mask(mask)
    _, fn = _backend.choose("pc_loss", impl, mask.device)
    return fn(list(logits_list), mask, mu, radius)
