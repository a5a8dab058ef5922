"""Stage I of ECVL: fine-tune both towers of an open_clip model with the stage-I loss.

`Stage1Trainer`'s whole state (weights, optimizer, schedule, scaler, RNG, step) round-trips
through `state_dict()`, so a run resumed from the end of epoch e is identical to one that never
stopped. It takes objects and returns results; it knows no paths.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from ecvl.errors import TrainingError
from ecvl.losses import stage1_loss
from ecvl.precision import autocast
from ecvl.text import encode_class_prompts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage1Config:
    """Optimisation settings of stage I (DESIGN.md §1); every field required: the defaults
    and bounds users see are params.yaml's, validated in `pipeline/params.py`."""

    epochs: int
    steps_per_epoch: int
    lr: float
    weight_decay: float
    warmup_steps: int
    grad_clip: float | None
    w_i2t: float
    w_t2i: float
    logit_scale_max: float
    precision: str  # resolved: fp32 | bf16 | fp16
    text_batch_size: int | None  # prompts per checkpointed text-tower call; None = all
    logit_offset: tuple[float, ...] | None  # (K,) of `ecvl.losses.logit_adjustment`; None = none
    label_smoothing: float  # of the image->text term; 0 = none

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


@dataclass
class EpochStats:
    epoch: int
    loss: float
    loss_i2t: float
    loss_t2i: float
    lr: float
    images_per_s: float
    seconds: float
    logit_scale: float


def cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    """LR multiplier: linear warm-up to 1 over `warmup` steps, then cosine decay to 0."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """open_clip's rule: no weight decay on gains, biases, embeddings' scales, logit_scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name
        exclude = exclude or "logit_scale" in name
        (no_decay if exclude else decay).append(p)
    return [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]


class _ClipForward(nn.Module):
    """Routes both towers through one `forward`, so DDP sees (and syncs) every gradient.

    `text_batch_size`: prompts per checkpointed text-tower call (`encode_class_prompts`); the
    eq. 4 loss needs every class at every step.
    """

    def __init__(self, model: nn.Module, text_batch_size: int | None = None):
        super().__init__()
        self.model = model
        self.text_batch_size = text_batch_size

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple:
        image_features = self.model.encode_image(images, normalize=True)
        text_features = encode_class_prompts(self.model, tokens, self.text_batch_size)
        return image_features, text_features, self.model.logit_scale


def _image_size(model: nn.Module) -> tuple[int, int]:
    size = getattr(getattr(model, "visual", None), "image_size", 224)
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def freeze_unused(forward: _ClipForward, tokens: torch.Tensor, device: torch.device) -> list[str]:
    """Freeze parameters the stage-I loss never reaches (SigLIP's `logit_bias`, CoCa's text
    decoder, ...) and return their names.

    DDP expects a gradient for every trainable parameter and stops at step 2 with "Expected to
    have finished reduction" otherwise. One forward/backward in eval mode on two blank images
    and one class finds them (no running statistics change, no random number is drawn).
    """
    model = forward.model
    was_training = model.training
    model.eval()
    images = torch.zeros(2, 3, *_image_size(model), device=device)
    img, text, scale = forward(images, tokens[:1])
    (img.float().sum() + text.float().sum() + scale.float().sum()).backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    for name, p in model.named_parameters():
        if name in unused:
            p.requires_grad_(False)
    return unused


class Stage1Trainer:
    """Fine-tunes image and text towers with `w_i2t * L_i2t + w_t2i * L_t2i`.

    Args:
        model: an open_clip model, already on `device`.
        tokens: (K, T, L) tokenised class prompts (`ecvl.text.tokenize_prompts`); the T
            templates' embeddings are averaged per class.
        config: optimisation settings.
        device: where the model lives.
        ddp: wrap in DistributedDataParallel (torchrun); the process group must exist.
    """

    # Steps between host synchronisations (loss check, progress bar): on a GPU every `.item()`
    # stalls the queue of kernels.
    sync_every = 25

    def __init__(
        self,
        model: nn.Module,
        tokens: torch.Tensor,
        config: Stage1Config,
        device: torch.device,
        ddp: bool = False,
    ):
        self.model = model
        self.config = config
        self.device = device
        self.tokens = tokens.to(device)
        self.logit_offset = (
            None
            if config.logit_offset is None
            else torch.tensor(config.logit_offset, device=device)
        )
        forward = _ClipForward(model, config.text_batch_size)
        self.frozen = freeze_unused(forward, self.tokens, device)
        if self.frozen:
            log.info("not trained (the stage-I loss does not use them): %s", ", ".join(self.frozen))
        self.forward: nn.Module = forward
        if ddp:
            ids = [device.index] if device.type == "cuda" else None
            self.forward = nn.parallel.DistributedDataParallel(self.forward, device_ids=ids)
        self.optimizer = torch.optim.AdamW(
            _param_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.98), eps=1e-6
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: cosine_with_warmup(step, config.warmup_steps, config.total_steps),
        )
        self.scaler = torch.amp.GradScaler(
            device.type, enabled=config.precision == "fp16" and device.type == "cuda"
        )
        self.epoch = 0  # epochs completed

    def train_epoch(self, batches: Iterable, progress: bool = True) -> EpochStats:
        """One epoch over `batches` of (images, labels, keys); returns its statistics.

        Raises:
            TrainingError: a non-finite loss (names the epoch and the step); the model's state
                is then unusable and must not be checkpointed. The loss is checked every
                `sync_every` steps and at the end of the epoch, not after every step.
        """
        cfg = self.config
        self.model.train()
        epoch = self.epoch + 1
        losses: list[torch.Tensor] = []  # (3,) per step, on the device: no sync per step
        images_seen, start, steps = 0, time.perf_counter(), 0
        bar = tqdm(
            batches,
            total=cfg.steps_per_epoch,
            desc=f"stage1 epoch {epoch}/{cfg.epochs}",
            unit="step",
            disable=not progress,
            leave=False,
        )
        for step, (images, labels, _) in enumerate(bar, start=1):
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            with autocast(self.device, cfg.precision):
                image_features, text_features, logit_scale = self.forward(images, self.tokens)
                loss, parts = stage1_loss(
                    image_features,
                    text_features,
                    labels,
                    logit_scale,
                    cfg.w_i2t,
                    cfg.w_t2i,
                    logit_offset=self.logit_offset,
                    label_smoothing=cfg.label_smoothing,
                )
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if cfg.grad_clip is not None:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            with torch.no_grad():  # CLIP's clamp: 1/tau at most logit_scale_max
                self.model.logit_scale.clamp_(0, math.log(cfg.logit_scale_max))
            losses.append(torch.stack([loss.detach(), parts["i2t"], parts["t2i"]]).float())
            images_seen += images.shape[0]
            steps = step
            if step % self.sync_every == 0:
                self._check_finite(losses, epoch, step - self.sync_every)
                elapsed = time.perf_counter() - start
                bar.set_postfix(
                    loss=f"{losses[-1][0].item():.3f}", img_s=f"{images_seen / elapsed:.0f}"
                )
        if steps == 0:
            raise TrainingError(f"epoch {epoch}: the data loader yielded no batch")
        self._check_finite(losses, epoch, steps - steps % self.sync_every)
        seconds = time.perf_counter() - start
        self.epoch = epoch
        mean = torch.stack(losses).double().mean(dim=0).tolist()
        return EpochStats(
            epoch=epoch,
            loss=mean[0],
            loss_i2t=mean[1],
            loss_t2i=mean[2],
            lr=self.scheduler.get_last_lr()[-1],
            images_per_s=images_seen / seconds,
            seconds=seconds,
            logit_scale=float(self.model.logit_scale.exp().item()),
        )

    @staticmethod
    def _check_finite(losses: list[torch.Tensor], epoch: int, first: int) -> None:
        """Raise on the first non-finite loss among the steps after `first` (1 host sync)."""
        if first >= len(losses):
            return
        window = torch.stack(losses[first:])[:, 0]
        bad = (~torch.isfinite(window)).nonzero()
        if bad.numel():
            i = int(bad[0, 0])
            raise TrainingError(
                f"non-finite loss ({window[i].item()}) at epoch {epoch}, step {first + i + 1}; "
                "lower the learning rate or use fp32"
            )

    def state_dict(self) -> dict:
        """Everything a resumed run needs; loadable with `torch.load(weights_only=True)`.

        The RNG part is this process's own: the CPU generator and, on CUDA, the generator of
        this process's GPU only (not of every visible GPU, which a resumed run with fewer
        visible GPUs could not restore)."""
        return {
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": self.rng_state(),
        }

    def rng_state(self) -> dict:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # empty when saved without a scaler (fp32, bf16)
            self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.epoch = int(state["epoch"])
