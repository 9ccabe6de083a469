"""The NCL loss terms (SPEC.md section 5), plain batch-vectorized PyTorch.

This is the baseline a user would write: it materializes the `(B, L, L)`
similarity matrix. The fused Triton kernels compute the same numbers without it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _checks
from .patches import AUTHENTIC, TAMPERED, CONTOUR, patch_features_unchecked

#: The `F.normalize` clamp of SPEC.md section 3.
EPS = 1e-12


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs (SPEC: everything in fp32); fp64 stays fp64 (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def masked_logsumexp(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Max-shifted log-sum-exp over the last axis where `mask`; 0 for an empty row.

    Written so that empty rows give finite values and zero gradients (a plain
    `logsumexp` of an all `-inf` row back-propagates NaN).
    """
    neg_inf = torch.finfo(x.dtype).min
    x = x.masked_fill(~mask, neg_inf)  # excluded entries: exp(.) underflows to exactly 0
    shift = x.amax(dim=-1, keepdim=True)
    shift = torch.where(mask.any(dim=-1, keepdim=True), shift, torch.zeros_like(shift)).detach()
    total = (x - shift).exp().sum(dim=-1, keepdim=True)
    has_any = total > 0
    lse = shift + torch.where(has_any, total, torch.ones_like(total)).log()
    return torch.where(has_any, lse, torch.zeros_like(lse)).squeeze(-1)


def ncl_terms(
    feat: torch.Tensor,
    labels: torch.Tensor,
    anchor_pos: torch.Tensor,
    anchor_neg: torch.Tensor,
    patch: int,
    tau: float = 0.1,
) -> torch.Tensor:
    """Per-image NCL terms `[t1, t2, t3]`, shape `(B, 3)`.

    Args:
        feat: `(B, C, h, w)` feature map (fp32, bf16, fp16; any memory layout).
        labels: `(B, L)` patch labels from `patch_labels`.
        anchor_pos, anchor_neg: `(B, D)` Pivot anchors `a+`, `a-`; the rows of
            images without contour patches are ignored.
        patch: `p` in feature cells. tau: the temperature.

    Returns:
        fp32 `(B, 3)` (fp64 for fp64 inputs). Undefined terms are 0.
    """
    grid = _checks.check_ncl_inputs(feat, labels, anchor_pos, anchor_neg, patch, tau)
    return ncl_terms_unchecked(feat, labels, anchor_pos, anchor_neg, grid, tau)


def ncl_terms_unchecked(
    feat: torch.Tensor,
    labels: torch.Tensor,
    anchor_pos: torch.Tensor,
    anchor_neg: torch.Tensor,
    grid: _checks.PatchGrid,
    tau: float,
) -> torch.Tensor:
    """`ncl_terms` on arguments already checked (`grid` from `_checks.check_ncl_inputs`)."""
    dt = compute_dtype(feat.dtype)
    f = F.normalize(patch_features_unchecked(feat.to(dt), grid.patch), dim=-1, eps=EPS)  # (B, L, D)
    ap = F.normalize(anchor_pos.to(dt), dim=-1, eps=EPS)  # (B, D)
    an = F.normalize(anchor_neg.to(dt), dim=-1, eps=EPS)

    is_p = labels == TAMPERED  # (B, L)
    is_n = labels == AUTHENTIC
    n_p = is_p.sum(1).to(dt)
    n_n = is_n.sum(1)
    n_k = (labels == CONTOUR).sum(1)

    # t1: every ordered pair (m, j) of distinct tampered patches, against all authentic ones.
    sim = torch.bmm(f, f.transpose(1, 2)) / tau  # (B, L, L), s_mj
    neg_lse = masked_logsumexp(sim, is_n[:, None, :].expand_as(sim))  # (B, L): log sum_{i in N} exp(s_mi)
    # log(exp(s_mj) + sum_i exp(s_mi)) - s_mj == softplus(neg_lse_m - s_mj)
    pair = F.softplus(neg_lse[:, :, None] - sim)
    eye = torch.eye(sim.shape[1], dtype=torch.bool, device=sim.device)
    pair_mask = is_p[:, :, None] & is_p[:, None, :] & ~eye
    ok1 = (n_p >= 2) & (n_n >= 1)
    t1 = (pair * pair_mask).sum(dim=(1, 2)) / torch.where(ok1, n_p * (n_p - 1), torch.ones_like(n_p))

    # t2: a+ against the tampered patches (positives) and the authentic ones (negatives).
    s_pos = torch.einsum("bd,bld->bl", ap, f) / tau  # s(a+, l)
    lse_pos = masked_logsumexp(s_pos, is_n)
    t2 = (F.softplus(lse_pos[:, None] - s_pos) * is_p).sum(1) / n_p.clamp(min=1)

    # t3: a- against the authentic patches (positives) and the tampered ones (negatives).
    s_neg = torch.einsum("bd,bld->bl", an, f) / tau  # s(a-, l)
    lse_neg = masked_logsumexp(s_neg, is_p)
    t3 = (F.softplus(lse_neg[:, None] - s_neg) * is_n).sum(1) / n_n.clamp(min=1).to(dt)

    ok23 = (n_p >= 1) & (n_n >= 1) & (n_k >= 1)
    zero = torch.zeros_like(t1)
    return torch.stack(
        [torch.where(ok1, t1, zero), torch.where(ok23, t2, zero), torch.where(ok23, t3, zero)], dim=1
    )
