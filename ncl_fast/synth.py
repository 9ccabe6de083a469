"""`python -m ncl_fast.synth OUT --n 200 --seed 0`: realistic forgeries from the
photos bundled with scikit-image (no download), written as a Tp/Gt folder.

Each sample is a splicing (40 %), a copy-move (30 %), a removal by diffusion
inpainting (20 %) or authentic (10 %), with irregular feathered regions and
trace-hiding post-processing (resampling, noise, JPEG); see
`ncl_fast.data.synthetic`. Images are saved as PNG, masks as 0/255 PNG; the same
seed gives the same bytes. `python -m ncl_fast.train` without `--data_path`
makes this set once (200 images, seed 0).
"""
from __future__ import annotations

import argparse
import sys

from . import cli
from .data.synthetic import generate


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
