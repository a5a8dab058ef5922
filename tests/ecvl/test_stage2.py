"""Stage-II trainer: the modes, the measurement pass, exact resume, and a real learning check."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ecvl.data.embeddings import ViewBank
from ecvl.errors import DataError, TrainingError
from ecvl.losses import image_to_text_loss
from ecvl.models.adapter import ResidualAdapter
from ecvl.reencode import SelectiveEncoder
from ecvl.stage2 import Stage2Config, Stage2Trainer, predict_cached
from support import CountingEncoder, cached_world

COUNTS = (12, 8, 4)  # three classes, long-tailed
N = sum(COUNTS)
K = len(COUNTS)
GROUPS = ["many", "medium", "few"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny random-init ViT, N random 32×32 PNGs in an image store, their cache, text features."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(K), COUNTS)
    # Each class has its own dominant colour channel, so even a random encoder separates them.
    pixels = rng.integers(0, 96, size=(N, 32, 32, 3))
    pixels[np.arange(N), :, :, labels] += 150
    world = cached_world(tmp_path_factory.mktemp("stage2"), pixels, labels)
    dim = world["cache"].shape[1]
    text = F.normalize(torch.randn(K, dim, generator=torch.Generator().manual_seed(1)))
    return {**world, "labels": labels, "text": text}


def config(**kw) -> Stage2Config:
    base = {
        "epochs": 2,
        "batch_size": 8,
        "logit_scale": math.log(10.0),
        "lr": 1e-2,
        "weight_decay": 1e-4,
        "warmup_steps": 0,
        "residual_ratio": 0.2,
        "beta": 0.97,
        "k": 2,
        "tau_dcvl": 0.1,
        "w_dcvl": 1.0,
        "sampler": "balanced",
        "draws_per_epoch": None,
        "mode": "ecvl",
        "seed": 3,
    }
    return Stage2Config(**{**base, **kw})


def make_trainer(world, cfg, cache=None, bank="world", **enc_kw):
    counting = CountingEncoder(world["model"])
    enc = SelectiveEncoder(
        world["cache"] if cache is None else cache,
        world["store"],
        counting,
        world["renderer"],
        "cpu",
        bank=world["bank"] if bank == "world" else bank,
        **enc_kw,
    )
    trainer = Stage2Trainer(
        None, world["text"], world["labels"], enc, cfg, "cpu", class_groups=GROUPS
    )
    return trainer, counting


def test_lambda_zero_predicts_exactly_like_stage1(world):
    cached = world["cache"]
    stage1 = (F.normalize(torch.from_numpy(cached).float(), dim=-1) @ world["text"].T).argmax(1)
    trainer, _ = make_trainer(world, config(residual_ratio=0.0, mode="ballad", epochs=1))
    trainer.train_epoch(progress=False)  # the weights move, the output cannot
    assert trainer.head.weight.grad is not None
    pred = predict_cached(trainer.head, cached, world["text"], "cpu", batch_size=5)
    assert pred.dtype == torch.int64 and torch.equal(pred, stage1)
    # and a trained adapter with lambda > 0 is what predict_cached evaluates
    adapter = ResidualAdapter(cached.shape[1], 1.0, seed=4)
    expected = (F.normalize(adapter(torch.from_numpy(cached).float())) @ world["text"].T).argmax(1)
    assert torch.equal(predict_cached(adapter, cached, world["text"], "cpu"), expected)


def test_ballad_never_calls_the_encoder(world):
    trainer, counting = make_trainer(world, config(mode="ballad"))
    for _ in range(2):
        stats = trainer.train_epoch(progress=False)
        assert stats["views"] == stats["draws"] == N
        assert stats["reencoded_views"] == 0 and stats["loss_dcvl"] == 0.0
        assert stats["loss"] == pytest.approx(stats["loss_cls"])
    assert counting.images_seen == 0
    assert trainer.momentum.epochs_ended == 2  # measured for the trace, not used


def test_contrast_standard_reencodes_nothing_and_its_two_views_differ(world):
    trainer, counting = make_trainer(world, config(mode="contrast_standard", epochs=1))
    order = trainer.sampler.indices()
    for req in trainer._requests(1, order, None):
        b = req.indices.size // 2
        assert req.plans is None and np.array_equal(req.indices[:b], req.indices[b:])
        assert np.all(req.entries[:b] != req.entries[b:])  # two different bank entries
    stats = trainer.train_epoch(progress=False)
    assert stats["views"] == 2 * N and stats["reencoded_views"] == 0 == counting.images_seen
    assert stats["reencoded_fraction"] == 0.0
    assert stats["loss_dcvl"] > 0
    assert stats["loss"] == pytest.approx(stats["loss_cls"] + stats["loss_dcvl"])


def test_ecvl_epoch1_uses_base_views_then_memory_drives_augmentation(world):
    trainer, counting = make_trainer(world, config(mode="ecvl", epochs=3))
    lm0, m0 = trainer.momentum_snapshot()
    assert np.isnan(lm0).all() and np.isnan(m0).all()

    first = trainer.train_epoch(progress=False)
    assert first["reencoded_views"] == 0 == counting.images_seen  # no scores yet
    assert first["views"] == 2 * N and first["clean_views"] == 2 * N
    lm1, m1 = trainer.momentum_snapshot()
    assert not np.isnan(lm1).any()  # the measurement pass scores every sample
    assert m1.std() > 0 and m1.mean() == pytest.approx(0.5)
    assert set(first) >= {"score_mean_many", "score_mean_medium", "score_mean_few"}
    assert -1.0 <= first["score_count_spearman"] <= 1.0

    second = trainer.train_epoch(progress=False)
    assert 0 < second["reencoded_views"] < second["views"]
    assert counting.images_seen == second["reencoded_views"]
    lm2, _ = trainer.momentum_snapshot()
    assert not np.allclose(lm2, lm1)  # the EMA moved
    assert trainer.momentum.epochs_ended == 2
    assert len(trainer.trace["M"]) == 2
    np.testing.assert_array_equal(trainer.trace["M"][0], m1.astype(np.float32))


def test_every_sample_is_scored_every_epoch_however_often_it_was_drawn(world):
    # lr = 0: the head stays at its (seeded) init, so the measurement depends on nothing else
    few_draws = config(mode="ballad", epochs=1, lr=0.0, draws_per_epoch=4)
    full = config(mode="contrast_standard", epochs=1, lr=0.0)
    a, _ = make_trainer(world, few_draws)
    b, _ = make_trainer(world, full)
    a.train_epoch(progress=False)
    b.train_epoch(progress=False)
    lm_a, _ = a.momentum_snapshot()
    lm_b, _ = b.momentum_snapshot()
    assert not np.isnan(lm_a).any()  # 4 draws, 24 samples scored (before: 4 at most)
    np.testing.assert_array_equal(lm_a, lm_b)  # the same pass: not the draws, not the mode
    total, _ = make_trainer(world, dataclasses.replace(full, momentum_loss="total"))
    total.train_epoch(progress=False)
    assert np.all(total.momentum_snapshot()[0] > lm_b)  # + the classification loss


def test_ecvl_uniform_plans_every_view_with_the_mean_score(world):
    trainer, _ = make_trainer(world, config(mode="ecvl_uniform", epochs=2))
    assert trainer._augment_scores() is None
    trainer.train_epoch(progress=False)
    _, m = trainer.momentum_snapshot()
    scores = trainer._augment_scores()
    assert m.std() > 0 and np.all(scores == pytest.approx(m.mean()))
    assert trainer.train_epoch(progress=False)["reencoded_views"] > 0


def test_bank_modes_need_a_bank_of_two_views(world):
    with pytest.raises(DataError, match="needs at least 2 bank views per sample, the export has 0"):
        make_trainer(world, config(mode="contrast_standard"), bank=None)
    probe, _ = make_trainer(world, config(mode="linear_probe"), bank=None)  # the clean cache
    assert probe.train_epoch(progress=False)["views"] == N


def test_resume_is_identical_to_an_uninterrupted_run(world, tmp_path):
    cfg = config(mode="ecvl", epochs=2)
    straight, _ = make_trainer(world, cfg)
    stats_straight = [straight.train_epoch(progress=False) for _ in range(2)]

    first, _ = make_trainer(world, cfg)
    first.train_epoch(progress=False)
    torch.save(first.state_dict(), tmp_path / "stage2.pt")
    state = torch.load(tmp_path / "stage2.pt", weights_only=True)
    resumed, _ = make_trainer(world, cfg)
    resumed.load_state_dict(state)
    assert resumed.epoch == 1
    stats_resumed = resumed.train_epoch(progress=False)
    assert stats_resumed["reencoded_views"] > 0  # epoch 2 augments: the resumed EMA drives it

    for key, value in straight.head.state_dict().items():
        assert torch.equal(value, resumed.head.state_dict()[key]), key
    for key in ("Lm", "M"):  # the trace travels with the trainer's state
        assert len(resumed.trace[key]) == 2
        for x, y in zip(straight.trace[key], resumed.trace[key], strict=True):
            np.testing.assert_array_equal(x, y)
    a, b = straight.momentum.state_dict(), resumed.momentum.state_dict()
    assert torch.equal(a["momentum_loss"], b["momentum_loss"])
    assert torch.equal(a["seen"], b["seen"])
    for key in ("loss", "loss_cls", "loss_dcvl", "reencoded_views", "lr"):
        assert stats_resumed[key] == stats_straight[1][key], key
    with pytest.raises(TrainingError, match="all 2 epochs"):
        resumed.train_epoch(progress=False)


def test_resume_with_other_settings_is_refused(world):
    trainer, _ = make_trainer(world, config(mode="ecvl"))
    other, _ = make_trainer(world, config(mode="ballad"))
    with pytest.raises(TrainingError, match="mode: 'ecvl' -> 'ballad'"):
        other.load_state_dict(trainer.state_dict())


def test_training_reduces_the_loss_on_a_separable_problem(world):
    # Cached features of three well-separated clusters; the text features are random, so the
    # adapter has to learn the mapping cluster -> class prompt.
    gen = np.random.default_rng(5)
    d = world["cache"].shape[1]
    centres = gen.normal(size=(K, d))
    feats = (centres[world["labels"]] + 0.3 * gen.normal(size=(N, d))).astype(np.float16)
    labels = torch.from_numpy(world["labels"])
    cfg = config(mode="ballad", epochs=15, residual_ratio=0.5, lr=3e-2, weight_decay=0.0)
    views = np.repeat(feats[:, None], world["bank"].num_views, axis=1)  # its bank: the same rows
    bank = ViewBank(views, world["bank"].boxes, world["bank"].flips)
    trainer, _ = make_trainer(world, cfg, cache=feats, bank=bank)
    before = (predict_cached(trainer.head, feats, world["text"], "cpu") == labels).float()
    losses = [trainer.train_epoch(progress=False)["loss"] for _ in range(cfg.epochs)]
    after = (predict_cached(trainer.head, feats, world["text"], "cpu") == labels).float()
    assert losses[-1] < 0.5 * losses[0]
    assert after.mean() == 1.0 and before.mean() < 1.0


def test_ecvl_mode_learns_from_the_images(world):
    cfg = config(mode="ecvl", epochs=6, residual_ratio=0.5, lr=3e-2, weight_decay=0.0)
    trainer, _ = make_trainer(world, cfg)
    cached = torch.from_numpy(world["cache"]).float()
    labels = torch.from_numpy(world["labels"])

    def clean_loss() -> float:
        with torch.no_grad():
            v = F.normalize(trainer.head(cached), dim=-1)
            return float(image_to_text_loss(v, world["text"], labels, cfg.logit_scale))

    def accuracy() -> float:
        pred = predict_cached(trainer.head, world["cache"], world["text"], "cpu")
        return float((pred == labels).float().mean())

    loss0, acc0 = clean_loss(), accuracy()
    stats = [trainer.train_epoch(progress=False) for _ in range(cfg.epochs)]
    assert sum(s["reencoded_views"] for s in stats) > 0
    assert clean_loss() < 0.5 * loss0
    assert accuracy() == 1.0 > acc0


def test_non_finite_loss_names_epoch_and_step(world):
    trainer, _ = make_trainer(world, config(mode="ballad"))
    with torch.no_grad():
        trainer.head.weight.fill_(float("nan"))
    with pytest.raises(TrainingError, match="epoch 1, step 1"):
        trainer.train_epoch(progress=False)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="unknown stage-II mode 'fancy'"):
        config(mode="fancy")
    with pytest.raises(TypeError):
        Stage2Config(2, 8, 1.0)  # keyword-only
    assert dataclasses.asdict(config())["mode"] == "ecvl"


def test_linear_probe_learns_from_the_cache_alone(world):
    cached = world["cache"]
    trainer, counting = make_trainer(
        world, config(mode="linear_probe", sampler="instance", epochs=8, lr=5e-2)
    )
    losses = [trainer.train_epoch(progress=False)["loss"] for _ in range(8)]
    assert counting.images_seen == 0  # one clean, cached view per draw
    assert losses[-1] < 0.5 * losses[0]
    assert losses[0] < math.log(K) + 0.05  # zero init: the first steps start at log K
    pred = predict_cached(trainer.head, cached, world["text"], "cpu")
    # the colour channel separates the classes: the probe fits the train set
    assert (pred.numpy() == world["labels"]).mean() == 1.0
    expected = trainer.head(torch.from_numpy(cached).float()).argmax(1)
    assert torch.equal(pred, expected)  # ranked by its own logits, not by the text features


class _NoPixels:
    """An image store for caches alone: the bank modes measured on base views never read one."""

    labels = None

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def get_many_bytes(self, indices):
        raise AssertionError("base views are bank rows: no image may be read")


def _cluster_spearman(sampler: str) -> float:
    """Spearman(class-mean measured loss, class size) on features where every class is an
    equally tight cluster (every sample equally easy), class sizes 500 down to 5 over 100
    classes (CIFAR-100-LT's profile), the adapter the identity (lambda = 0)."""
    from ecvl.metrics import spearman

    rng = np.random.default_rng(0)
    k, d, e = 100, 32, 4
    counts = np.floor(500 * (5 / 500) ** (np.arange(k) / (k - 1))).astype(int)
    labels = np.repeat(np.arange(k), counts)
    centres = rng.standard_normal((k, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    views = centres[labels][:, None, :] + 0.05 * rng.standard_normal((labels.size, e, d))
    bank = ViewBank(
        views.astype(np.float16),
        np.zeros((labels.size, e, 4), int),
        np.zeros((labels.size, e), bool),
    )
    encoder = SelectiveEncoder(
        views.mean(1).astype(np.float16),
        _NoPixels(labels.size),
        torch.nn.Identity(),
        None,
        "cpu",
        bank=bank,
    )
    cfg = config(
        mode="contrast_standard",
        epochs=1,
        batch_size=128,
        lr=0.0,
        residual_ratio=0.0,
        sampler=sampler,
        seed=0,
    )
    text = F.normalize(torch.randn(k, d, generator=torch.Generator().manual_seed(0)), dim=-1)
    trainer = Stage2Trainer(None, text, labels, encoder, cfg, "cpu")
    trainer.train_epoch(progress=False)
    lm, _ = trainer.momentum_snapshot()
    return spearman(np.bincount(labels, weights=lm) / counts, counts)


def test_measured_score_does_not_follow_class_size_when_negatives_are_balanced():
    # Same-class views are the hardest negatives. Drawn as the balanced sampler draws a
    # training batch, every anchor meets about as many of them whatever its class size...
    assert abs(_cluster_spearman("balanced")) < 0.2
    # ...drawn uniformly, a Many-class anchor meets ~100x more than a Few-class one, and the
    # "memorisation" score is class size (the same pass with the instance sampler's law).
    assert _cluster_spearman("instance") > 0.8


def test_measurement_negatives_are_never_the_anchor_itself(world):
    trainer, _ = make_trainer(world, config(mode="contrast_standard", epochs=1))
    anchors = np.arange(6)  # six of class 0's 12 samples; all 4 of class 2's below
    few = np.flatnonzero(world["labels"] == 2)
    negatives = np.concatenate([anchors, few, anchors])
    out = trainer._other_than(negatives, np.concatenate([anchors, few]), np.random.default_rng(0))
    anchor_set = set(anchors) | set(few)
    replaced = [j for j in range(out.size) if out[j] != negatives[j]]
    # every draw of a class-0 anchor became another class-0 sample; class 2 has no other
    # sample left, so its draws stay (the loss masks them)
    assert all(world["labels"][out[j]] == world["labels"][negatives[j]] for j in replaced)
    assert not any(out[j] in anchor_set for j in range(out.size) if world["labels"][out[j]] != 2)
    assert set(out[anchors.size : anchors.size + few.size]) == set(few)


def test_augmented_measurement_scores_the_views_training_would_see(world):
    base, base_enc = make_trainer(world, config(mode="ecvl", epochs=2))
    aug, aug_enc = make_trainer(world, config(mode="ecvl", epochs=2, measure_views="augmented"))
    for trainer in (base, aug):
        first = trainer.train_epoch(progress=False)
        assert first["reencoded_views"] == 0  # no scores yet: base views, also when measuring
    assert base_enc.images_seen == aug_enc.images_seen == 0
    np.testing.assert_array_equal(base.momentum_snapshot()[0], aug.momentum_snapshot()[0])
    b2, a2 = base.train_epoch(progress=False), aug.train_epoch(progress=False)
    assert b2["reencoded_views"] == a2["reencoded_views"] > 0  # training is the same
    assert base_enc.images_seen == b2["reencoded_views"]  # measuring re-encoded nothing
    assert aug_enc.images_seen > a2["reencoded_views"]  # measuring re-encoded planned views
    assert not np.allclose(base.momentum_snapshot()[0], aug.momentum_snapshot()[0])
