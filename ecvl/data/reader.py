"""Read shards back safely: webdataset 1.x pipelines with an explicit decode allow-list.

Only image members (PNG/JPEG/WebP/BMP through PIL, each opened only with the decoder its name
promises, so `.png` bytes in another format are refused), `.cls` (ASCII integer) and `.json`
are ever decoded; every other member of a sample (`.pyd`, `.pickle`, `.pth`, ...) is dropped
unread, so a shard can never make us unpickle anything.

Training pipelines are infinite: each rank cycles over its own shards (shard order reshuffled
per pass with a seed shared by all ranks, so the per-rank sets are disjoint), shuffles samples
in a seeded buffer and yields fixed-size batches; the training loop takes a fixed number of
steps per epoch. With one process and one worker an epoch of `N // batch` steps is one exact
pass over the data. Evaluation pipelines read every sample once, in shard order.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Iterator
from itertools import count, islice

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from ecvl.data.batch_norm import BatchNormalize, split_normalize
from ecvl.data.shards import open_image
from ecvl.data.sources import IMAGE_EXTENSIONS
from ecvl.errors import DataError

log = logging.getLogger(__name__)

_META_KEYS = ("__key__", "__url__", "__local_path__")
_IMAGE_EXTS = frozenset(IMAGE_EXTENSIONS) | {"jpg"}
_REPORTED: set[tuple[int, int, int]] = set()


def worker_info() -> tuple[int, int, int, int]:
    """(rank, world_size, worker, num_workers) as webdataset sees them."""
    return wds.utils.pytorch_worker_info()


def is_image_member(suffix: str) -> bool:
    """Whether a sample member with this suffix (`png`, `JPG`, ...) is on the image allow-list."""
    return suffix.lower() in _IMAGE_EXTS


def decode_image(data: bytes, where: str, ext: str) -> Image.Image:
    """An allow-listed image member's bytes as a PIL RGB image, decoded only as the format its
    extension `ext` names (by content, see `ecvl.data.shards.open_image`).

    Raises:
        DataError: the bytes are not a readable image of that format; the message starts with
            `where`.
    """
    try:
        with open_image(data, ext) as im:
            return im.convert("RGB")
    except Exception as e:  # PIL raises assorted types
        raise DataError(f"{where}: cannot decode ({e})") from None


def decode_sample(sample: dict) -> dict:
    """Decode the allow-listed members of a raw webdataset sample; drop everything else.

    Returns:
        dict with `key`, `image` (PIL RGB), `label` (int), `meta` (dict or None), `url`, and
        `encoded` (the image member's bytes, as stored).

    Raises:
        DataError: a sample without exactly one image or without a label, or an undecodable
            member; the message names the key and the shard.
    """
    key, url = sample.get("__key__"), sample.get("__url__")
    where = f"sample {key!r} in {url}"
    images = [k for k in sample if k not in _META_KEYS and is_image_member(k)]
    if len(images) != 1:
        raise DataError(f"{where}: expected one image member, found {sorted(images) or 'none'}")
    if "cls" not in sample:
        raise DataError(f"{where}: no .cls member")
    image = decode_image(sample[images[0]], where, images[0])
    try:
        label = int(sample["cls"].decode("ascii").strip())
        meta = json.loads(sample["json"]) if "json" in sample else None
    except Exception as e:  # int() and json raise assorted types
        raise DataError(f"{where}: cannot decode ({e})") from None
    return {
        "key": key,
        "image": image,
        "label": label,
        "meta": meta,
        "url": url,
        "encoded": sample[images[0]],
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
            samples = wds.tarfile_to_samples()(iter([{"url": u} for u in mine]))
            if bufsize > 1:
                samples = wds.filters._shuffle(samples, bufsize, min(bufsize, 100), rng)
            yield from samples

    return source


def _to_tuple(transform: Callable, with_bytes: bool = False) -> Callable:
    def stage(src: Iterator[dict]) -> Iterator[tuple]:
        for s in src:
            if with_bytes:
                yield transform(s["image"]), s["label"], s["key"], bytes(s["encoded"])
            else:
                yield transform(s["image"]), s["label"], s["key"]

    return stage


def _transform_stages(transform: Callable, batch_size: int, partial: bool, with_bytes: bool):
    """Per-image transform and batching; returns (stages, the batch normalisation or None)
    when `transform` ends in ToTensor + Normalize (bit-identical; see `ecvl.data.batch_norm`)."""
    per_image, per_batch = split_normalize(transform)
    stages = [_to_tuple(per_image, with_bytes), wds.batched(batch_size, partial=partial)]
    return stages, per_batch


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
    pipe.device_normalize = per_batch if on_device else None
    return pipe


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
    usable = max(1, min(num_workers, num_shards // world_size))
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
) -> wds.DataPipeline:
    """Infinite batches `(images B×C×H×W, labels B, keys list)` of this rank's shards."""
    stages, per_batch = _transform_stages(transform, batch_size, partial=False, with_bytes=False)
    return _with_normalization(
        [_train_samples(urls, seed, epoch, shuffle_buffer), wds.map(decode_sample), *stages],
        per_batch,
        device,
    )


def eval_pipeline(
    urls: list[str],
    transform: Callable,
    batch_size: int,
    with_bytes: bool = False,
    device: torch.device | str = "cpu",
) -> wds.DataPipeline:
    """Every sample of `urls` once, split by worker (not by rank): batches of
    `(images, labels, keys)`, plus the encoded image bytes when `with_bytes`.

    With one worker the order is shard order; with several, DataLoader interleaves the
    workers' batches, which is deterministic for a given worker count."""
    stages, per_batch = _transform_stages(
        transform, batch_size, partial=True, with_bytes=with_bytes
    )
    return _with_normalization(
        [
            wds.SimpleShardList(list(urls)),
            wds.split_by_worker,
            wds.tarfile_to_samples(),
            wds.map(decode_sample),
            *stages,
        ],
        per_batch,
        device,
    )


class _OnDevice:
    """Batches moved to `device` (pinned, non-blocking) and normalised there."""

    def __init__(self, loader: DataLoader, device: torch.device, normalize: BatchNormalize):
        self.loader, self.device, self.normalize = loader, device, normalize

    def __iter__(self) -> Iterator[tuple]:
        for images, *rest in self.loader:
            yield (self.normalize(images.to(self.device, non_blocking=True)), *rest)


def make_loader(
    pipeline: wds.DataPipeline, num_workers: int, device: torch.device | str = "cpu"
) -> DataLoader | _OnDevice:
    """A DataLoader over an already-batched pipeline (workers overlap decoding with compute).

    On CUDA, batches are pinned, and when the pipeline left the normalisation to the device
    (see `train_pipeline`/`eval_pipeline`) the loader yields them on the device, normalised.
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
    normalize = getattr(pipeline, "device_normalize", None)
    return loader if normalize is None else _OnDevice(loader, device, normalize)


def take(loader: DataLoader, steps: int) -> Iterator:
    """The first `steps` batches of an infinite training loader."""
    return islice(iter(loader), steps)


def iter_samples(urls: list[str]) -> Iterator[dict]:
    """Decoded samples of `urls` in shard order (no workers): for tests and small tools."""
    pipe = wds.DataPipeline(
        wds.SimpleShardList(list(urls)), wds.tarfile_to_samples(), wds.map(decode_sample)
    )
    yield from pipe


__all__ = [
    "check_shard_count",
    "decode_image",
    "decode_sample",
    "rank_shards",
    "eval_pipeline",
    "is_image_member",
    "iter_samples",
    "make_loader",
    "take",
    "train_pipeline",
    "worker_info",
]
