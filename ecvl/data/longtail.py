"""Long-tailed profiles (CIFAR-LT convention) and the Many/Medium/Few class groups."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

GROUPS = ("many", "medium", "few")


def longtail_counts(n_max: int, num_classes: int, imbalance_factor: float) -> list[int]:
    """Per-class image counts `int(n_max * (1/IF)^(i/(K-1)))` in the natural class order.

    This is the exponential profile of Cao et al. (LDAM) used by every CIFAR-100-LT paper;
    with n_max=500 and K=100 it gives 10,847 / 12,608 / 19,573 images for IF 100 / 50 / 10.
    """
    if n_max < 1:
        raise ValueError(f"n_max must be >= 1, got {n_max}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if imbalance_factor < 1:
        raise ValueError(f"imbalance_factor must be >= 1, got {imbalance_factor}")
    if num_classes == 1:
        return [int(n_max)]
    ratio = 1.0 / imbalance_factor
    return [int(n_max * ratio ** (i / (num_classes - 1.0))) for i in range(num_classes)]


def assign_groups(counts: Sequence[int], many_above: int = 100, few_below: int = 20) -> list[str]:
    """Group of each class: 'many' (> many_above), 'few' (< few_below), else 'medium'."""
    if few_below > many_above + 1:
        raise ValueError(
            f"few_below ({few_below}) must not exceed many_above + 1 ({many_above + 1})"
        )
    return ["many" if c > many_above else "few" if c < few_below else "medium" for c in counts]


def sample_longtail(
    labels: np.ndarray, counts: Sequence[int], rng: np.random.Generator
) -> np.ndarray:
    """Indices (sorted) keeping `counts[c]` samples of each class c, chosen with `rng`.

    Raises:
        ValueError: a class has fewer samples than its target count.
    """
    labels = np.asarray(labels)
    keep = []
    for c, n in enumerate(counts):
        idx = np.flatnonzero(labels == c)
        if len(idx) < n:
            raise ValueError(
                f"class {c} has {len(idx)} samples, the long-tail profile asks for {n}"
            )
        keep.append(rng.choice(idx, size=n, replace=False) if n < len(idx) else idx)
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


def balanced_subset(
    labels: np.ndarray, per_class: int, num_classes: int, rng: np.random.Generator
) -> np.ndarray:
    """Indices (sorted) of up to `per_class` samples of each class, chosen with `rng`."""
    labels = np.asarray(labels)
    keep = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        n = min(per_class, len(idx))
        keep.append(rng.choice(idx, size=n, replace=False))
    return np.sort(np.concatenate(keep)).astype(np.int64) if keep else np.zeros(0, np.int64)
