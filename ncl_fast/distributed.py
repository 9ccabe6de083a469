"""torchrun support: the same command runs on one device, the CPU, or N processes
(`torchrun --standalone --nproc_per_node=N -m ncl_fast.train ...`).

Under torchrun the processes agree on two things the collectives of a step cannot
carry:

* **Stops.** A signal may reach one process only, or reach the processes on either
  side of a step boundary. At every step boundary the processes combine their stop
  flags (`agree`: one all-reduce of a few integers over a gloo group kept for such
  messages, on the CPU, whatever the training backend; it waits for no GPU work),
  so all of them stop after the same step, save once and exit with the same code.
* **Failures.** A process that fails claims the failure in the rendezvous store
  (`claim_failure`); the first claim shows its error, the others end quietly. A
  thread in every process (`FailureWatch`) polls the store: when another process
  has failed, this one gets `GRACE_S` seconds to end on its own (a collective with
  the dead peer fails, or it meets the same error), then ends with exit 1, so no
  process waits for the process group's 30-minute timeout.
"""
from __future__ import annotations

import datetime
import gc
import os
import signal
import sys
import threading
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

#: seconds a process whose peer failed gets to end on its own before its watch ends it
GRACE_S = 10.0
#: seconds between two looks at the store
POLL_S = 1.0
#: the store key of the failure that ends the job (its value: the failed process's rank)
FAILED_KEY = "ncl_fast/failed"


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    #: a gloo group of every process, for host-side messages (stops); None when alone
    control: object = field(default=None, compare=False, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


class PeerFailed(Exception):
    """Another process failed; this one ends without an error line of its own (the
    failed process shows it)."""


class _State:
    """This process's part in the job's failure handling."""
    store = None  # the rendezvous store, or None when alone
    watch: "FailureWatch | None" = None
    code: int | None = None  # the exit status this process decided on after a failure
    end_code: int | None = None  # the exit status of an agreed stop: the process ends with it right after teardown
    writing = threading.Lock()  # held while a checkpoint is written: a watch never ends the process mid-write


_state = _State()


def launched() -> bool:
    """Started as one of several processes (torchrun sets WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str | None = None) -> Context:
    """Initialize the process group under torchrun (NCCL on GPUs, gloo on the CPU), the
    gloo group for control messages and the failure watch."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(dev)
    control = None
    if world > 1:
        if not dist.is_initialized():
            backend = "nccl" if dev.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
        control = dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=30))
        store = dist.PrefixStore("ncl_fast", dist.distributed_c10d._get_default_store())
        start_watch(store, rank)
    return Context(rank, world, local, dev, control)


def start_watch(store, rank: int, exit=os._exit, poll_s: float = POLL_S, grace_s: float = GRACE_S) -> "FailureWatch":
    """Watch `store` for another process's failure (one watch per process)."""
    if _state.watch is not None:
        _state.watch.stop()
    _state.store, _state.code, _state.end_code = store, None, None
    _state.watch = FailureWatch(store, rank, exit=exit, poll_s=poll_s, grace_s=grace_s)
    _state.watch.start()
    return _state.watch


def stop_watch() -> None:
    if _state.watch is not None:
        _state.watch.stop()
    _state.watch = _state.store = None


def teardown() -> None:
    """Leave the process group in step: wait for every rank (so none is still talking
    to a peer), then destroy the group, before the interpreter starts to exit.

    Without the barrier a rank that finishes first destroys its gloo context while
    another rank's last collective may still be in flight on the connection; the
    gloo threads of the destroyed context then die with `std::terminate`
    ("terminate called without an active exception", SIGABRT) at exit. After a
    failure on any process there is no barrier (a failed peer never reaches it);
    the watch stays on until the group is gone, so a teardown that hangs still ends."""
    if not (dist.is_available() and dist.is_initialized()):
        stop_watch()
        return
    gc.collect()  # DDP reducers or loaders left in reference cycles let go of the group now, not at exit
    if _state.code is None and failed_rank() is None:
        try:
            dist.barrier()
        except Exception:  # a peer is already gone (it failed): destroy ours anyway
            pass
    dist.destroy_process_group()
    stop_watch()
    if _state.end_code is not None:
        # after a stop every process exits at once with its status: torchrun sends SIGTERM to the
        # others when the first one exits, and the interpreter's own exit restores the default
        # handlers, which would turn 143 into a death by the signal
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_state.end_code)


def end_with(code: int) -> None:
    """Under torchrun, once this process's work is over (an agreed stop, after its
    checkpoint; a failure): `teardown` ends the process with `code`, and so does a
    SIGINT or SIGTERM from here on. torchrun sends SIGTERM to the processes still
    running when the first one exits; this keeps their exit status (143, 130, 1)
    instead of a death by the signal."""
    _state.end_code = code

    def handle(signum, frame):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, handle)


# ---- stops: every process stops after the same step ---------------------------------------------------------------
def agree(flags: list[int], ctx: Context) -> list[int]:
    """The element-wise maximum of every process's `flags` (small non-negative integers):
    one all-reduce over the control group (gloo, CPU), called by every process at the
    same point. The flags themselves when alone."""
    if not ctx.distributed:
        return list(flags)
    t = torch.tensor(flags, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ctx.control)
    return [int(v) for v in t.tolist()]


def sync(ctx: Context) -> None:
    """Wait until every process is here (over the control group)."""
    if ctx.distributed:
        dist.barrier(group=ctx.control)


@contextmanager
def writing():
    """Around a write that must not be cut short (a checkpoint): a watch that ends this
    process after a peer's failure waits for it."""
    with _state.writing:
        yield


# ---- failures: one process's error ends every process, shown once --------------------------------------------------
def failed_rank() -> int | None:
    """The rank of the process whose failure ended the job, or None (also when alone,
    or when the store cannot be reached)."""
    store = _state.store
    if store is None:
        return None
    try:
        if not store.check([FAILED_KEY]):
            return None
        return int(store.get(FAILED_KEY).decode())
    except Exception:  # the store is gone: the job is ending anyway
        return None


def claim_failure(rank: int) -> bool:
    """Record that process `rank` failed; True when it is the first failure of the job
    (its error is the one shown), False when another process failed first."""
    store = _state.store
    if store is None:
        return True
    try:
        first = store.compare_set(FAILED_KEY, "", str(rank)).decode()
    except Exception:  # the store is gone: show the error here rather than lose it
        return True
    return first == str(rank)


def exit_code_of(err: BaseException) -> int:
    from . import cli

    if isinstance(err, cli.UsageError):
        return cli.USAGE
    if isinstance(err, KeyboardInterrupt):
        return cli.INTERRUPTED
    return cli.FAILURE


def note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextmanager
def one_failure_ends_all(ctx: Context):
    """Around the work of every process of a job. Alone: nothing changes. Under
    torchrun, an exception ends this process (SystemExit with the exit status:
    2 bad input, 1 failure, 130 Ctrl-C) after saying it once for the whole job: the
    first process to fail shows its `error:` line (or traceback, for an unexpected
    exception); the others, whose errors follow from it or repeat it, print one note
    without `error:`. The watches of the processes still working end them."""
    if not ctx.distributed:
        yield
        return
    from . import cli

    try:
        yield
    except SystemExit:
        raise
    except BaseException as err:
        if isinstance(err, PeerFailed):
            end_job(ctx, 1, None)
        if isinstance(err, (cli.UsageError, cli.RunError)):
            show = lambda: cli.error(str(err))  # noqa: E731
        elif isinstance(err, KeyboardInterrupt):
            show = lambda: note("\ninterrupted")  # noqa: E731
        else:
            show = lambda: traceback.print_exception(err)  # noqa: E731
        end_job(ctx, exit_code_of(err), show)


def end_job(ctx: Context, code: int, show) -> None:
    """End this process with `code` (SystemExit) after a failure: `show()` says why when
    this is the job's first failure (None: this process fails because another did);
    otherwise one note names the process that failed first."""
    _state.code = code
    end_with(code)
    if show is not None and claim_failure(ctx.rank):
        show()
    else:
        origin = failed_rank()
        who = f"process {origin}" if origin is not None else "another process"
        note(f"process {ctx.rank} ends: {who} failed (its message says why)")
    raise SystemExit(code) from None


class FailureWatch(threading.Thread):
    """A daemon thread: every `POLL_S` seconds, has another process failed? Then this
    process gets `GRACE_S` seconds to end by itself (the main thread sees a collective
    fail, or fails the same way), after which the watch ends it with exit 1 (or the
    status the main thread chose), once no checkpoint is being written. A store that
    cannot be reached (the job's launcher has ended) ends the watch, never the process."""

    def __init__(self, store, rank: int, exit=os._exit, poll_s: float = POLL_S, grace_s: float = GRACE_S):
        super().__init__(name="ncl_fast-failure-watch", daemon=True)
        self.store, self.rank, self.exit = store, rank, exit
        self.poll_s, self.grace_s = poll_s, grace_s
        self.done = threading.Event()

    def stop(self) -> None:
        self.done.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=5)

    def run(self) -> None:
        while not self.done.wait(self.poll_s):
            try:
                if not self.store.check([FAILED_KEY]):
                    continue
                origin = self.store.get(FAILED_KEY).decode()
            except Exception:
                return
            if self.done.wait(self.grace_s):
                return
            with _state.writing:
                if origin != str(self.rank) and _state.code is None:
                    note(f"process {self.rank} ends: process {origin} failed (its message says why)")
                sys.stdout.flush()
                sys.stderr.flush()
                self.exit(_state.code if _state.code is not None else 1)
            return


# ---- collectives of objects ---------------------------------------------------------------------------------------
def gather_objects(obj, ctx: Context) -> list:
    """Every rank's `obj`, in rank order (one element when not distributed)."""
    if not ctx.distributed:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()
