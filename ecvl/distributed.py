"""Process-group set-up for torchrun, read from the environment once and returned.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; a plain `python`/`ecvl` run has none of them
and is rank 0 of 1. NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class WorldInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def world_info() -> WorldInfo:
    """Rank, world size and local rank as torchrun set them (defaults: a single process)."""
    env = os.environ
    return WorldInfo(
        rank=int(env.get("RANK", 0)),
        world_size=int(env.get("WORLD_SIZE", 1)),
        local_rank=int(env.get("LOCAL_RANK", 0)),
    )


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """`auto` → this rank's GPU when CUDA is available, else CPU; other specs as given."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda":
        spec = f"cuda:{local_rank}"
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {spec!r} asked for, but CUDA is not available")
        torch.cuda.set_device(device)
    return device


def init_distributed(world: WorldInfo, device: torch.device) -> None:
    """Join the process group when there is more than one process (idempotent)."""
    if world.distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=world.rank, world_size=world.world_size)


def barrier(world: WorldInfo) -> None:
    if world.distributed and dist.is_initialized():
        dist.barrier()


def shutdown(world: WorldInfo) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
