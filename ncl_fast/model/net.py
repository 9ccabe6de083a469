"""The trainable NCL model: DeepLabV3+, the Pivot and the loss in one module."""
from __future__ import annotations

import torch
from torch import nn

from .deeplab import DeepLabV3Plus
from .loss import LossConfig, NCLCriterion
from .pivot import Pivot


class NCLModel(nn.Module):
    """`forward(image, mask=None)` returns `logits`, `pred_mask` (sigmoid) and, given
    a mask, the loss dict of `NCLCriterion` (`loss`, `ncl`, `pc` / `bce`).

    The Pivot is built for the variants that use it (`pivot`, `full`) and the
    auxiliary heads for `full` only, so every parameter trains.
    """

    def __init__(
        self,
        backbone: int = 101,
        pivot_stage: int = 1,
        loss: LossConfig | None = None,
        dropout: float = 0.1,
        width: int = 64,
        head_channels: int = 256,
    ):
        super().__init__()
        self.criterion = NCLCriterion(loss)
        aux = self.criterion.config.variant == "full"
        self.net = DeepLabV3Plus(backbone, pivot_stage, aux_heads=aux, dropout=dropout, width=width,
                                 head_channels=head_channels)
        uses_pivot = self.criterion.config.variant != "base"
        self.pivot = Pivot(self.net.feature_channels) if uses_pivot else None

    def forward(self, image: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
        out = self.net(image)
        result = {"logits": out["logits"], "pred_mask": torch.sigmoid(out["logits"])}
        if mask is not None:
            result.update(self.criterion(out, mask, self.pivot))
        return result
