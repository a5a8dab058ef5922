"""Per-sample momentum loss (ECVL eq. 8) and the normalised memorisation score (eq. 9).

State lives in CPU torch tensors (float64 for the EMA, so a long run does not drift with the
batch order) and round-trips through `torch.save` / `torch.load(weights_only=True)`.

Unseen samples: a sample whose loss was never observed has no `Lm_i`. It is left out of the
mean and of the max-abs used by eq. 9 and gets the neutral score 0.5 (the mean score), so it
is augmented like an average sample until it is first drawn.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ecvl.errors import TrainingError

log = logging.getLogger(__name__)

UNSEEN_SCORE = 0.5
# Deviations this small relative to the losses' scale are rounding, not signal: all-equal.
_REL_EPS = 1e-12


class MomentumTracker:
    """EMA of every train sample's loss over epochs and the scores derived from it.

    During an epoch, `update(indices, losses)` accumulates each drawn sample's losses (a sample
    drawn several times contributes the mean of its draws, `L_i,t`). `end_epoch()` then applies
    eq. 8 to the samples drawn in that epoch: `Lm_i <- beta * Lm_i + (1 - beta) * L_i,t`, or
    `Lm_i <- L_i,t` the first time sample i is observed; samples not drawn keep their value.

    Args:
        num_samples: N, the number of train samples (indices are in `[0, N)`).
        beta: EMA momentum in [0, 1] (paper default 0.97).

    Raises:
        ValueError: non-positive `num_samples` or `beta` outside [0, 1].
    """

    def __init__(self, num_samples: int, beta: float = 0.97) -> None:
        if isinstance(num_samples, bool) or int(num_samples) != num_samples or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        beta = float(beta)
        if not (0.0 <= beta <= 1.0):
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        self.num_samples = int(num_samples)
        self.beta = beta
        self.momentum_loss = torch.zeros(self.num_samples, dtype=torch.float64)
        self.seen = torch.zeros(self.num_samples, dtype=torch.bool)
        self.epochs_ended = 0
        self._sum = torch.zeros(self.num_samples, dtype=torch.float64)
        self._count = torch.zeros(self.num_samples, dtype=torch.int64)

    def update(
        self,
        indices: torch.Tensor | np.ndarray | Sequence[int],
        losses: torch.Tensor | np.ndarray | Sequence[float],
    ) -> None:
        """Record the per-sample losses of one batch (detached; any device).

        Raises:
            ValueError: shapes differ or an index is out of range.
            TrainingError: a loss is not finite (training cannot go on).
        """
        idx = torch.as_tensor(
            indices.detach().cpu() if isinstance(indices, torch.Tensor) else np.asarray(indices)
        ).reshape(-1)
        loss = torch.as_tensor(
            losses.detach().cpu() if isinstance(losses, torch.Tensor) else np.asarray(losses)
        ).reshape(-1)
        if idx.numel() != loss.numel():
            raise ValueError(f"{idx.numel()} indices but {loss.numel()} losses")
        if idx.numel() == 0:
            return
        if idx.dtype.is_floating_point or idx.dtype == torch.bool:
            raise ValueError(f"indices must be integers, got {idx.dtype}")
        idx = idx.to(torch.int64)
        if int(idx.min()) < 0 or int(idx.max()) >= self.num_samples:
            raise ValueError(
                f"sample index out of range [0, {self.num_samples}): "
                f"{int(idx.min())}..{int(idx.max())}"
            )
        loss = loss.to(torch.float64)
        if not bool(torch.isfinite(loss).all()):
            bad = idx[~torch.isfinite(loss)][:5].tolist()
            raise TrainingError(f"non-finite per-sample loss for sample(s) {bad}")
        self._sum.index_add_(0, idx, loss)
        self._count.index_add_(0, idx, torch.ones_like(idx))

    def end_epoch(self) -> int:
        """Fold this epoch's mean losses into the EMA (eq. 8); returns how many were drawn."""
        drawn = self._count > 0
        mean = self._sum[drawn] / self._count[drawn]
        old = self.momentum_loss[drawn]
        first = ~self.seen[drawn]
        self.momentum_loss[drawn] = torch.where(
            first, mean, self.beta * old + (1.0 - self.beta) * mean
        )
        self.seen |= drawn
        self._sum.zero_()
        self._count.zero_()
        self.epochs_ended += 1
        n = int(drawn.sum())
        log.debug("epoch %d: %d of %d samples drawn", self.epochs_ended, n, self.num_samples)
        return n

    @property
    def has_scores(self) -> bool:
        """False until an epoch ended with at least one sample seen (Algorithm 2: no aug yet)."""
        return bool(self.seen.any())

    def scores(self) -> torch.Tensor | None:
        """Normalised memorisation scores `M_i` (eq. 9), float64 of shape (N,), or None.

        `M_i = 0.5 * ((Lm_i - mean) / max_j |Lm_j - mean| + 1)` over the seen samples, so scores
        are in [0, 1] with mean 0.5 among them; if all seen losses are equal every score is 0.5.
        Unseen samples get `UNSEEN_SCORE` (0.5) and do not enter the mean or the max. Returns
        None before any sample has been seen.
        """
        if not self.has_scores:
            return None
        out = torch.full((self.num_samples,), UNSEEN_SCORE, dtype=torch.float64)
        lm = self.momentum_loss[self.seen]
        centred = lm - lm.mean()
        spread = centred.abs().max()
        scale = max(1.0, float(lm.abs().max()))
        if float(spread) <= _REL_EPS * scale:
            out[self.seen] = 0.5
        else:
            out[self.seen] = (0.5 * (centred / spread + 1.0)).clamp_(0.0, 1.0)
        return out

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and numbers (loadable with `torch.load(..., weights_only=True)`)."""
        return {
            "num_samples": self.num_samples,
            "beta": self.beta,
            "epochs_ended": self.epochs_ended,
            "momentum_loss": self.momentum_loss.clone(),
            "seen": self.seen.clone(),
            "epoch_sum": self._sum.clone(),
            "epoch_count": self._count.clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a `state_dict()`, so a resumed run continues the EMA identically.

        Raises:
            TrainingError: the state is for another N or beta, or is malformed.
        """
        keys = {"num_samples", "beta", "epochs_ended", "momentum_loss", "seen"}
        missing = sorted(keys - set(state))
        if missing:
            raise TrainingError(f"momentum state lacks {missing}")
        if int(state["num_samples"]) != self.num_samples:
            raise TrainingError(
                f"momentum state is for {int(state['num_samples'])} samples, "
                f"this run has {self.num_samples}"
            )
        if float(state["beta"]) != self.beta:
            raise TrainingError(
                f"momentum state was built with beta={float(state['beta'])}, "
                f"this run uses beta={self.beta}"
            )
        n = self.num_samples
        tensors = {
            "momentum_loss": torch.float64,
            "seen": torch.bool,
            "epoch_sum": torch.float64,
            "epoch_count": torch.int64,
        }
        loaded = {}
        for key, dtype in tensors.items():
            if key not in state:  # the in-epoch accumulators are optional (saved between epochs)
                loaded[key] = torch.zeros(n, dtype=dtype)
                continue
            t = torch.as_tensor(state[key])
            if tuple(t.shape) != (n,):
                raise TrainingError(
                    f"momentum state {key!r} has shape {tuple(t.shape)}, expected ({n},)"
                )
            loaded[key] = t.to(dtype).clone()
        self.momentum_loss = loaded["momentum_loss"]
        self.seen = loaded["seen"]
        self._sum = loaded["epoch_sum"]
        self._count = loaded["epoch_count"]
        self.epochs_ended = int(state["epochs_ended"])


__all__ = ["UNSEEN_SCORE", "MomentumTracker"]
