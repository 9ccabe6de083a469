"""Stops a run can survive: Ctrl-C (SIGINT) and SIGTERM, which Slurm and Kubernetes
send before they kill a job, only set a flag; the loop sees it at the next step
boundary and saves a checkpoint of a whole number of steps. Nothing is copied per
step to make that possible. A second Ctrl-C quits at once, without saving. Under
torchrun the processes combine their flags at every step boundary
(`Trainer.agree_to_stop`), so a signal that reaches one process stops all of them
after the same step.
"""
from __future__ import annotations

import signal
import sys
import threading

#: exit status of a run stopped by a signal: 128 + the signal's number (130 for SIGINT, 143 for SIGTERM)
EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


class StopRequest:
    """A context manager that turns SIGINT and SIGTERM into `self.signum` while it is open."""

    def __init__(self, announce: bool = True):
        self.signum: int | None = None
        self.received = False  # a signal reached this process (not only a peer)
        self.announce = announce
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return EXIT.get(self.signum, 130)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def adopt(self, signum: int) -> None:
        """Stop as if `signum` had arrived here (under torchrun: the stop every process
        agreed on, which a peer received); no announcement."""
        self.signum = signum

    def _handle(self, signum, frame) -> None:
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: quit now
        self.received = True  # a stop adopted from a peer is not this process's first Ctrl-C
        if self.signum is None:
            self.signum = signum
            from .. import distributed

            # under torchrun, the SIGTERM that follows another process's failure stops nothing: say nothing
            if self.announce and distributed.failed_rank() is None:
                print(f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint "
                      f"(Ctrl-C again to quit at once, without one)", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for s in EXIT:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


def ignore_in_workers(_worker_id: int) -> None:
    """DataLoader `worker_init_fn`: a Ctrl-C or SIGTERM sent to the whole process group
    reaches the workers too; they leave the stop to the main process, which finishes
    its step, saves and shuts them down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

