"""The image/mask dataset: decoding (in DataLoader workers), resizing or padding,
training crops and flips. Items stay uint8 (images) and bool (masks) across the
DataLoader; `to_model_input` (`model_input.py`) converts and normalizes them on
the device.

Sizing modes (`mode`):
* `resize` (default for evaluation): image (bilinear) and mask (nearest) to
  `size x size`;
* `pad`: top-left zero padding to `size x size` with a `shape_mask` that keeps
  the padding out of the metrics (images larger than `size` are first scaled
  down to fit, keeping their aspect ratio);
* `crop` (training, the paper's setting): a random `size x size` crop, smaller
  images padded (padding is authentic and outside `shape_mask`).
IMDL-BenCo's evaluation protocols (`protocol="benco"` or `"benco13"`; both
versions make their inputs alike) reproduce its inputs instead: the mask
thresholded (mean(RGB) > 127.5) at the original size, the label true when any
raw mask value is non-zero, then `resize` with OpenCV as albumentations does
(`cv2.resize`, linear for the image, nearest for the mask; OpenCV is needed,
`pip install opencv-python-headless`) or `pad` by zero padding at the bottom and
right and cropping the top-left `size x size` of a larger image (its
`shape_mask` covers what holds the image).
Training adds horizontal flips. Augmentation randomness is drawn from
(seed, epoch, index): the key a sampler passes is `(epoch, index)` (see
`sampler.EpochSampler`; a plain index means epoch 0), so batches are the same
whatever the number of workers, persistent workers draw new crops every epoch,
and a resumed run sees exactly the data an uninterrupted one would.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .sources import Entry, read_image, read_mask, read_mask_and_label

MODES = ("resize", "pad", "crop")
PROTOCOLS = ("ncl_fast", "benco", "benco13")


def opencv():
    """cv2, which IMDL-BenCo's protocols resize with; a clear error when it is missing."""
    try:
        import cv2
    except ImportError as err:
        raise ImportError(f"IMDL-BenCo's protocol resizes with OpenCV (cv2.resize), which cannot be imported "
                          f"({err}): pip install opencv-python-headless (or ncl_fast[benco]), or evaluate with "
                          f"--if_padding, which needs no resizing") from None
    return cv2


def check_protocol(protocol: str, mode: str) -> None:
    """Raise ValueError (or ImportError for a missing OpenCV) when `protocol` cannot run in `mode`."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if protocol != "ncl_fast":
        if mode not in ("resize", "pad"):
            raise ValueError(f"protocol {protocol} evaluates in resize or pad mode, not {mode!r}")
        if mode == "resize":
            opencv()


def benco_resize(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """albumentations' `Resize(size, size)` as IMDL-BenCo applies it: cv2.resize, linear for the
    uint8 image, nearest for the binary mask."""
    cv2 = opencv()
    if image.shape[:2] == (size, size):
        return image, mask
    return (cv2.resize(np.ascontiguousarray(image), (size, size), interpolation=cv2.INTER_LINEAR),
            cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST).astype(bool))


def resize_to_fit(image: np.ndarray, mask: np.ndarray, size: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """`resize`: both to size x size; `pad`: scaled down to fit in size x size when larger
    (aspect ratio kept); otherwise unchanged. Image bilinear, mask nearest, uint8 throughout."""
    h, w = mask.shape
    if mode == "resize":
        return (np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR)),
                np.asarray(Image.fromarray(mask).resize((size, size), Image.NEAREST)))
    if mode == "pad" and (h > size or w > size):
        scale = size / max(h, w)
        nw, nh = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
        return (np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR)),
                np.asarray(Image.fromarray(mask).resize((nw, nh), Image.NEAREST)))
    return image, mask


def crop_origin(h: int, w: int, size: int, rng: np.random.Generator) -> tuple[int, int]:
    """The random top-left corner (y0, x0) of a size x size crop of an h x w image (0 along a
    side not longer than `size`); draws nothing when the image fits."""
    if h <= size and w <= size:
        return 0, 0
    y0 = int(rng.integers(0, max(h - size, 0) + 1))
    x0 = int(rng.integers(0, max(w - size, 0) + 1))
    return y0, x0


def to_canvas(image: np.ndarray, mask: np.ndarray, size: int, y0: int = 0, x0: int = 0,
              flip: bool = False) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """The size x size window at (y0, x0), zero-padded at the bottom and right where the image
    ends, mirrored left-right with `flip`: (image uint8 (3, size, size), mask bool (size, size),
    (h, w) of the part that holds the image). One copy of each: crop, padding, flip and the
    HWC -> CHW transpose happen together."""
    crop = image[y0 : y0 + size, x0 : x0 + size]
    crop_mask = mask[y0 : y0 + size, x0 : x0 + size]
    h, w = crop_mask.shape
    chw = crop.transpose(2, 0, 1)
    if flip:
        chw, crop_mask = chw[:, :, ::-1], crop_mask[:, ::-1]
    if (h, w) == (size, size):
        return np.array(chw, order="C"), np.array(crop_mask, dtype=bool, order="C"), (h, w)
    cols = slice(size - w, size) if flip else slice(0, w)  # a flip moves the padding to the left
    img = np.zeros((3, size, size), dtype=np.uint8)
    m = np.zeros((size, size), dtype=bool)
    img[:, :h, cols] = chw
    m[:h, cols] = crop_mask
    return img, m, (h, w)


def valid_region(size: int, hw: tuple[int, int], flip: bool = False) -> np.ndarray:
    """Bool (size, size): the pixels of a `to_canvas` result that hold the image."""
    h, w = hw
    shape = np.zeros((size, size), dtype=bool)
    shape[:h, slice(size - w, size) if flip else slice(0, w)] = True
    return shape


class UnreadableItemError(RuntimeError):
    """An item whose files cannot be read any more; the message names them. (One
    string argument, so that a DataLoader worker can hand it to the main process.)"""


class ForgeryDataset(Dataset):
    """Items: `image` uint8 (3, S, S), `mask` bool (1, S, S), `label` (1. if any pixel is
    tampered; IMDL-BenCo's rule under its protocols), `name`, `size` (H, W) of the original
    image, `index`; and `shape_mask` bool
    (1, S, S), the pixels that hold the image, when `shape_mask` is true (default: outside
    training, in the modes that pad; in `resize` mode it would be all ones, and training
    never reads it).

    Keys: `(epoch, index)` (what `EpochSampler` yields) or a plain `index` (epoch 0); the
    epoch seeds training crops and flips."""

    def __init__(
        self,
        entries: Sequence[Entry],
        size: int = 512,
        mode: str = "resize",
        train: bool = False,
        invert_masks: bool = False,
        seed: int = 0,
        attack: Callable[[np.ndarray, str], np.ndarray] | None = None,
        shape_mask: bool | None = None,
        protocol: str = "ncl_fast",
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        check_protocol(protocol, mode)
        if protocol != "ncl_fast" and train:
            raise ValueError(f"protocol {protocol} is an evaluation protocol; training uses ncl_fast's inputs")
        self.protocol = protocol
        self.entries = list(entries)
        self.size = size
        self.mode = mode
        self.train = train
        self.invert_masks = invert_masks
        self.seed = seed
        self.attack = attack
        self.shape_mask = (mode != "resize" and not train) if shape_mask is None else shape_mask

    def __len__(self) -> int:
        return len(self.entries)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, bool]:
        """(image, mask, label); the label is IMDL-BenCo's (any non-zero raw mask value) under its
        protocols, else any tampered pixel."""
        e = self.entries[index]
        image = read_image(e.image)
        if e.mask is None:
            mask, label = np.zeros(image.shape[:2], dtype=bool), False
        else:
            if self.protocol == "ncl_fast":
                mask = read_mask(e.mask, self.invert_masks)
                label = bool(mask.any())
            else:
                mask, label = read_mask_and_label(e.mask, self.invert_masks)
            if mask.shape != image.shape[:2]:
                raise ValueError(f"size mismatch: image {e.image} is {image.shape[:2]} but mask {e.mask} is {mask.shape}")
        return image, mask, label

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        e = self.entries[index]
        try:
            image, mask, label = self.load(index)
        except (OSError, ValueError, SyntaxError) as err:  # a file changed or vanished since it was checked
            raise UnreadableItemError(f"{e.image}" + (f" (mask {e.mask})" if e.mask else "")
                                      + f": {type(err).__name__}: {err}") from None
        H, W = mask.shape
        label = float(label)
        if self.attack is not None:
            image = self.attack(image, e.image)
        if self.protocol == "ncl_fast":
            image, mask = resize_to_fit(image, mask, self.size, self.mode)
        elif self.mode == "resize":
            image, mask = benco_resize(image, mask, self.size)
        # (IMDL-BenCo's pad mode: to_canvas below pads, and crops the top-left of a larger image)
        y0 = x0 = 0
        flip = False
        if self.train:  # the draws, in this order: crop corner (crop mode, larger images only), then flip
            rng = np.random.default_rng([self.seed, epoch, index])
            if self.mode == "crop":
                y0, x0 = crop_origin(*mask.shape, self.size, rng)
            flip = bool(rng.random() < 0.5)
        img, m, hw = to_canvas(image, mask, self.size, y0, x0, flip)
        item = {
            "image": torch.from_numpy(img),
            "mask": torch.from_numpy(m)[None],
            "label": torch.tensor(label),
            "name": e.image,
            "size": torch.tensor([H, W]),
            "index": index,
        }
        if self.shape_mask:
            item["shape_mask"] = torch.from_numpy(valid_region(self.size, hw, flip))[None]
        return item
