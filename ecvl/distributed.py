"""Process-group set-up for torchrun, read from the environment once and returned.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE; a plain `python`/`ecvl` run
has none of them and is rank 0 of 1. NCCL on GPUs, gloo on CPUs. Also the few collectives the
stages use (object gathers and broadcasts, `collect_in_order`), each a no-op without a group.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ecvl.errors import DeviceError, EcvlError

T = TypeVar("T")


@dataclass(frozen=True)
class WorldInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def world_info() -> WorldInfo:
    """Rank, world size and local rank as torchrun set them (defaults: a single process)."""
    env = os.environ
    world_size = int(env.get("WORLD_SIZE", 1))
    return WorldInfo(
        rank=int(env.get("RANK", 0)),
        world_size=world_size,
        local_rank=int(env.get("LOCAL_RANK", 0)),
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", world_size)),
    )


def choose_device(spec: str, world: WorldInfo, cuda_count: int, mps: bool = False) -> str:
    """The device string this process uses for `spec` (auto | cpu | cuda | cuda:N | mps).

    Pure (the visible device count is an argument), so rank placement is testable anywhere:
    - `auto` is `cuda` when a GPU is visible, else `mps` when available, else `cpu`;
    - `cuda` takes GPU `LOCAL_RANK`, or GPU 0 when each process sees exactly one GPU (a
      launcher that sets CUDA_VISIBLE_DEVICES per rank);
    - `cuda:N` pins one GPU, which only makes sense for a single process.

    Raises:
        DeviceError: the spec cannot be satisfied here (names the spec and what is visible).
    """
    if spec == "auto":
        spec = "cuda" if cuda_count > 0 else "mps" if mps else "cpu"
    if spec == "cpu":
        return "cpu"
    if spec == "mps":
        if not mps:
            raise DeviceError("device 'mps' asked for, but this machine has no MPS backend")
        if world.distributed:
            raise DeviceError("device 'mps' cannot run under torchrun (one MPS device)")
        return "mps"
    if spec == "cuda" or spec.startswith("cuda:"):
        if cuda_count == 0:
            raise DeviceError(f"device {spec!r} asked for, but no CUDA device is visible")
        if spec == "cuda":
            if cuda_count == 1 and world.local_rank > 0 and world.local_world_size > 1:
                return "cuda:0"  # one visible GPU per process
            if world.local_rank >= cuda_count:
                raise DeviceError(
                    f"LOCAL_RANK {world.local_rank} needs GPU {world.local_rank}, but only "
                    f"{cuda_count} CUDA device(s) are visible (fewer processes per node, or "
                    "more GPUs)"
                )
            return f"cuda:{world.local_rank}"
        try:
            index = int(spec.split(":", 1)[1])
        except ValueError:
            raise DeviceError(f"device {spec!r}: expected cuda:N with an integer N") from None
        if world.distributed:
            raise DeviceError(
                f"device {spec!r} pins one GPU for every rank under torchrun; use 'cuda' or "
                "'auto' (each rank takes GPU LOCAL_RANK)"
            )
        if not 0 <= index < cuda_count:
            raise DeviceError(
                f"device {spec!r} asked for, but only {cuda_count} CUDA device(s) are visible "
                f"(cuda:0..cuda:{cuda_count - 1})"
            )
        return spec
    raise DeviceError(f"unknown device {spec!r}; expected auto, cpu, cuda, cuda:N or mps")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(spec: str, world: WorldInfo | None = None) -> torch.device:
    """This process's device for `spec` (see `choose_device`); makes it current on CUDA.

    Raises:
        DeviceError: the spec cannot be satisfied on this machine.
    """
    world = world or world_info()
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = torch.device(choose_device(spec, world, count, _mps_available()))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def init_distributed(world: WorldInfo, device: torch.device) -> None:
    """Join the process group when there is more than one process (idempotent)."""
    if world.distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(
            backend=backend, rank=world.rank, world_size=world.world_size, **kwargs
        )


def barrier(world: WorldInfo) -> None:
    if world.distributed and dist.is_initialized():
        dist.barrier()


def all_gather_objects(world: WorldInfo, obj):
    """Every rank's `obj`, in rank order (a one-element list without a process group)."""
    if not (world.distributed and dist.is_initialized()):
        return [obj]
    out = [None] * world.world_size
    dist.all_gather_object(out, obj)
    return out


def shutdown(world: WorldInfo) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(world: WorldInfo, obj, src: int = 0):
    """Rank `src`'s `obj` on every rank (`obj` itself without a process group)."""
    if not (world.distributed and dist.is_initialized()):
        return obj
    box = [obj if world.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@dataclass(frozen=True)
class _Failure:
    """What a rank sends in place of a result when producing it raised an `EcvlError`."""

    error: EcvlError


def on_main(world: WorldInfo, fn: Callable[[], T]) -> T:
    """`fn()` run on rank 0 alone; every rank returns its result, or raises its `EcvlError`
    (so a user error on rank 0 stops the others with the same one line, not a hang)."""
    out: Any = None
    if world.is_main:
        try:
            out = fn()
        except EcvlError as e:
            out = _Failure(e)
    out = broadcast_object(world, out)
    if isinstance(out, _Failure):
        raise out.error
    return out


def collect_in_order(
    world: WorldInfo,
    count: int,
    produce: Iterator,
    consume: Callable[[int, Any], None] | None,
) -> None:
    """Items 0..count-1 dealt to the ranks in turn (item i on rank i % world_size), handed to
    rank 0 in item order: the pattern of a stage whose ranks compute and one process writes.

    Every rank passes `produce`, an iterator over the results of its own items in order; rank 0
    calls `consume(i, result)` for every item i in order (the other ranks pass None). The items
    go in rounds of one per rank, each rank's result sent to rank 0 point to point, so rank 0
    holds its own result and at most one other rank's at a time. After each round rank 0 tells
    every rank whether to go on: an `EcvlError` raised by any rank's `produce` (or by rank 0's
    `consume`) stops every rank at the end of that round with that error (the first in item
    order), instead of leaving the others blocked in a send. Any other exception is a bug and
    ends the process (torchrun then stops the others). Without a process group it is a plain
    loop: `consume(i, result)` for each result, the first error raised as it comes.
    """
    size, rank = world.world_size, world.rank
    for first in range(0, count, size):
        own: Any = None
        if first + rank < count:
            try:
                own = next(produce)
            except EcvlError as e:
                own = _Failure(e)
        stop: EcvlError | None = None
        if rank:
            if first + rank < count:
                dist.send_object_list([own], dst=0)
        else:
            for i in range(first, min(count, first + size)):
                got = own
                if i > first:
                    box = [None]
                    dist.recv_object_list(box, src=i - first)
                    got = box[0]
                if stop is not None:
                    continue  # received only to release the sender
                if isinstance(got, _Failure):
                    stop = got.error
                    continue
                try:
                    consume(i, got)
                except EcvlError as e:
                    stop = e
        stop = broadcast_object(world, stop)
        if stop is not None:
            raise stop
