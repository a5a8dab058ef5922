"""Stage-I train transforms: open_clip's own, or the CIFAR recipe for small images.

open_clip's train transform is a random resized crop of 90-100% of the area: almost no
augmentation, which a small model trained from scratch on a few thousand images over-fits
(on CIFAR-100-LT the image→text loss reaches 0.03 while val stalls). `crop_flip` is what
CIFAR recipes do: pad, random crop back to the side, horizontal flip. The image is first
resized to the model's input side (bicubic, as open_clip's eval transform does), so a 32 px
image feeding a 64 px tower is upsampled, never cropped, and the padding is an eighth of the
side (4 px at 32 px, the CIFAR value).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image
    from torchvision.transforms import Compose

# Params validation imports the names below: torch (through torchvision) loads only when a
# transform is built, after the stage has set its OpenMP policy (pipeline/runtime.py).
TRAIN_AUGMENTS = ("open_clip", "crop_flip")
PAD_FRACTION = 1 / 8  # of the side: 4 px at 32 px


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def crop_flip_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> Compose:
    """Resize + centre crop to `image_size`, zero-pad by `PAD_FRACTION` of the side, random
    crop back, random horizontal flip, then ToTensor + Normalize (which the data pipeline
    moves onto whole batches)."""
    from open_clip.transform import MaybeToTensor
    from torchvision.transforms import (
        CenterCrop,
        Compose,
        InterpolationMode,
        Normalize,
        RandomCrop,
        RandomHorizontalFlip,
        Resize,
    )

    pad = max(1, round(image_size * PAD_FRACTION))
    return Compose(
        [
            _rgb,
            Resize(image_size, interpolation=InterpolationMode.BICUBIC),
            CenterCrop(image_size),
            RandomCrop(image_size, padding=pad),
            RandomHorizontalFlip(),
            MaybeToTensor(),
            Normalize(mean=mean, std=std),
        ]
    )


def train_transform(
    kind: str, open_clip_transform: Callable[[Any], Any], preprocess_cfg: dict
) -> Callable[[Any], Any]:
    """The stage-I train transform `kind` (one of `TRAIN_AUGMENTS`) for a model whose open_clip
    train transform and preprocess config (`open_clip.get_model_preprocess_cfg`) are given."""
    if kind == "open_clip":
        return open_clip_transform
    if kind == "crop_flip":
        size = preprocess_cfg["size"]
        side = size if isinstance(size, int) else size[0]
        return crop_flip_transform(side, preprocess_cfg["mean"], preprocess_cfg["std"])
    raise ValueError(f"unknown train augmentation {kind!r}; choose from {TRAIN_AUGMENTS}")


__all__ = ["PAD_FRACTION", "TRAIN_AUGMENTS", "crop_flip_transform", "train_transform"]
