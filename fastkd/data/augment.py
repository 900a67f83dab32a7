"""Random-resized-crop + flip augmentation as numbers: drawn from a key, replayed exactly.

:class:`CropFlip` is the random part of the trainer's train transforms (torchvision's
``RandomResizedCrop`` followed by ``RandomHorizontalFlip``) split in two:

* :meth:`CropFlip.draw` picks the crop box ``(i, j, h, w)`` and the flip of one image from an
  integer key, with torchvision's own ``RandomResizedCrop.get_params`` (the documented algorithm:
  up to 10 tries of a uniform area fraction in ``scale`` and a log-uniform aspect ratio in
  ``ratio``, then the center crop of the closest valid ratio) run on torch's global CPU generator
  seeded with the key, then one ``torch.rand(1) < flip_p``; the generator's state is saved before
  and restored after (what ``torch.random.fork_rng`` does, faster), so the caller's stream is
  untouched, and the numbers depend on the key alone (not on the
  process, the rank, the worker or what was drawn before).
* :meth:`CropFlip.apply` replays a drawn box: ``resized_crop`` to ``size`` x ``size`` (bilinear,
  antialiased, as ``RandomResizedCrop``) and ``hflip`` when flagged, on a PIL image or a
  ``[C, H, W]`` tensor. It is deterministic: the same image and numbers give the same pixels.

:func:`augmentation_key` makes the keys: a hash of a tuple of integers (seed, image index, slot or
epoch), so any rank, any resumed run, any worker derives the same key for the same image.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import asdict, dataclass
from typing import Any

import torch

# Fields of a stored augmentation: the crop box (top, left, height, width) and the flip (0 or 1).
BOX_FIELDS = ("top", "left", "height", "width", "flip")


def augmentation_key(*parts: int) -> int:
    """A 63-bit seed from integers (seed, index, slot, ...): the same parts, the same key."""
    data = struct.pack(f"<{len(parts)}q", *parts)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


@dataclass(frozen=True)
class CropFlip:
    """``RandomResizedCrop(size, scale, ratio)`` then ``RandomHorizontalFlip(flip_p)``."""

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip_p: float = 0.5
    interpolation: str = "bilinear"
    antialias: bool = True

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scale"], d["ratio"] = list(self.scale), list(self.ratio)
        return d

    def draw(self, height: int, width: int, key: int) -> tuple[int, int, int, int, int]:
        """``(top, left, crop height, crop width, flip)`` of an image of ``height`` x ``width``."""
        from torchvision.transforms import RandomResizedCrop

        # get_params reads only the image's size; a stride-0 view stands in for the pixels.
        probe = torch.empty(1, 1, 1).expand(1, height, width)
        # What torch.random.fork_rng does for the CPU generator, at a fifth of its cost.
        generator = torch.default_generator
        saved = generator.get_state()
        try:
            generator.manual_seed(key)
            i, j, h, w = RandomResizedCrop.get_params(probe, list(self.scale), list(self.ratio))
            flip = int(torch.rand(1).item() < self.flip_p)
        finally:
            generator.set_state(saved)
        return int(i), int(j), int(h), int(w), flip

    def apply(self, image, box) -> Any:
        """The crop ``box`` (five integers, see :meth:`draw`) of a PIL image or ``[C, H, W]``
        tensor, resized to ``size`` x ``size`` and flipped when its flag is set."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        i, j, h, w, flip = (int(v) for v in box)
        out = TF.resized_crop(image, i, j, h, w, [self.size, self.size],
                              interpolation=InterpolationMode(self.interpolation),
                              antialias=self.antialias)
        return TF.hflip(out) if flip else out


def image_size(image) -> tuple[int, int]:
    """(height, width) of a PIL image or a ``[..., H, W]`` tensor."""
    if isinstance(image, torch.Tensor):
        return int(image.shape[-2]), int(image.shape[-1])
    width, height = image.size
    return int(height), int(width)


# Distinguishes the keys of live augmentation from those of a store's crops.
_LIVE = 0x4C495645


class SeededCropFlip:
    """A tensor data set (``dataset[i] -> (image [C, H, W], label)``) augmented with ``crop``:
    image ``i`` in epoch ``e`` gets the crop and flip drawn from ``(seed, e, i)``."""

    def __init__(self, dataset, crop: CropFlip, seed: int) -> None:
        self.dataset = dataset
        self.crop = crop
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        height, width = image_size(image)
        box = self.crop.draw(height, width, augmentation_key(_LIVE, self.seed, self.epoch, index))
        return self.crop.apply(image, box), label

    def __getitems__(self, indices: list[int]):
        items = [self[i] for i in indices]
        return torch.stack([x for x, _ in items]), torch.stack([torch.as_tensor(y)
                                                                for _, y in items])
