"""The image/mask dataset: decoding (in DataLoader workers), resizing or padding,
training crops and flips.

Sizing modes (`mode`):
* `resize` (default for evaluation): image (bilinear) and mask (nearest) to
  `size x size`;
* `pad`: top-left zero padding to `size x size` with a `shape_mask` that keeps
  the padding out of the metrics (images larger than `size` are first scaled
  down to fit, keeping their aspect ratio);
* `crop` (training, the paper's setting): a random `size x size` crop, smaller
  images padded (padding is authentic and outside `shape_mask`).
Training adds horizontal flips. Augmentation randomness is drawn from
(seed, epoch, index), so batches are the same whatever the number of workers,
and a resumed run sees exactly the data an uninterrupted one would.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .sources import Entry, read_image, read_mask

# Per-channel normalization of RGB in [0, 1] (the usual ImageNet statistics).
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
MODES = ("resize", "pad", "crop")


def normalize(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float (3, H, W), normalized."""
    x = (image.astype(np.float32) / 255.0 - MEAN) / STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def fit_size(image: np.ndarray, mask: np.ndarray, size: int, mode: str, rng: np.random.Generator | None):
    """Apply the sizing mode; returns (image, mask, shape_mask) of size x size."""
    h, w = mask.shape
    if mode == "resize":
        img = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
        m = np.asarray(Image.fromarray(mask).resize((size, size), Image.NEAREST))
        return img, m, np.ones((size, size), dtype=bool)
    if mode == "pad" and (h > size or w > size):
        scale = size / max(h, w)
        nw, nh = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
        image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
        mask = np.asarray(Image.fromarray(mask).resize((nw, nh), Image.NEAREST))
        h, w = nh, nw
    y0 = x0 = 0
    if mode == "crop" and (h > size or w > size):
        assert rng is not None
        y0 = int(rng.integers(0, max(h - size, 0) + 1))
        x0 = int(rng.integers(0, max(w - size, 0) + 1))
    crop_img = image[y0 : y0 + size, x0 : x0 + size]
    crop_mask = mask[y0 : y0 + size, x0 : x0 + size]
    ch, cw = crop_mask.shape
    img = np.zeros((size, size, 3), dtype=np.uint8)
    m = np.zeros((size, size), dtype=bool)
    shape = np.zeros((size, size), dtype=bool)
    img[:ch, :cw] = crop_img
    m[:ch, :cw] = crop_mask
    shape[:ch, :cw] = True
    return img, m, shape


class ForgeryDataset(Dataset):
    """Items: `image` (3, S, S) float, `mask` (1, S, S) float {0, 1}, `shape_mask`
    (1, S, S) float, `label` (1 if any pixel is tampered), `name`, `size` (H, W)
    of the original image, `index`."""

    def __init__(
        self,
        entries: Sequence[Entry],
        size: int = 512,
        mode: str = "resize",
        train: bool = False,
        invert_masks: bool = False,
        seed: int = 0,
        attack: Callable[[np.ndarray, str], np.ndarray] | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.entries = list(entries)
        self.size = size
        self.mode = mode
        self.train = train
        self.invert_masks = invert_masks
        self.seed = seed
        self.attack = attack
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.entries)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        e = self.entries[index]
        image = read_image(e.image)
        if e.mask is None:
            mask = np.zeros(image.shape[:2], dtype=bool)
        else:
            mask = read_mask(e.mask, self.invert_masks)
            if mask.shape != image.shape[:2]:
                raise ValueError(f"size mismatch: image {e.image} is {image.shape[:2]} but mask {e.mask} is {mask.shape}")
        return image, mask

    def __getitem__(self, index: int) -> dict:
        e = self.entries[index]
        image, mask = self.load(index)
        H, W = mask.shape
        if self.attack is not None:
            image = self.attack(image, e.image)
        rng = np.random.default_rng([self.seed, self.epoch, index]) if self.train else None
        img, m, shape = fit_size(image, mask, self.size, self.mode, rng)
        if self.train and rng.random() < 0.5:
            img, m, shape = img[:, ::-1], m[:, ::-1], shape[:, ::-1]
        return {
            "image": normalize(img),
            "mask": torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))[None],
            "shape_mask": torch.from_numpy(np.ascontiguousarray(shape, dtype=np.float32))[None],
            "label": torch.tensor(float(mask.any())),
            "name": e.image,
            "size": torch.tensor([H, W]),
            "index": index,
        }
