"""The trainable NCL model: the segmentation network (DeepLabV3+ or a ViT), the
Pivot and the loss in one module."""
from __future__ import annotations

import torch
from torch import nn

from .deeplab import DeepLabV3Plus
from .loss import LossConfig, NCLCriterion
from .pivot import Pivot
from .resnet import ARCHS
from .vit import VIT_CONFIGS, ViTConfig, ViTSegmenter, is_vit, vit_config

#: Every `backbone` value: ResNet depths (DeepLabV3+) and ViT sizes.
BACKBONES = tuple(sorted(ARCHS)) + tuple(VIT_CONFIGS)


def describe_backbone(backbone: int | str | ViTConfig, width: int | None = None) -> str:
    """The backbone for messages: `ResNet-18 (width 16)`, `ViT vit_demo (depth 4, width 128, 4 heads)`."""
    if is_vit(backbone):
        cfg = vit_config(backbone)
        name = f"ViT {backbone}" if isinstance(backbone, str) else "ViT"
        return f"{name} (depth {cfg.depth}, width {cfg.width}, {cfg.heads} heads)"
    return f"ResNet-{backbone} (width {64 if width is None else width})"


class NCLModel(nn.Module):
    """`forward(image, mask=None)` returns `logits`, `pred_mask` (sigmoid) and, given
    a mask, the loss dict of `NCLCriterion` (`loss`, `ncl`, `pc` / `bce`).

    `backbone`: a ResNet depth (18, 34, 50, 101) builds DeepLabV3+, with the Pivot on
    ResNet stage `pivot_stage` (default 1) and a stem of `width` channels (default
    64); a ViT name (`vit_demo`, `vit_tiny`, `vit_small`, `vit_base`) or a `ViTConfig`
    builds `ViTSegmenter`, with the Pivot on its token map. A ViT has neither stages
    nor a stem width: `pivot_stage` and `width` must then be None.

    The Pivot is built for the variants that use it (`pivot`, `full`) and the
    auxiliary heads for `full` only, so every parameter trains.
    """

    def __init__(
        self,
        backbone: int | str | ViTConfig = 101,
        pivot_stage: int | None = None,
        loss: LossConfig | None = None,
        dropout: float = 0.1,
        width: int | None = None,
        head_channels: int = 256,
    ):
        super().__init__()
        self.criterion = NCLCriterion(loss)
        aux = self.criterion.config.variant == "full"
        if is_vit(backbone):
            for name, value in (("pivot_stage", pivot_stage), ("width", width)):
                if value is not None:
                    raise ValueError(f"{name} applies to ResNet backbones only, got {name}={value} with "
                                     f"{backbone if isinstance(backbone, str) else 'a ViT'} (the Pivot reads the "
                                     f"ViT's token map; its width is part of the ViT size)")
            self.net = ViTSegmenter(backbone, aux_heads=aux, dropout=dropout, head_channels=head_channels)
        else:
            self.net = DeepLabV3Plus(backbone, 1 if pivot_stage is None else pivot_stage, aux_heads=aux,
                                     dropout=dropout, width=64 if width is None else width,
                                     head_channels=head_channels)
        uses_pivot = self.criterion.config.variant != "base"
        self.pivot = Pivot(self.net.feature_channels) if uses_pivot else None

    def forward(self, image: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
        out = self.net(image)
        result = {"logits": out["logits"], "pred_mask": torch.sigmoid(out["logits"])}
        if mask is not None:
            result.update(self.criterion(out, mask, self.pivot))
        return result
