"""Device placement under torchrun, simulated: no GPU needed (`choose_device` is pure)."""

import pytest

from ecvl.distributed import WorldInfo, choose_device, world_info
from ecvl.errors import DeviceError

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
