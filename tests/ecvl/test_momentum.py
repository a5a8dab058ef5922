from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from ecvl.errors import TrainingError
from ecvl.momentum import UNSEEN_SCORE, MomentumTracker


def _close(actual: torch.Tensor | None, expected: list[float]) -> None:
    assert actual is not None
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float64))


def test_hand_worked_example() -> None:
    """Four samples, beta = 0.5, three epochs; every number below is worked out by hand."""
    tracker = MomentumTracker(4, beta=0.5)
    assert not tracker.has_scores and tracker.scores() is None

    # Epoch 0: samples 0, 1, 2 drawn; sample 1 twice (losses 2 and 4 -> L = 3); 3 not drawn.
    tracker.update([0, 1], torch.tensor([1.0, 2.0]))
    tracker.update(np.array([1, 2]), [4.0, 5.0])
    assert tracker.scores() is None  # nothing folded in before the epoch ends
    assert tracker.end_epoch() == 3
    # First value rule: Lm = L_i,0.  Lm = [1, 3, 5, -]
    _close(tracker.momentum_loss[:3], [1.0, 3.0, 5.0])
    assert tracker.seen.tolist() == [True, True, True, False]
    # Eq. 9 over the seen samples: mean 3, max |Lm - mean| = 2
    # M = 0.5 * ((Lm - 3) / 2 + 1) = [0, 0.5, 1]; unseen sample 3 -> 0.5.
    _close(tracker.scores(), [0.0, 0.5, 1.0, 0.5])

    # Epoch 1: sample 0 loss 3 (EMA), sample 3 loss 2 (first value); 1 and 2 not drawn.
    tracker.update([3, 0], [2.0, 3.0])
    tracker.end_epoch()
    # Lm_0 = 0.5 * 1 + 0.5 * 3 = 2; Lm_1 = 3, Lm_2 = 5 kept; Lm_3 = 2.  Lm = [2, 3, 5, 2]
    _close(tracker.momentum_loss, [2.0, 3.0, 5.0, 2.0])
    # mean 3, max |Lm - mean| = 2 -> M = 0.5 * ([-1, 0, 2, -1] / 2 + 1) = [0.25, 0.5, 1, 0.25]
    _close(tracker.scores(), [0.25, 0.5, 1.0, 0.25])

    # Epoch 2: sample 2 drawn three times (losses 1, 1, 4 -> L = 2), sample 1 loss 7.
    tracker.update([2, 2, 1, 2], [1.0, 1.0, 7.0, 4.0])
    tracker.end_epoch()
    # Lm_1 = 0.5 * 3 + 0.5 * 7 = 5; Lm_2 = 0.5 * 5 + 0.5 * 2 = 3.5.  Lm = [2, 5, 3.5, 2]
    _close(tracker.momentum_loss, [2.0, 5.0, 3.5, 2.0])
    # mean 12.5 / 4 = 3.125, deviations [-1.125, 1.875, 0.375, -1.125], max abs 1.875
    # M = 0.5 * (dev / 1.875 + 1) = [0.2, 1.0, 0.6, 0.2]
    _close(tracker.scores(), [0.2, 1.0, 0.6, 0.2])
    assert tracker.epochs_ended == 3


def test_default_beta_097() -> None:
    tracker = MomentumTracker(2)
    tracker.update([0, 1], [1.0, 1.0])
    tracker.end_epoch()
    tracker.update([0], [2.0])
    tracker.end_epoch()
    # 0.97 * 1 + 0.03 * 2 = 1.03
    _close(tracker.momentum_loss, [1.03, 1.0])


def test_not_drawn_sample_keeps_its_value_over_epochs() -> None:
    tracker = MomentumTracker(3, beta=0.9)
    tracker.update([0, 1, 2], [1.0, 2.0, 3.0])
    tracker.end_epoch()
    for _ in range(5):
        tracker.update([0, 2], [9.0, 9.0])
        tracker.end_epoch()
    assert tracker.momentum_loss[1].item() == 2.0
    tracker.end_epoch()  # an epoch with no draws changes nothing
    assert tracker.momentum_loss[1].item() == 2.0


def test_first_value_even_after_other_samples_have_history() -> None:
    tracker = MomentumTracker(2, beta=0.97)
    for _ in range(3):
        tracker.update([0], [1.0])
        tracker.end_epoch()
    tracker.update([1], [10.0])
    tracker.end_epoch()
    # Sample 1's first observed loss initialises it, no shrinking towards 0.
    assert tracker.momentum_loss[1].item() == 10.0


def test_scores_range_and_mean_for_random_losses() -> None:
    gen = torch.Generator().manual_seed(0)
    n = 500
    tracker = MomentumTracker(n, beta=0.8)
    for _ in range(4):
        idx = torch.randint(0, n, (800,), generator=gen)
        tracker.update(idx, torch.rand(800, generator=gen, dtype=torch.float64) * 5)
        tracker.end_epoch()
    scores = tracker.scores()
    assert scores is not None and scores.shape == (n,)
    assert scores.min() >= 0.0 and scores.max() <= 1.0
    assert abs(scores.mean().item() - 0.5) < 1e-9  # unseen samples sit at the mean
    seen = scores[tracker.seen]
    assert abs(seen.mean().item() - 0.5) < 1e-9
    # Max-abs normalisation: one end of [0, 1] is reached exactly.
    assert min(seen.min().item(), 1 - seen.max().item()) == pytest.approx(0.0, abs=1e-12)
    assert (scores[~tracker.seen] == UNSEEN_SCORE).all()


def test_all_equal_losses_give_half() -> None:
    tracker = MomentumTracker(5)
    tracker.update(range(5), [0.1] * 5)  # 0.1 is not exact in binary: the mean has rounding
    tracker.end_epoch()
    _close(tracker.scores(), [0.5] * 5)
    single = MomentumTracker(3)
    single.update([1], [4.0])
    single.end_epoch()
    _close(single.scores(), [0.5, 0.5, 0.5])


def test_state_dict_round_trip_continues_identically() -> None:
    gen = torch.Generator().manual_seed(1)
    n = 50
    batches = [
        (torch.randint(0, n, (40,), generator=gen), torch.rand(40, generator=gen)) for _ in range(6)
    ]

    def run(tracker: MomentumTracker, epochs: range) -> None:
        for e in epochs:
            tracker.update(*batches[e])
            tracker.end_epoch()

    straight = MomentumTracker(n, beta=0.9)
    run(straight, range(6))

    first = MomentumTracker(n, beta=0.9)
    run(first, range(3))
    first.update(batches[3][0][:10], batches[3][1][:10])  # saved mid-epoch
    buf = io.BytesIO()
    torch.save({"momentum": first.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)["momentum"]
    resumed = MomentumTracker(n, beta=0.9)
    resumed.load_state_dict(state)
    resumed.update(batches[3][0][10:], batches[3][1][10:])
    resumed.end_epoch()
    run(resumed, range(4, 6))

    assert torch.equal(resumed.momentum_loss, straight.momentum_loss)
    assert torch.equal(resumed.seen, straight.seen)
    assert torch.equal(resumed.scores(), straight.scores())
    assert resumed.epochs_ended == straight.epochs_ended == 6


def test_load_state_dict_rejects_other_runs() -> None:
    state = MomentumTracker(4, beta=0.9).state_dict()
    with pytest.raises(TrainingError, match="4 samples"):
        MomentumTracker(5, beta=0.9).load_state_dict(state)
    with pytest.raises(TrainingError, match="beta"):
        MomentumTracker(4, beta=0.97).load_state_dict(state)
    with pytest.raises(TrainingError, match="lacks"):
        MomentumTracker(4, beta=0.9).load_state_dict({"num_samples": 4})
    bad = dict(state, seen=torch.zeros(3, dtype=torch.bool))
    with pytest.raises(TrainingError, match="shape"):
        MomentumTracker(4, beta=0.9).load_state_dict(bad)


def test_update_validation() -> None:
    tracker = MomentumTracker(3)
    with pytest.raises(ValueError, match="2 indices but 1 losses"):
        tracker.update([0, 1], [1.0])
    with pytest.raises(ValueError, match="out of range"):
        tracker.update([3], [1.0])
    with pytest.raises(ValueError, match="integers"):
        tracker.update(torch.tensor([0.0]), [1.0])
    with pytest.raises(TrainingError, match="non-finite"):
        tracker.update([0, 2], [1.0, float("nan")])
    tracker.update([], [])  # an empty batch is fine
    with pytest.raises(ValueError, match="beta"):
        MomentumTracker(3, beta=1.5)
    with pytest.raises(ValueError, match="num_samples"):
        MomentumTracker(0)


def test_update_accepts_graph_tensors() -> None:
    tracker = MomentumTracker(2)
    loss = torch.tensor([0.5, 1.5], requires_grad=True) * 2
    tracker.update(torch.tensor([0, 1]), loss)
    tracker.end_epoch()
    _close(tracker.momentum_loss, [1.0, 3.0])
