import numpy as np
import pytest

from ecvl.data.longtail import assign_groups, balanced_subset, longtail_counts, sample_longtail


@pytest.mark.parametrize("imf,total", [(100, 10847), (50, 12608), (10, 19573)])
def test_cifar100_lt_totals(imf, total):
    counts = longtail_counts(500, 100, imf)
    assert sum(counts) == total
    assert counts[0] == 500
    assert counts[-1] == int(500 / imf)


def test_counts_follow_formula():
    counts = longtail_counts(500, 100, 100)
    for i in (0, 1, 37, 50, 98, 99):
        assert counts[i] == int(500 * (1 / 100) ** (i / 99))
    assert all(a >= b for a, b in zip(counts, counts[1:], strict=False))


def test_membership_rule_if100():
    counts = longtail_counts(500, 100, 100)
    groups = assign_groups(counts)
    # CIFAR-100-LT IF 100: 35 Many (> 100), 35 Medium (20..100), 30 Few (< 20)
    assert (groups.count("many"), groups.count("medium"), groups.count("few")) == (35, 35, 30)
    assert assign_groups([101, 100, 20, 19]) == ["many", "medium", "medium", "few"]


def test_if10_has_no_few_group_on_its_own_counts():
    assert "few" not in assign_groups(longtail_counts(500, 100, 10))


def test_sample_longtail_exact_counts_and_seeded():
    labels = np.repeat(np.arange(5), 30)
    counts = longtail_counts(30, 5, 10)
    a = sample_longtail(labels, counts, np.random.default_rng(0))
    b = sample_longtail(labels, counts, np.random.default_rng(0))
    c = sample_longtail(labels, counts, np.random.default_rng(1))
    assert np.bincount(labels[a], minlength=5).tolist() == counts
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_sample_longtail_too_few_images():
    with pytest.raises(ValueError, match="class 1 has 3 samples"):
        sample_longtail(np.array([0] * 10 + [1] * 3), [5, 4], np.random.default_rng(0))


def test_balanced_subset_caps_at_available():
    labels = np.array([0] * 10 + [1] * 2)
    idx = balanced_subset(labels, 4, 2, np.random.default_rng(0))
    assert np.bincount(labels[idx]).tolist() == [4, 2]


@pytest.mark.parametrize("bad", [dict(n_max=0), dict(num_classes=0), dict(imbalance_factor=0.5)])
def test_longtail_counts_rejects_bad_args(bad):
    args = dict(n_max=10, num_classes=3, imbalance_factor=2) | bad
    with pytest.raises(ValueError):
        longtail_counts(**args)
