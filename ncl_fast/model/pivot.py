"""The Pivot network (SPEC.md section 4): the anchors `a+`, `a-` of every image."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..reference.patches import CONTOUR


class PivotBranch(nn.Module):
    """`Conv2d(C, C, 1, bias=False) -> BatchNorm2d(C) -> ReLU` on a `(k, C, p, p)` batch."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        # BatchNorm cannot take batch statistics from a single value per channel
        # (one contour patch of one cell in the whole batch): use the running ones.
        use_batch_stats = self.training and x.shape[0] * x.shape[2] * x.shape[3] > 1
        x = F.batch_norm(
            x,
            self.bn.running_mean,
            self.bn.running_var,
            self.bn.weight,
            self.bn.bias,
            training=use_batch_stats,
            momentum=self.bn.momentum,
            eps=self.bn.eps,
        )
        return F.relu(x)


class Pivot(nn.Module):
    """Two branches `se+`, `se-` over the contour patches, averaged per image.

    `forward(feat, labels, patch)` takes the feature map `(B, C, h, w)` the Pivot
    is attached to, the patch labels `(B, L)` and the patch size `p`, and returns
    `(a+, a-)`, each `(B, C*p*p)` flattened like a patch feature. Images with no
    contour patch get zero anchors, which `ncl_terms` ignores. BatchNorm
    statistics are taken over all contour patches of the batch.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.pos = PivotBranch(channels)
        self.neg = PivotBranch(channels)

    def forward(self, feat: torch.Tensor, labels: torch.Tensor, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
        B, C = feat.shape[:2]
        if C != self.channels:
            raise ValueError(f"the Pivot was built for {self.channels} channels, the feature map has {C}")
        D = C * patch * patch
        cols = F.unfold(feat, kernel_size=patch, stride=patch)  # (B, D, L)
        is_contour = labels == CONTOUR  # (B, L)
        image_of, patch_of = is_contour.nonzero(as_tuple=True)
        if image_of.numel() == 0:
            # No contour patch in the batch: zero anchors (ncl_terms ignores them),
            # tied to the parameters so that every parameter gets a (zero) gradient.
            tie = sum(p.sum() for p in self.parameters()) * 0.0
            zeros = feat.new_zeros(B, D) + tie.to(feat.dtype)
            return zeros, zeros
        contour = cols[image_of, :, patch_of].reshape(-1, C, patch, patch)  # (k, C, p, p)
        counts = is_contour.sum(dim=1).clamp(min=1).to(feat.dtype)[:, None]  # (B, 1)

        def average(branch: PivotBranch) -> torch.Tensor:
            out = branch(contour).reshape(-1, D)
            summed = out.new_zeros(B, D).index_add(0, image_of, out)
            return summed / counts.to(out.dtype)

        return average(self.pos), average(self.neg)
