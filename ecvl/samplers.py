"""Index samplers for stage II: class-balanced (marginal 1/K per class) or plain shuffled.

Both are `torch.utils.data.Sampler[int]`s that also hand out their whole epoch as an array
(`indices()`), for loops that read cached embeddings without a DataLoader. An epoch's order is
a pure function of `(seed, epoch)`: call `set_epoch(e)` before each epoch, as with
`DistributedSampler`, and a resumed run replays the same draws.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from ecvl.errors import DataError

log = logging.getLogger(__name__)


def _as_labels(labels: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise DataError(f"labels must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise DataError("no labels: cannot sample from an empty train set")
    if not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"labels must be integers, got dtype {arr.dtype}")
    if arr.min() < 0:
        raise DataError(f"labels must be >= 0, got {int(arr.min())}")
    return arr.astype(np.int64, copy=False)


def _epoch_rng(seed: int, epoch: int, stream: int = 0) -> np.random.Generator:
    # stream 0 is the plain (seed, epoch) sequence: the training order
    entropy = [int(seed), int(epoch)] + ([int(stream)] if stream else [])
    return np.random.default_rng(np.random.SeedSequence(entropy))


class _EpochSampler(Sampler[int]):
    """Shared plumbing: label checks, epoch length, `set_epoch` and iteration."""

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray | torch.Tensor,
        num_samples: int | None = None,
        seed: int = 0,
        epoch: int = 0,
        num_classes: int | None = None,
        stream: int = 0,
    ) -> None:
        self.labels = _as_labels(labels)
        top = int(self.labels.max())
        if num_classes is None:
            num_classes = top + 1
        if top >= num_classes:
            raise DataError(f"label {top} is out of range for {num_classes} classes")
        self.num_classes = int(num_classes)
        if num_samples is None:
            num_samples = len(self.labels)
        if isinstance(num_samples, bool) or int(num_samples) != num_samples or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.epoch = int(epoch)
        self.stream = int(stream)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose draws `indices()` and iteration return."""
        self.epoch = int(epoch)

    def indices(self) -> np.ndarray:
        """This epoch's `num_samples` sample indices (int64), a function of (seed, epoch)."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return self.num_samples


class ClassBalancedSampler(_EpochSampler):
    """Each draw picks a class uniformly (probability 1/K), then a sample of that class.

    Within a class, samples come from a per-class shuffled cycle (as BALLAD's code does): a
    class drawn `d` times in an epoch yields `d` consecutive items of fresh random permutations
    of its samples, so each of its samples appears `floor(d/n_c)` or `ceil(d/n_c)` times. The
    marginal of every sample is still `1/(K n_c)`, with less variance than uniform picks.

    Args:
        labels: class index of every train sample, in `[0, num_classes)`.
        num_samples: draws per epoch (default: the number of samples N).
        seed: base seed; the epoch's draws use the seed sequence `(seed, epoch)`.
        epoch: initial epoch (see `set_epoch`).
        num_classes: K (default `max(labels) + 1`); every class must have a sample.
        stream: a non-zero value draws from the seed sequence `(seed, epoch, stream)`
            instead: a second, independent sequence of draws under the same law (stage II's
            measurement pass takes its negatives from one).

    Raises:
        DataError: labels not a non-empty 1-D array of non-negative integers, a label
            `>= num_classes`, or a class without samples (which could never be drawn).
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray | torch.Tensor,
        num_samples: int | None = None,
        seed: int = 0,
        epoch: int = 0,
        num_classes: int | None = None,
        stream: int = 0,
    ) -> None:
        super().__init__(labels, num_samples, seed, epoch, num_classes, stream)
        counts = np.bincount(self.labels, minlength=self.num_classes)
        empty = np.flatnonzero(counts == 0)
        if empty.size:
            shown = ", ".join(str(c) for c in empty[:10]) + (" ..." if empty.size > 10 else "")
            raise DataError(
                f"class-balanced sampling needs a sample of every class; "
                f"{empty.size} of {self.num_classes} classes have none: {shown}"
            )
        order = np.argsort(self.labels, kind="stable")
        self._members = np.split(order, np.cumsum(counts)[:-1])

    def indices(self) -> np.ndarray:
        rng = _epoch_rng(self.seed, self.epoch, self.stream)
        classes = rng.integers(self.num_classes, size=self.num_samples)
        draws = np.bincount(classes, minlength=self.num_classes)
        # Draw positions grouped by class, in draw order: class c fills slots[start:start+d].
        slots = np.argsort(classes, kind="stable")
        out = np.empty(self.num_samples, dtype=np.int64)
        start = 0
        for c in np.flatnonzero(draws):
            members = self._members[c]
            d = int(draws[c])
            cycles = -(-d // len(members))
            cycle = np.concatenate([rng.permutation(members) for _ in range(cycles)])
            out[slots[start : start + d]] = cycle[:d]
            start += d
        return out


class InstanceSampler(_EpochSampler):
    """Plain shuffling (instance-balanced): the natural, long-tailed class frequencies.

    An epoch is a random permutation of all samples, cut to `num_samples` or extended with
    further permutations. Same arguments as `ClassBalancedSampler`; here the labels only give
    N and are range-checked, and a class without samples is fine.
    """

    def indices(self) -> np.ndarray:
        rng = _epoch_rng(self.seed, self.epoch, self.stream)
        n = len(self.labels)
        perms = -(-self.num_samples // n)
        return np.concatenate([rng.permutation(n) for _ in range(perms)])[: self.num_samples]


SAMPLERS: dict[str, type[_EpochSampler]] = {
    "balanced": ClassBalancedSampler,
    "instance": InstanceSampler,
}


def build_sampler(
    name: str,
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    *,
    num_samples: int | None = None,
    seed: int = 0,
    epoch: int = 0,
    num_classes: int | None = None,
    stream: int = 0,
) -> Sampler[int]:
    """Sampler registered under `name` ("balanced" or "instance").

    Args:
        name: registry key, see `SAMPLERS`.
        labels, num_samples, seed, epoch, num_classes, stream: as for
            `ClassBalancedSampler`.

    Returns:
        The sampler; call `set_epoch(e)` at the start of each epoch.

    Raises:
        KeyError: unknown name (the message lists the known names).
        DataError: see `ClassBalancedSampler`.
    """
    try:
        cls = SAMPLERS[name]
    except KeyError:
        raise KeyError(f"unknown sampler {name!r} (known: {', '.join(sorted(SAMPLERS))})") from None
    return cls(
        labels,
        num_samples=num_samples,
        seed=seed,
        epoch=epoch,
        num_classes=num_classes,
        stream=stream,
    )


__all__ = ["SAMPLERS", "ClassBalancedSampler", "InstanceSampler", "build_sampler"]
