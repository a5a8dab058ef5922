"""Evaluate a CLIP-style model on shards with eq. 6 prediction and the long-tail report; the
embedding pass (`encode_loader`) that evaluation and export share."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ecvl.data.reader import check_shard_count, eval_pipeline, make_loader
from ecvl.distributed import WorldInfo, all_gather_objects
from ecvl.metrics import classification_report
from ecvl.models.clip import ClipBundle
from ecvl.precision import autocast
from ecvl.text import class_text_features


def evaluate_on_shards(
    model: nn.Module,
    urls: list[str],
    transform: Callable,
    text_features: torch.Tensor,
    class_groups: Sequence[str],
    *,
    device: torch.device,
    precision: str = "fp32",
    batch_size: int = 256,
    num_workers: int = 0,
    world: WorldInfo | None = None,
) -> tuple[dict, np.ndarray, np.ndarray]:
    """Many/Medium/Few/All accuracy and macro F1 of `model` on every sample of `urls`.

    Under torchrun (`world` with several ranks, process group up) every rank predicts its own
    shards and the predictions are gathered, so no rank idles at a barrier; every rank returns
    the same report, with the samples grouped by rank.

    Returns:
        (report, y_true, y_pred) with numpy label arrays.
    """
    world = world or WorldInfo()
    mine = list(urls)[world.rank :: world.world_size]
    y_true = y_pred = torch.zeros(0, dtype=torch.long)  # a rank with no shard of its own
    if mine:
        workers = check_shard_count(len(mine), 1, num_workers)
        pipe = eval_pipeline(mine, transform, batch_size, device=device)
        loader = make_loader(pipe, workers, device)
        y_true, y_pred = predict(model, loader, text_features, device, precision)
    parts = all_gather_objects(world, (y_true.numpy(), y_pred.numpy()))
    y_true = np.concatenate([t for t, _ in parts])
    y_pred = np.concatenate([p for _, p in parts])
    report = classification_report(y_true, y_pred, list(class_groups), len(class_groups))
    return report, y_true, y_pred


def evaluate_clip(
    bundle: ClipBundle,
    urls: list[str],
    classnames: Sequence[str],
    templates: Sequence[str],
    class_groups: Sequence[str],
    *,
    device: torch.device,
    precision: str = "fp32",
    batch_size: int = 256,
    num_workers: int = 0,
    world: WorldInfo | None = None,
) -> tuple[dict, np.ndarray, np.ndarray]:
    """Zero-shot-style evaluation of a CLIP model: class prompts (templates averaged) as the
    classifier, eq. 6 prediction, the long-tail report."""
    with torch.no_grad():
        text = class_text_features(
            bundle.model.eval(), bundle.tokenizer, classnames, templates, device=device
        )
    return evaluate_on_shards(
        bundle.model,
        urls,
        bundle.eval_transform,
        text,
        class_groups,
        device=device,
        precision=precision,
        batch_size=batch_size,
        num_workers=num_workers,
        world=world,
    )


# Embedding and prediction passes, shared by evaluation and export


def _encoded(
    model: nn.Module, batches: Iterable, device: torch.device, precision: str, normalize: bool
) -> Iterator[tuple]:
    """Inference mode covers each forward, never a `yield`: it is a per-thread switch, so a
    generator suspended inside it would keep the caller's whole thread in inference mode, and a
    consumer that stops on an exception leaves it on until the generator is collected (a model
    created meanwhile gets inference-tensor weights that cannot be loaded into)."""
    model.eval()
    for images, labels, keys, *rest in batches:
        with torch.inference_mode(), autocast(device, precision):
            feats = model.encode_image(images.to(device, non_blocking=True), normalize=normalize)
            feats = feats.float()
        yield feats, labels, list(keys), *rest


def encode_loader(
    model: nn.Module,
    batches: Iterable,
    device: torch.device,
    precision: str = "fp32",
    normalize: bool = False,
) -> Iterator[tuple]:
    """Image embeddings batch by batch: yields (features on CPU float32, labels, keys), then any
    further fields of the batch unchanged (the export's encoded image bytes)."""
    for feats, *rest in _encoded(model, batches, device, precision, normalize):
        yield feats.cpu(), *rest


def predict(
    model: nn.Module,
    batches: Iterable,
    text_features: torch.Tensor,
    device: torch.device,
    precision: str = "fp32",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 6 predictions: argmax_c of v · u_c. Returns (y_true, y_pred) on CPU.

    Features stay on the device; predictions come back to the host once, at the end."""
    text = F.normalize(text_features.float().to(device), dim=-1)
    y_true, y_pred = [], []
    for feats, labels, _ in _encoded(model, batches, device, precision, normalize=True):
        y_pred.append((feats @ text.T).argmax(dim=1))
        y_true.append(labels)
    if not y_true:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.cat(y_true).cpu(), torch.cat(y_pred).cpu()
