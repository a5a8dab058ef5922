"""Read shards back safely: webdataset 1.x pipelines with an explicit decode allow-list.

Only image members (raw `.npy` uint8 pixels through `ecvl.data.pixels`, never with pickles;
PNG/JPEG/WebP/BMP through PIL, each opened only with the decoder its name promises, so `.png`
bytes in another format are refused) and `.cls` (ASCII integer) are ever decoded; every other
member of a sample (`.json`, written for people and plain readers, and `.pyd`, `.pickle`,
`.pth`, ...) is dropped unread, so a shard can never make us unpickle anything. Tars are read
by `ecvl.data.tar_reader` (the same samples as webdataset's reader, ~4x faster).

Stage-I training can take a `BatchAugment` (`ecvl.data.batch_augment`): samples are then
decoded to uint8 pixels only, and crop, flip and normalisation run once per batch; the crop
parameters are drawn in the data worker (seeded as the per-image transforms were), the pixels
are moved in the worker on a CPU and on the GPU after the transfer, where JPEG members are
also decoded (`torchvision.io.decode_jpeg` on the device).

Training pipelines are infinite: each rank cycles over its own shards (shard order reshuffled
per pass with a seed shared by all ranks, so the per-rank sets are disjoint), shuffles samples
in a seeded buffer and yields fixed-size batches; the training loop takes a fixed number of
steps per epoch. With one process and one worker an epoch of `N // batch` steps is one exact
pass over the data. Evaluation pipelines read every sample once, in shard order.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import count, islice
from typing import TYPE_CHECKING

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from ecvl.data.batch_norm import BatchNormalize, passthrough_side, split_normalize
from ecvl.data.pixels import RAW_EXT, decode_rgb, to_rgb
from ecvl.data.shards import open_image
from ecvl.data.sources import IMAGE_EXTENSIONS
from ecvl.data.tar_reader import read_tars
from ecvl.errors import DataError

if TYPE_CHECKING:
    from ecvl.data.batch_augment import BatchAugment

log = logging.getLogger(__name__)

_META_KEYS = ("__key__", "__url__", "__local_path__")
_IMAGE_EXTS = frozenset(IMAGE_EXTENSIONS) | {"jpg"}
_MEMBER_EXTS = _IMAGE_EXTS | {RAW_EXT}  # shard members may also hold raw pixels
_JPEG = frozenset({"jpg", "jpeg"})
_REPORTED: set[tuple[int, int, int]] = set()


def worker_info() -> tuple[int, int, int, int]:
    """(rank, world_size, worker, num_workers) as webdataset sees them."""
    return wds.utils.pytorch_worker_info()


def is_image_member(suffix: str) -> bool:
    """Whether an image file with this suffix (`png`, `JPG`, ...) is on the image allow-list."""
    return suffix.lower() in _IMAGE_EXTS


def is_shard_image_member(suffix: str) -> bool:
    """Whether a shard member with this suffix is an image on the allow-list: an image file's
    format (`is_image_member`) or raw `.npy` pixels."""
    return suffix.lower() in _MEMBER_EXTS


def decode_pixels(data: bytes, where: str, ext: str) -> np.ndarray:
    """An allow-listed image member's bytes as H×W×3 uint8 pixels: `.npy` read as an array
    (never unpickled), other formats decoded only as the format `ext` names (by content,
    see `ecvl.data.shards.open_image`).

    Raises:
        DataError: the bytes are not a readable image of that format; the message starts with
            `where`.
    """
    if ext == RAW_EXT:
        try:
            return decode_rgb(data)
        except ValueError as e:
            raise DataError(f"{where}: cannot decode ({e})") from None
    return np.asarray(decode_image(data, where, ext))


def decode_image(data: bytes, where: str, ext: str) -> Image.Image:
    """An allow-listed image member's bytes as a PIL RGB image (see `decode_pixels`).

    Raises:
        DataError: the bytes are not a readable image of that format; the message starts with
            `where`.
    """
    if ext == RAW_EXT:
        return Image.fromarray(decode_pixels(data, where, ext))
    try:
        with open_image(data, ext) as im:
            return to_rgb(im)
    except Exception as e:  # PIL raises assorted types
        raise DataError(f"{where}: cannot decode ({e})") from None


def decode_sample(sample: dict, image: str = "pil") -> dict:
    """Decode the allow-listed members of a raw webdataset sample; drop everything else.

    Args:
        image: what `image` holds: `pil` (an RGB PIL image), `pixels` (H×W×3 uint8 array) or
            `encoded` (the member's bytes, for decoding on the device; `ext` says the format).

    Returns:
        dict with `key`, `image`, `ext`, `label` (int), `url`, and `encoded` (the image
        member's bytes, as stored).

    Raises:
        DataError: a sample without exactly one image or without a label, or an undecodable
            member; the message names the key and the shard.
    """
    key, url = sample.get("__key__"), sample.get("__url__")
    where = f"sample {key!r} in {url}"
    images = [k for k in sample if k not in _META_KEYS and is_shard_image_member(k)]
    if len(images) != 1:
        raise DataError(f"{where}: expected one image member, found {sorted(images) or 'none'}")
    if "cls" not in sample:
        raise DataError(f"{where}: no .cls member")
    ext, data = images[0].lower(), sample[images[0]]
    if image == "pil":
        decoded = decode_image(data, where, ext)
    elif image == "pixels":
        decoded = decode_pixels(data, where, ext)
    else:
        decoded = data
    try:
        label = int(sample["cls"].decode("ascii").strip())
    except (UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{where}: cannot decode ({e})") from None
    return {
        "key": key,
        "image": decoded,
        "ext": ext,
        "label": label,
        "url": url,
        "encoded": data,
    }


def rank_shards(
    urls: list[str],
    seed: int,
    epoch: int,
    pass_index: int,
    rank: int,
    world: int,
    worker: int,
    workers: int,
) -> list[str]:
    """The shards one worker of one rank reads in one pass: a shuffle shared by every rank
    (same seed), then a strided split by rank and by worker, so the sets are disjoint and
    together cover every shard."""
    order = list(urls)
    random.Random(f"{seed}-{epoch}-{pass_index}").shuffle(order)
    return order[rank::world][worker::workers]


def _train_samples(urls: list[str], seed: int, epoch: int, bufsize: int) -> Callable:
    """Endless raw samples of this rank/worker: pass after pass over its shards, each pass in
    a new shard order and shuffled in a seeded buffer that is drained at the end of the pass
    (so a pass never mixes with the next, and N samples from one worker are one exact pass)."""

    def source() -> Iterator[dict]:
        rank, world, worker, workers = worker_info()
        rng = random.Random(f"{seed}-{epoch}-{rank}-{worker}")
        for pass_index in count():
            mine = rank_shards(urls, seed, epoch, pass_index, rank, world, worker, workers)
            if not mine:
                return
            samples = read_tars(iter([{"url": u} for u in mine]))
            if bufsize > 1:
                samples = wds.filters._shuffle(samples, bufsize, min(bufsize, 100), rng)
            yield from samples

    return source


def _to_tuple(transform: Callable, with_bytes: bool = False) -> Callable:
    """Decoded samples (pixels) to `(image, label, key[, bytes])`; pixels the per-image part
    would return unchanged (see `passthrough_side`) skip it."""
    side = passthrough_side(transform)

    def image(pixels: np.ndarray) -> torch.Tensor:
        if side is not None and pixels.shape == (side, side, 3):
            return torch.from_numpy(np.array(pixels)).permute(2, 0, 1)
        return transform(Image.fromarray(pixels))

    def stage(src: Iterator[dict]) -> Iterator[tuple]:
        for s in src:
            if with_bytes:
                yield image(s["image"]), s["label"], s["key"], bytes(s["encoded"])
            else:
                yield image(s["image"]), s["label"], s["key"]

    return stage


def _transform_stages(transform: Callable, batch_size: int, partial: bool, with_bytes: bool):
    """Decoding, the per-image transform and batching; returns (stages, the batch
    normalisation or None) when `transform` ends in ToTensor + Normalize (bit-identical; see
    `ecvl.data.batch_norm`)."""
    per_image, per_batch = split_normalize(transform)
    stages = [
        wds.map(_decode_pixels),
        _to_tuple(per_image, with_bytes),
        wds.batched(batch_size, partial=partial),
    ]
    return stages, per_batch


def _decode_pixels(sample: dict) -> dict:
    return decode_sample(sample, image="pixels")


def _with_normalization(
    stages: list, per_batch: BatchNormalize | None, device: torch.device | str
) -> wds.DataPipeline:
    """The pipeline; the batch normalisation runs in the data worker on a CPU, and after the
    transfer on a GPU (`make_loader` applies it), so that uint8 batches, 4x smaller than
    float32, cross shared memory and the PCIe bus."""
    on_device = per_batch is not None and torch.device(device).type == "cuda"
    if per_batch is not None and not on_device:

        def normalize(src: Iterator[tuple]) -> Iterator[tuple]:
            for images, *rest in src:
                yield (per_batch(images), *rest)

        stages = [*stages, normalize]
    pipe = wds.DataPipeline(*stages)
    pipe.device_finish = _NormalizeOnDevice(per_batch) if on_device else None
    return pipe


@dataclass(frozen=True)
class _NormalizeOnDevice:
    normalize: BatchNormalize

    def __call__(self, batch: tuple, device: torch.device) -> tuple:
        images, *rest = batch
        return (self.normalize(images.to(device, non_blocking=True)), *rest)


def _augmented_batches(
    augment: BatchAugment, normalize: BatchNormalize, batch_size: int, device: torch.device
) -> list:
    """Stages from raw samples to batches with `augment` applied batch-wise: decode to pixels
    (or keep JPEG bytes for the GPU), collate, draw the crops here, and move the pixels here on
    a CPU or after the transfer on a GPU (`make_loader`, through `pipe.device_finish`)."""
    on_device = device.type == "cuda"

    def decode(sample: dict) -> dict:
        gpu_jpeg = on_device and any(k.lower() in _JPEG for k in sample)
        return decode_sample(sample, image="encoded" if gpu_jpeg else "pixels")

    def batches(src: Iterator[dict]) -> Iterator[tuple]:
        for chunk in _chunks(src, batch_size):
            images, sizes = _collate_images(chunk)
            plan = augment.draw(sizes[:, 0], sizes[:, 1])
            labels = torch.tensor([s["label"] for s in chunk], dtype=torch.int64)
            keys = [s["key"] for s in chunk]
            if on_device:
                yield images, labels, keys, plan
            else:
                yield normalize(augment.apply(images, plan)), labels, keys

    return [wds.map(decode), batches]


def _chunks(src: Iterator[dict], size: int) -> Iterator[list[dict]]:
    """Full chunks of `size` samples (a training stream drops the incomplete last one)."""
    chunk = []
    for sample in src:
        chunk.append(sample)
        if len(chunk) == size:
            yield chunk
            chunk = []


def _collate_images(chunk: list[dict]) -> tuple[torch.Tensor | list, torch.Tensor]:
    """(images, B×2 heights and widths): one uint8 B×C×H×W tensor when every sample is decoded
    pixels of one size, else a list of C×H×W pixels and 1-D encoded JPEG bytes."""
    pixels = [s["image"] for s in chunk]
    if all(isinstance(p, np.ndarray) for p in pixels):
        sizes = torch.tensor([p.shape[:2] for p in pixels], dtype=torch.int64)
        if len({p.shape for p in pixels}) == 1:
            return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous(), sizes
    items, hw = [], []
    for s in chunk:
        if isinstance(s["image"], np.ndarray):
            items.append(torch.from_numpy(np.array(s["image"])).permute(2, 0, 1))
            hw.append(s["image"].shape[:2])
        else:  # JPEG bytes for the device decoder; the header gives the size
            items.append(torch.frombuffer(bytearray(s["image"]), dtype=torch.uint8))
            hw.append(_jpeg_size(s["image"], f"sample {s['key']!r} in {s['url']}"))
    return items, torch.tensor(hw, dtype=torch.int64)


def _jpeg_size(data: bytes, where: str) -> tuple[int, int]:
    try:
        with open_image(data, "jpg") as im:  # parses the header only
            return im.height, im.width
    except ValueError as e:
        raise DataError(f"{where}: cannot decode ({e})") from None


@dataclass(frozen=True)
class _AugmentOnDevice:
    augment: BatchAugment
    normalize: BatchNormalize

    def __call__(self, batch: tuple, device: torch.device) -> tuple:
        images, labels, keys, plan = batch
        if isinstance(images, list):
            try:
                images = _device_images(images, device)
            except RuntimeError as e:  # nvJPEG on a member whose header PIL accepted
                raise DataError(
                    f"cannot decode a JPEG member of samples {keys[0]!r}..{keys[-1]!r} on "
                    f"{device} ({e})"
                ) from None
        else:
            images = images.to(device, non_blocking=True)
        return self.normalize(self.augment.apply(images, plan)), labels, keys


def _device_images(items: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """C×H×W pixels moved to `device`; 1-D JPEG bytes decoded there in one batched call."""
    from torchvision.io import ImageReadMode, decode_jpeg

    jpeg = [i for i, t in enumerate(items) if t.dim() == 1]
    out = [t.to(device, non_blocking=True) if t.dim() == 3 else None for t in items]
    if jpeg:
        decoded = decode_jpeg([items[i] for i in jpeg], mode=ImageReadMode.RGB, device=device)
        for i, image in zip(jpeg, decoded, strict=True):
            out[i] = image
    return out


def check_shard_count(num_shards: int, world_size: int, num_workers: int) -> int:
    """Workers per rank that every get at least one shard; raises when ranks would starve.

    Raises:
        DataError: fewer shards than ranks.
    """
    if num_shards < world_size:
        raise DataError(
            f"{num_shards} shard(s) for {world_size} ranks: every rank needs one "
            "(write smaller shards: lower `shard.maxcount`)"
        )
    usable = min(num_workers, max(1, num_shards // world_size))  # 0: read in-process
    if usable < num_workers and (num_shards, world_size, num_workers) not in _REPORTED:
        _REPORTED.add((num_shards, world_size, num_workers))  # once per process, not per epoch
        log.info(
            "using %d data worker(s) instead of %d: %d shard(s) per rank",
            usable,
            num_workers,
            num_shards // world_size,
        )
    return usable


def train_pipeline(
    urls: list[str],
    transform: Callable,
    batch_size: int,
    seed: int,
    epoch: int,
    shuffle_buffer: int = 1000,
    device: torch.device | str = "cpu",
    augment: BatchAugment | None = None,
) -> wds.DataPipeline:
    """Infinite batches `(images B×C×H×W, labels B, keys list)` of this rank's shards.

    With `augment`, it replaces the per-image part of `transform` (which must then end in
    ToTensor + Normalize: its normalisation is kept) and runs on whole batches."""
    samples = _train_samples(urls, seed, epoch, shuffle_buffer)
    if augment is None:
        stages, per_batch = _transform_stages(transform, batch_size, False, with_bytes=False)
        return _with_normalization([samples, *stages], per_batch, device)
    _, normalize = split_normalize(transform)
    if normalize is None:
        raise ValueError("a batched augmentation needs a transform ending in ToTensor + Normalize")
    device = torch.device(device)
    pipe = wds.DataPipeline(samples, *_augmented_batches(augment, normalize, batch_size, device))
    pipe.device_finish = _AugmentOnDevice(augment, normalize) if device.type == "cuda" else None
    return pipe


def eval_pipeline(
    urls: list[str],
    transform: Callable,
    batch_size: int,
    with_bytes: bool = False,
    device: torch.device | str = "cpu",
    split_by_worker: bool = True,
) -> wds.DataPipeline:
    """Every sample of `urls` once, split by worker (not by rank) unless `split_by_worker` is
    False (the caller gives each worker its own pipeline): batches of `(images, labels, keys)`,
    plus the encoded image bytes when `with_bytes`.

    With one worker the order is shard order; with several, DataLoader interleaves the
    workers' batches, which is deterministic for a given worker count."""
    stages, per_batch = _transform_stages(
        transform, batch_size, partial=True, with_bytes=with_bytes
    )
    split = [wds.split_by_worker] if split_by_worker else []
    return _with_normalization(
        [wds.SimpleShardList(list(urls)), *split, read_tars, *stages], per_batch, device
    )


class _OnDevice:
    """Batches moved to `device` (pinned, non-blocking) and finished there (normalised, and
    augmented when the pipeline augments batch-wise)."""

    def __init__(self, loader: DataLoader, device: torch.device, finish: Callable):
        self.loader, self.device, self.finish = loader, device, finish

    def __iter__(self) -> Iterator[tuple]:
        for batch in self.loader:
            yield self.finish(batch, self.device)


def make_loader(
    pipeline: wds.DataPipeline, num_workers: int, device: torch.device | str = "cpu"
) -> DataLoader | _OnDevice:
    """A DataLoader over an already-batched pipeline (workers overlap decoding with compute).

    On CUDA, batches are pinned, and when the pipeline left the normalisation to the device
    (see `train_pipeline`/`eval_pipeline`) the loader yields them on the device, finished.
    Two batches in flight per worker: enough to hide decoding, without filling shared memory.
    """
    device = torch.device(device)
    loader = DataLoader(
        pipeline,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=2 if num_workers > 0 else None,
    )
    finish = getattr(pipeline, "device_finish", None)
    return loader if finish is None else _OnDevice(loader, device, finish)


def take(loader: DataLoader, steps: int) -> Iterator:
    """The first `steps` batches of an infinite training loader."""
    return islice(iter(loader), steps)


def iter_samples(urls: list[str]) -> Iterator[dict]:
    """Decoded samples of `urls` in shard order (no workers): for tests and small tools."""
    pipe = wds.DataPipeline(wds.SimpleShardList(list(urls)), read_tars, wds.map(decode_sample))
    yield from pipe


__all__ = [
    "check_shard_count",
    "decode_image",
    "decode_sample",
    "rank_shards",
    "eval_pipeline",
    "is_image_member",
    "is_shard_image_member",
    "iter_samples",
    "make_loader",
    "take",
    "train_pipeline",
    "worker_info",
]
