"""Build the view bank at export: E base views of every train sample through the frozen encoder.

DESIGN.md §1, "Base views and the view bank": every view of a two-view stage-II mode starts
from a base view (random resized crop + flip). Encoding E of them per sample once, at export,
makes base views free in stage II: a view that draws no RandAugment op *is* its bank row, and
one that draws ops is rebuilt from the image store with the stored crop box and flip by the
same renderer used here (`ecvl.views.ViewRenderer`, on batches on the encoder's device).

Determinism: view e of sample i draws its crop and flip from `bank_rng(seed, i, e)`, so the
bank does not depend on block sizes, threads or resume points; encoder batches are formed in
row order inside each block, so a resumed export that restarts at a block boundary encodes the
same batches as an uninterrupted one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ecvl.augment import sample_base_view
from ecvl.data.image_store import ImageStore
from ecvl.precision import autocast
from ecvl.views import ViewRenderer, stack_pixels

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
    renderer: ViewRenderer,
    device: torch.device,
    precision: str,
    batch_size: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """E base views of each sample in `rows`: their embeddings, crop boxes and flips.

    Args:
        model: the frozen open_clip model (``encode_image``), on `device`, in eval mode.
        store: the train image store.
        rows: sample indices (one block of the bank).
        views: E.
        seed: the bank's seed.
        renderer: the model's view renderer (the one stage II re-renders views with).
        device, precision: where and how the encoder runs (views are rendered there too).
        batch_size: images per encoder call.

    Returns:
        ``(features, boxes, flips)``: float32 n×E×d on the CPU (projected, not normalised),
        int32 n×E×4, bool n×E.
    """
    rows = [int(i) for i in rows]
    n = len(rows)
    pixels = [
        store.decode_pixels(i, data)
        for i, data in zip(rows, store.get_many_bytes(rows), strict=True)
    ]
    drawn = [
        sample_base_view((image.shape[1], image.shape[0]), bank_rng(seed, i, e))
        for i, image in zip(rows, pixels, strict=True)
        for e in range(views)
    ]
    boxes = np.asarray([box for box, _ in drawn], dtype=np.int32).reshape(n, views, 4)
    flips = np.asarray([flip for _, flip in drawn], dtype=bool).reshape(n, views)
    sizes = np.repeat(
        np.array([p.shape[:2] for p in pixels], dtype=np.int64).reshape(-1, 2), views, 0
    )
    plan = renderer.source_boxes(sizes, boxes.reshape(-1, 4), flips.reshape(-1))
    feats = []
    with torch.inference_mode(), autocast(device, precision):
        for a in range(0, n * views, batch_size):
            chunk = range(a, min(n * views, a + batch_size))
            images = stack_pixels([pixels[v // views] for v in chunk])
            if isinstance(images, torch.Tensor):
                images = images.to(device, non_blocking=True)
            else:
                images = [t.to(device, non_blocking=True) for t in images]
            batch = renderer.render(images, plan[a : chunk.stop])
            feats.append(model.encode_image(batch, normalize=False).float().cpu())
    out = torch.cat(feats).reshape(n, views, -1).numpy() if feats else np.zeros((0, views, 0))
    return out, boxes, flips
