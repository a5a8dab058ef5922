"""`count_samples` reads tar headers itself; it must count exactly what `tarfile` iterates, on
whole, cut and corrupted shards, since every stage trusts it to catch a truncated shard."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest

from ecvl.data.shards import count_samples, write_split_shards
from ecvl.data.sources import Split
from support import make_images


def _tarfile_count(path) -> int:
    """The reference: what `tarfile` iterates."""
    n = 0
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".cls"):
                    n += 1
    except (tarfile.TarError, OSError, EOFError):
        pass
    return n


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> bytes:
    """One shard as `ecvl shard` writes it: 12 samples of raw pixels, .cls and .json."""
    out = tmp_path_factory.mktemp("shards")
    split = Split(
        [f"k{i:03d}" for i in range(12)], np.arange(12) % 3, images=make_images(12, 8, seed=3)
    )
    write_split_shards(
        split, "train", ("a", "b", "c"), out, 100, 0.0, encoding="raw", progress=False
    )
    return (out / "train-000000.tar").read_bytes()


def test_whole_shard(shard, tmp_path):
    path = tmp_path / "s.tar"
    path.write_bytes(shard)
    assert count_samples(path) == _tarfile_count(path) == 12


def test_every_cut_counts_what_tarfile_counts(shard, tmp_path):
    path = tmp_path / "cut.tar"
    cuts = sorted({*range(0, len(shard), 173), *range(0, len(shard), 512), len(shard) - 1})
    seen = set()
    for cut in cuts:
        path.write_bytes(shard[:cut])
        expected = _tarfile_count(path)
        assert count_samples(path) == expected, f"cut at byte {cut}"
        seen.add(expected)
    assert len(seen) == 13  # every count from 0 to 12 came up: the cuts cover each sample


def test_corrupted_bytes_count_what_tarfile_counts(shard, tmp_path):
    path = tmp_path / "bad.tar"
    rng = np.random.default_rng(0)
    for pos in [*range(0, 512), *rng.integers(512, len(shard), 300).tolist()]:
        data = bytearray(shard)
        data[pos] ^= 0x5A
        path.write_bytes(bytes(data))
        assert count_samples(path) == _tarfile_count(path), f"byte {pos} changed"


def test_long_names_and_pax_headers(tmp_path):
    """Names over 100 bytes: a GNU long-name member, a PAX record or the ustar prefix field."""
    path = tmp_path / "long.tar"
    long_key = "d" * 120 + "/" + "x" * 60
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT):
        with tarfile.open(path, "w", format=fmt) as tf:
            for name in (f"{long_key}.cls", f"{long_key}.npy", "short.cls", "é.cls"):
                info = tarfile.TarInfo(name)
                info.size = 1
                tf.addfile(info, io.BytesIO(b"1"))
            folder = tarfile.TarInfo("folder.cls")
            folder.type = tarfile.DIRTYPE
            tf.addfile(folder)
        assert count_samples(path) == _tarfile_count(path) == 3, fmt


def test_not_a_tar_counts_nothing(tmp_path):
    for name, data in [
        ("empty.tar", b""),
        ("text.tar", b"hello" * 300),
        ("zeros.tar", bytes(2048)),
    ]:
        (tmp_path / name).write_bytes(data)
        assert count_samples(tmp_path / name) == _tarfile_count(tmp_path / name) == 0
    assert count_samples(tmp_path / "missing.tar") == 0
