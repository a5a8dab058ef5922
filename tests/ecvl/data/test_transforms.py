"""The stage-I train transforms: the CIFAR recipe shifts and mirrors, never rescales."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ecvl.data.batch_norm import split_normalize
from ecvl.data.transforms import PAD_FRACTION, crop_flip_transform, train_transform

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _image(side: int = 32) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))


def _placement(out: np.ndarray, ref: np.ndarray, pad: int) -> tuple[int, int, bool] | None:
    """(dy, dx, flipped) such that `out` is `ref` shifted by (dy, dx) with zero fill, else None."""
    side = ref.shape[0]
    padded = np.zeros((side + 2 * pad, side + 2 * pad, 3), ref.dtype)
    padded[pad : pad + side, pad : pad + side] = ref
    for flipped in (False, True):
        for y in range(2 * pad + 1):
            for x in range(2 * pad + 1):
                crop = padded[y : y + side, x : x + side]
                if np.array_equal(crop[:, ::-1] if flipped else crop, out):
                    return y - pad, x - pad, flipped
    return None


@pytest.mark.parametrize("size", [32, 64])
def test_crop_flip_is_a_padded_shift_or_mirror_of_the_resized_image(size):
    image = _image(32)
    transform = crop_flip_transform(size, MEAN, STD)
    per_image, normalize = split_normalize(transform)
    assert normalize is not None  # the data pipeline can normalise whole batches
    ref = np.asarray(image.resize((size, size), Image.Resampling.BICUBIC))
    pad = round(size * PAD_FRACTION)
    seen = set()
    for seed in range(40):
        torch.manual_seed(seed)
        out = per_image(image).permute(1, 2, 0).numpy()
        assert out.shape == (size, size, 3)
        placement = _placement(out, ref, pad)
        assert placement is not None, f"seed {seed}: not a padded shift of the resized image"
        seen.add(placement)
    flips = {p[2] for p in seen}
    assert flips == {False, True}
    assert len(seen) > 20  # the offsets vary


def test_grayscale_images_become_rgb():
    transform = crop_flip_transform(32, MEAN, STD)
    assert transform(_image().convert("L")).shape == (3, 32, 32)


def test_train_transform_dispatch():
    cfg = {"size": (64, 64), "mean": MEAN, "std": STD}

    def sentinel(x):
        return x

    assert train_transform("open_clip", sentinel, cfg) is sentinel
    assert train_transform("crop_flip", sentinel, cfg)(_image()).shape == (3, 64, 64)
    with pytest.raises(ValueError, match="unknown train augmentation 'jitter'"):
        train_transform("jitter", sentinel, cfg)
