"""A model that follows IMDL-BenCo's contract, to drop NCL into its scripts.

IMDL-BenCo models take `forward(image, mask, label, shape_mask, ...)` and return a
dict with `backward_loss`, `pred_mask` (probabilities), `pred_label`, `visual_loss`
and `visual_image`. `NCLBenCo` wraps `NCLModel` that way with no dependency on
`imdlbenco`; register it in their registry yourself (`MODELS.register_module()`).

Its constructor is what IMDL-BenCo's `train.py` / `test.py` turn into options
(`misc.create_argparser`): every parameter has a plain type that argparse can call
(`str`, `int`, `float`) and a default, so `--backbone vit_small --width 32` work
there as here. This module must not use `from __future__ import annotations`: the
argument builder reads the annotations as callables.

* `backbone`: a ResNet depth (`"18"`, `"34"`, `"50"`, `"101"`; an int works too) or a
  ViT size (`"vit_demo"`, `"vit_tiny"`, `"vit_small"`, `"vit_base"`);
* `pivot_stage`, `width`: ResNet only; 0 means the backbone's default (stage 1,
  width 64); a ViT takes neither;
* `variant`, `dropout`, `head_channels`: as `NCLModel`; `omega`, `mu`, `radius`,
  `patch_px`, `tau`, `tol`: the loss (`LossConfig`, SPEC.md).

`pred_label` (the image score) is the maximum of `pred_mask` over the valid pixels:
the padding that IMDL-BenCo's `shape_mask` marks is left out.

Checkpoints cross both ways: IMDL-BenCo saves this module's weights under
`model.net.*` / `model.pivot.*`, which ncl_fast's `evaluate`, `predict` and
`--resume` read; and an ncl_fast checkpoint's `model` (keys `net.*`, `pivot.*`)
loads strictly into `NCLBenCo` (`load_state_dict` adds the `model.` prefix), which
is how IMDL-BenCo's `test.py` loads it. Build `NCLBenCo` with the checkpoint's
`model_config` (backbone, width, head_channels, variant).
"""
import torch
from torch import nn

from .model import LossConfig, NCLModel

__all__ = ["NCLBenCo"]


def _backbone(value: "int | str") -> "int | str":
    if isinstance(value, int):
        return value
    text = str(value).strip()
    return int(text) if text.isdigit() else text


class NCLBenCo(nn.Module):
    def __init__(self, backbone: str = "101", pivot_stage: int = 0, variant: str = "full", width: int = 0,
                 head_channels: int = 256, dropout: float = 0.1, omega: float = 0.01, mu: float = 0.9,
                 radius: int = 2, patch_px: int = 16, tau: float = 0.1, tol: float = 0.0):
        super().__init__()
        for name, value in (("pivot_stage", pivot_stage), ("width", width)):
            if value is None or value < 0:
                raise ValueError(f"{name} must be 0 (the backbone's default) or a positive integer, got {value!r}")
        loss = LossConfig(variant=variant, omega=omega, mu=mu, radius=radius, patch_px=patch_px, tau=tau, tol=tol)
        self.model = NCLModel(_backbone(backbone), pivot_stage or None, loss, dropout=dropout, width=width or None,
                              head_channels=head_channels)
        self._register_load_state_dict_pre_hook(_add_wrapper_prefix)

    def forward(self, image: torch.Tensor, mask: "torch.Tensor | None" = None, label=None,
                shape_mask: "torch.Tensor | None" = None, **unused) -> dict:
        if mask is not None and mask.dim() == 3:
            mask = mask[:, None]
        out = self.model(image, mask)
        pred = out["pred_mask"]
        if shape_mask is not None:  # the image score over the pixels that hold the image
            valid = shape_mask.reshape(pred.shape) > 0
            score = torch.where(valid, pred, torch.zeros_like(pred)).flatten(1).amax(dim=1)
        else:
            score = pred.flatten(1).amax(dim=1)
        result = {
            "pred_mask": pred,
            "pred_label": score,
            "visual_image": {"pred_mask": pred},
        }
        if mask is not None:
            result["backward_loss"] = out["loss"]
            result["visual_loss"] = {k: out[k] for k in ("loss", "ncl", "pc", "bce") if k in out}
        return result


def _add_wrapper_prefix(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """An ncl_fast checkpoint's `NCLModel` keys (`net.*`, `pivot.*`) as this wrapper's (`model.net.*`)."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix):]
        if rest.split(".", 1)[0] in ("net", "pivot"):
            state_dict[prefix + "model." + rest] = state_dict.pop(key)
