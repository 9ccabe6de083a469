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
written) or an output could not be written, 2 bad input (options, checkpoint,
output folder), 130 interrupted.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from . import cli
from .data.sources import read_image
from .engine.checkpoints import model_from_checkpoint
from .evaluate import add_model_fallbacks, model_fallback
from .engine.prediction import THRESHOLD, list_images, output_names, predict_image, write_prediction
from .model import BACKBONES
from .outputs import OutputError


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
    ap.add_argument("--device", type=cli.device, default=None, help="cpu, cuda or cuda:N (default: cuda when present)")
    ap.add_argument("--amp", default="bf16", choices=("bf16", "fp16", "off"), help="autocast on GPU (default: bf16)")
    ap.add_argument("--backbone", type=cli.backbone, default=101, choices=BACKBONES,
                    help="a ResNet depth or ViT size, for checkpoints without model_config (default: 101)")
    add_model_fallbacks(ap)
    ap.add_argument("--no-overlay", action="store_true", help="do not write overlay/")
    cli.add_large_images_option(ap.add_argument)
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


@cli.command
def main(argv=None) -> int:
    args = cli.parse_args(build_parser(), argv)
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise cli.UsageError(f"--device {args.device} was asked for but no CUDA device is visible")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.out)
    kinds = ["mask", "prob"] + ([] if args.no_overlay else ["overlay"])
    for kind in kinds:
        cli.check_output_dir(out / kind, "--out")
    try:
        files = list_images(Path(args.input))
        model, ckpt = model_from_checkpoint(args.checkpoint, device, model_fallback(args))
    except (FileNotFoundError, ValueError) as err:
        raise cli.UsageError(str(err)) from None
    trained = ckpt["args"]
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
            write_prediction(out, name, image, prob, overlay=not args.no_overlay)
        except OutputError as err:
            raise cli.RunError(f"{err}; {written} image(s) were written before it") from None
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
