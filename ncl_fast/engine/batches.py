"""A batch from the DataLoader on its way into the model: moved to the device, then
converted and normalized there, so the workers and the loader's queues carry uint8.
"""
from __future__ import annotations

import torch

# Per-channel normalization of RGB in [0, 1] (the usual ImageNet statistics).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def normalize_image(image: torch.Tensor) -> torch.Tensor:
    """uint8 `(B, 3, H, W)` (0-255) -> float32 `(x / 255 - MEAN) / STD`; a float image
    passes through (already normalized)."""
    if image.dtype != torch.uint8:
        return image.float()
    mean = torch.tensor(MEAN, device=image.device, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=image.device, dtype=torch.float32).view(1, 3, 1, 1)
    return (image.float() / 255.0 - mean) / std


def to_device(batch: dict, device: torch.device, channels_last: bool = False, keys=("image", "mask")) -> list:
    """The batch's `keys` on `device` (asynchronously from pinned memory), the image
    in channels_last where asked. Conversion happens on the device (`normalize_image`)."""
    out = []
    for key in keys:
        t = batch[key].to(device, non_blocking=True)
        if key == "image" and channels_last:
            t = t.contiguous(memory_format=torch.channels_last)
        out.append(t)
    return out
