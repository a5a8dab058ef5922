"""Stage II of ECVL (Algorithm 2): a balanced residual adapter with momentum-driven augmentation.

The image encoder and the class text features are frozen; only the residual adapter of eq. 7
trains, on class-balanced draws (eq. 12). Three modes are the rows of the paper's Table 5, and
one is the baseline a user tries first:

``linear_probe``
    A plain K-way linear classifier (`ecvl.models.linear_probe.LinearProbe`) on the cached
    embeddings with cross-entropy; no class prompts, no adapter, one clean view per draw. Run
    it with the ``instance`` sampler for the "long-tailed sampling" baseline.
``ballad``
    Adapter + balanced sampling + classification loss (eq. 4 on `v*`); one clean view per
    draw, read from the export's cache. The encoder is never called.
``contrast_standard``
    Two views per draw, each from a fixed standard augmentation
    (`ecvl.augment.standard_view_transform`: random resized crop + flip), so every view is
    re-encoded; loss = classification (mean over the two views) + `w_dcvl` * two-view
    contrastive loss (eq. 11). No memory-driven augmentation.
``ecvl``
    The full method: two views per draw, each planned by eq. 10 from the memorisation scores
    `M_i` (eq. 9) of the momentum losses after the previous epoch; epoch 1 has no scores, so
    its views are all clean (cached) and nothing is re-encoded. Same loss as above.

In every mode each draw's total loss `L_i` (classification, plus `w_dcvl` * DCVL when there
are two views) feeds the per-sample momentum EMA (eq. 8), one `MomentumTracker.end_epoch()`
per epoch. Only `ecvl` feeds the scores back into augmentation; in the ablations they are
tracked for the per-sample trace and the epoch log alone, so the three rows' traces compare.

Mixed precision concerns the frozen encoder only (`SelectiveEncoder(precision=...)`); the
adapter is one d×d layer and trains in fp32, so it needs no autocast and no grad scaler.

All randomness is a pure function of ``(seed, epoch, step)`` (sampler order, view plans, pixel
randomness), so a run resumed from the end of epoch e replays exactly what an uninterrupted
run would have done; the trainer state holds no RNG state beyond the seed and the epoch.
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

from ecvl.augment import plan_views, standard_view_transform
from ecvl.data.longtail import GROUPS
from ecvl.errors import DataError, TrainingError
from ecvl.losses import image_to_text_loss, two_view_contrastive_loss
from ecvl.models.adapter import ResidualAdapter
from ecvl.models.heads import class_logits
from ecvl.models.linear_probe import LinearProbe
from ecvl.momentum import MomentumTracker
from ecvl.reencode import SelectiveEncoder, ViewRequest
from ecvl.samplers import SAMPLERS, build_sampler
from ecvl.stage1 import cosine_with_warmup

log = logging.getLogger(__name__)

__all__ = ["MODES", "STATE_FORMAT", "Stage2Config", "Stage2Trainer", "predict_cached"]

MODES = ("linear_probe", "ballad", "contrast_standard", "ecvl")
STATE_FORMAT = "ecvl-stage2-trainer"
# Distinct SeedSequence streams per (seed, epoch, step): view plans and pixel randomness.
_PLAN_STREAM, _PIXEL_STREAM = 1, 2


@dataclasses.dataclass(frozen=True, kw_only=True)
class Stage2Config:
    """Settings of stage II (DESIGN.md §1, "Stage II"); keyword-only, every field required: the
    defaults and bounds users see are params.yaml's, validated in `pipeline/params.py`.

    Attributes:
        epochs: number of epochs.
        batch_size: draws per optimisation step (two views each in ``contrast_standard``
            and ``ecvl``).
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
        sampler: "balanced" (eq. 12) or "instance".
        draws_per_epoch: draws per epoch (None: N, the number of train samples).
        mode: "linear_probe", "ballad", "contrast_standard" or "ecvl" (see the module
            docstring).
        seed: seeds the sampler, the view plans, the pixel randomness and a built head.
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

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown stage-II mode {self.mode!r} (known: {', '.join(MODES)})")
        if self.sampler not in SAMPLERS:
            raise ValueError(
                f"unknown sampler {self.sampler!r} (known: {', '.join(sorted(SAMPLERS))})"
            )
        if not math.isfinite(self.logit_scale):  # read from the stage-I model, not a param
            raise ValueError(f"logit_scale must be finite, got {self.logit_scale}")

    @property
    def two_views(self) -> bool:
        """Whether each draw has two views and the contrastive loss."""
        return self.mode in ("contrast_standard", "ecvl")


class Stage2Trainer:
    """Trains the stage-II head (residual adapter, or linear probe); one `train_epoch` per epoch.

    Args:
        head: the head to train (e.g. a `ResidualAdapter`), or None to build
            `ResidualAdapter(d, config.residual_ratio, seed=config.seed)` (a
            `LinearProbe(d, K)` in mode ``linear_probe``). Moved to `device`.
        text_features: (K, d) class text embeddings `u_c` (normalised again here), frozen.
        train_labels: (N,) class of every train sample, aligned with the encoder's cache.
        encoder: the `SelectiveEncoder` serving cached rows and re-encoded views.
        config: the settings.
        device: where the head trains (the encoder's device is its own).
        class_groups: optional group ("many", "medium", "few") of each class, for the
            per-group mean memorisation score in the epoch statistics.

    Raises:
        DataError: labels, cache, image store, text features or class groups disagree in
            size, or a label is out of range.
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

        if head is None and config.mode == "linear_probe":
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
        self.sampler = build_sampler(
            config.sampler,
            labels,
            num_samples=self.draws_per_epoch,
            seed=config.seed,
            num_classes=self.num_classes,
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
        self.epoch = 0  # epochs completed

    # -- training -----------------------------------------------------------------------------

    def _requests(
        self, epoch: int, order: np.ndarray, scores: np.ndarray | None
    ) -> Iterator[ViewRequest]:
        """The views of every step of the epoch; a function of (seed, epoch, step) only."""
        cfg = self.config
        bs = cfg.batch_size
        for step in range(self.steps_per_epoch):
            idx = order[step * bs : (step + 1) * bs]
            pixel_seed = (cfg.seed, epoch, step, _PIXEL_STREAM)
            if not cfg.two_views:
                yield ViewRequest(idx)
                continue
            views = np.concatenate([idx, idx])  # rows [0, b): first views, [b, 2b): second
            if cfg.mode == "contrast_standard":
                yield ViewRequest(views, seed=pixel_seed, view_transform=standard_view_transform)
            elif scores is None:  # Algorithm 2, line 3: no scores yet, no augmentation
                yield ViewRequest(views, [()] * views.size, seed=pixel_seed)
            else:
                rng = np.random.default_rng([cfg.seed, epoch, step, _PLAN_STREAM])
                plans = plan_views(scores[views], cfg.k, rng)
                yield ViewRequest(views, plans, seed=pixel_seed)

    def train_epoch(self, progress: bool = True) -> dict[str, Any]:
        """Train one epoch; returns its statistics.

        Returns:
            ``epoch``, ``mode``, ``steps``, ``draws``, ``lr`` (after the epoch);
            ``loss``, ``loss_cls``, ``loss_dcvl``: means over the epoch's draws (``loss_dcvl``
            is 0.0 with one view); ``views``, ``clean_views``, ``reencoded_views``,
            ``reencoded_fraction``, ``encode_seconds``, ``pixel_wait_seconds`` (from the
            encoder's counters, this epoch only); ``drawn_samples`` (distinct samples drawn);
            after this epoch's EMA update: ``momentum_loss_mean`` (mean `Lm` over seen samples),
            ``score_mean`` (0.5 by construction of eq. 9), ``score_std``, and with
            `class_groups` ``score_mean_many`` / ``_medium`` / ``_few`` (NaN for an empty
            group); ``seconds`` and ``draws_per_s``.

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
        scores = None
        if cfg.mode == "ecvl" and self.momentum.has_scores:
            scores = self.momentum.scores().numpy()
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
                idx = order[(step - 1) * bs : step * bs]
                total, cls, dcvl = self._losses(features, torch.from_numpy(idx))
                # The one host sync of a step: the momentum EMA lives on the host.
                per_draw = total.detach().cpu()
                if not torch.isfinite(per_draw).all():
                    raise TrainingError(
                        f"non-finite stage-II loss ({per_draw.mean().item()}) at epoch {epoch}, "
                        f"step {step}; lower the learning rate"
                    )
                loss = total.mean()
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                self.scheduler.step()
                self.momentum.update(idx, per_draw)
                sums += torch.stack([total.detach().sum(), cls.detach().sum(), dcvl.detach().sum()])
                bar.update(1)
                if step % 25 == 0:
                    bar.set_postfix(loss=f"{per_draw.mean().item():.3f}")
        drawn = self.momentum.end_epoch()
        self.epoch = epoch
        seconds = time.perf_counter() - start
        after = self.encoder.counters
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
            "pixel_wait_seconds": float(delta["pixel_wait_seconds"]),
            "drawn_samples": drawn,
            **self._score_stats(),
            "seconds": seconds,
            "draws_per_s": n / seconds if seconds > 0 else math.nan,
        }
        log.info(
            "stage2 %s epoch %d/%d: loss %.4f (cls %.4f, dcvl %.4f), %d/%d views re-encoded, %.1fs",
            cfg.mode,
            epoch,
            cfg.epochs,
            stats["loss"],
            stats["loss_cls"],
            stats["loss_dcvl"],
            stats["reencoded_views"],
            views,
            seconds,
        )
        return stats

    def _losses(
        self, features: torch.Tensor, idx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-draw (total, classification, contrastive) losses, each (b,)."""
        cfg = self.config
        labels = self._labels[idx.to(self._labels.device)]
        if cfg.mode == "linear_probe":
            cls = F.cross_entropy(self.head(features.to(self.device)), labels, reduction="none")
            return cls, cls, torch.zeros_like(cls)
        adapted = self.head(features.to(self.device))
        v = F.normalize(adapted, dim=-1)
        if not cfg.two_views:
            cls = image_to_text_loss(
                v, self.text_features, labels, cfg.logit_scale, reduction="none"
            )
            return cls, cls, torch.zeros_like(cls)
        b = labels.shape[0]
        per_view = image_to_text_loss(
            v, self.text_features, labels.repeat(2), cfg.logit_scale, reduction="none"
        )
        cls = 0.5 * (per_view[:b] + per_view[b:])
        dcvl = two_view_contrastive_loss(adapted[:b], adapted[b:], cfg.tau_dcvl, reduction="none")
        return cls + cfg.w_dcvl * dcvl, cls, dcvl

    def _score_stats(self) -> dict[str, float]:
        lm, m = self.momentum_snapshot()
        seen = self.momentum.seen.numpy()
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
