"""`python -m ncl_fast.synth OUT --n 200 --seed 0`: realistic forgeries from the
photos bundled with scikit-image (no download), written as a Tp/Gt folder.

Each sample starts from a random crop of a bundled photo (random size, flip and
colour jitter) and is one of:

* **splicing** (40 %): an irregular region of another photo pasted in, resampled
  by a random factor and given its own noise level;
* **copy-move** (30 %): an irregular region of the same photo moved elsewhere,
  resampled, with a brightness shift;
* **removal** (20 %): an irregular region filled by diffusion from its
  surroundings (an inpainting), which leaves it smoother than the rest;
* **authentic** (10 %): untouched (an all-zero mask).

Region shapes are blobs (thresholded sums of random Gaussians and smooth noise,
never rectangles) with feathered boundaries; then the whole image may be
resampled, blurred slightly, given sensor-like noise and JPEG re-compressed,
which hides traces as real forgeries do. Images are saved as PNG after the
JPEG round trip, masks as 0/255 PNG; the same seed gives the same bytes.

`python -m ncl_fast.train` without `--data_path` makes this set once (200
images, seed 0) in $NCL_FAST_SYNTH_DIR, else $XDG_CACHE_HOME/ncl_fast or
~/.cache/ncl_fast.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from . import cli

#: Bundled photographs (scikit-image ships them; no download).
PHOTOS = (
    "astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
    "camera", "coins", "moon", "brick", "grass", "gravel", "clock",
)
KINDS = (("splice", 0.4), ("copymove", 0.3), ("removal", 0.2), ("authentic", 0.1))


def load_photos() -> list[np.ndarray]:
    import skimage.data

    out = []
    for name in PHOTOS:
        img = np.asarray(getattr(skimage.data, name)())
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        out.append(np.ascontiguousarray(img[..., :3].astype(np.uint8)))
    return out


def random_crop(photos: list[np.ndarray], rng: np.random.Generator, h: int, w: int, exclude: int = -1):
    """A (h, w) crop of a random photo (scaled up when too small), flipped and colour-jittered."""
    k = int(rng.integers(len(photos)))
    while k == exclude:
        k = int(rng.integers(len(photos)))
    img = photos[k]
    ph, pw = img.shape[:2]
    scale = max(h / ph, w / pw, 1.0) * rng.uniform(1.0, 1.3)
    if scale > 1.0:
        img = np.asarray(Image.fromarray(img).resize((int(pw * scale) + 1, int(ph * scale) + 1), Image.BICUBIC))
        ph, pw = img.shape[:2]
    y0, x0 = int(rng.integers(0, ph - h + 1)), int(rng.integers(0, pw - w + 1))
    crop = img[y0 : y0 + h, x0 : x0 + w].astype(np.float32)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    crop = crop * rng.uniform(0.85, 1.15, size=3) + rng.uniform(-15, 15)
    return np.clip(crop, 0, 255), k


def blob(rng: np.random.Generator, h: int, w: int, area: tuple[float, float] = (0.04, 0.25)) -> np.ndarray:
    """An irregular bool region covering a random fraction of the image in `area`."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    field = np.zeros((h, w), np.float32)
    cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
    for _ in range(int(rng.integers(2, 6))):
        py, px = cy + rng.normal(0, 0.12) * h, cx + rng.normal(0, 0.12) * w
        sy, sx = rng.uniform(0.05, 0.18) * h, rng.uniform(0.05, 0.18) * w
        field += np.exp(-(((yy - py) / sy) ** 2 + ((xx - px) / sx) ** 2))
    noise = ndimage.gaussian_filter(rng.standard_normal((h, w)).astype(np.float32), sigma=min(h, w) / 24)
    field += 0.6 * noise / (np.abs(noise).max() + 1e-6)
    target = rng.uniform(*area)
    thr = np.quantile(field, 1.0 - target)
    region = field > thr
    labels, n = ndimage.label(region)
    if n > 1:  # keep the largest piece: one manipulated object
        sizes = ndimage.sum(region, labels, index=range(1, n + 1))
        region = labels == (1 + int(np.argmax(sizes)))
    return region


def feathered(region: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Alpha in [0, 1]: the region with a blurred boundary."""
    sigma = rng.uniform(0.5, 2.0)
    return np.clip(ndimage.gaussian_filter(region.astype(np.float32), sigma), 0, 1)


def resample(img: np.ndarray, factor: float) -> np.ndarray:
    h, w = img.shape[:2]
    small = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).resize(
        (max(8, int(w * factor)), max(8, int(h * factor))), Image.BILINEAR
    )
    return np.asarray(small.resize((w, h), Image.BICUBIC)).astype(np.float32)


def inpaint_diffusion(img: np.ndarray, region: np.ndarray, iterations: int = 40) -> np.ndarray:
    """Fill `region` from its surroundings by repeated Gaussian diffusion."""
    out = img.copy()
    out[region] = img[~region].mean(axis=0)
    for _ in range(iterations):
        blurred = ndimage.gaussian_filter(out, sigma=(3, 3, 0))
        out[region] = blurred[region]
    return out


def make_sample(photos: list[np.ndarray], seed: int, index: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(uint8 image (H, W, 3), bool mask (H, W), kind) of sample `index`."""
    rng = np.random.default_rng([seed, index])
    h, w = int(rng.integers(256, 385)), int(rng.integers(256, 385))
    base, k = random_crop(photos, rng, h, w)
    u, acc, kind = rng.random(), 0.0, "authentic"
    for name, p in KINDS:
        acc += p
        if u < acc:
            kind = name
            break
    region = np.zeros((h, w), bool)
    img = base
    if kind != "authentic":
        region = blob(rng, h, w)
        alpha = feathered(region, rng)[..., None]
        if kind == "splice":
            donor, _ = random_crop(photos, rng, h, w, exclude=k)
            donor = resample(donor, rng.uniform(0.4, 0.8))
            donor = donor + rng.normal(0, rng.uniform(4, 10), donor.shape)
            img = alpha * donor + (1 - alpha) * base
        elif kind == "copymove":
            dy, dx = int(rng.integers(-h // 3, h // 3 + 1)), int(rng.integers(-w // 3, w // 3 + 1))
            src = np.roll(base, (-dy, -dx), axis=(0, 1))  # pixel (y, x) comes from (y + dy, x + dx)
            src = resample(src, rng.uniform(0.4, 0.8)) + rng.uniform(-12, 12)
            img = alpha * src + (1 - alpha) * base
        else:  # removal
            filled = inpaint_diffusion(base, ndimage.binary_dilation(region, iterations=2))
            img = alpha * filled + (1 - alpha) * base
    # post-processing that hides traces
    if rng.random() < 0.3:
        img = resample(img, rng.uniform(0.8, 0.95))
    if rng.random() < 0.3:
        img = img + rng.normal(0, rng.uniform(1, 3), img.shape)
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    if rng.random() < 0.7:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=int(rng.integers(75, 96)))
        buf.seek(0)
        with Image.open(buf) as im:
            img = np.asarray(im.convert("RGB"))
    return img, region, kind


def generate(out: str | os.PathLike, n: int = 200, seed: int = 0, progress: bool = True) -> Path:
    """Write `n` samples to `out/Tp`, `out/Gt` (and `out/manifest.json`); return the folder."""
    from tqdm import tqdm

    root = Path(out)
    (root / "Tp").mkdir(parents=True, exist_ok=True)
    (root / "Gt").mkdir(parents=True, exist_ok=True)
    photos = load_photos()
    manifest = []
    for i in tqdm(range(n), desc="synthesizing", disable=not progress, unit="img", mininterval=2.0):
        img, mask, kind = make_sample(photos, seed, i)
        stem = f"{i:05d}_{kind}"
        Image.fromarray(img).save(root / "Tp" / f"{stem}.png")
        Image.fromarray((mask * 255).astype(np.uint8)).save(root / "Gt" / f"{stem}.png")
        manifest.append({"image": f"Tp/{stem}.png", "mask": f"Gt/{stem}.png", "kind": kind})
    (root / "manifest.json").write_text(json.dumps({"seed": seed, "n": n, "samples": manifest}, indent=1))
    return root


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m ncl_fast.synth", description=__doc__,
                                 formatter_class=cli.HelpFormatter)
    cli.add_version_option(ap)
    ap.add_argument("out", help="output folder (Tp/ and Gt/ are created in it)")
    ap.add_argument("--n", type=cli.positive_int, default=200, help="number of images (default: 200)")
    ap.add_argument("--seed", type=cli.nonnegative_int, default=0, help="(default: 0)")
    return ap


@cli.command
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = cli.check_output_dir(args.out, "OUT")
    for sub in ("Tp", "Gt"):
        cli.check_output_dir(out / sub, "OUT")
    root = generate(out, args.n, args.seed)
    print(f"wrote {args.n} images to {root}/Tp and masks to {root}/Gt", file=sys.stderr)
    return cli.OK


if __name__ == "__main__":
    sys.exit(main())
