"""Stage-II heads (adapter or probe): rebuilding one from its saved config and weights, and
turning its output into class logits, the one way evaluation and the packaged classifier do."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ecvl.errors import ModelError


def build_checked(
    cls: type[nn.Module],
    kwargs: Mapping[str, Any],
    config: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor] | None,
    what: str,
) -> nn.Module:
    """`cls(**kwargs)` with the saved weights loaded; any mismatch is a `ModelError` naming
    `what` and the config, never a raw TypeError or RuntimeError."""
    try:
        module = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ModelError(f"invalid {what} config {dict(config)}: {e}") from None
    if state_dict is not None:
        try:
            module.load_state_dict(state_dict)
        except RuntimeError as e:
            msg = str(e).splitlines()[0]
            raise ModelError(f"{what} weights do not match config {dict(config)}: {msg}") from None
    return module


def class_logits(
    head: nn.Module,
    features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """Eq. 6 logits of a stage-II head: `logit_scale * v* . u_c` with `v* = f*/|f*|`, `f*` the
    head's output; a head with its own `scores(features, text_features)` (the linear probe)
    gives those instead, unscaled.

    Args:
        head: an adapter (returns `f*`) or a head with `scores`.
        features: (N, d) image embeddings, un-normalised.
        text_features: (K, d) L2-normalised class text embeddings `u_c`.
        logit_scale: `1/tau` (the exponentiated CLIP `logit_scale`); 1 gives the plain cosine,
            which ranks the classes the same.

    Returns:
        (N, K) logits.
    """
    if hasattr(head, "scores"):
        return head.scores(features, text_features)
    return logit_scale * (F.normalize(head(features), dim=-1) @ text_features.T)
