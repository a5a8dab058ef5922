"""Long-tailed classification metrics: Many/Medium/Few/All accuracy, macro F1, per class.

Conventions (those of the long-tailed literature: OLTR, BALLAD, LIFT, BCL):

- Accuracies are fractions in [0, 1], never percent.
- A group's accuracy is the accuracy over the *test samples* whose true class belongs to the
  group (correct / samples), not the mean of per-class accuracies. On the usual balanced test
  sets the two agree; on an unbalanced test set they differ, and this is the one papers report.
- Macro F1 averages the per-class F1 over the classes that have at least one test sample. A
  class that has samples but is never predicted has precision 0/0, counted as 0 (scikit-learn's
  ``zero_division=0``), hence F1 0. A class with no test sample is left out of the average even
  if it is predicted; its false positives still lower the recall of the true classes. This
  equals ``sklearn.metrics.f1_score(y_true, y_pred, labels=np.unique(y_true), average="macro",
  zero_division=0)``.
- A quantity with nothing to average (an empty group, an empty test set) is NaN. JSON has no
  NaN: pass results through `to_jsonable`, which writes it as ``null``.

Everything is plain numpy so that the numbers do not depend on scikit-learn's version.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ecvl.data.longtail import GROUPS
from ecvl.errors import DataError

__all__ = [
    "classification_report",
    "confusion_matrix",
    "macro_f1",
    "per_class_accuracy",
    "spearman",
    "to_jsonable",
]


# The columns of the paper's tables, in their order.
SUMMARY_KEYS = ("many_acc", "medium_acc", "few_acc", "all_acc", "macro_f1")


def _labels(values: Any, name: str, num_classes: int) -> np.ndarray:
    """1-D int64 class indices, every one in [0, num_classes)."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise DataError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{name} must hold integer class indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    bad = (arr < 0) | (arr >= num_classes)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{name}[{i}] = {int(arr[i])} is not a class index in [0, {num_classes}) "
            f"({int(bad.sum())} such values)"
        )
    return arr


def _pair(y_true: Any, y_pred: Any, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    t = _labels(y_true, "y_true", num_classes)
    p = _labels(y_pred, "y_pred", num_classes)
    if t.shape != p.shape:
        raise DataError(f"y_true has {t.size} samples but y_pred has {p.size}")
    return t, p


def confusion_matrix(y_true: Any, y_pred: Any, num_classes: int) -> np.ndarray:
    """Counts of (true class, predicted class) pairs.

    Args:
        y_true: true class index per sample.
        y_pred: predicted class index per sample.
        num_classes: K; every class gets a row and a column, sampled or not.

    Returns:
        int64 K×K array, rows = true class, columns = predicted class (scikit-learn's layout).

    Raises:
        DataError: lengths differ or an index is outside [0, K).
    """
    t, p = _pair(y_true, y_pred, num_classes)
    flat = np.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).astype(np.int64, copy=False)


def per_class_accuracy(y_true: Any, y_pred: Any, num_classes: int) -> np.ndarray:
    """Accuracy (recall) of each class over its own test samples.

    Returns:
        float64 array of length K; NaN for a class with no test sample.

    Raises:
        DataError: lengths differ or an index is outside [0, K).
    """
    t, p = _pair(y_true, y_pred, num_classes)
    support = np.bincount(t, minlength=num_classes)
    correct = np.bincount(t[t == p], minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, correct / np.maximum(support, 1), np.nan)


def macro_f1(y_true: Any, y_pred: Any, num_classes: int) -> float:
    """Macro F1 over the classes present in `y_true` (module docstring); NaN if none is.

    Counted per class in O(N + K), without the K×K confusion matrix (8 MB at K = 1,000,
    allocated for every row of every results table)."""
    t, p = _pair(y_true, y_pred, num_classes)
    tp = np.bincount(t[t == p], minlength=num_classes).astype(np.float64)
    support = np.bincount(t, minlength=num_classes)
    predicted = np.bincount(p, minlength=num_classes)
    present = support > 0
    if not present.any():
        return math.nan
    # 2TP / (2TP + FP + FN) is the harmonic mean of precision and recall, and is 0 when TP = 0,
    # which is scikit-learn's value for a never-predicted class; the denominator is > 0 for
    # every present class.
    f1 = 2.0 * tp[present] / (support[present] + predicted[present])
    return float(f1.mean())


def _group_array(groups: Sequence[str], num_classes: int) -> np.ndarray:
    g = np.asarray(list(groups), dtype=object)
    if g.shape != (num_classes,):
        raise DataError(f"groups has {g.size} entries, expected one per class ({num_classes})")
    unknown = sorted({str(x) for x in g} - set(GROUPS))
    if unknown:
        raise DataError(f"groups holds unknown group name(s) {unknown}; known: {list(GROUPS)}")
    return g


def classification_report(
    y_true: Any, y_pred: Any, groups: Sequence[str], num_classes: int
) -> dict[str, float | int]:
    """Many/Medium/Few/All accuracy and macro F1 in the paper's layout.

    Args:
        y_true: true class index per test sample.
        y_pred: predicted class index per test sample.
        groups: group of each class ("many", "medium" or "few"), length K, as in `meta.json`.
        num_classes: K.

    Returns:
        Flat dict: ``many_acc``, ``medium_acc``, ``few_acc``, ``all_acc`` (fractions; NaN when
        the group has no test sample), ``macro_f1`` and the sample counts ``many_n``,
        ``medium_n``, ``few_n``, ``all_n``. See the module docstring for the conventions.

    Raises:
        DataError: lengths differ, an index is outside [0, K), or `groups` does not name one
            known group per class.
    """
    t, p = _pair(y_true, y_pred, num_classes)
    g = _group_array(groups, num_classes)
    correct = t == p
    sample_group = g[t] if t.size else np.zeros(0, dtype=object)
    report: dict[str, float | int] = {}
    for name in GROUPS:
        mask = sample_group == name
        n = int(mask.sum())
        report[f"{name}_acc"] = float(correct[mask].mean()) if n else math.nan
        report[f"{name}_n"] = n
    report["all_acc"] = float(correct.mean()) if t.size else math.nan
    report["all_n"] = int(t.size)
    report["macro_f1"] = macro_f1(t, p, num_classes)
    return report


def spearman(x: Any, y: Any) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN when either side is constant
    or there are fewer than two pairs. Used for the stage-II diagnostic "class mean memorisation
    score against class train count"."""
    a, b = np.asarray(x, dtype=np.float64).reshape(-1), np.asarray(y, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"spearman needs two equal-length sequences, got {a.size} and {b.size}")
    if a.size < 2:
        return math.nan
    ra, rb = _average_ranks(a), _average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra * ra).sum()) * float((rb * rb).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else math.nan


def _average_ranks(a: np.ndarray) -> np.ndarray:
    _, inverse, counts = np.unique(a, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + ends - 1) / 2.0)[inverse]


def to_jsonable(obj: Any) -> Any:
    """`obj` with NaN/inf floats as None and numpy/torch scalars and arrays as Python values.

    `json.dumps` would otherwise write ``NaN``, which is not JSON and breaks `dvc metrics`.
    """
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.generic) or (
        callable(getattr(obj, "item", None)) and hasattr(obj, "dim")
    ):
        obj = obj.item()  # numpy scalar, or a one-element torch tensor
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
