"""Plain linear probe on frozen image embeddings: the baseline a user tries first.

A K-way logistic regression on the cached embeddings, with no class prompts: `logits =
W (sqrt(d) * f/|f|) + b`. Scaling the unit-norm feature by `sqrt(d)` gives each coordinate
unit RMS, as standardised inputs to a logistic regression have, so that the same optimiser
settings as the adapter's train it in the same number of steps. Zero-initialised: it starts
from uniform predictions, not from the text tower.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ecvl.errors import ModelError
from ecvl.models.heads import build_checked

__all__ = ["LinearProbe"]


class LinearProbe(nn.Module):
    """K-way linear classifier on L2-normalised, RMS-scaled embeddings.

    `forward` returns class logits; `scores` (what `ecvl.stage2.predict_cached` ranks by) are
    the same logits, as the probe does not use the class text features.

    Args:
        dim: embedding width d.
        num_classes: K.

    Raises:
        ValueError: a non-positive `dim` or `num_classes`.
    """

    name = "linear_probe"

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        for label, value in (("dim", dim), ("num_classes", num_classes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be a positive int, got {value!r}")
        self.dim = dim
        self.num_classes = num_classes
        self.weight = nn.Parameter(torch.zeros(num_classes, dim))
        self.bias = nn.Parameter(torch.zeros(num_classes))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.shape[-1] != self.dim:
            raise ValueError(
                f"expected features of width {self.dim}, got shape {tuple(features.shape)}"
            )
        x = F.normalize(features.to(self.weight.dtype), dim=-1) * math.sqrt(self.dim)
        return F.linear(x, self.weight, self.bias)

    def scores(self, features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Class scores for prediction; the text features are not used by a probe."""
        del text_features
        return self(features)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_classes={self.num_classes}"

    def config(self) -> dict[str, Any]:
        """Plain-JSON description that `from_config` turns back into this architecture."""
        return {"name": self.name, "dim": self.dim, "num_classes": self.num_classes}

    @classmethod
    def from_config(
        cls,
        config: Mapping[str, Any],
        state_dict: Mapping[str, torch.Tensor] | None = None,
    ) -> LinearProbe:
        """Rebuild a probe from `config()` and, optionally, its saved weights.

        Raises:
            ModelError: the config or the weights do not describe a linear probe.
        """
        cfg = dict(config)
        name = cfg.pop("name", cls.name)
        if name != cls.name:
            raise ModelError(f"probe config names {name!r}, expected {cls.name!r}")
        if set(cfg) != {"dim", "num_classes"}:
            raise ModelError(
                f"linear probe config needs exactly 'dim' and 'num_classes', got {sorted(cfg)}"
            )
        return build_checked(cls, cfg, config, state_dict, "linear probe")
