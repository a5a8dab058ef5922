"""Device placement under torchrun, simulated: no GPU needed (`choose_device` is pure); the
collection pattern of the export with real gloo processes."""

import socket

import pytest
import torch.multiprocessing as mp

from ecvl.distributed import (
    WorldInfo,
    choose_device,
    collect_in_order,
    init_distributed,
    on_main,
    shutdown,
    world_info,
)
from ecvl.errors import DataError, DeviceError

ONE = WorldInfo()


def _rank(local_rank: int, local_world: int = 4) -> WorldInfo:
    return WorldInfo(
        rank=local_rank, world_size=local_world, local_rank=local_rank, local_world_size=local_world
    )


def test_world_from_torchrun_environment(monkeypatch):
    for key, value in {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "4",
    }.items():
        monkeypatch.setenv(key, value)
    assert world_info() == WorldInfo(rank=5, world_size=8, local_rank=1, local_world_size=4)


def test_single_process_defaults(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert world_info() == ONE


@pytest.mark.parametrize("spec", ["auto", "cuda"])
def test_each_rank_takes_its_local_gpu(spec):
    assert [choose_device(spec, _rank(r), cuda_count=4) for r in range(4)] == [
        "cuda:0",
        "cuda:1",
        "cuda:2",
        "cuda:3",
    ]


def test_one_visible_gpu_per_process_is_gpu_zero():
    # a launcher that sets CUDA_VISIBLE_DEVICES per rank: every process sees one GPU
    assert [choose_device("auto", _rank(r), cuda_count=1) for r in range(4)] == ["cuda:0"] * 4


def test_more_ranks_than_gpus_is_refused_with_the_numbers():
    with pytest.raises(DeviceError, match="LOCAL_RANK 2 needs GPU 2, but only 2"):
        choose_device("cuda", _rank(2), cuda_count=2)


def test_pinned_gpu_is_refused_under_torchrun():
    with pytest.raises(DeviceError, match="pins one GPU for every rank"):
        choose_device("cuda:1", _rank(1), cuda_count=4)


def test_pinned_gpu_in_one_process():
    assert choose_device("cuda:1", ONE, cuda_count=2) == "cuda:1"
    with pytest.raises(
        DeviceError, match=r"only 2 CUDA device\(s\) are visible \(cuda:0..cuda:1\)"
    ):
        choose_device("cuda:3", ONE, cuda_count=2)


@pytest.mark.parametrize("spec", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu(spec):
    with pytest.raises(DeviceError, match="no CUDA device is visible"):
        choose_device(spec, ONE, cuda_count=0)


def test_auto_and_mps():
    assert choose_device("auto", ONE, cuda_count=0) == "cpu"
    assert choose_device("auto", ONE, cuda_count=0, mps=True) == "mps"
    assert choose_device("cpu", _rank(3), cuda_count=4) == "cpu"
    with pytest.raises(DeviceError, match="no MPS backend"):
        choose_device("mps", ONE, cuda_count=0)


# collect_in_order / on_main in 3 gloo processes (items dealt 0, 1, 2, 0, 1, 2, 0)

ITEMS = 7


def _collect(rank: int, world_size: int, port: int, fail: str, out) -> None:
    import os

    import torch

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    world = WorldInfo(rank, world_size, rank, world_size)
    init_distributed(world, torch.device("cpu"))
    try:

        def produce():
            for i in range(rank, ITEMS, world_size):
                if fail == f"produce {i}":
                    raise DataError(f"item {i} is bad")
                yield {"item": i, "rank": rank}

        seen = []

        def consume(i, result):
            if fail == f"consume {i}":
                raise DataError(f"cannot write item {i}")
            seen.append((i, result["item"], result["rank"]))

        try:
            collect_in_order(world, ITEMS, produce(), consume if rank == 0 else None)
            out.put((rank, "done", seen, on_main(world, lambda: "from rank 0")))
        except DataError as e:
            out.put((rank, "error", str(e), None))
    finally:
        shutdown(world)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "fail,message",
    [
        ("", None),
        ("produce 5", "item 5 is bad"),
        pytest.param("consume 3", "cannot write item 3", marks=pytest.mark.slow),
    ],
)
def test_collect_in_order_under_three_gloo_processes(fail, message):
    """Rank 0 gets every item once, in order, from the rank it was dealt to; an error on any
    rank (rank 2's item 5, or rank 0 writing item 3) stops all three with its message."""
    ctx = mp.get_context("spawn")
    out, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_collect, args=(rank, 3, port, fail, out)) for rank in range(3)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    if message is None:
        assert [r[1] for r in results] == ["done"] * 3
        assert results[0][2] == [(i, i, i % 3) for i in range(ITEMS)]
        assert [r[3] for r in results] == ["from rank 0"] * 3
    else:
        assert [(r[1], r[2]) for r in results] == [("error", message)] * 3


def test_collect_in_order_in_one_process_is_a_loop():
    seen = []
    collect_in_order(ONE, 3, iter("abc"), lambda i, r: seen.append((i, r)))
    assert seen == [(0, "a"), (1, "b"), (2, "c")]
    assert on_main(ONE, lambda: 5) == 5
    with pytest.raises(DataError, match="bad"):
        collect_in_order(ONE, 2, iter("ab"), lambda i, r: (_ for _ in ()).throw(DataError("bad")))
