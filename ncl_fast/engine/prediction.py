"""Prediction: tampering probabilities of new photos at their original size, and
the files `predict` writes (binary mask, probability map, heat-map overlay)."""
from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..data import to_model_input
from ..data.dataset import resize_to_fit, to_canvas
from ..data.sources import IMAGE_EXTS
from ..outputs import write_atomic
from .evaluation import autocast

#: The evaluation threshold (SPEC section 9, IMDL-BenCo): tampered where p > 0.5, strictly.
THRESHOLD = 0.5


def heat_overlay(image: np.ndarray, prob: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """The photo with p drawn as a transparent heat map (blue low, red high), uint8."""
    p = prob[..., None].astype(np.float32)
    heat = np.concatenate([np.clip(2 * p, 0, 1), np.clip(2 - np.abs(4 * p - 2), 0, 1) * 0.8,
                           np.clip(1 - 2 * p, 0, 1)], axis=2) * 255
    weight = alpha * np.clip(p * 1.5, 0.15, 1.0)
    return np.clip(image * (1 - weight) + heat * weight, 0, 255).astype(np.uint8)


def output_names(files: list[Path]) -> list[str]:
    """One distinct output name per input: the stem, with the extension added where
    stems collide (`x.png`, `x.jpg` -> `x_png`, `x_jpg`), numbered if still equal."""
    stems = Counter(f.stem for f in files)
    names = [f.stem if stems[f.stem] == 1 else f"{f.stem}_{f.suffix.lstrip('.').lower()}" for f in files]
    seen: Counter = Counter()
    out = []
    for name in names:
        seen[name] += 1
        out.append(name if seen[name] == 1 and names.count(name) == 1 else f"{name}-{seen[name]}")
    return out


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
    img, _, _ = to_canvas(*resize_to_fit(image, np.zeros((H, W), bool), size, mode), size)
    x = to_model_input(torch.from_numpy(img)[None], device).image
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


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def write_prediction(out: Path, name: str, image: np.ndarray, prob: np.ndarray, overlay: bool) -> None:
    """`mask/<name>.png` (255 where p > 0.5), `prob/<name>.png` (round(255 p)) and, if
    asked, `overlay/<name>.png`, each written atomically (raises OutputError)."""
    write_atomic(out / "mask" / f"{name}.png", png_bytes(np.where(prob > THRESHOLD, 255, 0).astype(np.uint8)))
    write_atomic(out / "prob" / f"{name}.png", png_bytes(np.rint(255 * prob).astype(np.uint8)))
    if overlay:
        write_atomic(out / "overlay" / f"{name}.png", png_bytes(heat_overlay(image, prob)))
