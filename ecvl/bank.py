"""Build the view bank at export: E base views of every train sample through the frozen encoder.

DESIGN.md §1, "Base views and the view bank": every view of a two-view stage-II mode starts
from a base view (random resized crop + flip). Encoding E of them per sample once, at export,
makes base views free in stage II: a view that draws no RandAugment op *is* its bank row, and
one that draws ops is rebuilt from the image store with the stored crop box and flip
(`ecvl.augment.apply_base_view`), the same function used here.

Determinism: view e of sample i draws its crop and flip from `bank_rng(seed, i, e)`, so the
bank does not depend on block sizes, threads or resume points; encoder batches are formed in
row order inside each block, so a resumed export that restarts at a block boundary encodes the
same batches as an uninterrupted one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from torch import nn

from ecvl.augment import apply_base_view, sample_base_view
from ecvl.data.image_store import ImageStore
from ecvl.precision import autocast

log = logging.getLogger(__name__)

__all__ = ["BANK_STREAM", "bank_rng", "encode_bank_block"]

BANK_STREAM = 7  # SeedSequence stream of the bank's crops and flips


def bank_rng(seed: int, sample: int, entry: int) -> np.random.Generator:
    """The generator of bank view `entry` of train sample `sample` (its crop box and flip)."""
    return np.random.default_rng([int(seed), int(sample), int(entry), BANK_STREAM])


def encode_bank_block(
    model: nn.Module,
    store: ImageStore,
    rows: Sequence[int],
    views: int,
    seed: int,
    transform: Callable[[Image.Image], torch.Tensor],
    device: torch.device,
    precision: str,
    batch_size: int,
    num_workers: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """E base views of each sample in `rows`: their embeddings, crop boxes and flips.

    Args:
        model: the frozen open_clip model (``encode_image``), on `device`, in eval mode.
        store: the train image store.
        rows: sample indices (one block of the bank).
        views: E.
        seed: the bank's seed.
        transform: the model's eval transform (the one the export and stage II use).
        device, precision: where and how the encoder runs.
        batch_size: images per encoder call.
        num_workers: threads decoding and cropping (0: inline).

    Returns:
        ``(features, boxes, flips)``: float32 n×E×d on the CPU (projected, not normalised),
        int32 n×E×4, bool n×E.
    """
    rows = [int(i) for i in rows]
    blobs = store.get_many_bytes(rows)

    def pixels(item: tuple[int, bytes]) -> tuple[list[torch.Tensor], list, list]:
        i, data = item
        image = store.decode(i, data)
        tensors, boxes, flips = [], [], []
        for e in range(views):
            box, flip = sample_base_view(image.size, bank_rng(seed, i, e))
            tensors.append(transform(apply_base_view(image, box, flip)))
            boxes.append(box)
            flips.append(flip)
        return tensors, boxes, flips

    items = list(zip(rows, blobs, strict=True))
    if num_workers > 0:
        with ThreadPoolExecutor(num_workers, thread_name_prefix="ecvl-bank") as pool:
            done = list(pool.map(pixels, items))
    else:
        done = [pixels(item) for item in items]
    images = [t for tensors, _, _ in done for t in tensors]
    feats = []
    with torch.inference_mode(), autocast(device, precision):
        for a in range(0, len(images), batch_size):
            batch = torch.stack(images[a : a + batch_size]).to(device, non_blocking=True)
            feats.append(model.encode_image(batch, normalize=False).float().cpu())
    n = len(rows)
    out = torch.cat(feats).reshape(n, views, -1).numpy() if feats else np.zeros((0, views, 0))
    boxes = np.asarray([b for _, b, _ in done], dtype=np.int32).reshape(n, views, 4)
    flips = np.asarray([f for _, _, f in done], dtype=bool).reshape(n, views)
    return out, boxes, flips
