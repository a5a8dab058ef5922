"""Batched crop + flip draws as torchvision draws and moves pixels as the per-image path does."""

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import ks_2samp
from torchvision.transforms import (
    CenterCrop,
    ColorJitter,
    Compose,
    InterpolationMode,
    RandomResizedCrop,
    Resize,
    ToTensor,
)
from torchvision.transforms.v2 import functional as F2

from ecvl.data.batch_augment import BatchAugment, batch_augment_for
from ecvl.models.clip import create_model


def _images(n, height, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, height, width), dtype=torch.uint8, generator=g)


def _diff(a, b):
    d = (a.int() - b.int()).abs()
    return d.float().mean().item(), d.max().item()


def test_resized_crop_draws_as_get_params():
    n = 4000
    heights = torch.tensor([40, 60]).repeat(n // 2)  # per-sample sizes differ
    widths = torch.tensor([60, 33]).repeat(n // 2)
    augment = BatchAugment("resized_crop", 32)
    plan = augment.draw(heights, widths, torch.Generator().manual_seed(0)).double()
    torch.manual_seed(0)
    ref = torch.tensor(
        [
            RandomResizedCrop.get_params(torch.empty(1, h, w), augment.scale, augment.ratio)
            for h, w in zip(heights.tolist(), widths.tolist(), strict=True)
        ],
        dtype=torch.float64,
    )
    for which in (heights == 40, heights == 60):
        got, want, h, w = plan[which], ref[which], heights[which], widths[which]
        stats = {
            "area fraction": lambda p, h, w: p[:, 2] * p[:, 3] / (h * w),
            "log aspect": lambda p, h, w: (p[:, 3] / p[:, 2]).log(),
            "relative top": lambda p, h, w: p[:, 0] / h,
            "relative left": lambda p, h, w: p[:, 1] / w,
        }
        for name, stat in stats.items():
            test = ks_2samp(stat(got, h, w).numpy(), stat(want, h, w).numpy())
            assert test.pvalue > 1e-3, (name, test)
        assert bool((got[:, 0] + got[:, 2] <= h).all() and (got[:, 1] + got[:, 3] <= w).all())


@pytest.mark.parametrize(
    ("shape", "ratio"),
    [
        ((32, 32), (6.0, 8.0)),
        ((20, 90), (6.0, 8.0)),
        ((90, 20), (6.0, 8.0)),
        ((20, 90), (1 / 8, 1 / 6)),
    ],
)
def test_resized_crop_fallback_is_get_params_centre_crop(shape, ratio):
    # 90-100 % of the area at an aspect of 6 or more (or 1/6 or less) never fits these images,
    # so every draw takes get_params' deterministic fallback, each side of the ratio clamp
    scale = (0.9, 1.0)
    augment = BatchAugment("resized_crop", 16, scale=scale, ratio=ratio)
    plan = augment.draw([shape[0]] * 50, [shape[1]] * 50, torch.Generator().manual_seed(1))
    want = RandomResizedCrop.get_params(torch.empty(1, *shape), scale, ratio)
    assert plan[:, :4].tolist() == [list(map(float, want))] * 50


def test_plan_is_seeded_shaped_and_uses_the_default_generator():
    augment = BatchAugment("resized_crop", 32, flip=True)
    a = augment.draw([32] * 8, [48] * 8, torch.Generator().manual_seed(5))
    b = augment.draw([32] * 8, [48] * 8, torch.Generator().manual_seed(5))
    c = augment.draw([32] * 8, [48] * 8, torch.Generator().manual_seed(6))
    assert a.shape == (8, 5) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert set(a[:, 4].tolist()) <= {0.0, 1.0}
    torch.manual_seed(5)  # a DataLoader worker seeds torch's default generator
    d = augment.draw([32] * 8, [48] * 8)
    torch.manual_seed(5)
    assert torch.equal(d, augment.draw([32] * 8, [48] * 8))


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("antialias", [False, True])
def test_pad_crop_is_bit_identical_to_per_image_random_crop_and_flip(interpolation, antialias):
    size, pad = 32, 4
    images = _images(400, size, size)
    augment = BatchAugment(
        "pad_crop", size, pad=pad, flip=True, interpolation=interpolation, antialias=antialias
    )
    plan = augment.draw([size] * 400, [size] * 400, torch.Generator().manual_seed(2))
    offsets = plan[:, :2]
    assert offsets.min() == -pad and offsets.max() == pad and torch.equal(offsets, offsets.round())
    assert plan[:, 4].sum() not in (0, 400)
    want = []
    for image, (top, left, _, _, flip) in zip(images, plan.tolist(), strict=True):
        # torchvision's RandomCrop(size, padding=pad) at offsets (top + pad, left + pad), then hflip
        crop = F2.crop(F2.pad(image, [pad]), int(top) + pad, int(left) + pad, size, size)
        want.append(F2.horizontal_flip(crop) if flip else crop)
    assert torch.equal(augment.apply(images, plan), torch.stack(want))


@pytest.mark.parametrize("shape", [(20, 25), (64, 69), (40, 32)])
def test_crop_flip_matches_the_per_image_pil_path_when_resizing(shape):
    """Resize + CenterCrop in PIL, then zero-pad and crop: antialias=True follows PIL's kernel.
    Measured on noise: mean |diff| <= 0.0015, max 1 level (PIL's fixed-point weights round a
    few half-way values the other way); bounds 0.01 and 1."""
    size, pad, n = 32, 4, 64
    height, width = shape
    images = _images(n, height, width, seed=3)
    augment = BatchAugment("pad_crop", size, pad=pad, flip=True, antialias=True)
    plan = augment.draw([height] * n, [width] * n, torch.Generator().manual_seed(4))
    resize = Compose([Resize(size, interpolation=InterpolationMode.BICUBIC), CenterCrop(size)])
    want = []
    for image, (top, left, _, _, flip) in zip(images, plan.tolist(), strict=True):
        pil = resize(Image.fromarray(image.permute(1, 2, 0).numpy()))
        square = torch.from_numpy(np.array(pil)).permute(2, 0, 1)
        rh, rw = (
            (size, size * width // height) if height <= width else (size * height // width, size)
        )
        dy = round(top * rh / height) - round((rh - size) / 2)  # back to resized pixels
        dx = round(left * rw / width) - round((rw - size) / 2)
        crop = F2.crop(F2.pad(square, [pad]), dy + pad, dx + pad, size, size)
        want.append(F2.horizontal_flip(crop) if flip else crop)
    mean, worst = _diff(augment.apply(images, plan), torch.stack(want))
    assert mean <= 0.01 and worst <= 1


def test_flip_mirrors_the_crop():
    images = _images(6, 40, 50)
    augment = BatchAugment("resized_crop", 24)
    plan = augment.draw([40] * 6, [50] * 6, torch.Generator().manual_seed(0))
    flipped = plan.clone()
    flipped[:, 4] = 1.0
    assert torch.equal(augment.apply(images, flipped), augment.apply(images, plan).flip(-1))


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("source", [20, 32, 64])
def test_resized_crop_tolerance_against_per_image_resized_crop(interpolation, source):
    """antialias=False against v2 `resized_crop(antialias=False)` computed in float32 and
    rounded: what that call does to a uint8 image on CUDA (on a CPU it switches to a native
    uint8 kernel that uses PIL's A = -0.5 cubic for bicubic, another filter). Measured on
    noise: mean 0, max 0 (the same taps and weights; only the order of the float sums
    differs). Bound: max 1 level, mean 0.001, for a sum landing the other side of a half.

    antialias=True against the same call on uint8 with antialias=True on a CPU (torch's
    PIL-compatible kernel, 8-bit between the passes as PIL). Measured on noise: bicubic mean
    <= 0.005, bilinear mean <= 0.06, max 2 for both (its fixed-point weights round a few
    intermediate values the other way, and the second pass carries that level on).
    Bounds: mean 0.02 (bicubic) / 0.1 (bilinear), max 3."""
    n, size = 64, 32
    images = _images(n, source, source, seed=source)
    mode = InterpolationMode(interpolation)
    for antialias in (False, True):
        augment = BatchAugment(
            "resized_crop", size, interpolation=interpolation, antialias=antialias
        )
        plan = augment.draw([source] * n, [source] * n, torch.Generator().manual_seed(9))
        want = []
        for image, box in zip(images, plan[:, :4].long().tolist(), strict=True):
            if antialias:
                want.append(F2.resized_crop(image, *box, [size, size], mode, antialias=True))
            else:
                out = F2.resized_crop(image.float(), *box, [size, size], mode, antialias=False)
                want.append(out.round().clamp(0, 255).to(torch.uint8))
        mean, worst = _diff(augment.apply(images, plan), torch.stack(want))
        if not antialias:
            assert mean <= 0.001 and worst <= 1
        else:
            assert mean <= (0.02 if interpolation == "bicubic" else 0.1) and worst <= 3


def test_images_of_different_sizes_are_grouped_and_kept_in_order():
    augment = BatchAugment("resized_crop", 16, flip=True)
    shapes = [(20, 30), (32, 32), (20, 30), (50, 24), (32, 32)]
    images = [_images(1, h, w, seed=i)[0] for i, (h, w) in enumerate(shapes)]
    plan = augment.draw(*zip(*shapes, strict=True), torch.Generator().manual_seed(0))
    out = augment.apply(images, plan)
    assert out.shape == (5, 3, 16, 16) and out.dtype == torch.uint8
    for i, image in enumerate(images):
        assert torch.equal(out[i], augment.apply(image[None], plan[i : i + 1])[0])


def test_batch_augment_for_the_shipped_model_and_crop_flip():
    bundle = create_model("ecvl-tiny-vit")
    got = batch_augment_for("open_clip", bundle.train_transform, {})
    assert got == BatchAugment(
        "resized_crop",
        32,
        scale=(0.9, 1.0),
        ratio=(3 / 4, 4 / 3),
        flip=False,
        interpolation="bicubic",
        antialias=True,
    )
    cfg = {"size": (64, 64), "mean": (0.5,) * 3, "std": (0.5,) * 3}
    assert batch_augment_for("crop_flip", None, cfg) == BatchAugment(
        "pad_crop", 64, pad=8, flip=True, interpolation="bicubic", antialias=True
    )


def test_batch_augment_for_leaves_recipes_it_cannot_batch_to_the_per_image_path():
    crop = RandomResizedCrop(32, scale=(0.9, 1.0), interpolation=InterpolationMode.BICUBIC)
    assert batch_augment_for("open_clip", Compose([crop, ColorJitter(0.4), ToTensor()]), {}) is None
    assert batch_augment_for("open_clip", lambda image: image, {}) is None
    with pytest.raises(ValueError, match="unknown train augmentation"):
        batch_augment_for("mixup", None, {})


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown batch augmentation"):
        BatchAugment("rotate", 32)
    with pytest.raises(ValueError, match="interpolation"):
        BatchAugment("pad_crop", 32, interpolation="nearest")
    augment = BatchAugment("pad_crop", 8, pad=1)
    with pytest.raises(ValueError, match="uint8"):
        augment.apply(torch.zeros(2, 3, 8, 8), augment.draw([8, 8], [8, 8]))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["pad_crop", "resized_crop"])
@pytest.mark.parametrize("antialias", [False, True])
def test_cuda_result_equals_cpu(kind, antialias):
    """Same weights, same fp32 matmuls (TF32 held off): at most 1 level where a sum lands the
    other side of a half, mean below 0.001."""
    n = 256
    shapes = [(32, 32)] * (n // 2) + [(45, 60)] * (n // 2)
    images = [_images(1, h, w, seed=i)[0] for i, (h, w) in enumerate(shapes)]
    augment = BatchAugment(kind, 32, pad=4, flip=True, antialias=antialias)
    plan = augment.draw(*zip(*shapes, strict=True), torch.Generator().manual_seed(0))
    cpu = augment.apply(images, plan)
    cuda = augment.apply([image.cuda() for image in images], plan)
    assert cuda.device.type == "cuda"
    mean, worst = _diff(cuda.cpu(), cpu)
    assert mean <= 0.001 and worst <= 1


def test_whole_pixel_shifts_are_copied_exactly_as_the_resampling_matrices_give(monkeypatch):
    import ecvl.data.batch_augment as module

    images = torch.randint(0, 256, (16, 3, 12, 12), dtype=torch.uint8)
    for antialias in (False, True):
        augment = module.BatchAugment("pad_crop", 12, pad=3, flip=True, antialias=antialias)
        plan = augment.draw([12] * 16, [12] * 16, torch.Generator().manual_seed(5))
        assert module._whole_shifts(plan, 12)
        copied = augment.apply(images, plan)
        with monkeypatch.context() as m:
            m.setattr(module, "_whole_shifts", lambda plan, size: False)
            resampled = augment.apply(images, plan)
        assert torch.equal(copied, resampled)
