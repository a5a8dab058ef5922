import numpy as np
import pytest

from ecvl.data.sources import LoadedSource, Split
from ecvl.data.splits import SplitPlan, carve_splits, class_membership
from ecvl.errors import DataError


def _plan(**kw) -> SplitPlan:
    """A plan that carves nothing unless `kw` says (SplitPlan's fields are all required)."""
    neutral = {
        "test_per_class": 0,
        "val_per_class": 0,
        "imbalance_factor": None,
        "n_max": None,
        "membership_imbalance_factor": None,
        "many_above": 100,
        "few_below": 20,
        "seed": 0,
    }
    return SplitPlan(**{**neutral, **kw})


def _source(per_class=30, k=4, with_test=False):
    labels = np.repeat(np.arange(k), per_class)
    images = np.zeros((len(labels), 2, 2, 3), np.uint8)
    keys = [f"s{i}" for i in range(len(labels))]
    splits = {"train": Split(keys, labels, images=images)}
    if with_test:
        splits["test"] = Split(["t0", "t1"], np.array([0, 1]), images=images[:2])
    return LoadedSource(tuple(f"c{i}" for i in range(k)), splits)


def test_holdout_then_longtail_then_val_are_disjoint():
    plan = _plan(test_per_class=5, val_per_class=4, imbalance_factor=10, n_max=20, seed=3)
    carved = carve_splits(_source(), plan)
    train, val, test = (carved.splits[s] for s in ("train", "val", "test"))
    assert np.bincount(test.labels).tolist() == [5, 5, 5, 5]
    assert np.bincount(train.labels).tolist() == carved.train_counts == [20, 9, 4, 2]
    assert np.bincount(val.labels).tolist() == [4, 4, 4, 4]
    assert not set(train.keys) & set(val.keys)
    assert not set(train.keys) & set(test.keys)
    assert not set(val.keys) & set(test.keys)


def test_carving_is_seeded():
    plan = _plan(test_per_class=5, val_per_class=4, imbalance_factor=10, n_max=20, seed=3)
    a, b = carve_splits(_source(), plan), carve_splits(_source(), plan)
    c = carve_splits(_source(), SplitPlan(**{**plan.__dict__, "seed": 4}))
    assert a.splits["train"].keys == b.splits["train"].keys
    assert a.splits["train"].keys != c.splits["train"].keys


def test_source_test_split_is_kept_and_override_wins():
    plan = _plan(test_per_class=5)
    assert carve_splits(_source(with_test=True), plan).splits["test"].keys == ["t0", "t1"]
    other = Split(["o0"], np.array([3]), images=np.zeros((1, 2, 2, 3), np.uint8))
    assert carve_splits(_source(), plan, test_override=other).splits["test"].keys == ["o0"]


def test_default_n_max_is_smallest_class():
    src = _source()
    src.splits["train"] = src.splits["train"].subset(np.arange(len(src.splits["train"]) - 5))
    carved = carve_splits(src, _plan(imbalance_factor=5))
    assert carved.train_counts[0] == 25


def test_val_short_classes_are_noted():
    carved = carve_splits(
        _source(per_class=20), _plan(imbalance_factor=10, n_max=20, val_per_class=5)
    )
    assert np.bincount(carved.splits["val"].labels).tolist() == [0, 5, 5, 5]
    assert any("fewer than 5" in n for n in carved.notes)


def test_class_without_train_sample_is_an_error():
    src = _source()
    keep = np.flatnonzero(src.splits["train"].labels != 2)
    src.splits["train"] = src.splits["train"].subset(keep)
    with pytest.raises(DataError, match="no train sample: 'c2'"):
        carve_splits(src, _plan())


def test_membership_from_reference_profile():
    plan = _plan(membership_imbalance_factor=100)
    own = [500, 300, 120, 80, 50]
    # IF-100 profile from n_max 500 over 5 classes: 500, 158, 50, 15, 5
    assert class_membership(own, plan, profile_counts=own) == [
        "many",
        "many",
        "medium",
        "few",
        "few",
    ]
    assert class_membership(own, _plan()) == ["many", "many", "many", "medium", "medium"]
