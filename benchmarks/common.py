"""What the benchmarks share: real data (the embedded digits) written as shards, and the
core-sharing bound that tells a missed ratio goal from a slow data path."""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import yaml

from ecvl.data.shards import write_manifest, write_split_shards
from ecvl.data.sources import DigitsSource
from ecvl.stage1 import Stage1Config


def preset_models() -> dict[str, dict]:
    """{stage-I model: {"augment": its train augmentation, "pretrained": its tag or None}} for
    params.yaml and every preset, first mention wins: the models users run, those sized for a
    CPU (trained from scratch) and the GPU ones (RN50, random init here: speed only)."""
    root = Path(__file__).resolve().parent.parent
    found: dict[str, dict] = {}
    for path in [root / "params.yaml", *sorted((root / "pipeline" / "presets").glob("*.yaml"))]:
        stage1 = yaml.safe_load(path.read_text()).get("stage1", {})
        if stage1.get("model"):
            found.setdefault(
                stage1["model"],
                {
                    "augment": stage1.get("augment", "open_clip"),
                    "pretrained": stage1.get("pretrained"),
                },
            )
    return found


def stage1_config(**overrides) -> Stage1Config:
    """Stage-I settings for a benchmark: params.yaml's values unless overridden (fp32)."""
    base = {
        "lr": 1e-3,
        "weight_decay": 0.1,
        "warmup_steps": 0,
        "grad_clip": 1.0,
        "w_i2t": 1.0,
        "w_t2i": 1.0,
        "logit_scale_max": 100.0,
        "precision": "fp32",
        "text_batch_size": None,
        "logit_offset": None,
        "label_smoothing": 0.0,
    }
    return Stage1Config(**{**base, **overrides})


def digits_train_shards(
    root: Path, maxcount: int, n: int | None = None, encoding: str = "auto"
) -> Path:
    """The first `n` digits images (all 1,797 by default) as train shards with a manifest, in
    `encoding` (`auto`, what `ecvl shard` writes for them: raw 32 px pixels)."""
    source = DigitsSource().load()
    split = source.splits["train"]
    if n is not None:
        split = split.subset(np.arange(n))
    written = write_split_shards(
        split,
        "train",
        source.classes,
        root,
        maxcount,
        max_bad_fraction=0.0,
        encoding=encoding,
        progress=False,
    )
    write_manifest(
        root,
        {
            "source_fingerprint": f"digits:{len(split)}:{encoding}",
            "classes": list(source.classes),
            "class_groups": ["many"] * len(source.classes),
            "splits": {"train": written.to_json()},
        },
    )
    return root


def core_share_bound(bare: float, data_alone: float, cores: int) -> float:
    """The best stage/bare ratio when the data path's CPU time (1/`data_alone` s per image,
    measured on one core) comes out of the same `cores` that the bare arm keeps busy at `bare`
    images/s, and the model's CPU time per image stays as in the bare arm:
    (cores / (cores/bare + 1/data_alone)) / bare."""
    return 1.0 / (1.0 + bare / (cores * data_alone))


def data_alone_images_per_s(batches: Iterable, images: int) -> float:
    """Drain a data path's `batches` (`images` in all) in this process on one torch thread: the
    data path's own speed on one core, with no model."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        for _ in batches:
            pass
        return images / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


class NoImages:
    """An image store of `n` samples that is never read: stands in for the store when every
    view a benchmark serves comes from the bank or the clean cache."""

    labels = None

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def get_many_bytes(self, indices):
        raise AssertionError("a view meant to come from the bank read the image store")
