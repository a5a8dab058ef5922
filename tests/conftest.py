"""Fixtures; the helpers they use live in `support.py`."""

from __future__ import annotations

import pytest

from support import tiny_npz_files


def pytest_collection_modifyitems(config, items):
    import torch

    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture
def tiny_npz(tmp_path) -> dict:
    """Three classes with 8/3/1 train images, 2 test images each."""
    return tiny_npz_files(tmp_path)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matmuls: more intra-op threads only add contention on a shared 2-core box."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
