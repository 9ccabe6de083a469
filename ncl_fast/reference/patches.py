"""Patch labels and patch features (SPEC.md sections 2 and 3), plain PyTorch."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _checks

#: Patch labels (SPEC.md section 2).
AUTHENTIC, TAMPERED, CONTOUR = 0, 1, 2


def binarize(mask: torch.Tensor) -> torch.Tensor:
    """`M > 0.5` as bool, whatever the mask's dtype (bool, integer or float)."""
    if mask.dtype == torch.bool:
        return mask
    return mask > 0.5


def patch_labels(mask: torch.Tensor, feature_size, patch: int, tol: float = 0.0) -> torch.Tensor:
    """Label every patch of the grid as authentic (0), tampered (1) or contour (2).

    Args:
        mask: `(B, 1, H, W)`, any dtype, binarized as `mask > 0.5`.
        feature_size: `(h, w)` of the feature map (an int means square).
        patch: `p`, the patch side in feature cells.
        tol: a patch is tampered if its tampered fraction is `>= 1 - tol`,
            authentic if `<= tol`, contour otherwise.

    Returns:
        `uint8 (B, L)`, `L = (h // p) * (w // p)`, row-major.
    """
    return patch_labels_unchecked(mask, _checks.check_patch_labels_args(mask, feature_size, patch, tol), tol)


def patch_labels_unchecked(mask: torch.Tensor, grid: _checks.PatchGrid, tol: float) -> torch.Tensor:
    """`patch_labels` on arguments already checked (`grid` from `_checks.check_patch_labels_args`)."""
    B = mask.shape[0]
    wy, wx = grid.window_y, grid.window_x
    m = binarize(mask)[:, 0, : grid.rows * wy, : grid.cols * wx]
    # Count tampered pixels per window in int32 (exact), then compare the
    # fraction in float64, the precision of the SPEC oracle.
    counts = m.reshape(B, grid.rows, wy, grid.cols, wx).sum(dim=(2, 4), dtype=torch.int32)
    frac = counts.reshape(B, grid.num_patches).double() / float(wy * wx)
    contour = torch.full_like(frac, CONTOUR, dtype=torch.uint8)
    labels = torch.where(frac <= tol, AUTHENTIC, contour)  # torch.where: no host synchronization
    return torch.where(frac >= 1.0 - tol, TAMPERED, labels).to(torch.uint8)


def patch_features(feat: torch.Tensor, patch: int) -> torch.Tensor:
    """`(B, C, h, w) -> (B, L, D)`: each patch flattened channel-major, then row, then column."""
    _checks.check_feature_map(feat)
    return patch_features_unchecked(feat, patch)


def patch_features_unchecked(feat: torch.Tensor, patch: int) -> torch.Tensor:
    cols = F.unfold(feat, kernel_size=patch, stride=patch)  # (B, D, L)
    return cols.transpose(1, 2)
