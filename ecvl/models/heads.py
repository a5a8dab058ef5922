"""Rebuilding a stage-II head (adapter or probe) from its saved config and weights."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
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
