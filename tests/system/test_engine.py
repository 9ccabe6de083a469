"""The training engine's promises: a frozen configuration resolved once, the loss
variant's own list of ops, no host read inside a step, the GPU monitor's thread,
the data-wait share and its warning, records that survive a stop during the
evaluation, resumption by recorded position, and one compiled graph."""
import dataclasses
import json
import os
import shutil
import signal
import time
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import TINY_TRAIN, random_mask, synthetic_split
from ncl_fast import _backend, distributed
from ncl_fast.data import ForgeryDataset
from ncl_fast.engine import loop, records
from ncl_fast.engine.checkpoints import load_checkpoint
from ncl_fast.engine.config import TrainConfig, resolve
from ncl_fast.engine.loop import run_training
from ncl_fast.model import VARIANTS, LossConfig, NCLModel


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic_split(tmp_path_factory.mktemp("synth"), n=10, seed=3, n_train=8)


def config(tmp, data, *extra, test=True):
    return resolve(TINY_TRAIN + ["--data_path", str(data / "train.json"), "--output_dir", str(tmp)]
                   + (["--test_data_path", str(data / "test.json")] if test else []) + list(extra))


def run(tmp, data, *extra, test=True):
    return run_training(config(tmp, data, *extra, test=test), distributed.setup("cpu"))


def log_of(folder):
    return [json.loads(line) for line in (folder / "log.txt").read_text().splitlines()]


# ---- configuration ---------------------------------------------------------------------------------------------------
def test_configuration_is_resolved_once_and_frozen(tmp_path, data):
    cfg = config(tmp_path, data, "--preset", "paper", "--batch_size", "2")
    assert (cfg.backbone, cfg.lr, cfg.epochs, cfg.optimizer) == (18, 0.01, 70, "sgd")  # options over the preset
    assert cfg.batch_size == 2 and cfg.train_mode == "crop" and cfg.test_period == 5  # the rest from the preset
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0
    assert TrainConfig.from_dict(cfg.as_dict()) == cfg
    # an IMDL-BenCo-style args dict with keys we do not know still gives a configuration
    assert TrainConfig.from_dict({**cfg.as_dict(), "world_size": 8, "unknown": 1}).lr == cfg.lr
    # identities ignore what cannot change results
    assert cfg.identity() == dataclasses.replace(cfg, num_workers=7, progress=True, output_dir="x").identity()
    assert cfg.identity() != dataclasses.replace(cfg, lr=0.5).identity()


@pytest.mark.parametrize("bad, message", [
    (["--device", "gpu"], "'gpu' is not a device: use cpu, cuda or cuda:N"),
    (["--patch_px", "64"], "--patch_px 64 is larger than --image_size 32"),
    (["--patch_px", "3"], "is not a whole number of cells of the map the Pivot reads (ResNet stage 1, stride 2)"),
])
def test_bad_options_are_one_line_before_any_work(tmp_path, data, capsys, bad, message):
    with pytest.raises(SystemExit) as exc:
        config(tmp_path, data, *bad)
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_loss_variant_knows_its_ops(variant, gen, monkeypatch):
    called = []
    choose = _backend.choose
    monkeypatch.setattr(_backend, "choose", lambda op, impl, device: (called.append(op), choose(op, impl, device))[1])
    model = NCLModel(18, 1, LossConfig(variant=variant, impl="reference"), width=8, head_channels=16)
    mask = random_mask(2, 32, 32, "blobs", gen)
    model(torch.randn(2, 3, 32, 32, generator=gen), mask)["loss"].backward()
    assert set(called) == set(LossConfig(variant=variant).ops)
    assert set(model.criterion(model.net(torch.randn(2, 3, 32, 32)), mask, model.pivot)) == \
        set(LossConfig(variant=variant).parts)


# ---- host work -------------------------------------------------------------------------------------------------------
class HostReads(TorchDispatchMode):
    """Counts tensor-to-Python reads (`.item()`, `float(t)`, `bool(t)`): on a GPU each is a
    host-device sync. Not counted (`inside`): the network and loss themselves (their
    CPU-only input checks), and the DataLoader's seed draw from its CPU generator as an
    epoch's iterator starts; neither is the loop's, nor a device read on a GPU."""

    def __init__(self):
        super().__init__()
        self.count, self.inside = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and not self.inside:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.slow
def test_no_host_read_inside_a_step(tmp_path, data, monkeypatch):
    """8 steps (2 epochs of 4) read the loss terms only at the logging interval and at
    each epoch's end, with one copy each, and nothing else reads a tensor."""
    reads = []
    real_read = records.read_scalars
    monkeypatch.setattr(records, "read_scalars", lambda values: (reads.append(len(values)), real_read(values))[1])
    mode = HostReads()
    real_forward = loop.TrainStep.forward

    def forward(self, image, mask):
        mode.inside += 1
        try:
            return real_forward(self, image, mask)
        finally:
            mode.inside -= 1

    monkeypatch.setattr(loop.TrainStep, "forward", forward)
    real_iter = torch.utils.data.DataLoader.__iter__

    def loader_iter(self):
        mode.inside += 1
        try:
            return real_iter(self)
        finally:
            mode.inside -= 1

    monkeypatch.setattr(torch.utils.data.DataLoader, "__iter__", loader_iter)
    with mode:
        assert run(tmp_path / "a", data, "--epochs", "2", "--log_every", "100", "--optimizer", "sgd", test=False) == 0
    assert mode.count == 0
    assert reads == [3, 3] * 2  # per epoch: the last interval's read, the record's read; 3 terms in one copy
    reads.clear()
    with mode:
        assert run(tmp_path / "b", data, "--epochs", "2", "--log_every", "2", "--optimizer", "sgd", test=False) == 0
    assert mode.count == 0 and len(reads) == (2 + 1) * 2  # intervals at steps 2 and 4, then the record


class FakeNVML:
    """nvidia-ml-py's calls the monitor makes, with a utilization that counts up."""

    def __init__(self):
        self.calls = 0

    def nvmlInit(self):
        pass

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetUtilizationRates(self, handle):
        self.calls += 1
        return type("Util", (), {"gpu": 10 * self.calls})()

    def nvmlDeviceGetMemoryInfo(self, handle):
        return type("Mem", (), {"used": 2e9})()


def test_the_gpu_monitor_samples_in_its_own_thread():
    nvml = FakeNVML()
    monitor = records.GpuMonitor(torch.device("cpu"), period=0.01, nvml=nvml).start()
    deadline = time.monotonic() + 30
    while monitor.mark() < 4 and time.monotonic() < deadline:  # no call from this thread makes it sample
        time.sleep(0.01)
    monitor.stop()
    n = monitor.mark()
    assert n >= 4
    summary = monitor.since(0)
    assert summary["gpu_samples"] == n and summary["gpu_mem_gb"] == pytest.approx(2.0)
    assert summary["gpu_util"] == pytest.approx(10 * (n + 1) / 2)  # the mean of 10, 20, ..., 10 n
    assert monitor.since(n - 1)["gpu_util"] == pytest.approx(10 * n)
    time.sleep(0.05)
    assert monitor.mark() == n, "stop() ends the thread"
    assert records.GpuMonitor(torch.device("cpu")).start().since(0) == {}  # no GPU: no figures, no thread


@pytest.mark.slow
def test_an_input_bound_run_says_so_once_with_the_fix(tmp_path, data, monkeypatch, capsys):
    """A slow disk, on the loop's own clock: each item read moves that clock 5 s on,
    far more than any step takes even on a loaded machine (a real sleep raced the step's
    own time there)."""
    original = ForgeryDataset.__getitem__
    waited = [0.0]

    def slow(self, index):
        waited[0] += 5.0
        return original(self, index)

    clock = types.SimpleNamespace(perf_counter=lambda: time.perf_counter() + waited[0])
    monkeypatch.setattr(ForgeryDataset, "__getitem__", slow)
    monkeypatch.setattr(records, "time", clock)
    assert run(tmp_path, data, "--epochs", "2", "--log_every", "1", test=False) == 0
    err = capsys.readouterr().err
    assert err.count("(input-bound)") == 1 and "raise --num_workers (now 0;" in err
    record = log_of(tmp_path)[-1]
    assert records.WAIT_WARNING < record["train_data_wait"] <= 1 and record["train_host_ms"] > 0


def test_the_wait_share_is_the_time_spent_waiting():
    clock = records.StepClock()
    time.sleep(0.02)
    clock.waited()
    clock.stepped()
    times = clock.take()
    assert times["steps"] == 1 and times["seconds"] >= 0.02
    assert times["data_wait"] * times["seconds"] >= 0.02
    assert clock.take()["steps"] == 0


# ---- records and positions -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_stop_during_evaluation_loses_no_record(tmp_path, data, monkeypatch):
    """The checkpoint is written before the evaluation; a second Ctrl-C in the middle of
    it quits at once, and the resumed run evaluates and records that epoch first."""
    real = loop.evaluate_sets
    calls = {"n": 0}

    def quit_in_the_first(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt  # what a second Ctrl-C raises
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "evaluate_sets", quit_in_the_first)
    assert run(tmp_path, data, "--epochs", "2", "--test_period", "1") == 130
    assert not (tmp_path / "log.txt").exists()
    assert load_checkpoint(tmp_path / "checkpoint-0.pth")["epoch_record"]["epoch"] == 0
    assert run(tmp_path, data, "--epochs", "2", "--test_period", "1", "--resume", "auto") == 0
    log = log_of(tmp_path)
    assert [r["epoch"] for r in log] == [0, 1]
    assert all("test_pixel-level F1" in r for r in log)


@pytest.mark.slow
def test_a_signal_during_evaluation_finishes_the_epoch(tmp_path, data, monkeypatch):
    real = loop.evaluate_sets

    def signal_then_evaluate(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "evaluate_sets", signal_then_evaluate)
    assert run(tmp_path, data, "--epochs", "3", "--test_period", "1") == 143
    assert [r["epoch"] for r in log_of(tmp_path)] == [0]
    monkeypatch.setattr(loop, "evaluate_sets", real)
    assert run(tmp_path, data, "--epochs", "3", "--test_period", "1", "--resume", "auto") == 0
    assert [r["epoch"] for r in log_of(tmp_path)] == [0, 1, 2]


@pytest.mark.slow
def test_max_steps_leaves_no_partial_record(tmp_path, data):
    assert run(tmp_path, data, "--epochs", "2", "--max_steps", "6") == 0  # 4 steps per epoch
    assert [r["epoch"] for r in log_of(tmp_path)] == [0]
    assert run(tmp_path, data, "--epochs", "2", "--resume", "auto") == 0
    assert [r["epoch"] for r in log_of(tmp_path)] == [0, 1]


@pytest.mark.slow
def test_resume_takes_the_furthest_position_not_the_newest_file(tmp_path, data, capsys):
    assert run(tmp_path / "a", data, "--epochs", "2", test=False) == 0
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    future = time.time() + 1000
    os.utime(tmp_path / "b" / "checkpoint-0.pth", (future, future))  # a copy made the older file newer
    capsys.readouterr()
    assert run(tmp_path / "b", data, "--epochs", "3", "--resume", "auto", test=False) == 0
    assert "checkpoint-1.pth: epoch 2, step 0" in capsys.readouterr().out
    assert [r["epoch"] for r in log_of(tmp_path / "b")] == [0, 1, 2]


@pytest.mark.slow
def test_resuming_mid_epoch_with_another_batch_size_is_refused(tmp_path, data, capsys):
    assert run(tmp_path, data, "--epochs", "2", "--max_steps", "2", test=False) == 0
    capsys.readouterr()
    assert run(tmp_path, data, "--epochs", "2", "--resume", "auto", "--batch_size", "4", test=False) == 2
    err = capsys.readouterr().err
    assert "--batch_size 2 (this run: 4)" in err and "skip or repeat images" in err


# ---- compile ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_whole_step_compiles_to_one_graph(tmp_path, data):
    """Model and loss (normalization, network, patch labels, Pivot, NCL, PC) as one
    inductor graph: 5 steps over batches with different masks, 1 compile, 0 recompiles,
    0 graph breaks."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    assert run(tmp_path, data, "--compile", "--max_steps", "5", test=False) == 0
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1
    assert counters["frames"]["total"] == counters["frames"]["ok"] == 1  # compiled once, never again
    assert load_checkpoint(tmp_path / "checkpoint-1.pth")["global_step"] == 5


# ---- one run per folder ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_one_run_per_output_folder(tmp_path, data, capsys):
    from ncl_fast.outputs import FolderLock

    (tmp_path / "o").mkdir()
    held = FolderLock(tmp_path / "o")
    assert held.acquire() is None
    try:
        assert run(tmp_path / "o", data, "--epochs", "1", test=False) == 2
        err = capsys.readouterr().err
        assert f"--output_dir {tmp_path / 'o'} is in use by another run (pid {os.getpid()}" in err
    finally:
        held.release()
    assert run(tmp_path / "o", data, "--epochs", "1", test=False) == 0


@pytest.mark.slow
def test_a_killed_run_leaves_no_stale_lock(tmp_path, data):
    import subprocess
    import sys

    (tmp_path / "o").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from ncl_fast.outputs import FolderLock; "
                               "assert FolderLock(sys.argv[1]).acquire() is None; print('held', flush=True); "
                               "time.sleep(600)", str(tmp_path / "o")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait(timeout=60)
    assert run(tmp_path / "o", data, "--epochs", "1", test=False) == 0


@pytest.mark.slow
def test_a_fresh_run_never_overwrites_a_previous_one(tmp_path, data, capsys):
    assert run(tmp_path, data, "--epochs", "1", test=False) == 0
    before = (tmp_path / "checkpoint-0.pth").read_bytes()
    capsys.readouterr()
    assert run(tmp_path, data, "--epochs", "2", test=False) == 2  # a requeued job without --resume
    err = capsys.readouterr().err
    assert "holds a previous run's checkpoints (checkpoint-0.pth)" in err and "--resume auto" in err
    assert (tmp_path / "checkpoint-0.pth").read_bytes() == before
    assert run(tmp_path, data, "--epochs", "1", "--overwrite", test=False) == 0  # afresh, on purpose
    assert [r["epoch"] for r in log_of(tmp_path)] == [0]
    with pytest.raises(SystemExit):
        config(tmp_path, data, "--overwrite", "--resume", "auto")


@pytest.mark.slow
def test_a_log_that_cannot_be_written_is_one_error_line(tmp_path, data, monkeypatch, capsys):
    import errno

    real_open = open

    def refuse_log(path, *args, **kwargs):
        if str(path).endswith("log.txt"):
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", refuse_log)
    assert run(tmp_path, data, "--epochs", "1", test=False) == 1
    err = capsys.readouterr().err
    assert f"error: cannot write {tmp_path / 'log.txt'} (disk quota exceeded)" in err and "Traceback" not in err
    assert (tmp_path / "checkpoint-0.pth").is_file()  # written before the record


@pytest.mark.slow
def test_imdl_benco_checkpoints_load(tmp_path, data, capsys):
    """IMDL-BenCo saves `args` as an argparse.Namespace and NCLBenCo's weights under `model.`."""
    import argparse

    from ncl_fast.evaluate import main as evaluate_main

    assert run(tmp_path / "t", data, "--epochs", "1", test=False) == 0
    ckpt = load_checkpoint(tmp_path / "t" / "checkpoint-0.pth")
    benco = {"model": {f"model.{k}": v for k, v in ckpt["model"].items()}, "epoch": 0,
             "args": argparse.Namespace(test_image_size=32, if_padding=False), "model_config": ckpt["model_config"]}
    torch.save(benco, tmp_path / "benco.pth")
    loaded = load_checkpoint(tmp_path / "benco.pth")
    assert loaded["args"] == {"test_image_size": 32, "if_padding": False}
    capsys.readouterr()
    assert evaluate_main(["--checkpoint", str(tmp_path / "benco.pth"), "--test_data_path", str(data / "test.json"),
                          "--num_workers", "0", "--no-progress"]) == 0
    assert "32x32 (resize)" in capsys.readouterr().out


@pytest.mark.slow
def test_persistent_workers_train_exactly_as_the_main_process(tmp_path, data):
    """Workers persist across epochs (the epoch reaches them in the sampler's keys): two
    epochs with 2 workers give the weights of the same two epochs loaded in the main
    process, bit for bit (a worker stuck on epoch 0's crops would not)."""
    assert run(tmp_path / "w0", data, "--epochs", "2", test=False) == 0
    assert run(tmp_path / "w2", data, "--epochs", "2", "--num_workers", "2", test=False) == 0
    a = load_checkpoint(tmp_path / "w0" / "checkpoint-1.pth")["model"]
    b = load_checkpoint(tmp_path / "w2" / "checkpoint-1.pth")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
