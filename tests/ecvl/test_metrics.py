"""Long-tailed metrics against a hand-made example with every number written out."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix as sk_confusion_matrix
from sklearn.metrics import f1_score

from ecvl.errors import DataError
from ecvl.metrics import (
    classification_report,
    confusion_matrix,
    macro_f1,
    per_class_accuracy,
    to_jsonable,
)

# K = 5. Class 3 ("few") is never predicted; class 4 ("few") has no test sample but is
# predicted once (sample 5).
K = 5
GROUPS = ["many", "many", "medium", "few", "few"]
Y_TRUE = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 3])
Y_PRED = np.array([0, 0, 0, 1, 1, 4, 2, 0, 2, 0])


def test_confusion_matrix_hand_made():
    expected = np.array(
        [
            [3, 1, 0, 0, 0],
            [0, 1, 0, 0, 1],
            [1, 0, 2, 0, 0],
            [1, 0, 0, 0, 0],
            [0, 0, 0, 0, 0],
        ]
    )
    cm = confusion_matrix(Y_TRUE, Y_PRED, K)
    assert cm.dtype == np.int64
    np.testing.assert_array_equal(cm, expected)
    np.testing.assert_array_equal(cm, sk_confusion_matrix(Y_TRUE, Y_PRED, labels=range(K)))


def test_per_class_accuracy_hand_made():
    acc = per_class_accuracy(Y_TRUE, Y_PRED, K)
    np.testing.assert_allclose(acc[:4], [3 / 4, 1 / 2, 2 / 3, 0.0])
    assert math.isnan(acc[4])  # no test sample


def test_macro_f1_hand_made():
    # F1 = 2TP / (support + predicted):
    #   c0: 2*3 / (4 + 5) = 2/3    c1: 2*1 / (2 + 2) = 1/2    c2: 2*2 / (3 + 2) = 4/5
    #   c3: never predicted -> 0   c4: no test sample -> left out of the average
    expected = (2 / 3 + 1 / 2 + 4 / 5 + 0) / 4  # = 59/120
    assert macro_f1(Y_TRUE, Y_PRED, K) == pytest.approx(59 / 120)
    assert macro_f1(Y_TRUE, Y_PRED, K) == pytest.approx(expected)
    sk = f1_score(Y_TRUE, Y_PRED, labels=np.unique(Y_TRUE), average="macro", zero_division=0)
    assert macro_f1(Y_TRUE, Y_PRED, K) == pytest.approx(sk)
    # scikit-learn's default (classes in y_true ∪ y_pred) would count c4 as a 0: 59/150.
    assert f1_score(Y_TRUE, Y_PRED, average="macro", zero_division=0) == pytest.approx(59 / 150)


def test_classification_report_hand_made():
    r = classification_report(Y_TRUE, Y_PRED, GROUPS, K)
    # many = classes 0, 1: 6 samples, 3 + 1 correct. medium = class 2: 3 samples, 2 correct.
    # few = classes 3, 4: 1 sample, 0 correct. all: 6 of 10.
    assert r["many_acc"] == pytest.approx(4 / 6)
    assert r["medium_acc"] == pytest.approx(2 / 3)
    assert r["few_acc"] == 0.0
    assert r["all_acc"] == pytest.approx(0.6)
    assert r["macro_f1"] == pytest.approx(59 / 120)
    assert (r["many_n"], r["medium_n"], r["few_n"], r["all_n"]) == (6, 3, 1, 10)
    # Sample convention, not the mean of per-class accuracies ((3/4 + 1/2) / 2 = 0.625).
    assert r["many_acc"] != pytest.approx(0.625)


def test_empty_group_is_nan_and_json_null():
    groups = ["many", "many", "medium", "medium", "medium"]
    r = classification_report(Y_TRUE, Y_PRED, groups, K)
    assert math.isnan(r["few_acc"])
    assert r["few_n"] == 0
    out = to_jsonable(r)
    assert out["few_acc"] is None
    assert out["many_acc"] == pytest.approx(4 / 6)
    text = json.dumps(out, allow_nan=False)  # valid JSON, no NaN token
    assert json.loads(text)["few_acc"] is None


def test_empty_test_set_is_nan():
    r = classification_report([], [], GROUPS, K)
    assert all(math.isnan(r[k]) for k in ("many_acc", "medium_acc", "few_acc", "all_acc"))
    assert math.isnan(r["macro_f1"])
    assert r["all_n"] == 0


def test_to_jsonable_converts_numpy_and_nested_nan():
    obj = {
        "a": np.float32(0.5),
        "b": [np.nan, np.inf, 1.0],
        "c": np.array([1.0, np.nan]),
        "d": (np.int64(3), True),
        "e": {"f": float("-inf")},
    }
    assert to_jsonable(obj) == {
        "a": 0.5,
        "b": [None, None, 1.0],
        "c": [1.0, None],
        "d": [3, True],
        "e": {"f": None},
    }


def test_random_cross_check_with_sklearn():
    rng = np.random.default_rng(0)
    k = 12
    y_true = rng.integers(0, k - 2, size=300)  # the last two classes have no sample
    y_pred = np.where(rng.random(300) < 0.6, y_true, rng.integers(0, k, size=300))
    sk = f1_score(y_true, y_pred, labels=np.unique(y_true), average="macro", zero_division=0)
    assert macro_f1(y_true, y_pred, k) == pytest.approx(sk)
    r = classification_report(y_true, y_pred, ["many"] * 4 + ["medium"] * 4 + ["few"] * 4, k)
    assert r["all_acc"] == pytest.approx(np.mean(y_true == y_pred))


@pytest.mark.parametrize(
    ("y_true", "y_pred", "groups", "match"),
    [
        ([0, 1], [0, 5], GROUPS, r"y_pred\[1\] = 5"),
        ([0, -1], [0, 1], GROUPS, r"y_true\[1\] = -1"),
        ([0, 1], [0], GROUPS, "2 samples but y_pred has 1"),
        ([0.0, 1.0], [0, 1], GROUPS, "integer"),
        ([0, 1], [0, 1], GROUPS[:4], "one per class"),
        ([0, 1], [0, 1], ["many", "head", "few", "few", "few"], "head"),
    ],
)
def test_bad_input_raises_data_error(y_true, y_pred, groups, match):
    with pytest.raises(DataError, match=match):
        classification_report(y_true, y_pred, groups, K)
