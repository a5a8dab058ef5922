"""What stage II trains from, opened and cross-checked once: the export's train embeddings, its
view bank and the train image store.

The three are written by one export pass and index the same samples in the same order; a
mismatch (a store from another export, a bank of another N) would silently pair a sample's
embedding with another sample's pixels, so it is refused here, before any training.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ecvl.data.embeddings import (
    BANK_MEMORY_BYTES,
    Embeddings,
    SplitData,
    ViewBank,
    open_embeddings,
)
from ecvl.data.image_store import ImageStore
from ecvl.errors import DataError

log = logging.getLogger(__name__)

__all__ = ["TrainCaches", "open_train_caches"]


@dataclass(frozen=True)
class TrainCaches:
    """The validated train caches.

    Attributes:
        embeddings: the whole embedding store (val/test splits, text features, attributes).
        train: the train split, loaded (N×d float16 features, labels, keys).
        store: the train image store, same order.
        bank: the view bank (read lazily), or None when the export banked no views.
    """

    embeddings: Embeddings
    train: SplitData
    store: ImageStore
    bank: ViewBank | None

    @property
    def num_samples(self) -> int:
        return len(self.train)

    @property
    def bank_views(self) -> int:
        """E, or 0 without a bank."""
        return 0 if self.bank is None else self.bank.num_views


def open_train_caches(
    embeddings: str | os.PathLike[str],
    image_store: str | os.PathLike[str],
    *,
    bank_memory: int | None = BANK_MEMORY_BYTES,
) -> TrainCaches:
    """Open the embedding store, its view bank and the image store, and check they agree.

    The bank is loaded into memory when its features take at most `bank_memory` bytes (None:
    always), else read from disk per batch of samples (`Embeddings.bank`).

    Raises:
        DataError: a store is missing, incomplete or malformed; the image store holds another
            number of images or lists the samples in another order than the embeddings; the
            bank describes another number of samples or another width. The message names
            the paths.
    """
    emb_path, store_path = Path(embeddings), Path(image_store)
    emb = open_embeddings(emb_path, splits=("train",))
    train = emb.split("train")
    store = ImageStore(store_path)
    n = len(train)
    if len(store) != n:
        raise DataError(
            f"{store_path} holds {len(store)} images but {emb_path} has {n} train rows "
            "(re-run the export)"
        )
    if not np.array_equal(np.asarray(store.keys, dtype=object), np.asarray(train.keys)):
        raise DataError(
            f"{store_path} and {emb_path} list the train samples in a different order "
            "(re-run the export)"
        )
    bank = emb.bank(max_memory=bank_memory) if emb.bank_views else None
    if bank is not None and (bank.num_samples, bank.dim) != (n, emb.embed_dim):
        raise DataError(
            f"{bank.path} holds views of {bank.num_samples} samples of width {bank.dim}, "
            f"{emb_path} has {n} train rows of width {emb.embed_dim} (re-run the export)"
        )
    log.info(
        "train caches: %d samples, d=%d, %d bank views each, images in %s",
        n,
        emb.embed_dim,
        0 if bank is None else bank.num_views,
        store_path,
    )
    return TrainCaches(emb, train, store, bank)
