"""What a run records: `log.txt` (one JSON line per epoch, IMDL-BenCo's keys),
TensorBoard scalars, the progress bar, the GPU monitor and the input-wait share.

`log.txt` keys are built by `test_key` and read back by `test_metrics`: the one
definition of `test_<metric>` (one test set) and `test_<set>_<metric>` (several).
"""
from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import torch

from .. import cli
from ..outputs import OutputError

#: the metrics the ablation tables read from log.txt
TABLE_METRICS = ("pixel-level F1", "pixel-level AUC", "pixel-level IOU")


# ---- log.txt -------------------------------------------------------------------------------------------------------
def test_key(metric: str, test_set: str | None = None) -> str:
    """The log.txt key of a test metric: `test_<metric>` for a run's only test set
    (`test_set` None), `test_<set>_<metric>` when it has several."""
    return f"test_{metric}" if test_set is None else f"test_{test_set}_{metric}"


def test_metrics(record: dict, metrics=TABLE_METRICS) -> dict:
    """{test set: {metric: value}} from one log.txt record (`test` for a run's only set)."""
    out: dict = {}
    for key, value in record.items():
        if not key.startswith("test_"):
            continue
        for metric in metrics:
            if key == test_key(metric):
                out.setdefault("test", {})[metric] = value
            elif key.endswith(f"_{metric}"):
                out.setdefault(key[len("test_"): -len(metric) - 1], {})[metric] = value
    return out


def add_test_results(record: dict, results: dict[str, dict]) -> None:
    """Put every test set's summary metrics into an epoch's record."""
    single = len(results) == 1
    for name, res in results.items():
        for metric, value in res.items():
            record[test_key(metric, None if single else name)] = value


def read_log(path: str | Path) -> list[dict]:
    """The records of a log.txt, each epoch once (the last record of an epoch wins)."""
    path = Path(path)
    if not path.is_file():
        return []
    last = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            last[record.get("epoch")] = record
    return [last[e] for e in sorted(last, key=lambda e: (e is None, e))]


def append_log(path: str | Path, record: dict) -> None:
    """Append one JSON line (undefined figures as null, never NaN)."""
    path = Path(path)
    try:
        with open(path, "a") as f:
            f.write(json.dumps(cli.json_safe(record), allow_nan=False) + "\n")
    except OSError as err:
        raise OutputError(f"cannot write {path} ({cli.describe_os_error(err)})") from None


# ---- host reads --------------------------------------------------------------------------------------------------
def read_scalars(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Every value at once, in one device-to-host copy: the loop's only host read."""
    if not values:
        return {}
    stacked = torch.stack([v.detach().float().reshape(()) for v in values.values()]).cpu().tolist()
    return dict(zip(values, stacked))


# ---- GPU monitor -------------------------------------------------------------------------------------------------
class GpuMonitor:
    """GPU utilization and memory through nvidia-ml-py, sampled by a background thread
    every `period` seconds for as long as it runs (not at the loop's convenience, which
    would sample only the moments the host is free). `mark()` and `since(mark)` give
    the means over any span (a logging interval, an epoch). Without NVML (or a GPU) it
    samples nothing and `since` is empty."""

    def __init__(self, device: torch.device, period: float = 0.2, nvml=None):
        self.period = period
        self.handle, self.nvml = None, nvml
        self.util: list[float] = []
        self.mem: list[float] = []
        self._stop = threading.Event()
        self._thread = None
        if nvml is None and device.type != "cuda":
            return
        try:
            if self.nvml is None:
                import pynvml

                self.nvml = pynvml
            self.nvml.nvmlInit()
            self.handle = self.nvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        except Exception:  # no NVML (e.g. inside some containers): just skip the figures
            self.handle = None

    def start(self) -> "GpuMonitor":
        if self.handle is not None and self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="ncl_fast-gpu-monitor", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                util = float(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)
                used = self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used / 1e9
            except Exception:
                continue
            self.mem.append(used)  # list.append is atomic: the reader never sees half a sample
            self.util.append(util)

    def mark(self) -> int:
        return len(self.util)

    def since(self, mark: int = 0) -> dict:
        """{gpu_util (mean %), gpu_mem_gb (peak used), gpu_samples} of the samples after `mark`."""
        util, mem = self.util[mark:], self.mem[mark:len(self.util)]
        if not util:
            return {}
        return {"gpu_util": sum(util) / len(util), "gpu_mem_gb": max(mem) if mem else 0.0, "gpu_samples": len(util)}

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.period + 1)
            self._thread = None


# ---- time: data wait and host work -------------------------------------------------------------------------------
#: warn when the loop waits for data this share of the time or more
WAIT_WARNING = 0.10


class StepClock:
    """Host time of the loop, split into waiting for the next batch and the rest (the
    host's own work per step: enqueueing the step, logging). The wait share is what an
    input-bound run loses; on a GPU, the step's host time includes any host sync."""

    def __init__(self):
        self.wait = self.host = 0.0
        self.steps = 0
        self._t = time.perf_counter()

    def waited(self) -> None:
        """The batch has arrived."""
        now = time.perf_counter()
        self.wait += now - self._t
        self._t = now

    def stepped(self) -> None:
        """The step is issued."""
        now = time.perf_counter()
        self.host += now - self._t
        self._t = now
        self.steps += 1

    def take(self) -> dict:
        """{data_wait (share of the time), host_ms (per step), seconds, steps} since the last call."""
        total = self.wait + self.host
        out = {"data_wait": self.wait / total if total > 0 else 0.0,
               "host_ms": 1e3 * self.host / max(self.steps, 1), "seconds": total, "steps": self.steps}
        self.wait = self.host = 0.0
        self.steps = 0
        return out


def input_bound_advice(wait: float, num_workers: int, cpus: int) -> str:
    """The one-time warning of an input-bound run, with what to do."""
    more = (f"raise --num_workers (now {num_workers}; this process may use {cpus} CPUs)" if num_workers < cpus
            else f"every CPU already runs a worker ({num_workers})")
    return (f"warning: the training waited for data {100 * wait:.0f} % of the time (input-bound): {more}; "
            f"store the dataset on a local disk, pre-resize very large images, or choose --image_size / "
            f"--train_mode resize to decode less")


# ---- progress and TensorBoard ------------------------------------------------------------------------------------
class Progress:
    """The epoch's progress bar (tqdm), updated every step from host counters only,
    with the loss terms, images/s, data wait and GPU utilization at each read."""

    def __init__(self, total: int, epoch: int, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=f"epoch {epoch}", unit="step", disable=not enabled, dynamic_ncols=True,
                        file=sys.stderr)

    def step(self) -> None:
        self.bar.update(1)

    def show(self, losses: dict[str, float], rate: float, clock: dict, gpu: dict) -> None:
        post = {k: f"{v:.4f}" for k, v in losses.items()}
        post["img/s"] = f"{rate:.1f}"
        post["wait"] = f"{100 * clock['data_wait']:.0f}%"
        post["host ms"] = f"{clock['host_ms']:.1f}"
        if gpu:
            post["gpu%"] = f"{gpu['gpu_util']:.0f}"
        self.bar.set_postfix(post, refresh=False)

    def write(self, line: str) -> None:
        """A line above the bar (stderr), which the bar then redraws below."""
        self.bar.write(line, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


class Scalars:
    """TensorBoard scalars (rank 0), or nothing when tensorboard is missing."""

    def __init__(self, log_dir: str | Path):
        self.writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            print("warning: tensorboard is not installed; no TensorBoard scalars", file=sys.stderr)
            return
        self.writer = SummaryWriter(str(log_dir))

    def add(self, prefix: str, values: dict, step: int) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def add_test(self, results: dict[str, dict], epoch: int) -> None:
        single = len(results) == 1
        for name, res in results.items():
            self.add("test" if single else f"test/{name}", res, epoch)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
