"""Stage-I batches with the crop and flip applied batch-wise (`train_pipeline(augment=...)`)."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import Compose, Normalize, ToTensor

from ecvl.data.batch_augment import BatchAugment
from ecvl.data.reader import make_loader, take, train_pipeline
from ecvl.data.shards import write_split_shards
from ecvl.data.sources import Split
from support import make_images

TRANSFORM = Compose([ToTensor(), Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))])
PAD = BatchAugment("pad_crop", 16, pad=2, flip=True, antialias=True)
RESIZED = BatchAugment("resized_crop", 16, scale=(0.5, 1.0), antialias=True)


def _raw_shards(tmp_path, n=24):
    split = Split([f"r{i:02d}" for i in range(n)], np.arange(n) % 3, images=make_images(n, 16))
    res = write_split_shards(split, "train", "abc", tmp_path, 8, 0.0, encoding="raw")
    return [str(tmp_path / s["name"]) for s in res.shards]


def _jpeg_shards(tmp_path, n=8):
    paths = []
    for i, pixels in enumerate(make_images(n, 24, seed=2)):
        paths.append(tmp_path / f"j{i:02d}.jpg")
        side = 20 + 2 * (i % 3)  # three sizes: the batch cannot be one tensor
        Image.fromarray(pixels[:side, : side + 1]).save(paths[-1], quality=95)
    split = Split([p.stem for p in paths], np.arange(n) % 2, paths=paths)
    res = write_split_shards(split, "train", "ab", tmp_path / "jpeg", n, 0.0, encoding="png")
    return [str(tmp_path / "jpeg" / s["name"]) for s in res.shards]


def _shipped(urls, augment):
    """What a data worker ships when training on CUDA (pixels or JPEG bytes, and the plan),
    read through a DataLoader like `make_loader` (which draws a seed from torch's RNG)."""
    torch.manual_seed(0)
    pipe = train_pipeline(urls, TRANSFORM, 8, 0, 1, 10, device="cuda", augment=augment)
    return next(iter(DataLoader(pipe, batch_size=None, num_workers=0))), pipe


def _batches(urls, augment, seed=0, epoch=1, steps=3, device="cpu"):
    torch.manual_seed(seed)
    pipe = train_pipeline(urls, TRANSFORM, 8, 0, epoch, 10, device=device, augment=augment)
    return list(take(make_loader(pipe, 0), steps)), pipe


@pytest.mark.parametrize("augment", [PAD, RESIZED])
def test_batches_are_normalised_augmented_and_seeded(tmp_path, augment):
    urls = _raw_shards(tmp_path)
    first, _ = _batches(urls, augment)
    again, _ = _batches(urls, augment)
    other, _ = _batches(urls, augment, seed=1)
    images, labels, keys = first[0]
    assert images.shape == (8, 3, 16, 16) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and len(keys) == 8
    assert all(torch.equal(a[0], b[0]) and a[2] == b[2] for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other, strict=True))
    # one exact pass per len(N) // batch steps: every sample once
    assert sorted(k for _, _, ks in first for k in ks) == [f"r{i:02d}" for i in range(24)]


def test_the_pixels_are_those_of_per_image_crops_with_the_drawn_boxes(tmp_path):
    urls = _raw_shards(tmp_path)
    (pixels, _, keys, plan), _ = _shipped(urls, PAD)
    assert pixels.dtype == torch.uint8 and plan.shape == (8, 5)
    images, _, keys2 = _batches(urls, PAD, steps=1)[0][0]
    assert keys == keys2
    for i in range(8):
        top, left, _, _, flip = plan[i].tolist()
        padded = torch.nn.functional.pad(pixels[i], (2, 2, 2, 2))
        crop = padded[:, int(top) + 2 : int(top) + 18, int(left) + 2 : int(left) + 18]
        crop = crop.flip(-1) if flip else crop
        expected = (crop.float() / 255 - 0.5) / 0.25
        assert torch.allclose(images[i], expected, atol=1e-6)


@pytest.mark.parametrize("kind", ["raw", "jpeg"])
def test_the_gpu_path_finished_on_the_cpu_equals_the_worker_path(tmp_path, kind):
    """On CUDA the worker ships pixels (or JPEG bytes) and the crop plan; the finish step
    moves, decodes (`decode_jpeg`), augments and normalises. Run here on the CPU, it must give
    the batches the CPU path gives (JPEG: libjpeg-turbo in both, so equal too)."""
    urls = _raw_shards(tmp_path) if kind == "raw" else _jpeg_shards(tmp_path)
    augment = PAD if kind == "raw" else RESIZED
    cpu, _ = _batches(urls, augment, steps=1)
    shipped, pipe = _shipped(urls, augment)
    if kind == "jpeg":
        assert isinstance(shipped[0], list) and all(t.dim() == 1 for t in shipped[0])
    images, labels, keys = pipe.device_finish(shipped, torch.device("cpu"))
    assert keys == cpu[0][2] and torch.equal(labels, cpu[0][1])
    assert (images - cpu[0][0]).abs().max() <= 1 / 255 / 0.25 + 1e-6


def test_file_sources_of_mixed_sizes_are_batched(tmp_path):
    urls = _jpeg_shards(tmp_path)
    ((images, labels, keys),) = _batches(urls, RESIZED, steps=1)[0]
    assert images.shape == (8, 3, 16, 16) and sorted(keys) == [f"j{i:02d}" for i in range(8)]


def test_a_transform_without_normalisation_is_refused(tmp_path):
    with pytest.raises(ValueError, match="ending in ToTensor \\+ Normalize"):
        train_pipeline(_raw_shards(tmp_path), lambda im: im, 8, 0, 1, augment=PAD)
