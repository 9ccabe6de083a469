"""`python -m ncl_fast.train`: train NCL (DeepLabV3+ from scratch, NCL + PC losses).
`--backbone vit_demo|vit_tiny|vit_small|vit_base` trains a ViT from scratch
instead (SPEC section 10), with the Pivot on its token map.

With no `--data_path`, it trains on the embedded synthetic dataset (made once
from scikit-image's photos, 80 % train / 20 % test, and cached in
$NCL_FAST_SYNTH_DIR, else $XDG_CACHE_HOME/ncl_fast or ~/.cache/ncl_fast).
`--preset paper` is SPEC section 8 (ResNet-101, 512 crops, batch 4, SGD 0.007
poly, 70 epochs); `--preset demo` is a small model that visibly learns on a CPU
in minutes. The same command runs under
`torchrun --standalone --nproc_per_node=N -m ncl_fast.train ...` (DDP: NCCL on
GPUs, gloo on the CPU; `--batch_size` is per process).

Outputs in `--output_dir`: `checkpoint-<epoch>.pth` (atomic writes; Ctrl-C or
SIGTERM saves one at the next step boundary), `log.txt` (JSON lines) and
TensorBoard scalars in `--log_dir`; both folders are checked before any work
starts. `--resume auto|PATH` continues exactly: model, optimizer, scaler,
schedule, epoch and step, RNG states; `auto` takes the furthest readable
checkpoint. The progress bar and each epoch's record show the share of time
spent waiting for data (`wait`): above 10 % the run is input-bound and says
what to do.

Exit status: 0 done, 1 failure at run time (a loss no longer finite, a file
that cannot be written), 2 bad input, 130 interrupted by Ctrl-C and 143 by
SIGTERM (after saving). Under torchrun every process stops after the same
step, and an error on one process ends all of them, said once.
"""
from __future__ import annotations

import contextlib
import io
import sys

from . import cli, distributed
from .data import allow_large_images
from .engine.config import PRESETS, resolve, synthetic_root, train_parser
from .engine.loop import run_training

__all__ = ["PRESETS", "build_parser", "main", "synthetic_root"]


def build_parser():
    return train_parser(description=__doc__)


@cli.command
def main(argv=None) -> int:
    config = resolve(argv, build_parser()) if not distributed.launched() else resolve_once(argv)
    if config.allow_large_images:
        allow_large_images()
    ctx = distributed.setup(config.device)
    try:
        return run_training(config, ctx)
    finally:
        distributed.teardown()


def resolve_once(argv):
    """`resolve` under torchrun, where every process checks the options: a problem is
    said once for the job, and ends every process. Some checks depend on the node (a
    relative or node-local path), so the other processes may be fine and already
    waiting for this one: it joins them, then ends them all."""
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            config = resolve(argv, build_parser())
    except SystemExit as err:  # argparse: the message is in `said`
        if not err.code:
            sys.stderr.write(said.getvalue())
            raise
        code, message = int(err.code), said.getvalue()
    except cli.UsageError as err:
        code, message = cli.USAGE, f"error: {err}\n"
    else:
        sys.stderr.write(said.getvalue())
        return config
    ctx = distributed.setup(None)
    try:
        distributed.end_job(ctx, code, lambda: sys.stderr.write(message))
    finally:
        distributed.teardown()


if __name__ == "__main__":
    sys.exit(main())
