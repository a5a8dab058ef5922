"""Atomic outputs: they replace only ECVL's own earlier outputs, and across filesystems the final
rename happens on the target's filesystem."""

import json
import os
import tempfile
from pathlib import Path

import pytest

from pipeline.io import (
    ADAPTERS,
    CLASSIFIER,
    EMBEDDINGS,
    SHARDS,
    STAGE1_MODEL,
    OutputError,
    atomic_dir,
    check_writable,
    kind_of,
    replace,
    save_checkpoint,
    write_csv,
    write_json,
    write_text,
)

SHM = Path("/dev/shm")
SHARDS_MANIFEST = '{"format": "ecvl-shards/1"}'


@pytest.mark.skipif(
    not SHM.is_dir() or os.stat(SHM).st_dev == os.stat(tempfile.gettempdir()).st_dev,
    reason="needs /dev/shm on another filesystem than the temp dir",
)
def test_replace_moves_a_directory_and_a_file_across_filesystems(tmp_path):
    with tempfile.TemporaryDirectory(dir=SHM) as other:
        src_dir, src_file = Path(other) / "store", Path(other) / "blob"
        src_dir.mkdir()
        (src_dir / "meta.json").write_text(SHARDS_MANIFEST)
        src_file.write_text("file")
        dst_dir, dst_file = tmp_path / "out" / "store", tmp_path / "out" / "blob"
        dst_dir.mkdir(parents=True)
        (dst_dir / "meta.json").write_text(SHARDS_MANIFEST)
        (dst_dir / "old").write_text("old")
        replace(src_dir, dst_dir)
        replace(src_file, dst_file)
        assert sorted(p.name for p in dst_dir.iterdir()) == ["meta.json"]
        assert dst_file.read_text() == "file"
        assert not src_dir.exists() and not src_file.exists()
        assert sorted(p.name for p in dst_dir.parent.iterdir()) == ["blob", "store"]


def _shards(path: Path, extra: str = "") -> Path:
    path.mkdir(parents=True)
    (path / "meta.json").write_text(SHARDS_MANIFEST)
    (path / "train-000000.tar").write_text(extra or "tar")
    return path


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_an_output_replaces_its_own_earlier_output(tmp_path):
    target = _shards(tmp_path / "shards", "old")
    with atomic_dir(target) as tmp:
        (tmp / "meta.json").write_text(SHARDS_MANIFEST)
        (tmp / "train-000000.tar").write_text("new")
    assert (target / "train-000000.tar").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]  # no temp left


def test_a_folder_ecvl_did_not_write_is_never_replaced(tmp_path):
    user = tmp_path / "models"
    (user / "stage1").mkdir(parents=True)
    (user / "stage1" / "weights.bin").write_bytes(b"\0\1")
    (user / "notes.txt").write_text("mine")
    before = _tree(tmp_path)
    with pytest.raises(OutputError, match=r"models is a folder ECVL did not write \(no meta"):
        with atomic_dir(user) as tmp:
            (tmp / "meta.json").write_text(SHARDS_MANIFEST)
    assert _tree(tmp_path) == before  # the user's files, and no temp folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


def test_an_empty_folder_or_file_may_be_replaced(tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "eval.json").touch()
    with atomic_dir(tmp_path / "shards") as tmp:
        (tmp / "meta.json").write_text(SHARDS_MANIFEST)
    write_json(tmp_path / "eval.json", {"a": 1})
    assert json.loads((tmp_path / "eval.json").read_text()) == {"a": 1}


def _link_to_a_file(path: Path) -> None:
    (path.parent / "x").write_text("x")
    path.symlink_to(path.parent / "x")


@pytest.mark.parametrize(
    ("existing", "write", "match"),
    [
        (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n..."), "json", "not a JSON file"),
        (lambda p: p.write_text("a,b\n1,2\n"), "json", "not a JSON file"),
        (lambda p: p.mkdir(), "json", "is a folder, where ECVL writes a JSON file"),
        (lambda p: p.write_bytes(bytes(range(256))), "text", "not a text file"),
        (_link_to_a_file, "text", "is a symbolic link"),
    ],
)
def test_a_file_ecvl_did_not_write_is_never_replaced(tmp_path, existing, write, match):
    target = tmp_path / "out"
    existing(target)
    before = _tree(tmp_path)
    with pytest.raises(OutputError, match=match):
        if write == "json":
            write_json(target, {"a": 1})
        else:
            write_text(target, "hello\n")
    assert _tree(tmp_path) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_files_replace_files_of_their_kind(tmp_path):
    write_json(tmp_path / "m.json", {"a": 1})
    write_json(tmp_path / "m.json", {"a": 2})
    write_text(tmp_path / "r.md", "one")
    write_text(tmp_path / "r.md", "two")
    (tmp_path / "p.csv").write_text("1\n")  # text that happens to parse as JSON
    write_csv(tmp_path / "p.csv", [{"x": 1}])
    assert (tmp_path / "p.csv").read_text().splitlines() == ["x", "1"]
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 2}


def test_kinds_recognise_what_each_stage_writes(tmp_path):
    model = tmp_path / "stage1"
    model.mkdir()
    (model / "ecvl.json").write_text("{}")
    (model / "open_clip_config.json").write_text("{}")
    adapters = tmp_path / "stage2"
    (adapters / "ecvl").mkdir(parents=True)
    (adapters / "ecvl" / "adapter.json").write_text("{}")
    classifier = tmp_path / "classifier"
    classifier.mkdir()
    (classifier / "classifier.json").write_text('{"format": "ecvl-classifier/1"}')
    store = tmp_path / "embeddings.zarr"
    store.mkdir()
    (store / "zarr.json").write_text('{"attributes": {"format": "ecvl-embeddings"}}')
    assert kind_of(model) is STAGE1_MODEL and kind_of(adapters) is ADAPTERS
    assert kind_of(classifier) is CLASSIFIER and kind_of(store) is EMBEDDINGS
    for kind in (STAGE1_MODEL, ADAPTERS, CLASSIFIER, EMBEDDINGS, SHARDS):
        owned = [p for p in (model, adapters, classifier, store) if kind.owns(p)]
        assert len(owned) == (0 if kind is SHARDS else 1)


def test_checks_before_work_name_the_folder(tmp_path, monkeypatch):
    (tmp_path / "data").write_text("a file")
    with pytest.raises(OutputError, match="data is a file where a folder belongs"):
        check_writable(tmp_path / "data" / "shards" / "x")
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(OutputError, match="is not writable|read-only"):
        check_writable(tmp_path / "out" / "x.csv")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_a_full_disk_while_checkpointing_is_an_oserror_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    import torch

    opened = Path.open

    def full(self, mode="r", *args, **kwargs):  # the temp file's writes hit a full device
        if "w" in mode and self.name.startswith(".ckpt.pt.tmp-"):
            return opened(Path("/dev/full"), mode, *args, **kwargs)
        return opened(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", full)
    with pytest.raises(OSError) as caught:
        save_checkpoint(tmp_path / "ckpt.pt", {"w": torch.zeros(100_000)})
    assert caught.value.errno == errno.ENOSPC  # not torch's "unexpected pos" RuntimeError
    assert list(tmp_path.iterdir()) == []
