"""The Pivot network (SPEC.md section 4): the anchors `a+`, `a-` of every image."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..reference.patches import CONTOUR


class PivotBranch(nn.Module):
    """`Conv2d(C, C, 1, bias=False) -> BatchNorm2d(C) -> ReLU` (SPEC section 4).

    `forward(x)` applies it to a `(k, C, p, p)` batch of contour patches, the
    literal definition; `Pivot` computes the same thing on the whole feature map
    with masked statistics (`masked_forward`), which needs no gather of a
    data-dependent number of patches.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))

    def masked_forward(self, feat: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """The branch on every cell of `feat` (B, C, h, w), with BatchNorm statistics
        taken over the cells where `cells` (B, 1, h, w) is 1 (the contour patches)."""
        y = self.conv(feat)
        bn = self.bn
        if not self.training:
            return F.relu(F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps))
        w = cells.to(torch.float32)
        n = w.sum()
        yf = y.float()
        mean = (yf * w).sum(dim=(0, 2, 3)) / n.clamp(min=1)
        var = (((yf - mean[None, :, None, None]) ** 2) * w).sum(dim=(0, 2, 3)) / n.clamp(min=1)
        # BatchNorm needs more than one value per channel; with fewer, use the running statistics.
        enough = n > 1
        use_mean = torch.where(enough, mean, bn.running_mean)
        use_var = torch.where(enough, var, bn.running_var)
        with torch.no_grad():
            m = bn.momentum
            unbiased = var * n / (n - 1).clamp(min=1)
            bn.running_mean.copy_(torch.where(enough, (1 - m) * bn.running_mean + m * mean, bn.running_mean))
            bn.running_var.copy_(torch.where(enough, (1 - m) * bn.running_var + m * unbiased, bn.running_var))
            bn.num_batches_tracked.add_(enough.to(bn.num_batches_tracked.dtype))
        scale = bn.weight / torch.sqrt(use_var + bn.eps)
        out = (yf - use_mean[None, :, None, None]) * scale[None, :, None, None] + bn.bias[None, :, None, None]
        return F.relu(out).to(y.dtype)


class Pivot(nn.Module):
    """Two branches `se+`, `se-` over the contour patches, averaged per image.

    `forward(feat, labels, patch)` takes the feature map `(B, C, h, w)` the Pivot
    is attached to, the patch labels `(B, L)` and the patch size `p`, and returns
    `(a+, a-)`, each `(B, C*p*p)` flattened like a patch feature. Images with no
    contour patch get zero anchors, which `ncl_terms` ignores. BatchNorm
    statistics are taken over all contour patches of the batch.

    Computed on the whole map with masks (a 1x1 convolution is per cell), so
    there is no data-dependent shape and no host synchronization: it traces
    under `torch.compile` without a graph break.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.pos = PivotBranch(channels)
        self.neg = PivotBranch(channels)

    def forward(self, feat: torch.Tensor, labels: torch.Tensor, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
        B, C, h, w = feat.shape
        if C != self.channels:
            raise ValueError(f"the Pivot was built for {self.channels} channels, the feature map has {C}")
        R, Q = h // patch, w // patch
        is_contour = (labels == CONTOUR).reshape(B, 1, R, 1, Q, 1)
        cells = is_contour.expand(B, 1, R, patch, Q, patch).reshape(B, 1, R * patch, Q * patch)
        cells = F.pad(cells, (0, w - Q * patch, 0, h - R * patch))  # trailing cells: no patch
        count = is_contour.reshape(B, -1).sum(dim=1).clamp(min=1)  # (B,)

        def anchor(branch: PivotBranch) -> torch.Tensor:
            out = branch.masked_forward(feat, cells)[:, :, : R * patch, : Q * patch]
            out = out.reshape(B, C, R, patch, Q, patch) * is_contour.to(out.dtype)
            mean = out.sum(dim=(2, 4)) / count[:, None, None, None].to(out.dtype)  # (B, C, p, p)
            return mean.reshape(B, C * patch * patch)

        return anchor(self.pos), anchor(self.neg)
