"""Samplers and dataset wrappers that make a run's data stream a pure function of (seed, epoch).

* :class:`ResumableDistributedSampler` is ``DistributedSampler`` (shuffled with ``seed + epoch``,
  one shard per rank) that can start part-way through an epoch, so a resumed run sees exactly the
  batches an uninterrupted run would.
* :class:`ShardSampler` gives each rank every ``world``-th validation image, without the padding
  ``DistributedSampler`` adds, so metrics summed over ranks count each image once.
* :class:`SeededAugmentation` draws each training sample's random augmentation from a generator
  seeded by ``(seed, epoch, index)``: augmentation does not depend on worker count, worker
  scheduling or where a resumed run restarted.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler(shuffle=True)`` whose epoch can start at sample ``start``."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        """Iterate epoch ``epoch``'s shard from its ``start``-th sample on."""
        self.set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` of a dataset of ``length`` items, in order."""

    def __init__(self, length: int, num_replicas: int, rank: int) -> None:
        self.indices = list(range(rank, length, num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class SeededAugmentation(Dataset):
    """Runs ``dataset[i]`` (whose transform draws from torch's global generator) with the generator
    seeded by ``(seed, epoch, i)`` and restored afterwards."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        # Read by worker processes when the next epoch's iterator starts them.
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        key = (self.seed * 1_000_003 + self.epoch) * 1_000_000_007 + index
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(key % (2**63))
            return self.dataset[index]
