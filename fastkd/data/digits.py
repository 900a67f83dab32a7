"""The embedded data set: scikit-learn's handwritten digits (1797 grey 8x8 images, 10 classes).

It ships inside scikit-learn, so the trainer's default run and its demo need no download. The
train/validation split is fixed (stratified, independent of the run's seed), so every run and every
method is scored on the same 540 validation images. ``train_fraction`` keeps a fixed stratified
subset of the training split: a smaller transfer set leaves distillation room to help.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import TensorDataset

from .augment import CropFlip

# The split never depends on the training seed: every method and seed is scored on one val set.
SPLIT_SEED = 0
VAL_FRACTION = 0.3
NUM_CLASSES = 10
IMAGE_SHAPE = (1, 8, 8)
# The train transform of augmented digits (the trainer's --augment, teacher stores): a crop of at
# least half the image, resized back to 8x8, and a horizontal flip.
AUGMENTATION = CropFlip(8, scale=(0.5, 1.0), flip_p=0.5)


class BatchedTensorDataset(TensorDataset):
    """``TensorDataset`` that hands the DataLoader whole batches: one indexing per tensor instead
    of one per image plus a collate (pass ``collate_fn=collate_batch``)."""

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        index = torch.as_tensor(indices)
        return tuple(t[index] for t in self.tensors)


def collate_batch(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return batch


@dataclass(frozen=True)
class TensorSplit:
    """Images ``[N, 1, 8, 8]`` (float32, standardised) and labels ``[N]`` (int64)."""

    images: torch.Tensor
    labels: torch.Tensor


def load_digits_split(train_fraction: float = 1.0) -> tuple[TensorSplit, TensorSplit]:
    """(train, val) splits of the digits, standardised with the full training split's statistics.

    ``train_fraction`` in (0, 1] keeps that fraction of the training split, stratified by class
    (at least one image per class), always the same images for a given fraction.
    """
    if not 0.0 < train_fraction <= 1.0:
        raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.int64)
    train_idx, val_idx = train_test_split(
        range(len(labels)), test_size=VAL_FRACTION, stratify=digits.target,
        random_state=SPLIT_SEED,
    )
    train_idx = torch.tensor(sorted(train_idx))
    val_idx = torch.tensor(sorted(val_idx))
    mean = images[train_idx].mean()
    std = images[train_idx].std()
    images = (images - mean) / std
    if train_fraction < 1.0:
        keep = _stratified_subset(labels[train_idx], train_fraction)
        train_idx = train_idx[keep]
    return (
        TensorSplit(images[train_idx].contiguous(), labels[train_idx].contiguous()),
        TensorSplit(images[val_idx].contiguous(), labels[val_idx].contiguous()),
    )


def _stratified_subset(labels: torch.Tensor, fraction: float) -> torch.Tensor:
    """Sorted positions of a class-balanced subset: the first ``round(fraction * n_c)`` images
    (at least 1) of each class ``c`` after a fixed shuffle, so a smaller fraction's subset is
    contained in a larger one's."""
    gen = torch.Generator().manual_seed(SPLIT_SEED)
    order = torch.randperm(len(labels), generator=gen)
    keep = []
    for c in labels.unique().tolist():
        members = order[labels[order] == c]
        keep.append(members[: max(1, round(fraction * len(members)))])
    return torch.cat(keep).sort().values
