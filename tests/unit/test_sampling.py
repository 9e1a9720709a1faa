"""The global-batch sampler: N ranks together see exactly the batches one process sees, a resumed
epoch continues the same order, and each sample's augmentation depends on (seed, epoch, index) only."""

from __future__ import annotations

import random

import numpy as np
import torch

from training.sampling import GlobalBatchSampler, SeededSamples, derive_seed


def _batches(sampler: GlobalBatchSampler) -> list[list[tuple[int, int]]]:
    items = list(sampler)
    return [items[i : i + sampler.local] for i in range(0, len(items), sampler.local)]


def test_ranks_split_each_global_batch_of_one_process() -> None:
    one = _batches(GlobalBatchSampler(50, 8, 6, seed=3, epoch=2))
    for world in (2, 4, 8):
        shares = [_batches(GlobalBatchSampler(50, 8, 6, 3, 2, rank, world)) for rank in range(world)]
        for step, batch in enumerate(one):
            joined = [item for share in shares for item in share[step]]
            assert joined == batch, (world, step)


def test_epochs_differ_and_a_resumed_epoch_continues_the_order() -> None:
    full = list(GlobalBatchSampler(40, 4, 10, seed=1, epoch=0, rank=1, world_size=2))
    assert list(GlobalBatchSampler(40, 4, 10, 1, 0, 1, 2, start_step=3)) == full[3 * 2 :]
    assert [i for i, _ in GlobalBatchSampler(40, 4, 10, 1, 1)] != [
        i for i, _ in GlobalBatchSampler(40, 4, 10, 1, 0)
    ]
    assert len({i for i, _ in GlobalBatchSampler(40, 4, 10, 1, 0)}) == 40, "a permutation: no repeats"


def test_sample_seeds_depend_on_seed_epoch_and_index_only() -> None:
    seeds = dict(GlobalBatchSampler(20, 4, 5, seed=9, epoch=4))
    for rank in range(4):
        for index, seed in GlobalBatchSampler(20, 4, 5, 9, 4, rank, 4):
            assert seeds[index] == seed == derive_seed(9, 4, index)
    assert derive_seed(9, 4, 1) != derive_seed(9, 5, 1) != derive_seed(10, 4, 1)


class _Draws(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor([random.random() for _ in range(3)]), torch.tensor(index)


def test_seeded_samples_draw_the_same_augmentation_whatever_came_before() -> None:
    samples = SeededSamples(_Draws())
    first = samples[(5, 1234)]
    random.seed(99)
    np.random.seed(99)
    samples[(6, 77)]
    assert torch.equal(samples[(5, 1234)][0], first[0])
    assert not torch.equal(samples[(5, 1235)][0], first[0])
