"""Stage-II residual adapter (ECVL eq. 7) on frozen image embeddings.

`f* = lambda * ReLU(W^T f + b) + (1 - lambda) * f` with `W` d×d. The module returns `f*`
*unnormalised*; the caller normalises (`v* = f*/|f*|`, pass `normalize=True` or use
`torch.nn.functional.normalize`) before the cosine logits of eq. 6. Keeping the forward
unnormalised makes `lambda = 0` return exactly the input, so stage II then predicts exactly
as stage I does.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from ecvl.data.textfiles import read_json
from ecvl.errors import ModelError
from ecvl.models.heads import build_checked
from ecvl.models.linear_probe import LinearProbe

log = logging.getLogger(__name__)

INITS = ("uniform", "identity")
# A trained head on disk (`ecvl stage2` writes them; `ecvl package` copies them unchanged):
# `{"adapter": <config()>, ...}` and the state dict.
ADAPTER_CONFIG = "adapter.json"
ADAPTER_WEIGHTS = "adapter.safetensors"


class ResidualAdapter(nn.Module):
    """Residual MLP adapter of eq. 7, blending a learned feature with the frozen one.

    Args:
        dim: embedding width d (input and output).
        residual_ratio: lambda in [0, 1], the weight of the learned branch (paper default 0.2);
            0 leaves features untouched, 1 keeps only the learned branch.
        bias: learn `b`.
        init: "uniform" (torch.nn.Linear's default distribution, U(-1/sqrt(d), 1/sqrt(d)),
            drawn from `seed`) or "identity" (`W = I`, `b = 0`, so that
            `f* = lambda * ReLU(f) + (1 - lambda) * f` at the start).
        seed: seeds the initial weights; the global torch RNG is never used.

    Raises:
        ValueError: on a non-positive `dim`, a `residual_ratio` outside [0, 1] or an unknown `init`.
    """

    name = "residual"

    def __init__(
        self,
        dim: int,
        residual_ratio: float = 0.2,
        *,
        bias: bool = True,
        init: str = "uniform",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        residual_ratio = float(residual_ratio)
        if not (0.0 <= residual_ratio <= 1.0):  # also rejects NaN
            raise ValueError(f"residual_ratio (lambda) must be in [0, 1], got {residual_ratio}")
        if init not in INITS:
            raise ValueError(f"unknown init {init!r} (known: {', '.join(INITS)})")
        self.dim = dim
        self.residual_ratio = residual_ratio
        self.init = init
        # Stored as torch.nn.Linear stores it (out, in): F.linear computes f @ weight.T, so the
        # paper's W is `weight.T`.
        self.weight = nn.Parameter(torch.empty(dim, dim))
        self.bias = nn.Parameter(torch.empty(dim)) if bias else None
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """Re-draw the initial weights from `seed` (see the class docstring for `init`)."""
        if self.init == "identity":
            self.weight.copy_(torch.eye(self.dim))
            if self.bias is not None:
                self.bias.zero_()
            return
        gen = torch.Generator().manual_seed(int(seed))
        bound = 1.0 / math.sqrt(self.dim)
        w = torch.rand(self.dim, self.dim, generator=gen, dtype=torch.float64) * 2 - 1
        self.weight.copy_((w * bound).to(self.weight.dtype))
        if self.bias is not None:
            b = torch.rand(self.dim, generator=gen, dtype=torch.float64) * 2 - 1
            self.bias.copy_((b * bound).to(self.bias.dtype))

    def forward(self, features: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Adapt features `(..., d)`; returns `f*`, or `v* = f*/|f*|` when `normalize` is True.

        The input is cast to the adapter's dtype (the export caches float16 embeddings).
        """
        if features.shape[-1] != self.dim:
            raise ValueError(
                f"expected features of width {self.dim}, got shape {tuple(features.shape)}"
            )
        f = features.to(self.weight.dtype)
        lam = self.residual_ratio
        # With lam == 0 this is 0 * finite + 1 * f == f bit for bit.
        out = lam * F.relu(F.linear(f, self.weight, self.bias)) + (1.0 - lam) * f
        return F.normalize(out, dim=-1) if normalize else out

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, residual_ratio={self.residual_ratio}, "
            f"bias={self.bias is not None}, init={self.init!r}"
        )

    def config(self) -> dict[str, Any]:
        """Plain-JSON description that `from_config` turns back into this architecture."""
        return {
            "name": self.name,
            "dim": self.dim,
            "residual_ratio": self.residual_ratio,
            "bias": self.bias is not None,
            "init": self.init,
        }

    @classmethod
    def from_config(
        cls,
        config: Mapping[str, Any],
        state_dict: Mapping[str, torch.Tensor] | None = None,
    ) -> ResidualAdapter:
        """Rebuild an adapter from `config()` and, optionally, its saved weights.

        Args:
            config: the dict `config()` returned (e.g. read back from a checkpoint).
            state_dict: the module's `state_dict()`; without it the weights are freshly
                initialised.

        Returns:
            The adapter, in training mode, on the CPU.

        Raises:
            ModelError: the config or the weights do not describe a residual adapter.
        """
        cfg = dict(config)
        name = cfg.pop("name", cls.name)
        if name != cls.name:
            raise ModelError(f"adapter config names {name!r}, expected {cls.name!r}")
        known = {"dim", "residual_ratio", "bias", "init"}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ModelError(f"unknown adapter config key(s) {unknown} (known: {sorted(known)})")
        if "dim" not in cfg:
            raise ModelError("adapter config has no 'dim'")
        return build_checked(cls, cfg, config, state_dict, "adapter")


# Every stage-II head, by the `name` its `config()` records.
ADAPTERS: dict[str, type[nn.Module]] = {
    ResidualAdapter.name: ResidualAdapter,
    LinearProbe.name: LinearProbe,
}


def build_adapter(
    config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor] | None = None
) -> nn.Module:
    """Adapter named by `config["name"]` (default "residual"), rebuilt via its `from_config`.

    Raises:
        KeyError: unknown adapter name (the message lists the known names).
        ModelError: see `ResidualAdapter.from_config` and `LinearProbe.from_config`.
    """
    name = config.get("name", ResidualAdapter.name)
    try:
        cls = ADAPTERS[name]
    except KeyError:
        raise KeyError(f"unknown adapter {name!r} (known: {', '.join(sorted(ADAPTERS))})") from None
    return cls.from_config(config, state_dict)


def save_head(
    directory: str | os.PathLike[str],
    state: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    **fields: Any,
) -> None:
    """Write a trained head as `load_adapter` reads it: `adapter.safetensors` (the weights, on the
    CPU) and `adapter.json` (`{"adapter": config, **fields}`; `fields` record the run)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    safetensors.torch.save_file(weights, str(directory / ADAPTER_WEIGHTS))
    record = {"adapter": dict(config), **fields}
    (directory / ADAPTER_CONFIG).write_text(json.dumps(record, indent=2) + "\n")


def load_adapter(directory: str | os.PathLike[str]) -> nn.Module:
    """The trained head saved in `directory` (`adapter.json` + `adapter.safetensors`), rebuilt by
    `build_adapter`, in eval mode on the CPU. Safetensors hold tensors only: nothing unpickled.

    Raises:
        ModelError: a file is missing or unreadable, or config and weights disagree.
    """
    directory = Path(directory)
    config_path, weights_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ModelError(f"no trained head at {directory}: {path.name} is missing")
    try:
        config = read_json(config_path)["adapter"]
        state_dict = safetensors.torch.load_file(str(weights_path))
    except Exception as e:  # OSError, JSON, a missing key, safetensors' own error type
        raise ModelError(f"cannot read the head in {directory}: {e}") from None
    try:
        head = build_adapter(config, state_dict)
    except KeyError as e:
        raise ModelError(f"{config_path}: {e.args[0]}") from None
    return head.eval()


__all__ = [
    "ADAPTERS",
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "INITS",
    "ResidualAdapter",
    "save_head",
    "build_adapter",
    "load_adapter",
]
