"""The pivot-consistent BCE (SPEC.md section 6), plain PyTorch."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .. import _checks
from .ncl import compute_dtype
from .patches import binarize


def shrink_mask(mask: torch.Tensor, stride_y: int, stride_x: int) -> torch.Tensor:
    """`G = 1[avgpool_s(M > 0.5) >= 0.5]` as bool `(B, 1, h_o, w_o)`; `G = M` at stride 1.

    The area mean is compared as an integer count (`2 * count >= s_y * s_x`) so
    that no rounding can move a window across the threshold.
    """
    m = binarize(mask)
    if stride_y == 1 and stride_x == 1:
        return m
    B, _, H, W = m.shape
    counts = m.reshape(B, 1, H // stride_y, stride_y, W // stride_x, stride_x).sum(dim=(3, 5))
    return 2 * counts >= stride_y * stride_x


def contour_band(g: torch.Tensor, radius: int) -> torch.Tensor:
    """`E = 1[max != min over the (2r+1)^2 window]`, out-of-image pixels ignored."""
    if radius == 0:
        return torch.zeros_like(g, dtype=torch.bool)
    x = g.float()
    k = 2 * radius + 1
    # max_pool2d pads with -inf, so the border pixels see only in-image values.
    hi = F.max_pool2d(x, k, stride=1, padding=radius)
    lo = -F.max_pool2d(-x, k, stride=1, padding=radius)
    return hi != lo


def pc_bce(logits: torch.Tensor, mask: torch.Tensor, mu: float = 0.9, radius: int = 2) -> torch.Tensor:
    """Pivot-consistent BCE of one prediction `(B, 1, h_o, w_o)` against the full mask.

    `L = mu * sum_E(l) / |E| + (1 - mu) * sum(l) / (B h_o w_o)`; the band term is
    0 when the band is empty. Returns an fp32 scalar (fp64 for fp64 logits).
    """
    _checks.check_pc_inputs([logits], mask, mu, radius)
    return pc_bce_unchecked(logits, mask, mu, radius)


def pc_bce_unchecked(logits: torch.Tensor, mask: torch.Tensor, mu: float, radius: int) -> torch.Tensor:
    """`pc_bce` on arguments already checked (`_checks.check_pc_inputs`)."""
    g = shrink_mask(mask, mask.shape[2] // logits.shape[2], mask.shape[3] // logits.shape[3])
    band = contour_band(g, radius)
    z = logits.to(compute_dtype(logits.dtype))
    loss = F.binary_cross_entropy_with_logits(z, g.to(z.dtype), reduction="none")
    n_band = band.sum()
    band_term = (loss * band).sum() / n_band.clamp(min=1).to(z.dtype)
    return mu * band_term + (1.0 - mu) * loss.mean()


def pc_loss(
    logits_list: Sequence[torch.Tensor], mask: torch.Tensor, mu: float = 0.9, radius: int = 2
) -> torch.Tensor:
    """Sum of `pc_bce` over the model's predictions (every scale)."""
    _checks.check_pc_inputs(logits_list, mask, mu, radius)
    return pc_loss_unchecked(logits_list, mask, mu, radius)


def pc_loss_unchecked(logits_list: Sequence[torch.Tensor], mask: torch.Tensor, mu: float, radius: int) -> torch.Tensor:
    """`pc_loss` on arguments already checked (`_checks.check_pc_inputs`)."""
    return sum(pc_bce_unchecked(z, mask, mu, radius) for z in logits_list)
