"""torchrun support: the same command runs on one device, the CPU, or N processes
(`torchrun --standalone --nproc_per_node=N -m ncl_fast.train ...`)."""
from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str | None = None) -> Context:
    """Initialize the process group under torchrun (NCCL on GPUs, gloo on the CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return Context(rank, world, local, dev)


def teardown() -> None:
    """Leave the process group in step: wait for every rank (so none is still talking
    to a peer), then destroy the group, before the interpreter starts to exit.

    Without the barrier a rank that finishes first destroys its gloo context while
    another rank's last collective may still be in flight on the connection; the
    gloo threads of the destroyed context then die with `std::terminate`
    ("terminate called without an active exception", SIGABRT) at exit."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()  # DDP reducers or loaders left in reference cycles let go of the group now, not at exit
    try:
        dist.barrier()
    except Exception:  # a peer is already gone (it failed): destroy ours anyway
        pass
    dist.destroy_process_group()


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
