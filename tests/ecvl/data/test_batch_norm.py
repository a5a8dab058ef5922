"""Batched normalisation gives exactly what open_clip's per-image transforms give."""

import pytest
import torch
from PIL import Image
from torchvision.transforms import CenterCrop, Compose, Normalize, Resize, ToTensor

from ecvl.data.batch_norm import split_normalize
from ecvl.data.reader import eval_pipeline, train_pipeline
from ecvl.data.shards import write_split_shards
from ecvl.data.sources import Split
from ecvl.models.clip import create_model
from support import make_images


@pytest.fixture(scope="module")
def bundle():
    return create_model("ecvl-tiny-vit", device=torch.device("cpu"))


@pytest.fixture(scope="module")
def images():
    return make_images(12, 20, seed=3)  # 20 px: the transforms resize to the model's 32 px


@pytest.mark.parametrize("which", ["train_transform", "eval_transform"])
def test_split_is_bit_identical(bundle, images, which):
    transform = getattr(bundle, which)
    per_image, per_batch = split_normalize(transform)
    assert per_batch is not None
    torch.manual_seed(0)  # RandomResizedCrop draws from torch's RNG, once per image either way
    pils = [Image.fromarray(a) for a in images]
    whole = torch.stack([transform(im) for im in pils])
    torch.manual_seed(0)
    parts = [per_image(im) for im in pils]
    assert all(p.dtype == torch.uint8 for p in parts)
    assert torch.equal(per_batch(torch.stack(parts)), whole)


@pytest.mark.parametrize(
    "transform",
    [
        lambda im: im,  # not a Compose
        Compose([CenterCrop(8), ToTensor()]),  # no Normalize
        Compose([ToTensor(), Normalize((0.5,) * 3, (0.5,) * 3, inplace=True)]),
        Compose([Normalize((0.5,) * 3, (0.5,) * 3), ToTensor()]),  # wrong order
    ],
)
def test_other_transforms_are_left_whole(transform):
    per_image, per_batch = split_normalize(transform)
    assert per_image is transform and per_batch is None


def test_pipelines_batch_the_same_tensors(bundle, images, tmp_path):
    split = Split([f"k{i:02d}" for i in range(12)], torch.arange(12).numpy() % 2, images=images)
    res = write_split_shards(
        split, "train", ("a", "b"), tmp_path, 5, 0.0, encoding="png", progress=False
    )
    urls = [str(tmp_path / s["name"]) for s in res.shards]
    opaque = {  # wrapped: split_normalize cannot see inside, so every image is normalised alone
        "train": lambda im: bundle.train_transform(im),
        "eval": lambda im: bundle.eval_transform(im),
    }

    def first(kind, transform):
        torch.manual_seed(0)
        if kind == "train":
            return next(iter(train_pipeline(urls, transform, 4, 0, 1, 10)))
        return next(iter(eval_pipeline(urls, transform, 4, with_bytes=True)))

    for kind, transform in (("train", bundle.train_transform), ("eval", bundle.eval_transform)):
        got, want = first(kind, transform), first(kind, opaque[kind])
        assert got[0].dtype == torch.float32 and torch.equal(got[0], want[0])
        assert list(got[2]) == list(want[2])  # same keys, same order


@pytest.mark.parametrize("encoding", ["raw", "png"])
def test_eval_pixels_at_the_model_side_skip_the_per_image_transform_bit_identically(
    bundle, tmp_path, encoding
):
    from ecvl.data.batch_norm import passthrough_side

    per_image, _ = split_normalize(bundle.eval_transform)
    assert passthrough_side(per_image) == 32
    pixels = make_images(12, 32, seed=4)  # already the model's side: Resize + CenterCrop no-ops
    split = Split([f"k{i:02d}" for i in range(12)], torch.arange(12).numpy() % 2, images=pixels)
    res = write_split_shards(
        split, "val", ("a", "b"), tmp_path, 5, 0.0, encoding=encoding, progress=False
    )
    urls = [str(tmp_path / s["name"]) for s in res.shards]
    opaque = lambda im: bundle.eval_transform(im)  # noqa: E731 (per image, through PIL)
    got = torch.cat([x for x, _, _ in eval_pipeline(urls, bundle.eval_transform, 5)])
    want = torch.cat([x for x, _, _ in eval_pipeline(urls, opaque, 5)])
    assert got.dtype == torch.float32 and torch.equal(got, want)


@pytest.mark.parametrize(
    "transform",
    [
        Compose([CenterCrop(32)]),
        Compose([Resize(32), CenterCrop(16), ToTensor()]),
        Compose([Resize((32, 16)), CenterCrop(32), ToTensor()]),
        Compose([Resize(32, max_size=40), CenterCrop(32), ToTensor()]),
    ],
)
def test_only_resize_then_centre_crop_to_one_side_passes_through(transform):
    from ecvl.data.batch_norm import passthrough_side

    assert passthrough_side(transform) is None
