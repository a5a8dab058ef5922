"""Running a classifier over many images: finding them, decoding them in workers, top-k.

Inputs are image files, folders (recursive; hidden entries skipped), text files listing one
image path per line (relative paths are relative to the list file), and webdataset shard tars.
A tar is indexed by its headers only; each worker then reads just the bytes of its image
members, so shards decode in parallel and in order. Members go through the shard reader's
allow-list (`ecvl.data.reader`): only image members are ever read, nothing is unpickled.

An image that cannot be read is not an error: it comes back as a failure with its reason, and
the caller lists it.
"""

from __future__ import annotations

import logging
import os
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from webdataset.tariterators import base_plus_ext

from ecvl.data.batch_norm import split_normalize
from ecvl.data.reader import decode_image, is_image_member, is_shard_image_member
from ecvl.errors import DataError
from ecvl.precision import autocast

log = logging.getLogger(__name__)

__all__ = [
    "ImageDataset",
    "ImageInput",
    "Prediction",
    "collect_inputs",
    "make_predict_loader",
    "predict_topk",
]

# webdataset's own rule for metadata members (`__key__`, ...), which its reader skips.
_TAR_META = re.compile(r"__[^/]*__($|/)")
_LIST_MAX_BYTES = 256 << 20


@dataclass(frozen=True)
class ImageInput:
    """One image to classify: a file, or an image member of a shard tar.

    Attributes:
        path: the file, or the tar, as the user named it (list entries: resolved).
        key: the webdataset sample key inside a tar; None for a file.
        offset: where the member's bytes start in the tar (-1 for a file).
        size: the member's size in bytes.
    """

    path: str
    key: str | None = None
    offset: int = -1
    size: int = 0
    ext: str = ""  # the tar member's extension; a file's comes from its name

    @property
    def extension(self) -> str:
        return self.ext or Path(self.path).suffix.lstrip(".")

    @property
    def where(self) -> str:
        return self.path if self.key is None else f"{self.path}:{self.key}"

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            if self.key is None:
                return f.read()
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise DataError(f"{self.where}: truncated tar member")
        return data


def _is_image_file(path: Path) -> bool:
    return is_image_member(path.suffix.lstrip("."))


def _walk(root: Path) -> Iterator[Path]:
    """Image files under `root`, sorted, hidden files and directories skipped."""
    for parent, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and _is_image_file(Path(name)):
                yield Path(parent) / name


def _tar_members(path: Path) -> tuple[list[ImageInput], list[str]]:
    """Image members of a shard, grouped into samples as webdataset groups them (consecutive
    members with the same key); a sample without exactly one image member is a failure."""
    samples: list[tuple[str, list[tarfile.TarInfo]]] = []
    try:
        with tarfile.open(path, mode="r:") as tar:  # plain tar: members are seekable
            for info in tar:
                if not info.isreg() or _TAR_META.match(info.name):
                    continue
                key, suffix = base_plus_ext(info.name)
                if key is None:
                    continue
                if not samples or samples[-1][0] != key:
                    samples.append((key, []))
                if is_shard_image_member(suffix):  # raw `.npy` pixels too: ECVL's shards
                    samples[-1][1].append(info)
    except (OSError, tarfile.TarError) as e:
        raise DataError(f"{path}: not a readable (uncompressed) tar: {e}") from None
    items, failed = [], []
    for key, images in samples:
        if len(images) == 1:
            ext = base_plus_ext(images[0].name)[1]
            items.append(ImageInput(str(path), key, images[0].offset_data, images[0].size, ext))
        else:
            found = sorted(base_plus_ext(i.name)[1] for i in images) or "none"
            failed.append(f"{path}:{key}: expected one image member, found {found}")
    return items, failed


def _list_file(path: Path) -> list[ImageInput]:
    if path.stat().st_size > _LIST_MAX_BYTES:
        raise DataError(f"{path}: too large for a list of image paths")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(
            f"{path}: neither an image (by its extension), a .tar shard nor a text file "
            "listing image paths"
        ) from None
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line:
            entry = Path(line)
            out.append(ImageInput(str(entry if entry.is_absolute() else path.parent / entry)))
    return out


def collect_inputs(inputs: Sequence[str | os.PathLike[str]]) -> tuple[list[ImageInput], list[str]]:
    """Every image the inputs name, in the order given (folders sorted).

    Args:
        inputs: image files, folders, list files (one path per line) and `.tar` shards.

    Returns:
        (images, failures): the images to read, and `"<tar>:<key>: <reason>"` for each tar
        sample that holds no single image member.

    Raises:
        DataError: an input does not exist, or is neither an image, a folder, a tar nor a
            text list.
    """
    items: list[ImageInput] = []
    failed: list[str] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            items += [ImageInput(str(p)) for p in _walk(path)]
        elif not path.exists():
            raise DataError(f"{path}: not found")
        elif path.suffix.lower() == ".tar":
            found, bad = _tar_members(path)
            items += found
            failed += bad
        elif _is_image_file(path):
            items.append(ImageInput(str(path)))
        else:
            items += _list_file(path)
    return items, failed


class ImageDataset(Dataset):
    """Map-style dataset over `ImageInput`s: `(index, tensor, None)` or `(index, None, reason)`.

    Args:
        items: the images.
        transform: PIL RGB image → tensor (the per-image part of the preprocess).
    """

    def __init__(self, items: Sequence[ImageInput], transform: Callable[[Any], torch.Tensor]):
        self.items = list(items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        item = self.items[index]
        try:
            return (
                index,
                self.transform(decode_image(item.read(), item.where, item.extension)),
                None,
            )
        except DataError as e:
            return index, None, str(e)
        except OSError as e:
            return index, None, f"{item.where}: {e.strerror or e}"


class _Collate:
    """Stacks the readable images of a batch (then normalises them as one tensor, see
    `ecvl.data.batch_norm`) and passes the failures through. A class, so workers can pickle it."""

    def __init__(self, per_batch: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        self.per_batch = per_batch

    def __call__(self, samples: list[tuple]) -> tuple[torch.Tensor, torch.Tensor | None, list]:
        ok = [(i, x) for i, x, _ in samples if x is not None]
        failed = [(i, reason) for i, x, reason in samples if x is None]
        index = torch.tensor([i for i, _ in ok], dtype=torch.long)
        images = torch.stack([x for _, x in ok]) if ok else None
        if images is not None and self.per_batch is not None:
            images = self.per_batch(images)
        return index, images, failed


def make_predict_loader(
    items: Sequence[ImageInput],
    preprocess: Callable[[Any], torch.Tensor],
    batch_size: int,
    num_workers: int,
    pin_memory: bool = False,
) -> DataLoader:
    """Batches `(indices, images or None, failures)` in input order; `num_workers` processes
    read and decode while the model runs. Images are preprocessed exactly as the export
    preprocesses them (per image, then normalised per batch: bit-identical)."""
    per_image, per_batch = split_normalize(preprocess)
    workers = min(num_workers, -(-len(items) // batch_size))  # no idle workers to start
    return DataLoader(
        ImageDataset(items, per_image),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_Collate(per_batch),
        pin_memory=pin_memory,
        prefetch_factor=2 if workers > 0 else None,
    )


@dataclass
class Prediction:
    """A batch's top-k: rows `indices` (into the inputs), (n, k) `classes` and `probs`."""

    indices: torch.Tensor
    classes: torch.Tensor
    probs: torch.Tensor
    failed: list[tuple[int, str]]


@torch.inference_mode()
def predict_topk(
    classifier: nn.Module,
    loader: DataLoader,
    device: torch.device,
    precision: str = "fp32",
    k: int = 5,
) -> Iterator[Prediction]:
    """Softmax probabilities of the top `k` classes for every readable image of `loader`.

    Args:
        classifier: images → logits (e.g. `ecvl.classifier.Classifier`), on `device`.
        loader: from `make_predict_loader`.
        device: where the classifier is.
        precision: `fp32`, or `bf16`/`fp16` autocast (CUDA) for the classifier's forward.
        k: classes per image (at most K).

    Yields:
        One `Prediction` per batch, on the CPU.
    """
    for index, images, failed in loader:
        if images is None:
            yield Prediction(index, torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k), failed)
            continue
        with autocast(device, precision):
            logits = classifier(images.to(device, non_blocking=True))
        probs, classes = logits.float().softmax(dim=-1).topk(min(k, logits.shape[1]), dim=-1)
        yield Prediction(index, classes.cpu(), probs.cpu(), failed)
