"""Class text embeddings from prompt templates (CLIP's zero-shot classifier recipe).

Each class c gets `u_c = normalise(mean_t normalise(L(template_t.format(name_c))))`, computed
in one place, `encode_class_prompts`: on tokens prepared once by `tokenize_prompts` for stage I's
differentiable training step, and through `class_text_features` (names in, no grad) for
evaluation and export.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ecvl.errors import DataError

logger = logging.getLogger(__name__)


def build_prompts(classnames: Sequence[str], templates: Sequence[str]) -> list[list[str]]:
    """Fill every template with every class name.

    Underscores in class names are shown as spaces (`"aquarium_fish"` -> `"aquarium fish"`),
    as dataset class lists use them as word separators.

    Args:
        classnames: K class names.
        templates: T format strings, each with exactly one `{}`.

    Returns:
        K lists of T prompts, in class then template order.

    Raises:
        DataError: no class names or templates, an empty class name, or a template without
            exactly one `{}`.
    """
    if len(classnames) == 0:
        raise DataError("no class names to build prompts for")
    if len(templates) == 0:
        raise DataError("no prompt templates given")
    for template in templates:
        if not isinstance(template, str) or template.count("{}") != 1:
            raise DataError(f"prompt template {template!r} must contain exactly one '{{}}'")
    prompts = []
    for name in classnames:
        shown = str(name).replace("_", " ").strip()
        if not shown:
            raise DataError(f"empty class name {name!r} in the class list")
        try:
            prompts.append([template.format(shown) for template in templates])
        except (IndexError, KeyError, ValueError) as exc:
            raise DataError(f"cannot fill prompt templates {list(templates)}: {exc}") from exc
    return prompts


def tokenize_prompts(
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
) -> torch.Tensor:
    """Tokenise all prompts once, for repeated differentiable encoding.

    Args:
        tokenizer: an open_clip tokenizer (`ClipBundle.tokenizer`).
        classnames: K class names.
        templates: T templates with one `{}` each.

    Returns:
        A `LongTensor` of shape (K, T, context_length).

    Raises:
        DataError: see `build_prompts`.
    """
    prompts = build_prompts(classnames, templates)
    flat = [p for per_class in prompts for p in per_class]
    tokens = tokenizer(flat)
    return tokens.reshape(len(prompts), len(templates), -1)


def encode_class_prompts(
    model: nn.Module, tokens: torch.Tensor, batch_size: int | None = None
) -> torch.Tensor:
    """Class embeddings from pre-tokenised prompts; differentiable when grad is enabled.

    The one place class prompts go through the text tower: stage I's training step, and
    `class_text_features` for evaluation and export.

    Args:
        model: an open_clip model.
        tokens: (K, T, L) from `tokenize_prompts`, or (K, L) for one template.
        batch_size: prompts per text-tower call, rounded down to whole classes (at least one);
            None = all at once. With grad enabled each call is activation-checkpointed, so only
            one chunk's activations are kept (K = 1,000 classes would need 15-20 GB at once).

    Returns:
        (K, d): per class, the mean of its L2-normalised prompt embeddings, L2-normalised
        again.
    """
    if tokens.dim() == 2:
        tokens = tokens.unsqueeze(1)
    if tokens.dim() != 3:
        raise ValueError(f"expected tokens of shape (K, T, L), got {tuple(tokens.shape)}")
    k, t, length = tokens.shape
    device = next(model.parameters()).device
    per_chunk = k if batch_size is None else max(1, batch_size // t)

    def encode(chunk: torch.Tensor) -> torch.Tensor:
        feats = model.encode_text(chunk.reshape(-1, length).to(device), normalize=True)
        return F.normalize(feats.reshape(chunk.shape[0], t, -1).mean(dim=1), dim=-1)

    if per_chunk >= k:
        return encode(tokens)
    checkpointed = torch.is_grad_enabled()
    return torch.cat(
        [
            checkpoint(encode, chunk, use_reentrant=False) if checkpointed else encode(chunk)
            for chunk in tokens.split(per_chunk)
        ]
    )


def class_text_features(
    model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
    device: str | torch.device | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """Class embeddings `u_c` for all classes, encoded in chunks.

    Follows the caller's grad mode: wrap in `torch.no_grad()` for evaluation (chunking then
    bounds memory); with grad enabled the result is differentiable.

    Args:
        model: an open_clip model.
        tokenizer: its tokenizer.
        classnames: K class names (`_` shown as spaces).
        templates: T templates with one `{}` each; embeddings are averaged over them.
        device: where to return the result; default the model's device.
        batch_size: prompts encoded per forward pass (rounded to whole classes).

    Returns:
        (K, d) L2-normalised class embeddings.

    Raises:
        DataError: see `build_prompts`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tokens = tokenize_prompts(tokenizer, classnames, templates)
    features = encode_class_prompts(model, tokens, batch_size)
    logger.debug("encoded %d classes x %d templates", tokens.shape[0], len(templates))
    return features if device is None else features.to(device)
