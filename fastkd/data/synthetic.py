"""Synthetic ImageNet-shaped data for throughput measurements (``--data synthetic``).

A fixed pool of random images (drawn once from a seeded generator) is indexed cyclically, and the
label of image ``i`` is ``i % classes``: the loader costs one gather per batch, so a measurement
sees the models and the losses, not image decoding. Nothing here is learnable; accuracy on it is
meaningless.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

POOL = 256


class SyntheticImages(Dataset):
    def __init__(self, length: int, classes: int, shape: tuple[int, int, int], seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.pool = torch.randn(min(POOL, length), *shape, generator=gen)
        self.length = length
        self.classes = classes

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pool[index % len(self.pool)], torch.tensor(index % self.classes)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices)
        return self.pool[index % len(self.pool)], index % self.classes
