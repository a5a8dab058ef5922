"""Evaluate a CLIP-style model on shards with eq. 6 prediction and the long-tail report."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ecvl.data.reader import check_shard_count, eval_pipeline, make_loader
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
    device: torch.device,
    precision: str = "fp32",
    batch_size: int = 256,
    num_workers: int = 0,
) -> tuple[dict, np.ndarray, np.ndarray]:
    """Many/Medium/Few/All accuracy and macro F1 of `model` on every sample of `urls`.

    Returns:
        (report, y_true, y_pred) with numpy label arrays.
    """
    workers = check_shard_count(len(urls), 1, num_workers) if urls else 0
    loader = make_loader(
        eval_pipeline(urls, transform, batch_size), workers, pin_memory=device.type == "cuda"
    )
    y_true, y_pred = predict(model, loader, text_features, device, precision)
    y_true, y_pred = y_true.numpy(), y_pred.numpy()
    report = classification_report(y_true, y_pred, list(class_groups), len(class_groups))
    return report, y_true, y_pred


def evaluate_clip(
    bundle: ClipBundle,
    urls: list[str],
    classnames: Sequence[str],
    templates: Sequence[str],
    class_groups: Sequence[str],
    device: torch.device,
    precision: str = "fp32",
    batch_size: int = 256,
    num_workers: int = 0,
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
        device,
        precision,
        batch_size,
        num_workers,
    )
