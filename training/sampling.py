"""Which samples each process trains on, and the seeds of their augmentation.

Every process draws the same permutation of the training set from ``(seed, epoch)``; global batch
``k`` is its ``k``-th run of ``batch_size`` indices, and rank ``r`` takes the ``r``-th slice of it. Each
sample's augmentation is seeded by ``(seed, epoch, index)`` alone, so the global batches are the
same pixels whatever the number of processes, the number of loader workers, or where a resumed
run started: one process and N processes, resumed or not, see the same data.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (seed, epoch, index, ...)."""
    return int(np.random.SeedSequence([p % (1 << 64) for p in parts]).generate_state(2, np.uint64)[0]) >> 1


class GlobalBatchSampler(Sampler[tuple[int, int]]):
    """This rank's ``(index, augmentation seed)`` pairs of one epoch, from step ``start_step`` on.

    Batch the pairs by ``batch_size // world_size`` (the local batch) to get this rank's part of
    each global batch, in order.
    """

    def __init__(
        self,
        dataset_size: int,
        batch_size: int,
        steps: int,
        seed: int,
        epoch: int,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
    ) -> None:
        if batch_size % world_size or steps * batch_size > dataset_size:
            raise ValueError(
                f"{steps} batches of {batch_size} in {world_size} shares from {dataset_size} samples"
            )
        self.local = batch_size // world_size
        self.seed, self.epoch = seed, epoch
        generator = torch.Generator().manual_seed(derive_seed(seed, epoch))
        order = torch.randperm(dataset_size, generator=generator)[: steps * batch_size]
        mine = order.view(steps, world_size, self.local)[start_step:, rank]
        self.indices: list[int] = mine.flatten().tolist()

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in self.indices:
            yield index, derive_seed(self.seed, self.epoch, index)


class SeededSamples(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """A dataset read by ``(index, seed)``: the transforms' random draws start from ``seed``."""

    def __init__(self, dataset: Dataset[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.dataset = dataset

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = key
        random.seed(seed)  # the transforms draw from the random module
        return self.dataset[index]
