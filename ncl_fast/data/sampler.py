"""The training sampler: each epoch's permutation, sharded across processes."""
from __future__ import annotations

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler):
    """The epoch's permutation (seeded by seed and epoch), sharded across processes,
    from batch `start` on: a run resumed mid-epoch sees exactly the remaining batches,
    and N processes together see the batches a single process would."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n, batch_size, seed, rank, world_size
        self.epoch, self.start = 0, 0
        self.steps = n // (batch_size * world_size)  # drop_last

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)[: self.steps * self.batch_size * self.world_size]
        mine = perm[self.rank :: self.world_size]
        return iter(mine[self.start * self.batch_size :].tolist())

    def __len__(self) -> int:
        return (self.steps - self.start) * self.batch_size
