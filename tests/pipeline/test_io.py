"""Atomic outputs across filesystems: the final rename happens on the target's filesystem."""

import os
import tempfile
from pathlib import Path

import pytest

from pipeline.io import replace

SHM = Path("/dev/shm")


@pytest.mark.skipif(
    not SHM.is_dir() or os.stat(SHM).st_dev == os.stat(tempfile.gettempdir()).st_dev,
    reason="needs /dev/shm on another filesystem than the temp dir",
)
def test_replace_moves_a_directory_and_a_file_across_filesystems(tmp_path):
    with tempfile.TemporaryDirectory(dir=SHM) as other:
        src_dir, src_file = Path(other) / "store", Path(other) / "blob"
        src_dir.mkdir()
        (src_dir / "a").write_text("new")
        src_file.write_text("file")
        dst_dir, dst_file = tmp_path / "out" / "store", tmp_path / "out" / "blob"
        dst_dir.mkdir(parents=True)
        (dst_dir / "old").write_text("old")
        replace(src_dir, dst_dir)
        replace(src_file, dst_file)
        assert sorted(p.name for p in dst_dir.iterdir()) == ["a"]
        assert dst_file.read_text() == "file"
        assert not src_dir.exists() and not src_file.exists()
        assert sorted(p.name for p in dst_dir.parent.iterdir()) == ["blob", "store"]
