"""The training sampler: which images each step sees, and in which epoch."""
from __future__ import annotations

import torch
from torch.utils.data import Sampler

from ..distributed import Context


class EpochSampler(Sampler):
    """The epoch's permutation (seeded by seed and epoch), sharded across processes,
    from batch `start` on: a run resumed mid-epoch sees exactly the remaining batches,
    and N processes together see the batches a single process would.

    It yields `(epoch, index)` keys (what `ForgeryDataset` takes): the epoch travels with
    every index to the DataLoader's workers, so persistent workers, whose copy of the
    dataset never hears of a new epoch, still draw each epoch's own crops and flips.
    `set_epoch` (here, in the main process) is the only place the epoch changes."""

    def __init__(self, n: int, batch_size: int, ctx: Context, seed: int):
        self.n, self.batch_size, self.ctx, self.seed = n, batch_size, ctx, seed
        self.epoch, self.start = 0, 0
        self.steps = n // (batch_size * ctx.world_size)  # drop_last

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Epoch `epoch`, from its batch `start` on (a resumed run)."""
        self.epoch, self.start = epoch, start

    def indices(self) -> list[int]:
        """This process's dataset indices for the rest of the epoch, in order."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)[: self.steps * self.batch_size * self.ctx.world_size]
        mine = perm[self.ctx.rank :: self.ctx.world_size]
        return mine[self.start * self.batch_size :].tolist()

    def __iter__(self):
        epoch = self.epoch
        return iter([(epoch, i) for i in self.indices()])

    def __len__(self) -> int:
        return (self.steps - self.start) * self.batch_size
