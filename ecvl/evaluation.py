"""Evaluate a CLIP-style model on shards with eq. 6 prediction and the long-tail report."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ecvl.data.reader import check_shard_count, eval_pipeline, make_loader
from ecvl.distributed import WorldInfo, all_gather_objects
from ecvl.engine import predict
from ecvl.metrics import classification_report
from ecvl.models.clip import ClipBundle
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
