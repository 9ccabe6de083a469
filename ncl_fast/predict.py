"""`python -m ncl_fast.predict IMAGE_OR_DIR --checkpoint CKPT --out DIR`: tampering
masks for new photos.

For each image: `DIR/pred/<stem>.png` holds `round(255 * p)` at the image's
original size (IMDL-BenCo's convention), and `DIR/overlay/<stem>.png` a heat map
of p blended over the photo, for people to look at.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from .data.dataset import fit_size, normalize
from .data.sources import IMAGE_EXTS, read_image
from .evaluate import autocast, model_from_checkpoint


def heat_overlay(image: np.ndarray, prob: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """The photo with p drawn as a transparent heat map (blue low, red high), uint8."""
    p = prob[..., None].astype(np.float32)
    heat = np.concatenate([np.clip(2 * p, 0, 1), np.clip(2 - np.abs(4 * p - 2), 0, 1) * 0.8,
                           np.clip(1 - 2 * p, 0, 1)], axis=2) * 255
    weight = alpha * np.clip(p * 1.5, 0.15, 1.0)
    return np.clip(image * (1 - weight) + heat * weight, 0, 255).astype(np.uint8)


def list_images(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise FileNotFoundError(f"{path} holds no images ({', '.join(sorted(IMAGE_EXTS))})")
        return files
    if path.is_file():
        return [path]
    raise FileNotFoundError(f"{path} does not exist")


@torch.no_grad()
def predict_image(net, image: np.ndarray, size: int, mode: str, device: torch.device, amp: str = "off") -> np.ndarray:
    """p in [0, 1] at the image's original size, float32 (H, W)."""
    H, W = image.shape[:2]
    img, _, _ = fit_size(image, np.zeros((H, W), bool), size, mode, None)
    x = normalize(img)[None].to(device)
    with autocast(device, amp):
        prob = torch.sigmoid(net(x)["logits"].float())
    if mode == "resize":
        prob = F.interpolate(prob, size=(H, W), mode="bilinear", align_corners=False)
    else:  # padding: take the valid top-left region (scaled back if the image was shrunk to fit)
        scale = min(1.0, size / max(H, W))
        h, w = max(1, int(round(H * scale))), max(1, int(round(W * scale)))
        prob = prob[..., :h, :w]
        if (h, w) != (H, W):
            prob = F.interpolate(prob, size=(H, W), mode="bilinear", align_corners=False)
    return prob[0, 0].clamp(0, 1).cpu().numpy()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ncl_fast.predict", description=__doc__.splitlines()[0])
    ap.add_argument("input", help="an image or a folder of images")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--out", required=True, help="output folder (pred/ and overlay/ are created)")
    ap.add_argument("--image_size", "--image-size", type=int, default=None, help="default: the training one")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--if_resizing", "--if-resizing", action="store_true")
    size.add_argument("--if_padding", "--if-padding", action="store_true")
    ap.add_argument("--device", default=None)
    ap.add_argument("--amp", default="bf16", choices=("bf16", "fp16", "off"))
    ap.add_argument("--no-overlay", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        files = list_images(Path(args.input))
        model, ckpt = model_from_checkpoint(args.checkpoint, device)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    trained = ckpt.get("args", {}) or {}
    size = args.image_size or trained.get("test_image_size") or trained.get("image_size") or 512
    if size % 16:
        sys.exit(f"error: --image_size must be a multiple of 16, got {size}")
    mode = "pad" if args.if_padding or (not args.if_resizing and trained.get("if_padding")) else "resize"
    out = Path(args.out)
    (out / "pred").mkdir(parents=True, exist_ok=True)
    if not args.no_overlay:
        (out / "overlay").mkdir(parents=True, exist_ok=True)
    for f in tqdm(files, desc="predicting", unit="img", disable=len(files) < 2):
        try:
            image = read_image(str(f))
        except OSError as err:
            print(f"warning: skipping {f}: cannot read it ({err})", file=sys.stderr)
            continue
        prob = predict_image(model.net, image, size, mode, device, args.amp)
        Image.fromarray(np.rint(255 * prob).astype(np.uint8)).save(out / "pred" / f"{f.stem}.png")
        if not args.no_overlay:
            Image.fromarray(heat_overlay(image, prob)).save(out / "overlay" / f"{f.stem}.png")
    print(f"wrote {len(files)} prediction(s) to {out / 'pred'}" + ("" if args.no_overlay else f" and {out / 'overlay'}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
