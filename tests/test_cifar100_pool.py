"""`benchmarks/cifar100_pool.py`: the official CIFAR-100 files as the npz pool the `npz` source
reads. The official files are absent here, so a tiny stand-in in their layout is written and
the MD5 list swapped for the stand-in's (the check itself is tested in test_sources.py)."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest

import ecvl.data.sources
from ecvl.data.sources import NpzSource
from support import load_script

REPO = Path(__file__).resolve().parents[1]


def _pool_script():
    return load_script("benchmarks/cifar100_pool.py")


@pytest.fixture
def fake_cifar(tmp_path, monkeypatch) -> Path:
    """`cifar-100-python/{train,test,meta}` with 6 train and 3 test images of 3 classes, in the
    official layout (channel-major rows, py2-style pickles), their MD5s made the expected ones."""
    base = tmp_path / "raw/cifar-100-python"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    files = {
        "train": {
            "data": rng.integers(0, 256, (6, 3072), dtype=np.uint8),
            "fine_labels": [2, 0, 1, 0, 2, 1],
        },
        "test": {"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), "fine_labels": [0, 1, 2]},
        "meta": {"fine_label_names": ["apple", "aquarium_fish", "baby"]},
    }
    md5 = {}
    for name, payload in files.items():
        blob = pickle.dumps(payload, protocol=2)
        (base / name).write_bytes(blob)
        md5[name] = hashlib.md5(blob).hexdigest()
    monkeypatch.setattr(ecvl.data.sources, "CIFAR100_MD5", md5)
    return tmp_path / "raw"


@pytest.mark.parametrize("split", ["train", "test"])
def test_pool_holds_the_split_as_the_npz_source_reads_it(fake_cifar, tmp_path, split, capsys):
    out = tmp_path / "pool" / f"cifar100_{split}.npz"
    script = _pool_script()
    assert script.main(["--root", str(fake_cifar), "--out", str(out), "--split", split]) == 0
    n = 6 if split == "train" else 3
    assert capsys.readouterr().out == f"wrote {out}: {n:,} images of the {split} split\n"
    with np.load(out, allow_pickle=False) as z:
        assert sorted(z.files) == ["classes", "images", "labels"]
        assert z["images"].shape == (n, 32, 32, 3) and z["images"].dtype == np.uint8
    raw = pickle.loads((fake_cifar / "cifar-100-python" / split).read_bytes())
    loaded = NpzSource(**{split: out}).load()
    assert loaded.classes == ("apple", "aquarium_fish", "baby")
    got = loaded.splits[split]
    assert got.labels.tolist() == raw["fine_labels"]
    # channel-major rows: pixel (0, 0) of image 0 is (R, G, B) = row[0], row[1024], row[2048]
    row = raw["data"][0]
    assert got.images[0, 0, 0].tolist() == [row[0], row[1024], row[2048]]
    assert not list(out.parent.glob(".*tmp*"))


def test_pool_refuses_to_replace_a_file_without_force(fake_cifar, tmp_path):
    out = tmp_path / "cifar100_train.npz"
    out.write_bytes(b"mine")
    script = _pool_script()
    with pytest.raises(SystemExit) as info:
        script.main(["--root", str(fake_cifar), "--out", str(out)])
    assert info.value.code == 2 and out.read_bytes() == b"mine"
    assert script.main(["--root", str(fake_cifar), "--out", str(out), "--force"]) == 0
    assert out.read_bytes() != b"mine"


def test_pool_without_the_files_is_one_error(tmp_path, capsys):
    code = _pool_script().main(["--root", str(tmp_path), "--out", str(tmp_path / "p.npz")])
    assert code == 1
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'cifar-100-python'} not found (--download fetches it)\n"
    )
    assert not (tmp_path / "p.npz").exists()
