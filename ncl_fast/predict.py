"""`python -m ncl_fast.predict IMAGE_OR_DIR --checkpoint CKPT --out DIR`: tampering
masks for new photos.

For each image, at its original size:

* `DIR/mask/<name>.png`: the binary mask at the evaluation threshold, 255 where
  p > 0.5 (tampered), 0 elsewhere: what IMDL-BenCo users compare with ground truth;
* `DIR/prob/<name>.png`: the probability map, `round(255 * p)`;
* `DIR/overlay/<name>.png`: p as a heat map blended over the photo, for people
  (skipped with --no-overlay).

`<name>` is the image's stem; images sharing a stem (`x.png`, `x.jpg`) keep
their extension in it (`x_png`, `x_jpg`), so no output overwrites another.
Unreadable images are skipped with a message naming them.

Exit status: 0 every image written, 1 some could not be read (the others are
written), 2 bad input (options, checkpoint, output folder), 130 interrupted.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from . import cli
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


#: The evaluation threshold (SPEC section 9, IMDL-BenCo): tampered where p > 0.5, strictly.
THRESHOLD = 0.5


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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m ncl_fast.predict", description=__doc__,
                                 formatter_class=cli.HelpFormatter)
    cli.add_version_option(ap)
    ap.add_argument("input", help="an image or a folder of images")
    ap.add_argument("--checkpoint", required=True, help="a checkpoint-<epoch>.pth of ncl_fast.train (or {model: ...})")
    ap.add_argument("--out", "--output_dir", "--output-dir", required=True,
                    help="output folder (mask/, prob/ and overlay/ are created in it)")
    ap.add_argument("--image_size", "--image-size", type=cli.image_size, default=None,
                    help="a multiple of 16 (default: the checkpoint's test size, else 512)")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--if_resizing", "--if-resizing", action="store_true", help="resize to image_size")
    size.add_argument("--if_padding", "--if-padding", action="store_true", help="top-left zero padding")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    ap.add_argument("--amp", default="bf16", choices=("bf16", "fp16", "off"), help="autocast on GPU (default: bf16)")
    ap.add_argument("--no-overlay", action="store_true", help="do not write overlay/")
    cli.add_large_images_option(ap.add_argument)
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


@cli.command
def main(argv=None) -> int:
    args = cli.parse_args(build_parser(), argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.out)
    kinds = ["mask", "prob"] + ([] if args.no_overlay else ["overlay"])
    for kind in kinds:
        cli.check_output_dir(out / kind, "--out")
    try:
        files = list_images(Path(args.input))
        model, ckpt = model_from_checkpoint(args.checkpoint, device)
    except (FileNotFoundError, ValueError) as err:
        raise cli.UsageError(str(err)) from None
    trained = ckpt.get("args", {}) or {}
    size = args.image_size or trained.get("test_image_size") or trained.get("image_size") or 512
    mode = "pad" if args.if_padding or (not args.if_resizing and trained.get("if_padding")) else "resize"
    names = output_names(files)
    renamed = [(f, n) for f, n in zip(files, names) if n != f.stem]
    if renamed:
        print("note: images sharing a name are written under distinct names: "
              + ", ".join(f"{f.name} -> {n}.png" for f, n in renamed), file=sys.stderr)
    written, skipped = 0, []
    for f, name in tqdm(list(zip(files, names)), desc="predicting", unit="img",
                        disable=len(files) < 2 or args.no_progress):
        try:
            image = read_image(str(f))
        except (OSError, ValueError) as err:
            print(f"warning: skipping {f}: cannot read it ({err})", file=sys.stderr)
            skipped.append(f)
            continue
        prob = predict_image(model.net, image, size, mode, device, args.amp)
        try:
            Image.fromarray(np.where(prob > THRESHOLD, 255, 0).astype(np.uint8)).save(out / "mask" / f"{name}.png")
            Image.fromarray(np.rint(255 * prob).astype(np.uint8)).save(out / "prob" / f"{name}.png")
            if not args.no_overlay:
                Image.fromarray(heat_overlay(image, prob)).save(out / "overlay" / f"{name}.png")
        except OSError as err:
            raise cli.RunError(f"cannot write the outputs of {f} in {out} ({cli.describe_os_error(err)}); "
                               f"{written} image(s) were written before it") from None
        written += 1
    where = ", ".join(str(out / k) for k in kinds)
    print(f"wrote {written} of {len(files)} prediction(s) to {where} "
          f"(mask/: binary, 255 where p > {THRESHOLD}; prob/: round(255 p))")
    if skipped:
        cli.error(f"{len(skipped)} of {len(files)} image(s) could not be read and have no prediction: "
                  + ", ".join(str(f) for f in skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
        return cli.FAILURE
    return cli.OK


if __name__ == "__main__":
    sys.exit(main())
