"""Carve the experiment's train/val/test splits out of what a source provides.

Order matters and is fixed: a balanced test split is held out first (when the source has none
and one is asked for), the long-tailed train set is drawn from what is left, and a balanced
validation split is taken from the images the long tail did not keep. Each step has its own
seeded random stream, so changing one step's setting does not reshuffle the others.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from ecvl.data.longtail import assign_groups, balanced_subset, longtail_counts, sample_longtail
from ecvl.data.sources import LoadedSource, Split
from ecvl.errors import DataError

log = logging.getLogger(__name__)

_STREAM = {"test": 1, "longtail": 2, "val": 3, "order": 4}


@dataclass(frozen=True)
class SplitPlan:
    """How to derive the splits.

    Attributes:
        test_per_class: images per class held out as a balanced test split, when the source
            has no test split of its own (0: none).
        val_per_class: images per class for a balanced validation split drawn from the train
            images the long tail did not keep, when the source has no val split (0: none).
        imbalance_factor: the long-tail profile's n_max / n_min; None keeps train as it is
            (for sources that are long-tailed already, e.g. ImageNet-LT).
        n_max: images of the head class; None takes the smallest class count available, the
            largest n_max every class can satisfy.
        membership_imbalance_factor: compute Many/Medium/Few membership from the profile at
            this imbalance factor instead of the actual counts (LIFT keeps IF-100 membership
            for CIFAR-100-LT IF 50 / 10); None uses the actual train counts.
        many_above: a class with more train images than this is Many.
        few_below: a class with fewer train images than this is Few.
        seed: seed of every random choice.
    """

    test_per_class: int
    val_per_class: int
    imbalance_factor: float | None
    n_max: int | None
    membership_imbalance_factor: float | None
    many_above: int
    few_below: int
    seed: int


@dataclass
class CarvedSplits:
    """The experiment's splits and what the carving decided."""

    classes: tuple[str, ...]
    splits: dict[str, Split]
    train_counts: list[int]
    profile_counts: list[int] | None = None
    notes: list[str] = field(default_factory=list)


def _rng(seed: int, stream: str) -> np.random.Generator:
    return np.random.default_rng([seed, _STREAM[stream]])


def _complement(n: int, taken: np.ndarray) -> np.ndarray:
    mask = np.ones(n, dtype=bool)
    mask[taken] = False
    return np.flatnonzero(mask)


def carve_splits(
    source: LoadedSource, plan: SplitPlan, test_override: Split | None = None
) -> CarvedSplits:
    """Apply `plan` to `source`; `test_override` replaces the test split (another source).

    Raises:
        DataError: a class ends up with no train image, or the profile asks for more images
            than a class has.
    """
    k = len(source.classes)
    if "train" not in source.splits:
        raise DataError("the source has no train split")
    pool = source.splits["train"]
    test = test_override if test_override is not None else source.splits.get("test")
    val = source.splits.get("val")
    notes = []

    if test is None and plan.test_per_class > 0:
        idx = balanced_subset(pool.labels, plan.test_per_class, k, _rng(plan.seed, "test"))
        test = pool.subset(idx)
        pool = pool.subset(_complement(len(pool), idx))
        notes.append(f"test: {plan.test_per_class} per class held out of the source's train split")
        _check_left_for_train(source, pool, plan.test_per_class)

    pool_counts = np.bincount(pool.labels, minlength=k)
    profile = None
    if plan.imbalance_factor is not None:
        n_max = plan.n_max if plan.n_max is not None else int(pool_counts.min())
        profile = longtail_counts(n_max, k, plan.imbalance_factor)
        try:
            idx = sample_longtail(pool.labels, profile, _rng(plan.seed, "longtail"))
        except ValueError as e:
            raise DataError(f"long-tail profile (n_max={n_max}): {e}") from None
        leftover = pool.subset(_complement(len(pool), idx))
        train = pool.subset(idx)
    else:
        train, leftover = pool, pool.subset(np.zeros(0, dtype=np.int64))

    if val is None and plan.val_per_class > 0:
        idx = balanced_subset(leftover.labels, plan.val_per_class, k, _rng(plan.seed, "val"))
        val = leftover.subset(idx)
        if len(val) == 0:
            why = (
                "imbalance_factor is null, so train keeps every image"
                if plan.imbalance_factor is None
                else "the long tail kept every image"
            )
            raise DataError(
                f"val_per_class={plan.val_per_class}: no image is left for a val split ({why}); "
                "give the source a val split or set val_per_class: 0"
            )
        short = np.flatnonzero(np.bincount(val.labels, minlength=k) < plan.val_per_class)
        if len(short):
            msg = (
                f"val: {len(short)} class(es) had fewer than {plan.val_per_class} images left "
                f"after the long tail (e.g. {source.classes[short[0]]!r}); they get what is left"
            )
            log.warning(msg)
            notes.append(msg)

    counts = np.bincount(train.labels, minlength=k).tolist()
    check_train_counts(counts, source.classes)

    # Train is written in a seeded random order, so that streaming readers with a bounded
    # shuffle buffer still see every class early; val/test keep the source order.
    train = train.subset(_rng(plan.seed, "order").permutation(len(train)))
    splits = {"train": train}
    if val is not None:
        splits["val"] = val
    if test is not None:
        splits["test"] = test
    return CarvedSplits(source.classes, splits, counts, profile, notes)


def _check_left_for_train(source: LoadedSource, pool: Split, test_per_class: int) -> None:
    """Name the test hold-out when it took every image of a class (else the only message is a
    class without train samples, which does not say where they went)."""
    k = len(source.classes)
    left = np.bincount(pool.labels, minlength=k)
    emptied = [c for c in range(k) if left[c] == 0]
    if emptied:
        total = np.bincount(source.splits["train"].labels, minlength=k)
        c = emptied[0]
        raise DataError(
            f"test_per_class={test_per_class} held out every image of {len(emptied)} class(es) "
            f"for the test split (e.g. {source.classes[c]!r} has {int(total[c])}): none left to "
            "train on; lower test_per_class or give the source a test split"
        )


def check_train_counts(counts: list[int], classes: tuple[str, ...]) -> None:
    """Raise DataError naming the classes without a train image (they could never be learned)."""
    empty = [classes[c] for c in range(len(classes)) if counts[c] == 0]
    if empty:
        raise DataError(
            f"{len(empty)} class(es) have no train sample: {', '.join(map(repr, empty[:5]))}"
            + (" ..." if len(empty) > 5 else "")
        )


def class_membership(
    train_counts: list[int], plan: SplitPlan, profile_counts: list[int] | None = None
) -> list[str]:
    """Many/Medium/Few of each class, from the actual counts or from the profile at
    `plan.membership_imbalance_factor` (so IF-50/10 runs keep IF-100 membership)."""
    basis = train_counts
    if plan.membership_imbalance_factor is not None:
        n_max = profile_counts[0] if profile_counts else max(train_counts)
        basis = longtail_counts(n_max, len(train_counts), plan.membership_imbalance_factor)
    return assign_groups(basis, plan.many_above, plan.few_below)
