"""A model that follows IMDL-BenCo's contract, to drop NCL into existing scripts.

IMDL-BenCo models take `forward(image, mask, label, ...)` and return a dict with
`backward_loss`, `pred_mask` (probabilities), `pred_label`, `visual_loss` and
`visual_image`. `NCLBenCo` wraps `NCLModel` that way with no dependency on
`imdlbenco`; register it in their registry yourself if you use it there.
`backbone` is a ResNet depth or a ViT size (`vit_small`, ...; see `NCLModel`).
"""
from __future__ import annotations

import torch
from torch import nn

from .model import LossConfig, NCLModel


class NCLBenCo(nn.Module):
    def __init__(self, backbone: int | str = 101, pivot_stage: int | None = None, variant: str = "full",
                 **loss_kwargs):
        super().__init__()
        self.model = NCLModel(backbone, pivot_stage, LossConfig(variant=variant, **loss_kwargs))

    def forward(self, image: torch.Tensor, mask: torch.Tensor | None = None, label=None, **unused) -> dict:
        if mask is not None and mask.dim() == 3:
            mask = mask[:, None]
        out = self.model(image, mask)
        pred = out["pred_mask"]
        result = {
            "pred_mask": pred,
            "pred_label": pred.flatten(1).amax(dim=1),  # image score: max of the mask
            "visual_image": {"pred_mask": pred},
        }
        if mask is not None:
            result["backward_loss"] = out["loss"]
            result["visual_loss"] = {k: out[k] for k in ("loss", "ncl", "pc", "bce") if k in out}
        return result
