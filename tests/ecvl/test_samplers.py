from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from torch.utils.data import DataLoader

from ecvl.errors import DataError
from ecvl.samplers import SAMPLERS, ClassBalancedSampler, InstanceSampler, build_sampler

# Heavily imbalanced: 1000 / 300 / 100 / 30 / 10 / 3 / 1 samples (imbalance factor 1000),
# classes interleaved in the label array.
COUNTS = [1000, 300, 100, 30, 10, 3, 1]
LABELS = np.random.default_rng(0).permutation(np.repeat(np.arange(len(COUNTS)), COUNTS))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_epoch_is_valid_indices(name: str) -> None:
    sampler = build_sampler(name, LABELS, seed=1)
    idx = list(sampler)
    assert len(idx) == len(sampler) == len(LABELS)
    assert all(isinstance(i, int) for i in idx)
    assert min(idx) >= 0 and max(idx) < len(LABELS)
    assert np.array_equal(np.array(idx), sampler.indices())


def test_balanced_class_frequencies_are_uniform() -> None:
    draws = 14_000
    sampler = ClassBalancedSampler(LABELS, num_samples=draws, seed=11, epoch=0)
    counts = np.bincount(LABELS[sampler.indices()], minlength=len(COUNTS))
    assert counts.sum() == draws
    result = chisquare(counts)  # H0: uniform over the K classes
    assert result.pvalue > 0.01, counts
    # The instance sampler keeps the long tail: the same test rejects uniformity outright.
    inst = InstanceSampler(LABELS, num_samples=draws, seed=11)
    inst_counts = np.bincount(LABELS[inst.indices()], minlength=len(COUNTS))
    assert chisquare(inst_counts).pvalue < 1e-6


def test_balanced_within_class_choice_covers_each_class() -> None:
    sampler = ClassBalancedSampler(LABELS, num_samples=7_000, seed=3)
    idx = sampler.indices()
    for c, n_c in enumerate(COUNTS):
        members = np.flatnonzero(LABELS == c)
        drawn = idx[LABELS[idx] == c]
        d = len(drawn)
        per_sample = np.bincount(drawn, minlength=len(LABELS))[members]
        # Per-class shuffled cycle: every sample appears floor(d/n_c) or ceil(d/n_c) times.
        assert per_sample.min() >= d // n_c
        assert per_sample.max() <= -(-d // n_c)
        if d >= n_c:
            assert set(drawn.tolist()) == set(members.tolist())


def test_default_epoch_length_and_custom_length() -> None:
    assert len(ClassBalancedSampler(LABELS)) == len(LABELS)
    assert len(ClassBalancedSampler(LABELS, num_samples=10).indices()) == 10
    inst = InstanceSampler(LABELS, num_samples=len(LABELS) * 2 + 5, seed=0).indices()
    assert len(inst) == len(LABELS) * 2 + 5
    # Each pass over the data is a permutation.
    assert sorted(inst[: len(LABELS)].tolist()) == list(range(len(LABELS)))
    assert np.array_equal(
        np.sort(InstanceSampler(LABELS, seed=4).indices()), np.arange(len(LABELS))
    )


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_deterministic_per_seed_and_epoch(name: str) -> None:
    a = build_sampler(name, LABELS, seed=5, epoch=2)
    b = build_sampler(name, LABELS, seed=5)
    b.set_epoch(2)
    assert np.array_equal(a.indices(), b.indices())
    assert list(a) == list(b)
    b.set_epoch(3)
    assert not np.array_equal(a.indices(), b.indices())
    c = build_sampler(name, LABELS, seed=6, epoch=2)
    assert not np.array_equal(a.indices(), c.indices())


def test_does_not_touch_global_rngs() -> None:
    np.random.seed(0)
    torch.manual_seed(0)
    np_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state()
    ClassBalancedSampler(LABELS, seed=1).indices()
    InstanceSampler(LABELS, seed=1).indices()
    assert np.array_equal(np.random.get_state()[1], np_state)
    assert torch.equal(torch.get_rng_state(), torch_state)


def test_works_as_a_dataloader_sampler() -> None:
    labels = torch.tensor([0, 0, 0, 0, 1, 2])
    sampler = ClassBalancedSampler(labels, num_samples=12, seed=0)
    loader = DataLoader(list(range(6)), batch_size=4, sampler=sampler)
    batches = [b.tolist() for b in loader]
    assert sum(batches, []) == sampler.indices().tolist()


def test_empty_class_is_an_error() -> None:
    with pytest.raises(DataError, match="2 of 4 classes have none: 1, 3"):
        ClassBalancedSampler([0, 0, 2], num_classes=4)
    with pytest.raises(DataError, match="out of range"):
        build_sampler("balanced", [0, 5], num_classes=3)
    with pytest.raises(DataError, match="out of range"):
        build_sampler("instance", [0, 5], num_classes=3)
    # Plain shuffling never needs every class.
    assert len(build_sampler("instance", [0, 0, 2], num_classes=4)) == 3


@pytest.mark.parametrize(
    ("labels", "match"),
    [([], "empty"), ([[0, 1]], "1-D"), ([0.5, 1.0], "integers"), ([0, -1], ">= 0")],
)
def test_bad_labels(labels: list, match: str) -> None:
    for cls in SAMPLERS.values():
        with pytest.raises(DataError, match=match):
            cls(np.array(labels))


def test_bad_num_samples() -> None:
    with pytest.raises(ValueError, match="num_samples"):
        ClassBalancedSampler(LABELS, num_samples=0)


def test_unknown_sampler_name_lists_known_names() -> None:
    with pytest.raises(KeyError, match="unknown sampler 'ballad'.*balanced, instance"):
        build_sampler("ballad", LABELS)
