"""`python -m ncl_fast.evaluate --checkpoint CKPT --test_data_path PATH`: the
IMDL-BenCo metrics of a checkpoint on one or several test sets, optionally under
the robustness attacks.

`--test_data_path` is a Tp/Gt folder, a JSON list, or a JSON map
`{"name": path}`. Every image is evaluated exactly once, on one process or many
(`torchrun`: each rank takes every world_size-th image, the per-image results are
gathered, nothing is padded or duplicated). Prints a markdown table per dataset
and writes `eval.json` (and `eval.md`) to `--output_dir` when given; that folder
is checked before any work starts. A figure undefined for a set (image-level AUC
without authentic images, for instance) is `null` in `eval.json` and `n/a` in
the tables, with the reason.

`--protocol` chooses how inputs are made and scores averaged:
* `ncl_fast` (default): this package's inputs (Pillow resizing, bilinear with
  smoothing when shrinking; padding shrinks a larger image to fit), IMDL-BenCo
  0.1.45's per-image means (authentic images score 0), tie-correct AUC;
* `benco`: IMDL-BenCo 0.1.45's protocol, inputs included: cv2 resizing (linear
  image, nearest mask; needs opencv-python-headless), padding that crops the
  top-left of a larger image, an image labelled tampered when any raw mask value
  is non-zero, relative paths of JSON files taken from the working directory;
* `benco13`: the same inputs, with imdlbenco13's averaging (pixel F1, AUC and
  IOU over tampered images only).
Every protocol drops (and counts) the AUC of an image whose valid pixels are all
tampered, and computes AUC tie-correct.

Exit status: 0 done, 1 failure at run time, 2 bad input, 130 interrupted.
"""
from __future__ import annotations

import argparse
import sys

from . import cli, distributed
from .data import DatasetError, list_test_sets, load_entries
from .data.dataset import PROTOCOLS, check_protocol
from .engine.checkpoints import model_from_checkpoint
from .engine.evaluation import attack_grid, evaluate_sets, markdown
from .model import BACKBONES
from .outputs import OutputError, write_atomic, write_json


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m ncl_fast.evaluate", description=__doc__,
                                 formatter_class=cli.HelpFormatter)
    cli.add_version_option(ap)
    ap.add_argument("--checkpoint", required=True, help="a checkpoint-<epoch>.pth of ncl_fast.train (or {model: ...})")
    ap.add_argument("--test_data_path", "--test-data-path", required=True,
                    help="Tp/Gt folder, JSON list, or JSON map {name: path}")
    ap.add_argument("--image_size", "--image-size", type=cli.image_size, default=None,
                    help="a multiple of 16 (default: the checkpoint's test size, else 512)")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--if_resizing", "--if-resizing", action="store_true", help="resize to image_size (default)")
    size.add_argument("--if_padding", "--if-padding", action="store_true", help="top-left zero padding")
    ap.add_argument("--batch_size", "--batch-size", type=cli.positive_int, default=4, help="per process (default: 4)")
    workers = cli.default_workers()
    ap.add_argument("--num_workers", "--num-workers", type=cli.nonnegative_int, default=workers,
                    help=f"DataLoader workers (default: {workers}, the CPUs available up to 4)")
    ap.add_argument("--invert-masks", "--invert_masks", action="store_true", help="masks are black = tampered (NIST16)")
    ap.add_argument("--robustness", action="store_true", help="also evaluate under attacks (NCL paper Table 3)")
    ap.add_argument("--robustness-grid", "--robustness_grid", default="ncl", choices=("ncl", "benco"),
                    help="ncl: the NCL paper's attacks; benco: IMDL-BenCo's grids (default: ncl)")
    ap.add_argument("--output_dir", "--output-dir", default=None,
                    help="folder for eval.json and eval.md (default: print only)")
    ap.add_argument("--device", type=cli.device, default=None, help="cpu, cuda or cuda:N (default: cuda when present)")
    ap.add_argument("--amp", default="bf16", choices=("bf16", "fp16", "off"), help="autocast on GPU (default: bf16)")
    ap.add_argument("--protocol", default="ncl_fast", choices=PROTOCOLS,
                    help="inputs and averaging: ncl_fast (default), benco (IMDL-BenCo 0.1.45's, inputs included), "
                         "benco13 (imdlbenco13's); see above")
    ap.add_argument("--backbone", type=cli.backbone, default=101, choices=BACKBONES,
                    help="a ResNet depth or ViT size, for checkpoints without model_config (default: 101)")
    add_model_fallbacks(ap)
    cli.add_large_images_option(ap.add_argument)
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap


def add_model_fallbacks(ap: argparse.ArgumentParser) -> None:
    """What a checkpoint without `model_config` (IMDL-BenCo's) cannot say beyond its backbone."""
    ap.add_argument("--width", type=cli.positive_int, default=None,
                    help="ResNet width, for checkpoints without model_config (default: 64)")
    ap.add_argument("--head_channels", "--head-channels", type=cli.positive_int, default=256,
                    help="decoder channels, for checkpoints without model_config (default: 256)")
    ap.add_argument("--variant", default="full", choices=("base", "pivot", "full"),
                    help="loss variant (its heads), for checkpoints without model_config (default: full)")


def model_fallback(args) -> dict:
    return {"backbone": args.backbone, "width": args.width, "head_channels": args.head_channels,
            "variant": args.variant}


@cli.command
def main(argv=None) -> int:
    args = cli.parse_args(build_parser(), argv)
    out = cli.check_output_dir(args.output_dir, "--output_dir") if args.output_dir else None
    ctx = distributed.setup(args.device)
    try:
        try:
            paths = "auto" if args.protocol == "ncl_fast" else "cwd"  # IMDL-BenCo: from the working directory
            test_sets = {name: load_entries(path, paths=paths)[0]
                         for name, path in list_test_sets(args.test_data_path, paths).items()}
            model, ckpt = model_from_checkpoint(args.checkpoint, ctx.device, model_fallback(args))
            trained = ckpt["args"]
            size = args.image_size or trained.get("test_image_size") or trained.get("image_size") or 512
            mode = "pad" if args.if_padding or (not args.if_resizing and trained.get("if_padding")) else "resize"
            check_protocol(args.protocol, mode)
        except (DatasetError, FileNotFoundError, ValueError, ImportError) as err:
            raise cli.UsageError(str(err)) from None
        report = evaluate_sets(model.net, test_sets, ctx, size, mode, batch_size=args.batch_size,
                               num_workers=args.num_workers, amp=args.amp, invert_masks=args.invert_masks,
                               attacks=attack_grid(args.robustness, args.robustness_grid),
                               progress=not args.no_progress, protocol=args.protocol)
        if ctx.is_main:
            header = (f"checkpoint {args.checkpoint}, {size}x{size} ({mode}), F1 at threshold 0.5, "
                      f"protocol {args.protocol}")
            text = header + "\n\n" + "\n\n".join(markdown(name, results) for name, results in report.items())
            print(text)
            if out is not None:
                record = {"checkpoint": args.checkpoint, "size": size, "mode": mode, "protocol": args.protocol,
                          "results": report}
                try:
                    write_json(out / "eval.json", record)
                    write_atomic(out / "eval.md", text + "\n")
                except OutputError as err:
                    raise cli.RunError(f"{err}; the results are printed above") from None
                print(f"\nwrote {out / 'eval.json'} and {out / 'eval.md'}")
    finally:
        distributed.teardown()
    return cli.OK


if __name__ == "__main__":
    sys.exit(main())
