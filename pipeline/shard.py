"""Stage `shard`: source data → long-tailed train/val/test → webdataset shards + meta.json."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path

from ecvl.data.shards import write_manifest, write_split_shards
from ecvl.data.splits import SplitPlan, carve_splits, check_train_counts, class_membership
from ecvl.errors import DataError
from pipeline.io import atomic_dir
from pipeline.params import Params
from pipeline.schema import to_plain

log = logging.getLogger(__name__)


def run(params: Params) -> None:
    p = params.shard
    _warn_outside_raw(params)
    source = p.source.load()
    test_override = None
    if p.test_source is not None:
        other = p.test_source.load()
        if "test" not in other.splits:
            raise DataError(f"shard.test_source ({p.test_source.name}): it has no test split")
        if other.classes != source.classes:
            raise DataError(
                f"shard.test_source ({p.test_source.name}): its class names differ from the "
                "train source's"
            )
        test_override = other.splits["test"]
    plan = SplitPlan(
        test_per_class=p.test_per_class,
        val_per_class=p.val_per_class,
        imbalance_factor=p.imbalance_factor,
        n_max=p.n_max,
        membership_imbalance_factor=p.membership_imbalance_factor,
        many_above=p.many_above,
        few_below=p.few_below,
        seed=params.base.seed,
    )
    carved = carve_splits(source, plan, test_override)
    _log_reshaping(source, carved, p)

    with atomic_dir(params.paths.shards) as tmp:
        written = {
            name: write_split_shards(
                split,
                name,
                carved.classes,
                tmp,
                p.maxcount,
                p.max_bad_fraction,
                encoding=p.encoding,
                progress=params.base.progress,
            )
            for name, split in carved.splits.items()
        }
        counts = written["train"].per_class
        check_train_counts(counts, carved.classes)
        groups = class_membership(counts, plan, carved.profile_counts)
        fingerprint = hashlib.sha256(
            "".join(f"{n}:{w.fingerprint};" for n, w in sorted(written.items())).encode()
        ).hexdigest()
        write_manifest(
            tmp,
            {
                "source": {"name": p.source.name, **to_plain(p.source)},
                "test_source": None
                if p.test_source is None
                else {"name": p.test_source.name, **to_plain(p.test_source)},
                "classes": list(carved.classes),
                "num_classes": len(carved.classes),
                "imbalance_factor": p.imbalance_factor,
                "imbalance_ratio": max(counts) / min(counts),
                "profile_counts": carved.profile_counts,
                "group_thresholds": {"many_above": p.many_above, "few_below": p.few_below},
                "membership_imbalance_factor": p.membership_imbalance_factor,
                "class_groups": groups,
                "groups": {
                    g: [c for c, x in enumerate(groups) if x == g]
                    for g in ("many", "medium", "few")
                },
                "splits": {name: w.to_json() for name, w in written.items()},
                "source_fingerprint": fingerprint,
                "notes": carved.notes,
            },
        )
    _warn_degenerate(written, carved.classes)
    sizes = ", ".join(f"{n} {w.count}" for n, w in written.items())
    many, medium, few = (groups.count(g) for g in ("many", "medium", "few"))
    log.info(
        "wrote %s: %s images; %d classes (many %d / medium %d / few %d), imbalance ratio %.1f",
        params.paths.shards,
        sizes,
        len(carved.classes),
        many,
        medium,
        few,
        max(counts) / min(counts),
    )


def _log_reshaping(source, carved, p) -> None:
    """One line when train is not the source's train split as it is: a test split held out of
    it, or a long tail drawn from it (the embedded default does both), so that a user's own data
    is never subsampled without a word."""
    total, kept = len(source.splits["train"]), len(carved.splits["train"])
    if kept == total:
        return
    steps, remedies = [], []  # what happened; how to avoid it
    if "test" not in source.splits and p.test_source is None and p.test_per_class > 0:
        steps.append(
            f"{len(carved.splits['test']):,} held out as test (test_per_class {p.test_per_class})"
        )
        remedies.append("a source with a test split of its own has none held out")
    if p.imbalance_factor is not None:
        counts, rest = carved.train_counts, " from the rest" if steps else ""
        n_max = "null" if p.n_max is None else p.n_max
        steps.append(
            f"a long tail drawn{rest} (imbalance_factor {p.imbalance_factor:g}, n_max {n_max}: "
            f"{max(counts)} down to {min(counts)} per class)"
        )
        remedies.insert(0, "shard.imbalance_factor: null skips the long tail")
    log.info(
        "kept %s of the source's %s train images: %s. To keep more: %s",
        f"{kept:,}",
        f"{total:,}",
        ", then ".join(steps),
        "; ".join(remedies),
    )


def _warn_degenerate(written: dict, classes: tuple[str, ...]) -> None:
    """Data that shards fine but makes the numbers meaningless: the same image bytes in train
    and in an evaluation split (leakage: those images are scored on memory), or one class
    (every prediction is right)."""
    train = set(written["train"].digests)
    for name in ("val", "test"):
        if name in written:
            shared = sum(d in train for d in written[name].digests)
            if shared:
                log.warning(
                    "%d of %d %s image(s) have the same bytes as a train image (leakage: "
                    "accuracy on them measures memory); remove the copies from the source",
                    shared,
                    written[name].count,
                    name,
                )
    if len(classes) == 1:
        log.warning(
            "only one class (%r): every prediction is that class, so accuracy is meaningless; "
            "give the source at least two classes",
            classes[0],
        )


def _warn_outside_raw(params: Params) -> None:
    """DVC watches `paths.raw` only: source files elsewhere change without a re-shard."""
    raw = params.paths.raw.resolve()
    for key in ("source", "test_source"):
        source = getattr(params.shard, key)
        for f in dataclasses.fields(source) if source is not None else ():
            value = getattr(source, f.name)
            if isinstance(value, Path) and not value.resolve().is_relative_to(raw):
                log.warning(
                    "shard.%s.%s (%s) is outside paths.raw (%s): `dvc repro` will not notice "
                    "when it changes; set paths.raw to a folder that holds it",
                    key,
                    f.name,
                    value,
                    params.paths.raw,
                )
