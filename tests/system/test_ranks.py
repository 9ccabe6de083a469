"""Processes of one torchrun job agree: a signal that reaches one process stops all
of them after the same step, an error on one process ends every process with the
error shown once, and nodes that share nothing (each its own HOME) each make the
synthetic set. Real torchrun launches on the CPU (gloo), real signals."""
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from helpers import synthetic_split, tiny_train
from ncl_fast.engine.checkpoints import load_checkpoint
from ncl_fast.engine.config import SYNTH_N, SYNTH_SEED, synthetic_root

# a generous bound for a process to end: the machine may be shared; a hang would last the 30-minute group timeout
END_S = 420

ARGS = tiny_train(lr="0.05") + ["--variant", "base", "--dropout", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic_split(tmp_path_factory.mktemp("synth"), n=18, seed=2, n_train=16)


def environment(**changes):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def torchrun(*args, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


class Job:
    """A launched command whose output is read line by line in a thread; `wait_for`
    polls for a line, `end` waits (generously) for the command to end."""

    def __init__(self, cmd, cwd, env):
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, pattern: str, timeout: float = END_S) -> None:
        deadline = time.monotonic() + timeout
        while not any(re.search(pattern, line) for line in list(self.lines)):
            assert self.proc.poll() is None, f"ended before {pattern!r}:\n{self.output[-4000:]}"
            assert time.monotonic() < deadline, f"no {pattern!r} within {timeout} s:\n{self.output[-4000:]}"
            time.sleep(0.02)

    def end(self) -> int:
        try:
            code = self.proc.wait(timeout=END_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            for pid in workers(self.proc.pid).values():
                os.kill(pid, signal.SIGKILL)
            pytest.fail(f"still running after {END_S} s:\n{self.output[-4000:]}")
        self.reader.join(timeout=30)
        return code

    @property
    def output(self) -> str:
        return "".join(self.lines)


def workers(launcher_pid: int) -> dict[int, int]:
    """{global rank: pid} of the processes torchrun started (its children with RANK set)."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != launcher_pid:
                continue
            env = dict(kv.split("=", 1) for kv in (d / "environ").read_bytes().decode(errors="replace").split("\0")
                       if "=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = int(d.name)
    return found


def exit_codes(torchrun_output: str) -> dict[int, int]:
    """{rank: exit status} of the processes torchrun reports as failed (any exit but 0)."""
    return {int(rank): int(code) for rank, code in
            re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)", torchrun_output)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_signal_to_one_process_stops_every_process_at_the_same_step(tmp_path, data):
    """SIGTERM to rank 1 only, while rank 0 is held (SIGSTOP) at another point of the
    run: both stop after the same step, one checkpoint, both exit 143; `--resume auto`
    then ends bit for bit where an uninterrupted run ends."""
    common = ARGS + ["--epochs", "2", "--data_path", str(data / "train.json")]
    reference = Job(torchrun("-m", "ncl_fast.train", *common, "--output_dir", str(tmp_path / "a")), tmp_path,
                    environment())
    assert reference.end() == 0, reference.output[-4000:]

    job = Job(torchrun("-m", "ncl_fast.train", *common, "--output_dir", str(tmp_path / "b")), tmp_path, environment())
    job.wait_for(r"^training ")  # rank 0 is at its first steps
    pids = workers(job.proc.pid)
    assert sorted(pids) == [0, 1], pids
    os.kill(pids[0], signal.SIGSTOP)  # rank 0 is held wherever it is; rank 1 can run at most into its next step
    try:
        os.kill(pids[1], signal.SIGTERM)
        time.sleep(0.5)
    finally:
        os.kill(pids[0], signal.SIGCONT)
    job.end()
    out = job.output
    assert exit_codes(out) == {0: 143, 1: 143}, out[-4000:]
    assert out.count("interrupted by SIGTERM: saved") == 1, out[-4000:]
    assert "error:" not in out
    saved = sorted(p.name for p in (tmp_path / "b").glob("checkpoint-*.pth"))
    assert saved == ["checkpoint-0.pth"], saved  # one checkpoint, in the first epoch
    stopped = load_checkpoint(tmp_path / "b" / "checkpoint-0.pth")
    assert stopped["next_epoch"] == 0 and 0 <= stopped["next_step"] < 4

    resumed = Job(torchrun("-m", "ncl_fast.train", *common, "--output_dir", str(tmp_path / "b"), "--resume", "auto"),
                  tmp_path, environment())
    assert resumed.end() == 0, resumed.output[-4000:]
    assert f"resumed from {tmp_path / 'b' / 'checkpoint-0.pth'}: epoch 0, step {stopped['next_step']}" \
        in resumed.output
    a = load_checkpoint(tmp_path / "a" / "checkpoint-1.pth")
    b = load_checkpoint(tmp_path / "b" / "checkpoint-1.pth")
    assert a["global_step"] == b["global_step"] == 8
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


#: run as `torchrun ... FAIL_ONE.py <train options>`: rank 1 fails in its third step with a
#: run-time error; rank 0 then waits in that step forever, as it would in an NCCL collective
#: whose peer is gone (only the failure watch can end it)
FAIL_ONE = """
import os, sys, threading
from ncl_fast import cli
from ncl_fast.engine import loop
from ncl_fast.train import main

original, calls = loop.Trainer.train_step, [0]

def train_step(self, *args):
    calls[0] += 1
    if calls[0] == 3:
        if os.environ["RANK"] == "1":
            raise cli.RunError("the injected failure of process 1")
        threading.Event().wait()
    return original(self, *args)

loop.Trainer.train_step = train_step
sys.exit(main())
"""


@pytest.mark.slow
def test_an_error_on_one_process_ends_every_process_once(tmp_path, data):
    script = tmp_path / "fail_one.py"
    script.write_text(FAIL_ONE)
    job = Job(torchrun(str(script), *ARGS, "--epochs", "2", "--data_path", str(data / "train.json"),
                       "--output_dir", str(tmp_path / "out")), tmp_path, environment())
    job.end()  # ends: nothing waits for the 30-minute timeout
    out = job.output
    errors = [line for line in out.splitlines() if "error:" in line]
    assert errors == ["error: the injected failure of process 1"], out[-4000:]
    assert "process 0 ends: process 1 failed" in out
    # rank 0 ended by its failure watch (exit 1), not by torchrun's SIGTERM (-15) or SIGKILL (-9)
    assert exit_codes(out) == {0: 1, 1: 1}, out[-4000:]


#: run as `torchrun ... UNREADABLE_ON_ONE.py <train options>`: from the fifth training item it
#: loads, rank 1 cannot read its files (as when they vanish from a disk during the run)
UNREADABLE_ON_ONE = """
import os, sys
from ncl_fast.data import ForgeryDataset
from ncl_fast.train import main

original, calls = ForgeryDataset.load, [0]

def load(self, index):
    if self.train and os.environ["RANK"] == "1":
        calls[0] += 1
        if calls[0] >= 5:
            raise OSError("No such file (gone since the check)")
    return original(self, index)

ForgeryDataset.load = load
sys.exit(main())
"""


@pytest.mark.slow
def test_a_file_one_process_cannot_read_stops_every_process_at_the_same_step(tmp_path, data):
    script = tmp_path / "unreadable_on_one.py"
    script.write_text(UNREADABLE_ON_ONE)
    job = Job(torchrun(str(script), *ARGS, "--epochs", "2", "--data_path", str(data / "train.json"),
                       "--output_dir", str(tmp_path / "out")), tmp_path, environment())
    job.end()
    out = job.output
    errors = [line for line in out.splitlines() if "error:" in line]
    assert len(errors) == 1 and "No such file (gone since the check)" in errors[0], out[-4000:]
    # rank 1 read items 1-4 (steps 0 and 1); the fifth fails before step 2 on both processes
    assert "training stopped at epoch 0, step 2 of 4" in errors[0]
    assert "process 0 ends: process 1 failed" in out
    assert exit_codes(out) == {0: 1, 1: 1}, out[-4000:]
    saved = load_checkpoint(tmp_path / "out" / "checkpoint-0.pth")
    assert (saved["next_epoch"], saved["next_step"], saved["global_step"]) == (0, 2, 2)


#: run as `torchrun ... SMALL_SYNTH.py <train options>`: the embedded synthetic set with 10
#: images instead of 200, so that each node can make it in seconds
SMALL_SYNTH = """
import sys
from ncl_fast.engine import config, datasets
config.SYNTH_N = datasets.SYNTH_N = 10
from ncl_fast.train import main
sys.exit(main())
"""


@pytest.mark.slow
def test_two_nodes_with_their_own_homes_each_make_the_synthetic_set(tmp_path):
    script = tmp_path / "small_synth.py"
    script.write_text(SMALL_SYNTH)
    jobs = two_nodes(tmp_path, [str(script)], *ARGS, "--epochs", "1", "--output_dir", str(tmp_path / "out"))
    codes = [job.end() for job in jobs]
    assert codes == [0, 0], "\n".join(job.output[-3000:] for job in jobs)
    for node in (0, 1):
        made = tmp_path / f"home{node}" / ".cache" / "ncl_fast" / f"synthetic-n10-seed{SYNTH_SEED}"
        assert (made / "train.json").is_file() and len(list((made / "Tp").glob("*.png"))) == 10
        assert "making the synthetic dataset" in jobs[node].output
    out = jobs[0].output
    assert "8 images, 2 steps/epoch x 1 epochs, batch 2 x 2 process(es)" in out
    assert "weights identical on all 2 processes" in out
    assert load_checkpoint(tmp_path / "out" / "checkpoint-0.pth")["global_step"] == 2


def two_nodes(tmp_path, program: list[str], *args) -> list[Job]:
    """Two torchrun "nodes" of one process each on this machine, over loopback, each
    started in its own HOME (its working folder), with no NCL_FAST_SYNTH_DIR."""
    port = str(free_port())
    jobs = []
    for node in (0, 1):
        home = tmp_path / f"home{node}"
        home.mkdir(exist_ok=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port, *program, *args]
        env = environment(HOME=str(home), NCL_FAST_SYNTH_DIR=None, XDG_CACHE_HOME=None)
        jobs.append(Job(cmd, home, env))
    return jobs


@pytest.mark.slow
def test_a_bad_option_on_one_node_ends_both_nodes_once(tmp_path, data):
    """`--data_path` relative to each node's working folder: there on node 0, missing
    on node 1. Node 1 says so once (exit 2); node 0, already waiting for it, ends too."""
    import shutil

    shutil.copytree(data, tmp_path / "home0" / "data")
    jobs = two_nodes(tmp_path, ["-m", "ncl_fast.train"], *ARGS, "--epochs", "1", "--data_path",
                     "data/train.json", "--output_dir", str(tmp_path / "out"))
    for job in jobs:
        job.end()
    out = jobs[0].output + jobs[1].output
    errors = [line for line in out.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0] in jobs[1].output, out[-4000:]
    assert out.count("--data_path data/train.json does not exist") == 1
    assert "--data_path data/train.json does not exist" in jobs[1].output
    assert exit_codes(jobs[1].output) == {1: 2}, jobs[1].output[-3000:]
    assert exit_codes(jobs[0].output) == {0: 1}, jobs[0].output[-3000:]
    assert "process 0 ends: process 1 failed" in jobs[0].output


@pytest.mark.slow
def test_a_bad_option_is_said_once_under_torchrun(tmp_path, data):
    job = Job(torchrun("-m", "ncl_fast.train", *ARGS, "--epochs", "0", "--data_path", str(data / "train.json"),
                       "--output_dir", str(tmp_path / "out")), tmp_path, environment())
    job.end()
    out = job.output
    errors = [line for line in out.splitlines() if "error:" in line]
    assert errors == ["python -m ncl_fast.train: error: argument --epochs: must be >= 1, got 0"], out[-4000:]
    assert out.count("usage: python -m ncl_fast.train") == 1
    assert exit_codes(out) == {0: 2, 1: 2}, out[-4000:]


@pytest.mark.parametrize("value", ["", "   "])
def test_an_empty_synth_dir_is_not_the_current_folder(monkeypatch, tmp_path, value):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NCL_FAST_SYNTH_DIR", value)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert synthetic_root() == tmp_path / "cache" / "ncl_fast" / f"synthetic-n{SYNTH_N}-seed{SYNTH_SEED}"
    monkeypatch.setenv("NCL_FAST_SYNTH_DIR", str(tmp_path / "here"))
    assert synthetic_root() == tmp_path / "here"


def test_a_stop_adopted_from_a_peer_is_not_a_first_ctrl_c(monkeypatch):
    """Ctrl-C in a terminal reaches every process; one may learn of the stop from a peer
    (the agreement) before its own SIGINT is handled: that SIGINT is its first, not the
    second that quits without a checkpoint."""
    from ncl_fast.engine.interrupts import StopRequest

    with StopRequest(announce=False) as stop:
        stop.adopt(signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        deadline = time.monotonic() + 60
        while not stop.received:  # the handler runs between two bytecodes of this thread
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # the second one of this process
            time.sleep(60)


def test_the_failure_watch_ends_a_process_whose_peer_failed():
    """Rank 1's watch, over a store: nothing while nobody failed; after rank 0's failure,
    the grace, then the exit with status 1; the first failure claimed is rank 0's."""
    import torch.distributed as dist

    from ncl_fast import distributed

    store = dist.HashStore()
    ended = threading.Event()
    codes = []

    def fake_exit(code):
        codes.append(code)
        ended.set()

    distributed.start_watch(store, 1, exit=fake_exit, poll_s=0.01, grace_s=0.2)
    try:
        assert not ended.wait(0.3) and distributed.failed_rank() is None
        assert distributed.claim_failure(0)      # rank 0 fails first
        assert not distributed.claim_failure(2)  # a later failure is not shown
        assert distributed.failed_rank() == 0
        assert ended.wait(60), "the watch did not end the process"
        assert codes == [1]
    finally:
        distributed.stop_watch()


def test_the_failure_watch_lets_a_process_that_ends_by_itself_end():
    """A process whose main thread ends within the grace (its teardown stops the watch)
    is not ended by its watch."""
    import torch.distributed as dist

    from ncl_fast import distributed

    codes = []
    watch = distributed.start_watch(dist.HashStore(), 1, exit=codes.append, poll_s=0.01, grace_s=30)
    try:
        distributed.claim_failure(0)
        time.sleep(0.5)  # the watch has seen the failure and is in its grace
        distributed.stop_watch()
        assert not watch.is_alive() and codes == []
    finally:
        distributed.stop_watch()
