"""Training and evaluation loops: they take objects, return results and know no paths.

`Stage1Trainer` fine-tunes both towers of an open_clip model with the stage-I loss; its whole
state (weights, optimizer, schedule, scaler, RNG, step) round-trips through `state_dict()`, so
a run resumed from the end of epoch e is identical to one that never stopped. `predict` and
`encode_loader` are the evaluation and embedding passes every stage shares.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ecvl.errors import TrainingError
from ecvl.losses import stage1_loss

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Precision


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` → bf16 on CUDA devices that support it, else fp16 on CUDA, fp32 on CPU."""
    if precision != "auto":
        if precision in ("bf16", "fp16") and device.type != "cuda":
            log.info("precision %s needs CUDA; using fp32 on %s", precision, device)
            return "fp32"
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed-precision context for `precision` in fp32 | bf16 | fp16 (no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# --------------------------------------------------------------------------------------------
# Stage I


@dataclass(frozen=True)
class Stage1Config:
    """Optimisation settings of stage I (DESIGN.md §1)."""

    epochs: int
    steps_per_epoch: int
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 0
    grad_clip: float | None = 1.0
    w_i2t: float = 1.0
    w_t2i: float = 1.0
    logit_scale_max: float = 100.0
    precision: str = "fp32"  # resolved: fp32 | bf16 | fp16

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
    """Routes both towers through one `forward`, so DDP sees (and syncs) every gradient."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple:
        k, t, length = tokens.shape
        image_features = self.model.encode_image(images, normalize=True)
        text = self.model.encode_text(tokens.reshape(k * t, length), normalize=True)
        text_features = F.normalize(text.reshape(k, t, -1).mean(dim=1), dim=-1)
        return image_features, text_features, self.model.logit_scale


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
        self.forward: nn.Module = _ClipForward(model)
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
            TrainingError: a non-finite loss (names the epoch and step); the model's state is
                then unusable and must not be checkpointed.
        """
        cfg = self.config
        self.model.train()
        epoch = self.epoch + 1
        totals = torch.zeros(3, dtype=torch.float64)
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
                    image_features, text_features, labels, logit_scale, cfg.w_i2t, cfg.w_t2i
                )
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"non-finite loss ({loss.item()}) at epoch {epoch}, step {step}; "
                    "lower the learning rate or use fp32"
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
            totals += torch.tensor(
                [loss.item(), parts["i2t"].item(), parts["t2i"].item()], dtype=torch.float64
            )
            images_seen += images.shape[0]
            steps = step
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{images_seen / elapsed:.0f}")
        if steps == 0:
            raise TrainingError(f"epoch {epoch}: the data loader yielded no batch")
        seconds = time.perf_counter() - start
        self.epoch = epoch
        mean = (totals / steps).tolist()
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

    def state_dict(self) -> dict:
        """Everything a resumed run needs; loadable with `torch.load(weights_only=True)`."""
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.epoch = int(state["epoch"])


# --------------------------------------------------------------------------------------------
# Evaluation and embedding passes


def encode_loader(
    model: nn.Module,
    batches: Iterable,
    device: torch.device,
    precision: str = "fp32",
    normalize: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """Image embeddings batch by batch: yields (features on CPU float32, labels, keys)."""
    model.eval()
    with torch.inference_mode():
        for images, labels, keys in batches:
            with autocast(device, precision):
                feats = model.encode_image(
                    images.to(device, non_blocking=True), normalize=normalize
                )
            yield feats.float().cpu(), labels, list(keys)


def predict(
    model: nn.Module,
    batches: Iterable,
    text_features: torch.Tensor,
    device: torch.device,
    precision: str = "fp32",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 6 predictions: argmax_c of v · u_c. Returns (y_true, y_pred) on CPU."""
    text = F.normalize(text_features.float().to(device), dim=-1)
    y_true, y_pred = [], []
    for feats, labels, _ in encode_loader(model, batches, device, precision, normalize=True):
        y_pred.append((feats.to(device) @ text.T).argmax(dim=1).cpu())
        y_true.append(labels.cpu())
    if not y_true:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.cat(y_true), torch.cat(y_pred)
