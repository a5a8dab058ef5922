"""Mixed precision: what `auto` means on a device, and the autocast context for it."""

from __future__ import annotations

import contextlib
import logging

import torch

log = logging.getLogger(__name__)


def precision_for(device_type: str, capability: tuple[int, int] | None = None) -> str:
    """What `auto` means: bf16 on CUDA GPUs with native bf16 (compute capability >= 8.0,
    Ampere and newer), fp16 with a grad scaler on older GPUs (V100, T4, P100, where
    `torch.cuda.is_bf16_supported()` also counts slow emulation), fp32 elsewhere."""
    if device_type != "cuda":
        return "fp32"
    return "bf16" if capability is not None and tuple(capability) >= (8, 0) else "fp16"


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` → `precision_for(device)`; bf16/fp16 off CUDA fall back to fp32 (logged)."""
    if precision != "auto":
        if precision in ("bf16", "fp16") and device.type != "cuda":
            log.info("precision %s needs CUDA; using fp32 on %s", precision, device)
            return "fp32"
        return precision
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    return precision_for(device.type, capability)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed-precision context for `precision` in fp32 | bf16 | fp16 (no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
