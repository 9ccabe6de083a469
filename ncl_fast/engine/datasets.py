"""The data of a run: the embedded synthetic set (made on first use) and the
training and test entries, checked before any work starts."""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .. import distributed
from ..data import DatasetError, list_test_sets, load_entries
from ..outputs import write_atomic
from .config import SYNTH_N, SYNTH_SEED, TrainConfig, synthetic_root


def ensure_synthetic(ctx: distributed.Context, root: Path | None = None, progress: bool = True) -> Path:
    """Make the synthetic set and its 80/20 train/test JSON lists in `root` (default
    `synthetic_root()`) unless they exist. Each node's first process makes it (a
    cache may be node-local), in a temporary folder renamed into place, so nodes
    that share the folder never see half of one; every process waits for it."""
    root = Path(root or synthetic_root())
    ready = lambda: (root / "train.json").is_file() and (root / "test.json").is_file()
    if ctx.local_rank == 0 and not ready():
        from ..data.synthetic import generate

        print(f"no --data_path: making the synthetic dataset in {root} (once)", flush=True)
        root.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
        try:
            generate(work, SYNTH_N, SYNTH_SEED, progress=progress)
            pairs = [[f"Tp/{p.name}", f"Gt/{p.name}"] for p in sorted((work / "Tp").glob("*.png"))]
            cut = int(0.8 * len(pairs))
            write_atomic(work / "test.json", json.dumps(pairs[cut:], indent=0))
            write_atomic(work / "train.json", json.dumps(pairs[:cut], indent=0))
            if ready():  # another node finished first: keep its copy
                shutil.rmtree(work, ignore_errors=True)
            else:
                if root.exists():  # a partial folder from an older version: replace it
                    shutil.rmtree(root, ignore_errors=True)
                os.replace(work, root)
        finally:
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)
    distributed.barrier(ctx)
    if not ready():
        raise DatasetError(f"the synthetic dataset in {root} could not be made on this node; set "
                           f"NCL_FAST_SYNTH_DIR to a folder every node can write, or pass --data_path")
    return root


def load_training_data(config: TrainConfig, ctx: distributed.Context):
    """(training entries, {test set name: entries}); prints the datasets' warnings once.
    Raises DatasetError naming the files when a dataset cannot be used."""
    if config.synthetic:
        ensure_synthetic(ctx, Path(config.data_path).parent, progress=config.progress)
    entries, report = load_entries(config.data_path)
    test_sets = {}
    if config.test_data_path:
        test_sets = {n: load_entries(p)[0] for n, p in list_test_sets(config.test_data_path).items()}
    if ctx.is_main:
        for w in report.warnings[:10]:
            print(f"warning: {w}", file=sys.stderr)
        if len(report.warnings) > 10:
            print(f"warning: ... {len(report.warnings) - 10} more (python -m ncl_fast.check_data)", file=sys.stderr)
    return entries, test_sets
