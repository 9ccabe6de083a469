"""`NCLLoss`: the NCL loss as a module for any segmentation network (SPEC.md
sections 2-5 and 10): it holds its own Pivot and takes `(feature_map, mask)`."""
from __future__ import annotations

import torch
from torch import nn

from .. import _checks, functional
from .pivot import Pivot


class NCLLoss(nn.Module):
    """`L_NCL` of a batch from any network's feature map.

    `NCLLoss(channels, patch_px=16, tau=0.1, tol=0.0, impl=None)`:

    * `channels`: C of the feature map it will be given (the Pivot's two 1x1
      conv + BN + ReLU branches are built for it, so they train with the network:
      put this module's parameters in the optimizer);
    * `patch_px`: the patch side in input pixels; the feature map's stride
      `s = H / h` must divide it (`p = patch_px / s` cells per patch);
    * `tau`, `tol`: the similarity temperature and the patch purity tolerance;
    * `impl`: the backend (`auto`, `reference`, `triton`, `cuda`; see
      `ncl_fast.functional`).

    `forward(features, mask)` takes `features (B, C, h, w)` (any dtype and memory
    layout; gradients flow back into it) and `mask (B, 1, H, W)` with tampered
    pixels > 0.5, where `H / h = W / w` is an integer, and returns the fp32 scalar
    `mean_b (t1 + t2 + t3)`. Weight it as the paper does (`omega = 0.01`):

        ncl = NCLLoss(channels=256, patch_px=16)
        loss = bce(logits, mask) + 0.01 * ncl(features, mask)
    """

    def __init__(self, channels: int, patch_px: int = 16, tau: float = 0.1, tol: float = 0.0,
                 impl: str | None = None):
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive integer (the feature map's C), got {channels!r}")
        if isinstance(patch_px, bool) or not isinstance(patch_px, int) or patch_px < 1:
            raise ValueError(f"patch_px must be a positive integer, got {patch_px!r}")
        if not tau > 0:
            raise ValueError(f"tau must be positive, got {tau}")
        _checks.check_tol(tol)
        self.channels, self.patch_px, self.tau, self.tol, self.impl = channels, patch_px, float(tau), float(tol), impl
        self.pivot = Pivot(channels)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, patch_px={self.patch_px}, tau={self.tau}, tol={self.tol}"

    def patch_cells(self, mask: torch.Tensor, features: torch.Tensor) -> int:
        """`p`, the patch side in feature cells, from the two tensors' sizes."""
        (H, W), (h, w) = mask.shape[-2:], features.shape[-2:]
        sy = _checks.integer_stride(H, h, "rows", "feature map")
        sx = _checks.integer_stride(W, w, "columns", "feature map")
        if sy != sx:
            raise ValueError(f"the feature map's stride differs between rows ({H}/{h} = {sy}) and columns "
                             f"({W}/{w} = {sx}); NCLLoss needs square patches: give it a map with one stride")
        return _checks.patch_cells(self.patch_px, sy)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        _checks.check_feature_map(features, "features")
        _checks.check_mask(mask)
        if features.shape[1] != self.channels:
            raise ValueError(f"NCLLoss was built for {self.channels} channels, the feature map has "
                             f"{features.shape[1]} (shape {tuple(features.shape)}); build it with "
                             f"NCLLoss(channels={features.shape[1]}, ...)")
        p = self.patch_cells(mask, features)
        return functional.ncl_loss_after_map_checks(features, mask, self.pivot, p, self.tau, self.tol, impl=self.impl)
