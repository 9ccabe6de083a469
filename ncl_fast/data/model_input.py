"""Batches to model inputs, on the device: the one place where uint8 images become
normalized float32 and bool masks become float {0, 1} (training, evaluation and
prediction all call `to_model_input`).

The conversion runs after the copy to the device, so a quarter of the bytes cross
the DataLoader and the host-device link, and no worker spends time on float work.
The arithmetic is the former worker-side `normalize`, operation for operation in
float32: `(x / 255 - MEAN) / STD`.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

# Per-channel normalization of RGB in [0, 1] (the usual ImageNet statistics).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class ModelInput(NamedTuple):
    image: torch.Tensor  # float32 (B, 3, H, W), normalized
    mask: torch.Tensor | None  # float32 (B, 1, H, W) in {0, 1}; None for a bare image tensor
    shape_mask: torch.Tensor | None  # float32 (B, 1, H, W), the pixels that hold the image; None: all


_STATS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """MEAN and STD as float32 (1, 3, 1, 1) on `device`, made once per device."""
    if device not in _STATS:
        as_tensor = lambda v: torch.tensor(v, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        _STATS[device] = as_tensor(MEAN), as_tensor(STD)
    return _STATS[device]


def to_model_input(batch: dict | torch.Tensor, device: torch.device | str,
                   channels_last: bool = False) -> ModelInput:
    """A DataLoader batch of `ForgeryDataset` items (or a uint8 (B, 3, H, W) image tensor) as
    model input on `device`: the image float32 and normalized (channels_last memory with
    `channels_last`), the mask and shape mask float32. Copies are non-blocking (from pinned
    memory they overlap the step)."""
    device = torch.device(device)
    images = batch["image"] if isinstance(batch, dict) else batch
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4 \
            or images.shape[1] != 3:
        what = (f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor)
                else type(images).__name__)
        raise ValueError(f"to_model_input: images must be a uint8 (B, 3, H, W) tensor (ForgeryDataset items "
                         f"batched by a DataLoader), got {what}")
    x = images.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)  # on uint8: a quarter of the float copy
    mean, std = _stats(x.device)
    x = x.float().div_(255.0).sub_(mean).div_(std)
    if not isinstance(batch, dict):
        return ModelInput(x, None, None)
    mask = batch["mask"].to(device, non_blocking=True).float()
    shape = batch.get("shape_mask")
    if shape is not None:
        shape = shape.to(device, non_blocking=True).float()
    return ModelInput(x, mask, shape)
