"""What the benchmarks share: real data (the embedded digits) written as shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ecvl.data.shards import write_manifest, write_split_shards
from ecvl.data.sources import DigitsSource


def digits_train_shards(root: Path, maxcount: int, n: int | None = None) -> Path:
    """The first `n` digits images (all 1,797 by default) as train shards with a manifest."""
    source = DigitsSource().load()
    split = source.splits["train"]
    if n is not None:
        split = split.subset(np.arange(n))
    written = write_split_shards(
        split, "train", source.classes, root, maxcount=maxcount, progress=False
    )
    write_manifest(
        root,
        {
            "classes": list(source.classes),
            "class_groups": ["many"] * len(source.classes),
            "splits": {"train": written.to_json()},
        },
    )
    return root
