"""Stage II of ECVL (Algorithm 2): a balanced residual adapter with momentum-driven augmentation.

The image encoder and the class text features are frozen; only the head trains. What a mode
does is its `ModeSpec` in `MODES` (the rows of the paper's Table 5, nested, and a baseline):

``linear_probe``
    A plain K-way linear classifier on the clean cached embeddings with cross-entropy and
    long-tailed (instance) sampling: the baseline a user tries first.
``ballad``
    Adapter + class-balanced sampling + classification loss (eq. 4 on `v*`), one base view
    per draw from the export's view bank. The encoder is never called.
``contrast_standard``
    + two different bank views per draw and the contrastive loss of eq. 11: still nothing
    re-encoded.
``ecvl``
    + memory-driven RandAugment (eq. 10) on top of the two base views, planned from the
    memorisation scores `M_i` (eq. 9); a view that draws ops is rebuilt from the image store
    (its bank entry's crop and flip, then the ops) and re-encoded. Epoch 1 has no scores.
``ecvl_uniform``
    The control: as ``ecvl`` with every `M_i` set to the mean score (the same expected
    augmentation strength, no per-sample signal).

The score every sample earns every epoch (DESIGN.md §1, "Momentum loss"): after each epoch's
training, one pass over all N train samples (no gradient, two bank views each, batches of
`batch_size` anchors in a seeded order) measures each sample's contrastive loss (the mean over
its two views; ``momentum_loss="total"`` adds the classification loss) against the views of
`batch_size` fresh draws of the training sampler, and eq. 8 folds it into every sample's EMA.
Draw counts under balanced sampling differ by orders of magnitude between Many and Few
samples, so losses seen during training are not comparable; this pass is. Its negatives follow
the training sampler's law, so a Many-class anchor does not meet more same-class negatives than
a Few-class one. ``measure_views="augmented"`` scores the views the sample would train on (its
eq.-10 plan, re-encoded) instead of plain base views.

Mixed precision concerns the frozen encoder only (`SelectiveEncoder(precision=...)`); the
adapter is one d×d layer and trains in fp32, so it needs no autocast and no grad scaler.

All randomness is a pure function of ``(seed, epoch, step)`` (sampler order, bank entries, view
plans, pixel randomness, the measurement order), so a run resumed from the end of epoch e
replays exactly what an uninterrupted run would have done; the trainer state holds the EMA and
the momentum trace, and no RNG state beyond the seed and the epoch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ecvl.augment import plan_views
from ecvl.data.longtail import GROUPS
from ecvl.errors import DataError, TrainingError
from ecvl.losses import image_to_text_loss, two_view_contrastive_loss
from ecvl.metrics import spearman
from ecvl.models.adapter import ResidualAdapter
from ecvl.models.heads import class_logits
from ecvl.models.linear_probe import LinearProbe
from ecvl.modes import MEASURE_VIEWS, MODES, MOMENTUM_LOSSES, ModeSpec
from ecvl.momentum import MomentumTracker
from ecvl.reencode import SelectiveEncoder, ViewRequest
from ecvl.samplers import SAMPLERS, build_sampler
from ecvl.stage1 import cosine_with_warmup

log = logging.getLogger(__name__)

__all__ = [
    "MEASURE_VIEWS",
    "MODES",
    "MOMENTUM_LOSSES",
    "STATE_FORMAT",
    "ModeSpec",
    "Stage2Config",
    "Stage2Trainer",
    "predict_cached",
]

STATE_FORMAT = "ecvl-stage2-trainer"
# Distinct SeedSequence streams per (seed, epoch, step): view plans, pixel randomness, bank
# entries of the training views; the measurement pass's order and entries, its negative draws,
# and (with augmented measurement views) its view plans and pixel randomness.
_PLAN_STREAM, _PIXEL_STREAM, _ENTRY_STREAM, _MEASURE_STREAM = 1, 2, 3, 4
_NEGATIVE_STREAM, _MEASURE_PLAN_STREAM, _MEASURE_PIXEL_STREAM = 5, 6, 7


@dataclasses.dataclass(frozen=True, kw_only=True)
class Stage2Config:
    """Settings of stage II (DESIGN.md §1, "Stage II"); keyword-only, every field required: the
    defaults and bounds users see are params.yaml's, validated in `pipeline/params.py`.

    Attributes:
        epochs: number of epochs.
        batch_size: draws per optimisation step (two views each in the two-view modes), and
            samples per batch of the measurement pass.
        logit_scale: the stage-I model's fixed log inverse temperature
            (`1/tau = exp(logit_scale)`), a float.
        lr: AdamW learning rate (peak of the cosine schedule).
        weight_decay: AdamW weight decay, on the head's matrix only (not its bias).
        warmup_steps: linear warm-up steps before the cosine decay.
        residual_ratio: lambda of eq. 7 (used when the trainer builds the adapter, and checked
            against an adapter passed in).
        beta: momentum of the per-sample loss EMA (eq. 8).
        k: ops drawn per view by the memory-driven augmentation (eq. 10).
        tau_dcvl: temperature of the two-view contrastive loss (eq. 11).
        w_dcvl: weight of the contrastive loss.
        sampler: "balanced" (eq. 12) or "instance" (a mode's own `ModeSpec.sampler` wins).
        draws_per_epoch: draws per epoch (None: N, the number of train samples).
        mode: a key of `MODES`.
        seed: seeds the sampler, the bank entries, the view plans, the pixel randomness, the
            measurement pass and a built head.
        momentum_loss: the loss the measurement pass tracks: "contrastive" (eq. 11 per sample,
            mean over its two views, as BCL) or "total" (+ the classification loss).
        measure_views: the views the measurement pass scores: "base" (two bank views) or
            "augmented" (the same bank views with the eq.-10 plans the sample would train on
            this epoch, re-encoded; modes without augmentation measure base views either way).
    """

    epochs: int
    batch_size: int
    logit_scale: float
    lr: float
    weight_decay: float
    warmup_steps: int
    residual_ratio: float
    beta: float
    k: int
    tau_dcvl: float
    w_dcvl: float
    sampler: str
    draws_per_epoch: int | None
    mode: str
    seed: int
    momentum_loss: str = "contrastive"
    measure_views: str = "base"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown stage-II mode {self.mode!r} (known: {', '.join(MODES)})")
        if self.sampler not in SAMPLERS:
            raise ValueError(
                f"unknown sampler {self.sampler!r} (known: {', '.join(sorted(SAMPLERS))})"
            )
        if self.momentum_loss not in MOMENTUM_LOSSES:
            raise ValueError(
                f"unknown momentum_loss {self.momentum_loss!r} "
                f"(known: {', '.join(MOMENTUM_LOSSES)})"
            )
        if self.measure_views not in MEASURE_VIEWS:
            raise ValueError(
                f"unknown measure_views {self.measure_views!r} (known: {', '.join(MEASURE_VIEWS)})"
            )
        if not math.isfinite(self.logit_scale):  # read from the stage-I model, not a param
            raise ValueError(f"logit_scale must be finite, got {self.logit_scale}")

    @property
    def spec(self) -> ModeSpec:
        """The mode's spec."""
        return MODES[self.mode]


def _bank_entries(rng: np.random.Generator, b: int, views: int, num_views: int) -> np.ndarray:
    """Bank entries of `views` views of each of b draws, (views * b,): the views of one draw
    take different entries (`num_views` >= `views`)."""
    first = rng.integers(num_views, size=b)
    if views == 1:
        return first
    second = (first + 1 + rng.integers(num_views - 1, size=b)) % num_views
    return np.concatenate([first, second])


class Stage2Trainer:
    """Trains the stage-II head (residual adapter, or linear probe); one `train_epoch` per epoch.

    Args:
        head: the head to train (e.g. a `ResidualAdapter`), or None to build
            `ResidualAdapter(d, config.residual_ratio, seed=config.seed)` (a
            `LinearProbe(d, K)` for a ``linear_probe`` spec). Moved to `device`.
        text_features: (K, d) class text embeddings `u_c` (normalised again here), frozen.
        train_labels: (N,) class of every train sample, aligned with the encoder's cache.
        encoder: the `SelectiveEncoder` serving cached rows, banked views and re-encoded
            views; a mode whose views start from the bank needs its `bank`.
        config: the settings.
        device: where the head trains (the encoder's device is its own).
        class_groups: optional group ("many", "medium", "few") of each class, for the
            per-group mean memorisation score in the epoch statistics.

    Raises:
        DataError: labels, cache, image store, text features or class groups disagree in
            size, a label is out of range, or the mode needs a view bank the encoder lacks
            (or one with fewer than two views per sample).
        ValueError: a head whose `residual_ratio` differs from the config's.
    """

    def __init__(
        self,
        head: nn.Module | None,
        text_features: np.ndarray | torch.Tensor,
        train_labels: Sequence[int] | np.ndarray | torch.Tensor,
        encoder: SelectiveEncoder,
        config: Stage2Config,
        device: torch.device | str,
        *,
        class_groups: Sequence[str] | None = None,
    ) -> None:
        self.config = config
        self.spec = config.spec
        self.device = torch.device(device)
        self.encoder = encoder
        text = torch.as_tensor(
            text_features.detach().cpu()
            if isinstance(text_features, torch.Tensor)
            else np.asarray(text_features)
        )
        if text.dim() != 2 or text.shape[1] != encoder.dim:
            raise DataError(
                f"text features must be K×{encoder.dim} (the image embedding width), "
                f"got shape {tuple(text.shape)}"
            )
        self.num_classes = int(text.shape[0])
        self.text_features = F.normalize(text.float(), dim=-1).to(self.device)

        labels = np.asarray(
            train_labels.detach().cpu() if isinstance(train_labels, torch.Tensor) else train_labels
        )
        if labels.ndim != 1 or labels.shape[0] != encoder.num_samples:
            raise DataError(
                f"got {labels.size} train labels but the feature cache has "
                f"{encoder.num_samples} rows"
            )
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"train labels must be integers, got dtype {labels.dtype}")
        labels = labels.astype(np.int64)
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise DataError(
                f"train labels must be in [0, {self.num_classes}), "
                f"got {labels.min()}..{labels.max()}"
            )
        store_labels = getattr(encoder.image_store, "labels", None)
        if store_labels is not None and not np.array_equal(np.asarray(store_labels), labels):
            raise DataError(
                "the image store's labels differ from the train labels: the store and the "
                "embedding cache come from different exports"
            )
        self.train_labels = labels
        self._labels = torch.from_numpy(labels).to(self.device)
        self.class_counts = np.bincount(labels, minlength=self.num_classes)
        order = np.argsort(labels, kind="stable")
        self._class_members = np.split(order, np.cumsum(self.class_counts)[:-1])

        needed = self.spec.bank_views_needed
        have = 0 if encoder.bank is None else encoder.bank.num_views
        if have < needed:
            raise DataError(
                f"stage-II mode {config.mode!r} starts its views from the view bank and needs "
                f"at least {needed} bank views per sample, the export has {have}"
            )

        self.class_groups: np.ndarray | None = None
        if class_groups is not None:
            groups = np.asarray(list(class_groups), dtype=object)
            if groups.shape != (self.num_classes,):
                raise DataError(
                    f"class_groups has {groups.size} entries, expected one per class "
                    f"({self.num_classes})"
                )
            unknown = sorted({str(g) for g in groups} - set(GROUPS))
            if unknown:
                raise DataError(f"unknown class group(s) {unknown}; known: {list(GROUPS)}")
            self.class_groups = groups

        if head is None and self.spec.head == "linear_probe":
            head = LinearProbe(encoder.dim, self.num_classes)
        elif head is None:
            head = ResidualAdapter(encoder.dim, config.residual_ratio, seed=config.seed)
        ratio = getattr(head, "residual_ratio", None)
        if ratio is not None and float(ratio) != config.residual_ratio:
            raise ValueError(
                f"the head has residual_ratio {ratio}, the config says {config.residual_ratio}"
            )
        self.head = head.to(self.device)

        self.draws_per_epoch = config.draws_per_epoch or encoder.num_samples
        self.steps_per_epoch = -(-self.draws_per_epoch // config.batch_size)
        sampler = self.spec.sampler or config.sampler
        self.sampler = build_sampler(
            sampler,
            labels,
            num_samples=self.draws_per_epoch,
            seed=config.seed,
            num_classes=self.num_classes,
        )
        # The measurement pass's negatives: batch_size draws of the same law per batch of
        # anchors, from a stream of their own.
        measure_batches = -(-encoder.num_samples // config.batch_size)
        self._negatives = build_sampler(
            sampler,
            labels,
            num_samples=measure_batches * config.batch_size,
            seed=config.seed,
            num_classes=self.num_classes,
            stream=_NEGATIVE_STREAM,
        )
        decay = [p for p in self.head.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.head.parameters() if p.requires_grad and p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": config.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=config.lr,
        )
        total = config.epochs * self.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: cosine_with_warmup(step, config.warmup_steps, total)
        )
        self.momentum = MomentumTracker(encoder.num_samples, config.beta)
        # Per-sample Lm and M after every epoch (float32, one (N,) array per epoch), for
        # `momentum_trace.h5`; part of the state, so a resumed run writes the whole trace.
        self.trace: dict[str, list[np.ndarray]] = {"Lm": [], "M": []}
        self.epoch = 0  # epochs completed

    # -- training -----------------------------------------------------------------------------

    def _augment_scores(self) -> np.ndarray | None:
        """The scores eq. 10 plans this epoch's views with, or None (no augmentation)."""
        if self.spec.augment == "none" or not self.momentum.has_scores:
            return None  # Algorithm 2, line 3: no scores yet, base views only
        scores = self.momentum.scores().numpy()
        if self.spec.augment == "uniform":
            return np.full_like(scores, scores.mean())
        return scores

    def _requests(
        self, epoch: int, order: np.ndarray, scores: np.ndarray | None
    ) -> Iterator[ViewRequest]:
        """The views of every step of the epoch; a function of (seed, epoch, step) only."""
        cfg, spec = self.config, self.spec
        bs = cfg.batch_size
        for step in range(self.steps_per_epoch):
            idx = order[step * bs : (step + 1) * bs]
            if spec.source == "cache":
                yield ViewRequest(idx)
                continue
            # rows [0, b): first views, [b, 2b): second views of the same draws
            views = np.tile(idx, spec.views)
            rng = np.random.default_rng([cfg.seed, epoch, step, _ENTRY_STREAM])
            entries = _bank_entries(rng, idx.size, spec.views, self.encoder.bank.num_views)
            plans = None
            if scores is not None:
                plan_rng = np.random.default_rng([cfg.seed, epoch, step, _PLAN_STREAM])
                plans = plan_views(scores[views], cfg.k, plan_rng)
            seed = (cfg.seed, epoch, step, _PIXEL_STREAM)
            yield ViewRequest(views, plans, seed=seed, entries=entries)

    def train_epoch(self, progress: bool = True) -> dict[str, Any]:
        """Train one epoch, then (for a measuring mode) score every sample; returns its
        statistics.

        Returns:
            ``epoch``, ``mode``, ``steps``, ``draws``, ``lr`` (after the epoch);
            ``loss``, ``loss_cls``, ``loss_dcvl``: means over the epoch's draws (``loss_dcvl``
            is 0.0 with one view); ``views``, ``clean_views``, ``reencoded_views``,
            ``reencoded_fraction``, ``encode_seconds``, ``pixel_seconds`` (from the
            encoder's counters, this epoch's training only); ``drawn_samples`` (distinct
            samples drawn); after the measurement pass (NaN for a mode without one):
            ``momentum_loss_mean`` (mean `Lm`), ``score_mean`` (0.5 by construction of eq. 9),
            ``score_std``, with `class_groups` ``score_mean_many`` / ``_medium`` / ``_few``
            (NaN for an empty group), ``score_count_spearman`` (Spearman correlation between a
            class's mean M and its train count), ``measure_seconds``; ``seconds`` (training
            and measurement) and ``draws_per_s``.

        Raises:
            TrainingError: a non-finite loss (names the epoch and step; the trainer's state is
                then unusable and must not be saved), or all configured epochs are done.
        """
        cfg = self.config
        if self.epoch >= cfg.epochs:
            raise TrainingError(f"stage II already trained all {cfg.epochs} epochs")
        epoch = self.epoch + 1
        start = time.perf_counter()
        self.head.train()
        self.sampler.set_epoch(epoch)
        order = self.sampler.indices()
        scores = self._augment_scores()
        before = self.encoder.counters
        # total, cls, dcvl summed over the draws, on the device (MPS has no float64)
        wide = torch.float32 if self.device.type == "mps" else torch.float64
        sums = torch.zeros(3, dtype=wide, device=self.device)
        bs = cfg.batch_size
        stream = self.encoder.encode_stream(self._requests(epoch, order, scores))
        bar = tqdm(
            total=self.steps_per_epoch,
            desc=f"stage2 {cfg.mode} epoch {epoch}/{cfg.epochs}",
            unit="step",
            disable=not progress,
            leave=False,
        )
        with contextlib.closing(stream), bar:
            for step, (features, _) in enumerate(stream, start=1):
                idx = torch.from_numpy(order[(step - 1) * bs : step * bs])
                total, cls, dcvl = self._losses(features, idx)
                loss = total.mean()
                if not torch.isfinite(loss.detach()).item():
                    raise TrainingError(
                        f"non-finite stage-II loss ({loss.item()}) at epoch {epoch}, "
                        f"step {step}; lower the learning rate"
                    )
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                self.scheduler.step()
                sums += torch.stack([total.detach().sum(), cls.detach().sum(), dcvl.detach().sum()])
                bar.update(1)
                if step % 25 == 0:
                    bar.set_postfix(loss=f"{loss.item():.3f}")
        after = self.encoder.counters
        measured = time.perf_counter()
        if self.spec.measure:
            self._measure(epoch)
        measure_seconds = time.perf_counter() - measured
        self.epoch = epoch
        lm, m = self.momentum_snapshot()
        self.trace["Lm"].append(lm.astype(np.float32))
        self.trace["M"].append(m.astype(np.float32))
        seconds = time.perf_counter() - start
        delta = {k: after[k] - before[k] for k in after}
        n = len(order)
        views = int(delta["clean_views"] + delta["reencoded_views"])
        mean = (sums.cpu() / n).tolist()
        stats: dict[str, Any] = {
            "epoch": epoch,
            "mode": cfg.mode,
            "steps": self.steps_per_epoch,
            "draws": n,
            "lr": float(self.scheduler.get_last_lr()[0]),
            "loss": mean[0],
            "loss_cls": mean[1],
            "loss_dcvl": mean[2],
            "views": views,
            "clean_views": int(delta["clean_views"]),
            "reencoded_views": int(delta["reencoded_views"]),
            "reencoded_fraction": delta["reencoded_views"] / views if views else 0.0,
            "encode_seconds": float(delta["encode_seconds"]),
            "pixel_seconds": float(delta["pixel_seconds"]),
            "drawn_samples": int(np.unique(order).size),
            **self._score_stats(lm, m),
            "measure_seconds": measure_seconds,
            "seconds": seconds,
            "draws_per_s": n / seconds if seconds > 0 else math.nan,
        }
        log.info(
            "stage2 %s epoch %d/%d: loss %.4f (cls %.4f, dcvl %.4f), %d/%d views re-encoded, "
            "%.1fs (measurement %.1fs)",
            cfg.mode,
            epoch,
            cfg.epochs,
            stats["loss"],
            stats["loss_cls"],
            stats["loss_dcvl"],
            stats["reencoded_views"],
            views,
            seconds,
            measure_seconds,
        )
        return stats

    def _losses(
        self, features: torch.Tensor, idx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-draw (total, classification, contrastive) losses, each (b,); `features` holds
        the spec's views of the b draws `idx`, view by view."""
        cfg, spec = self.config, self.spec
        labels = self._labels[idx.to(self._labels.device)]
        if spec.head == "linear_probe":
            cls = F.cross_entropy(self.head(features.to(self.device)), labels, reduction="none")
            return cls, cls, torch.zeros_like(cls)
        adapted = self.head(features.to(self.device))
        v = F.normalize(adapted, dim=-1)
        b = labels.shape[0]
        per_view = image_to_text_loss(
            v, self.text_features, labels.repeat(spec.views), cfg.logit_scale, reduction="none"
        )
        cls = per_view.reshape(spec.views, b).mean(dim=0)
        if not spec.contrastive:
            return cls, cls, torch.zeros_like(cls)
        # a sample drawn twice in the batch is not its own negative
        ids = idx.to(adapted.device)
        dcvl = two_view_contrastive_loss(
            adapted[:b], adapted[b:], cfg.tau_dcvl, reduction="none", ids=ids
        )
        return cls + cfg.w_dcvl * dcvl, cls, dcvl

    @torch.no_grad()
    def _measure(self, epoch: int) -> None:
        """The measurement pass: every sample's loss on two views, folded into eq. 8.

        Anchors: a seeded permutation of all N samples in near-equal batches of at most
        `batch_size`. Negatives: for each batch, both views of `batch_size` fresh draws of the
        training sampler (`self._negatives`, class-balanced for the adapter modes), never the
        anchor's own sample, so every anchor meets the negatives a training batch would show
        it. Negatives from a uniform cut of all N samples would give a Many-class anchor about
        a hundred times more same-class (hard) negatives than a Few-class one, and the score
        would follow class size instead of how well the sample is learned.
        """
        cfg, n = self.config, self.encoder.num_samples
        rng = np.random.default_rng([cfg.seed, epoch, _MEASURE_STREAM])
        # near-equal batches of at most batch_size: no tiny last batch
        batches = np.array_split(rng.permutation(n), -(-n // cfg.batch_size))
        self._negatives.set_epoch(epoch)
        negatives = [
            self._other_than(
                neg, idx, np.random.default_rng([cfg.seed, epoch, step, _NEGATIVE_STREAM])
            )
            for step, (idx, neg) in enumerate(
                zip(batches, self._negatives.indices().reshape(len(batches), -1), strict=True)
            )
        ]
        num_views = self.encoder.bank.num_views
        scores = self._augment_scores() if cfg.measure_views == "augmented" else None

        def requests() -> Iterator[ViewRequest]:
            for step, (idx, neg) in enumerate(zip(batches, negatives, strict=True)):
                step_rng = np.random.default_rng([cfg.seed, epoch, step, _MEASURE_STREAM])
                # rows: anchors' first views, their second views, then the negatives' two
                views = np.concatenate([idx, idx, neg, neg])
                entries = np.concatenate(
                    [
                        _bank_entries(step_rng, idx.size, 2, num_views),
                        _bank_entries(step_rng, neg.size, 2, num_views),
                    ]
                )
                if scores is None:
                    yield ViewRequest(views, entries=entries)
                    continue
                plan_rng = np.random.default_rng([cfg.seed, epoch, step, _MEASURE_PLAN_STREAM])
                plans = plan_views(scores[views], cfg.k, plan_rng)
                seed = (cfg.seed, epoch, step, _MEASURE_PIXEL_STREAM)
                yield ViewRequest(views, plans, seed=seed, entries=entries)

        was_training = self.head.training
        self.head.eval()
        stream = self.encoder.encode_stream(requests())
        try:
            with contextlib.closing(stream):
                for idx, neg, (features, _) in zip(batches, negatives, stream, strict=True):
                    adapted = self.head(features.to(self.device))
                    b = idx.size
                    ids = torch.from_numpy(idx)
                    loss = two_view_contrastive_loss(
                        adapted[:b],
                        adapted[b : 2 * b],
                        cfg.tau_dcvl,
                        reduction="none",
                        ids=ids,
                        negatives=adapted[2 * b :],
                        negative_ids=torch.from_numpy(np.concatenate([neg, neg])),
                    )
                    if cfg.momentum_loss == "total":
                        labels = self._labels[ids.to(self._labels.device)]
                        per_view = image_to_text_loss(
                            F.normalize(adapted[: 2 * b], dim=-1),
                            self.text_features,
                            labels.repeat(2),
                            cfg.logit_scale,
                            reduction="none",
                        )
                        loss = per_view.reshape(2, b).mean(dim=0) + cfg.w_dcvl * loss
                    self.momentum.update(idx, loss.cpu())
        finally:
            self.head.train(was_training)
        self.momentum.end_epoch()

    def _other_than(
        self, negatives: np.ndarray, anchors: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray:
        """`negatives` with every draw that is one of `anchors` replaced by another sample of its
        class (uniformly among those that are not anchors), where the class has one.

        In a training batch the draws of one class are distinct samples (the balanced sampler
        cycles through each class), so an anchor meets as many same-class negatives as any
        other. Masking its own draw instead would take 1/n_c of them away: a Few-class anchor
        would meet fewer hard negatives, and the score would again follow class size.
        """
        hits = np.flatnonzero(np.isin(negatives, anchors))
        if not hits.size:
            return negatives
        out = negatives.copy()
        for j in hits:
            members = self._class_members[self.train_labels[negatives[j]]]
            free = members[~np.isin(members, anchors)]
            if free.size:  # else the loss masks it: a sample is never its own negative
                out[j] = free[rng.integers(free.size)]
        return out

    def _score_stats(self, lm: np.ndarray, m: np.ndarray) -> dict[str, float]:
        seen = ~np.isnan(lm)
        out = {
            "momentum_loss_mean": float(lm[seen].mean()) if seen.any() else math.nan,
            "score_mean": float(m[seen].mean()) if seen.any() else math.nan,
            "score_std": float(m[seen].std()) if seen.any() else math.nan,
        }
        if self.class_groups is not None:
            sample_group = self.class_groups[self.train_labels]
            for g in GROUPS:
                mask = (sample_group == g) & seen
                out[f"score_mean_{g}"] = float(m[mask].mean()) if mask.any() else math.nan
        out["score_count_spearman"] = math.nan
        if seen.any():
            counts = np.bincount(self.train_labels[seen], minlength=self.num_classes)
            sums = np.bincount(self.train_labels[seen], weights=m[seen], minlength=self.num_classes)
            present = counts > 0
            out["score_count_spearman"] = spearman(
                sums[present] / counts[present], self.class_counts[present]
            )
        return out

    # -- inspection and checkpoints -----------------------------------------------------------

    def momentum_snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-sample `(Lm, M)`, float64 arrays of shape (N,), for the momentum trace.

        `Lm` is NaN for a sample never drawn; `M` is eq. 9 over the seen samples (0.5 for an
        unseen one), all NaN before the first epoch ended (no scores exist yet).
        """
        lm = self.momentum.momentum_loss.numpy().copy()
        lm[~self.momentum.seen.numpy()] = np.nan
        scores = self.momentum.scores()
        m = np.full(lm.shape, np.nan) if scores is None else scores.numpy().copy()
        return lm, m

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs; plain tensors and Python values, so that
        `torch.load(..., weights_only=True)` reads it. Save it between epochs."""
        head_config = getattr(self.head, "config", None)
        return {
            "format": STATE_FORMAT,
            "epoch": self.epoch,
            "config": dataclasses.asdict(self.config),
            "adapter_config": head_config() if callable(head_config) else None,
            "adapter": self.head.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "momentum": self.momentum.state_dict(),
            "trace": {k: [torch.from_numpy(a) for a in v] for k, v in self.trace.items()},
            # Every random draw is a function of (seed, epoch, step): nothing else to save.
            "rng": {"seed": self.config.seed, "epoch": self.epoch},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a `state_dict()`; the next `train_epoch` continues where it stopped.

        Raises:
            TrainingError: not a stage-II trainer state, or saved with a different config
                (the message lists the differing fields).
        """
        if state.get("format") != STATE_FORMAT:
            raise TrainingError(
                f"not a stage-II trainer state (format={state.get('format')!r}, "
                f"expected {STATE_FORMAT!r})"
            )
        saved = dict(state["config"])
        current = dataclasses.asdict(self.config)
        differs = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        if differs:
            shown = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in differs)
            raise TrainingError(
                f"cannot resume stage II: the checkpoint was trained with other settings ({shown})"
            )
        self.head.load_state_dict(state["adapter"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.momentum.load_state_dict(state["momentum"])
        trace = state.get("trace", {})
        self.trace = {k: [torch.as_tensor(a).numpy() for a in trace.get(k, ())] for k in self.trace}
        self.epoch = int(state["epoch"])


@torch.no_grad()
def predict_cached(
    head: nn.Module,
    features: np.ndarray | torch.Tensor,
    text_features: np.ndarray | torch.Tensor,
    device: torch.device | str,
    batch_size: int = 4096,
) -> torch.Tensor:
    """Eq. 6 predictions on cached embeddings: `argmax_c v* . u_c` with `v* = f*/|f*|`.

    A head with its own `scores(features, text_features)` (the linear probe) is ranked by
    those instead.

    Args:
        head: the trained adapter (returns `f*`) or a head with `scores`; moved to `device`
            (heads are built on the CPU), its train/eval mode restored after.
        features: (N, d) cached, un-normalised image embeddings (float16 is fine).
        text_features: (K, d) class text embeddings (normalised here).
        device: where to compute.
        batch_size: rows per batch.

    Returns:
        (N,) int64 predicted classes, on the CPU.
    """
    device = torch.device(device)
    feats = torch.as_tensor(
        features.detach() if isinstance(features, torch.Tensor) else np.asarray(features)
    )
    text = torch.as_tensor(
        text_features.detach()
        if isinstance(text_features, torch.Tensor)
        else np.asarray(text_features)
    )
    text = F.normalize(text.float().to(device), dim=-1)
    head = head.to(device)
    was_training = head.training
    head.eval()
    out = []
    try:
        for a in range(0, feats.shape[0], batch_size):
            batch = feats[a : a + batch_size].to(device).float()
            out.append(class_logits(head, batch, text).argmax(dim=1))
    finally:
        head.train(was_training)
    return torch.cat(out).cpu() if out else torch.zeros(0, dtype=torch.int64)
