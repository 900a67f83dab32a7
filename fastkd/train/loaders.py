"""A run's data: the training and validation sets ``--data`` names, and their loaders.

The training sampler makes the data stream a pure function of (seed, epoch) and can start an
epoch part-way (a resumed run sees exactly the batches an uninterrupted one would); validation is
split over the ranks without padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from ..data import (
    AUGMENTATION,
    IMAGE_SHAPE,
    NUM_CLASSES,
    BatchedTensorDataset,
    ResumableDistributedSampler,
    SeededAugmentation,
    SeededCropFlip,
    ShardSampler,
    SyntheticImages,
    build_imagefolder,
    collate_batch,
    load_digits_split,
)
from . import distributed
from .config import SYNTHETIC, Config, ConfigError


@dataclass
class Data:
    train: Dataset
    val: Dataset
    num_classes: int
    input_shape: tuple[int, int, int]
    augmented: bool


@dataclass
class Loaders:
    sampler: ResumableDistributedSampler
    train: DataLoader
    val: DataLoader
    per_rank_batch: int
    steps_per_epoch: int


def load_data(cfg: Config) -> Data:
    """The training and validation sets ``cfg`` names (embedded digits, synthetic, or a folder)."""
    if cfg.data is None:
        train, val = load_digits_split(cfg.train_fraction)
        train_set = BatchedTensorDataset(train.images, train.labels)
        if cfg.augment:
            train_set = SeededCropFlip(train_set, AUGMENTATION, cfg.seed)
        return Data(train_set, BatchedTensorDataset(val.images, val.labels), NUM_CLASSES,
                    IMAGE_SHAPE, cfg.augment)
    if cfg.data == SYNTHETIC:
        shape = (3, cfg.image_size, cfg.image_size)
        return Data(
            SyntheticImages(cfg.synthetic_images, cfg.synthetic_classes, shape, cfg.seed),
            SyntheticImages(max(1, cfg.synthetic_images // 10), cfg.synthetic_classes, shape,
                            cfg.seed + 1),
            cfg.synthetic_classes, shape, False,
        )
    try:
        train, val, classes = build_imagefolder(cfg.data, cfg.image_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return Data(SeededAugmentation(train, cfg.seed), val, len(classes),
                (3, cfg.image_size, cfg.image_size), True)


def build_loaders(cfg: Config, data: Data, d: distributed.Dist, device: torch.device,
                  per_rank: int) -> Loaders:
    sampler = ResumableDistributedSampler(data.train, d.world_size, d.rank, cfg.seed)
    pin = device.type == "cuda"
    # In-memory data sets hand over whole batches (one gather instead of a per-image collate).
    collate = collate_batch if hasattr(data.train, "__getitems__") else None
    # Own generator: creating a loader iterator must not draw from the global RNG stream, or
    # a resumed run would see a different stream from an uninterrupted one.
    train_loader = DataLoader(
        data.train, batch_size=per_rank, sampler=sampler, num_workers=cfg.workers,
        pin_memory=pin, drop_last=True, generator=torch.Generator().manual_seed(cfg.seed),
        collate_fn=collate,
    )
    val_loader = DataLoader(
        data.val, batch_size=max(per_rank, 256),
        sampler=ShardSampler(len(data.val), d.world_size, d.rank),
        num_workers=cfg.workers, pin_memory=pin,
        collate_fn=collate_batch if hasattr(data.val, "__getitems__") else None,
    )
    full = len(sampler) // per_rank
    return Loaders(sampler, train_loader, val_loader, per_rank,
                   min(full, cfg.max_steps_per_epoch or full))
