"""Robustness attacks, applied to the full-resolution uint8 test image before any
resizing or padding; masks are untouched (ECOSYSTEM.md).

* NCL paper, Table 3 (`ncl` grid): resize 0.78x and 0.25x, Gaussian blur with
  kernel 3 and 5, Gaussian noise sigma 3 and 5 (0-255 scale), JPEG 50 and 100.
* IMDL-BenCo (`benco` grid): blur kernel {3, 7, ..., 23}, noise variance
  {3, 7, ..., 23}, JPEG quality {50, 60, ..., 100}.

Resizing is down and back up to the original size, so the image keeps its
mask's size in every evaluation mode. Blur uses OpenCV's sigma for a kernel of
size k, `0.3 ((k - 1) / 2 - 1) + 0.8`, truncated to the kernel. Noise is
seeded per image, so a run is repeatable.
"""
from __future__ import annotations

import io
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image
from scipy import ndimage


@dataclass(frozen=True)
class Attack:
    name: str
    fn: Callable[[np.ndarray, str], np.ndarray]  # (uint8 HxWx3 image, image name) -> attacked image

    def __call__(self, image: np.ndarray, key: str = "") -> np.ndarray:
        return self.fn(image, key)


def resize(scale: float) -> Attack:
    def fn(img, key):
        h, w = img.shape[:2]
        small = Image.fromarray(img).resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
        return np.asarray(small.resize((w, h), Image.BILINEAR))

    return Attack(f"resize {scale}x", fn)


def gaussian_blur(kernel: int) -> Attack:
    sigma = 0.3 * ((kernel - 1) * 0.5 - 1) + 0.8
    radius = (kernel - 1) // 2

    def fn(img, key):
        out = ndimage.gaussian_filter(img.astype(np.float32), sigma=(sigma, sigma, 0), truncate=radius / sigma,
                                      mode="reflect")
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)

    return Attack(f"blur k={kernel}", fn)


def gaussian_noise(sigma: float, label: str | None = None) -> Attack:
    def fn(img, key):
        rng = np.random.default_rng(zlib.crc32(key.encode()))
        noisy = img.astype(np.float32) + rng.normal(0.0, sigma, img.shape).astype(np.float32)
        return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)

    return Attack(label or f"noise sigma={sigma:g}", fn)


def jpeg(quality: int) -> Attack:
    def fn(img, key):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        with Image.open(buf) as im:
            return np.asarray(im.convert("RGB"))

    return Attack(f"jpeg q={quality}", fn)


def grid(name: str) -> list[Attack]:
    if name == "ncl":
        return [resize(0.78), resize(0.25), gaussian_blur(3), gaussian_blur(5), gaussian_noise(3), gaussian_noise(5),
                jpeg(50), jpeg(100)]
    if name == "benco":
        return (
            [gaussian_blur(k) for k in range(3, 24, 4)]
            + [gaussian_noise(v**0.5, f"noise var={v}") for v in range(3, 24, 4)]
            + [jpeg(q) for q in range(50, 101, 10)]
        )
    raise ValueError(f"unknown robustness grid {name!r}; use 'ncl' or 'benco'")
