"""torchrun on the CPU: two gloo processes keep identical weights, and match one
process with the same global batch.

BatchNorm takes its statistics per process (SyncBatchNorm has no CPU kernel), so
the one-process run uses the same global batch of 4 split into the two
processes' micro-batches of 2 (`--accum_steps 2`): the two runs then differ only
in the order of floating-point reductions, and after four SGD steps every
parameter agrees to 1e-4 relative to its tensor's largest value. BatchNorm
running statistics are not compared (DDP keeps rank 0's; accumulation updates
them once per micro-batch). The comparison uses the `base` variant without
dropout: the NCL/PC normalizations (|E| of the contour band, the Pivot's
BatchNorm over contour patches) are per process by design.
"""
import json
import os
import subprocess
import sys

import pytest

from helpers import synthetic_split, tiny_train
from ncl_fast.engine.checkpoints import load_checkpoint

pytestmark = pytest.mark.slow

# the batch size is each test's own
ARGS = tiny_train(lr="0.05", batch_size=None) + ["--variant", "base", "--dropout", "0", "--epochs", "1",
                                                 "--device", "cpu"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic_split(tmp_path_factory.mktemp("synth"), n=18, seed=2, n_train=16)


def launch(cmd, tmp):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_two_processes_match_one(tmp_path, data):
    common = ARGS + ["--data_path", str(data / "train.json"), "--test_data_path", str(data / "test.json")]
    out2 = launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   "-m", "ncl_fast.train", *common, "--batch_size", "2", "--output_dir", str(tmp_path / "two")],
                  tmp_path)
    assert "weights identical on all 2 processes" in out2
    assert "batch 2 x 2 process(es)" in out2
    launch([sys.executable, "-m", "ncl_fast.train", *common, "--batch_size", "4", "--accum_steps", "2",
            "--output_dir", str(tmp_path / "one")], tmp_path)
    a = load_checkpoint(tmp_path / "two" / "checkpoint-0.pth")
    b = load_checkpoint(tmp_path / "one" / "checkpoint-0.pth")
    assert a["global_step"] == b["global_step"] == 4
    moved = 0
    for key, wa in a["model"].items():
        wb = b["model"][key]
        if key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue
        scale = wb.abs().max().item() or 1.0
        assert (wa - wb).abs().max().item() <= 1e-4 * scale, key
        moved += 1
    assert moved > 50
    # each image of the test set was evaluated once, on one of the two processes
    log = [json.loads(line) for line in (tmp_path / "two" / "log.txt").read_text().splitlines()]
    assert log[-1]["test_images"] == 2


def test_ablation_runs_under_torchrun(tmp_path, data):
    """Every run of the ablation is data-parallel; rank 0 alone writes the tables."""
    train_args = [a for a in ARGS if a not in ("--variant", "base", "--epochs", "1")]
    out = launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                  "-m", "ncl_fast.ablate", "--tables", "variants", "--configs", "base", "pivot", "--seeds", "0", "1",
                  "--epochs", "1", "--output_dir", str(tmp_path / "ablation"), *train_args, "--batch_size", "2",
                  "--data_path", str(data / "train.json"), "--test_data_path", str(data / "test.json")], tmp_path)
    assert out.count("weights identical on all 2 processes") == 4
    assert out.count("batch 2 x 2 process(es)") == 4
    md = (tmp_path / "ablation" / "ablation.md").read_text()
    assert "| Base (BCE) | 0 1 |" in md and "| Base + Pivot (NCL) | 0 1 |" in md
    for config in ("base", "pivot"):
        for seed in (0, 1):
            run = json.loads((tmp_path / "ablation" / config / f"seed{seed}" / "run.json").read_text())
            assert run["done"] and run["curves"]["eval_epoch"] == [0]
