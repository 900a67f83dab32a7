"""Data for the trainer: the embedded digits and ImageNet-layout folders, with samplers that make
the data stream a pure function of (seed, epoch) so runs resume exactly."""

from .augment import CropFlip, SeededCropFlip, augmentation_key
from .digits import (
    AUGMENTATION,
    IMAGE_SHAPE,
    NUM_CLASSES,
    BatchedTensorDataset,
    TensorSplit,
    collate_batch,
    load_digits_split,
)
from .imagefolder import build_imagefolder
from .sampling import ResumableDistributedSampler, SeededAugmentation, ShardSampler
from .synthetic import SyntheticImages

__all__ = [
    "AUGMENTATION",
    "CropFlip",
    "SeededCropFlip",
    "augmentation_key",
    "BatchedTensorDataset",
    "collate_batch",
    "IMAGE_SHAPE",
    "NUM_CLASSES",
    "ResumableDistributedSampler",
    "SeededAugmentation",
    "ShardSampler",
    "SyntheticImages",
    "TensorSplit",
    "build_imagefolder",
    "load_digits_split",
]
