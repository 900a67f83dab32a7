"""ImageNet-layout folders (``train/<class>/``, ``val/<class>/``) with torchvision's ImageFolder.

Standard ImageNet transforms: RandomResizedCrop + horizontal flip for training, resize to
``size * 256 / 224`` and center-crop ``size`` for validation, both normalised with the ImageNet
mean and standard deviation.
"""

from __future__ import annotations

from pathlib import Path

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_imagefolder(root: str, image_size: int = 224):
    """(train, val, classes) datasets; raises ValueError when the two splits' classes differ."""
    from torchvision import datasets, transforms

    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = transforms.Compose([
        transforms.RandomResizedCrop(image_size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        normalize,
    ])
    val_tf = transforms.Compose([
        transforms.Resize(round(image_size * 256 / 224)),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        normalize,
    ])
    try:
        train = datasets.ImageFolder(str(Path(root) / "train"), transform=train_tf)
        val = datasets.ImageFolder(str(Path(root) / "val"), transform=val_tf)
    except (FileNotFoundError, RuntimeError) as e:
        raise ValueError(f"--data {root}: {e}") from e
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise ValueError(
            f"--data {root}: train/ and val/ must hold the same class folders; only in train: "
            f"{only_train[:5]}, only in val: {only_val[:5]}"
        )
    return train, val, train.classes


def raw_train_folder(root: str):
    """(train set without its random transform, what follows the crop and flip): the training
    images as PIL images and ``ToTensor`` + ``Normalize``, for a teacher store's replay."""
    from torchvision import datasets, transforms

    try:
        train = datasets.ImageFolder(str(Path(root) / "train"))
    except (FileNotFoundError, RuntimeError) as e:
        raise ValueError(f"--data {root}: {e}") from e
    post = transforms.Compose([transforms.ToTensor(),
                               transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return train, post
