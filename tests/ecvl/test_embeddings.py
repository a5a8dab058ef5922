"""Embedding store: round trip, resume after a kill, validation of what the reader gets."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import zarr

from ecvl.data.embeddings import EmbeddingWriter, open_embeddings
from ecvl.errors import DataError

D = 8
CLASSES = ["apple", "bee", "cat"]
SPLITS = {"train": 11, "test": 5}
ATTRS = {
    "model_name": "tiny-test",
    "checkpoint_digest": "sha256:abc",
    "templates": ["a photo of a {}."],
    "classes": CLASSES,
}
CHUNK = 4  # small chunks so that blocks straddle chunk boundaries


def make_split(name: str, n: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(len(name) * 100 + n)
    feats = (rng.standard_normal((n, D)) * 3).astype(np.float32)
    labels = rng.integers(0, len(CLASSES), size=n)
    keys = [f"{name}/{i:04d}-é" for i in range(n)]
    return feats, labels, keys


DATA = {name: make_split(name, n) for name, n in SPLITS.items()}


def text_features() -> np.ndarray:
    t = np.random.default_rng(1).standard_normal((len(CLASSES), D)).astype(np.float32)
    return t / np.linalg.norm(t, axis=1, keepdims=True)


def writer(path, **kw) -> EmbeddingWriter:
    return EmbeddingWriter(path, SPLITS, D, ATTRS, chunk_rows=CHUNK, **kw)


def write_rows(w: EmbeddingWriter, split: str, start: int, end: int, block: int = 3) -> None:
    feats, labels, keys = DATA[split]
    for a in range(start, end, block):
        b = min(end, a + block)
        w.write(split, a, feats[a:b], labels[a:b], keys[a:b])


def write_all(path) -> None:
    w = writer(path)
    for split, n in SPLITS.items():
        write_rows(w, split, 0, n)
        w.mark_complete(split)
    w.write_text_features(torch.from_numpy(text_features()))


def arrays(path) -> dict[str, np.ndarray]:
    root = zarr.open_group(path, mode="r", zarr_format=3)
    return {
        f"{s}/{a}": np.asarray(root[s][a][...])
        for s in (*SPLITS, "text")
        for a in (("features",) if s == "text" else ("features", "labels", "keys"))
    }


def test_round_trip(tmp_path):
    path = tmp_path / "emb.zarr"
    write_all(path)
    emb = open_embeddings(path, splits=("train", "test"))
    assert emb.splits == ("train", "test")
    assert (emb.embed_dim, emb.num_classes, emb.classes) == (D, 3, CLASSES)
    assert emb.model_name == "tiny-test" and emb.checkpoint_digest == "sha256:abc"
    assert emb.templates == ["a photo of a {}."]
    for split, (feats, labels, keys) in DATA.items():
        data = emb.split(split)
        assert len(data) == SPLITS[split]
        assert data.features.dtype == np.float16
        np.testing.assert_array_equal(data.features, feats.astype(np.float16))
        assert data.labels.dtype == np.int64
        np.testing.assert_array_equal(data.labels, labels)
        assert data.keys.tolist() == keys
    text = emb.text_features()
    assert text.dtype == np.float32
    np.testing.assert_array_equal(text, text_features())


def test_lazy_split_slices_like_numpy(tmp_path):
    path = tmp_path / "emb.zarr"
    write_all(path)
    lazy = open_embeddings(path).split("train", lazy=True)
    assert isinstance(lazy.features, zarr.Array)
    assert len(lazy) == SPLITS["train"]
    np.testing.assert_array_equal(lazy.features[2:7], DATA["train"][0][2:7].astype(np.float16))


def test_reopened_store_keeps_finished_splits_and_rewrites_others(tmp_path, caplog):
    reference = tmp_path / "ref.zarr"
    write_all(reference)

    path = tmp_path / "emb.zarr"
    w = writer(path)
    write_rows(w, "train", 0, SPLITS["train"])
    w.mark_complete("train")
    # Killed in the middle of `test`: some rows on disk, and zarr's local store left a temp file.
    write_rows(w, "test", 0, 3)
    (path / "test" / "features" / ("zarr." + "0" * 32 + ".partial")).write_bytes(b"junk")
    del w

    with caplog.at_level(logging.INFO, logger="ecvl.data.embeddings"):
        w = writer(path)
    assert w.is_complete("train") and not w.is_complete("test")
    assert not list(path.rglob("*.partial"))
    assert "removed 1 leftover partial file" in caplog.text
    write_rows(w, "test", 0, SPLITS["test"])
    w.mark_complete("test")
    w.write_text_features(text_features())

    got, want = arrays(path), arrays(reference)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert open_embeddings(path).attrs == open_embeddings(reference).attrs


def test_resume_with_other_attrs_refuses(tmp_path):
    path = tmp_path / "emb.zarr"
    writer(path)
    with pytest.raises(DataError, match="checkpoint_digest"):
        EmbeddingWriter(path, SPLITS, D, {**ATTRS, "checkpoint_digest": "other"})
    with pytest.raises(DataError, match="splits"):
        EmbeddingWriter(path, {"train": 12, "test": 5}, D, ATTRS)
    # resume=False starts over.
    w = EmbeddingWriter(path, SPLITS, D, {**ATTRS, "checkpoint_digest": "other"}, resume=False)
    assert not w.is_complete("train")


def test_writer_refuses_to_wipe_foreign_directory(tmp_path):
    path = tmp_path / "mine"
    path.mkdir()
    (path / "precious.txt").write_text("x")
    with pytest.raises(DataError, match="not a zarr store"):
        writer(path, resume=False)
    assert (path / "precious.txt").exists()


def test_write_validation(tmp_path):
    w = writer(tmp_path / "emb.zarr")
    feats, labels, keys = DATA["train"]
    with pytest.raises(ValueError, match="outside 'train'"):
        w.write("train", 10, feats[3:5], labels[3:5], keys[3:5])  # past the end
    with pytest.raises(ValueError, match="unknown split 'val'"):
        w.write("val", 0, feats[:1], labels[:1], keys[:1])
    with pytest.raises(DataError, match="label 7 of row 1"):
        w.write("train", 0, feats[:2], np.array([0, 7]), keys[:2])
    bad = feats[:2].copy()
    bad[1, 0] = 1e6  # overflows float16
    with pytest.raises(DataError, match="row 1"):
        w.write("train", 0, bad, labels[:2], keys[:2])
    with pytest.raises(ValueError, match="normalised"):
        w.write_text_features(np.ones((len(CLASSES), D), dtype=np.float32))


def test_reader_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        open_embeddings(tmp_path / "missing.zarr")

    path = tmp_path / "emb.zarr"
    w = writer(path)
    write_rows(w, "train", 0, 5)
    with pytest.raises(DataError, match="train is incomplete; the export was interrupted"):
        open_embeddings(path)
    write_rows(w, "train", 5, SPLITS["train"])
    w.mark_complete("train")
    write_rows(w, "test", 0, SPLITS["test"])
    w.mark_complete("test")
    with pytest.raises(DataError, match="text features were never written"):
        open_embeddings(path)
    w.write_text_features(text_features())

    emb = open_embeddings(path)
    with pytest.raises(DataError, match="no split 'val'"):
        emb.split("val")
    with pytest.raises(DataError, match="no split 'val'"):
        open_embeddings(path, splits=("train", "val"))

    # Someone replaces an array by one of the wrong length.
    root = zarr.open_group(path, mode="r+", zarr_format=3)
    del root["test"]["labels"]
    root["test"].create_array("labels", shape=(4,), dtype="int64")
    with pytest.raises(DataError, match=r"test/labels: shape \(4,\), expected \(5,\)"):
        open_embeddings(path)
    del root["test"]["labels"]
    with pytest.raises(DataError, match="array 'labels' is missing"):
        open_embeddings(path)


def test_reader_rejects_other_zarr(tmp_path):
    path = tmp_path / "other.zarr"
    zarr.open_group(path, mode="w", zarr_format=3).attrs["hello"] = 1
    with pytest.raises(DataError, match="not an ECVL embedding store"):
        open_embeddings(path)


def test_resume_over_interrupted_creation_starts_over(tmp_path):
    path = tmp_path / "emb.zarr"
    zarr.open_group(path, mode="w", zarr_format=3)  # killed right after the root was created
    assert not writer(path).is_complete("train")
    root = zarr.open_group(path, mode="r+", zarr_format=3)
    root.attrs["initialized"] = False  # killed before the last array was created
    w = writer(path)
    assert not w.is_complete("train")
    assert zarr.open_group(path, mode="r", zarr_format=3).attrs["initialized"] is True


def _feature_writes(monkeypatch) -> list[tuple[int, int]]:
    """Record every (start, stop) row range written into a `features` array."""
    calls: list[tuple[int, int]] = []
    original = zarr.Array.__setitem__

    def spy(self, selection, value):
        if self.path.endswith("features") and isinstance(selection, slice):
            calls.append((selection.start, selection.stop))
        return original(self, selection, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", spy)
    return calls


def test_consecutive_blocks_reach_zarr_as_whole_chunks(tmp_path, monkeypatch):
    """Blocks of 3 rows against chunks of 4: each chunk is written once, whole, so no block
    makes zarr read back, decompress and rewrite a chunk an earlier block filled."""
    calls = _feature_writes(monkeypatch)
    w = writer(tmp_path / "e.zarr")
    write_rows(w, "train", 0, 11)
    assert calls == [(0, 4), (4, 8), (8, 11)]  # the last one ends the split
    w.mark_complete("train")
    assert calls == [(0, 4), (4, 8), (8, 11)]
    np.testing.assert_array_equal(
        arrays(tmp_path / "e.zarr")["train/features"][:11],
        DATA["train"][0].astype(np.float16),
    )


def test_blocks_out_of_order_are_written_as_they_come(tmp_path, monkeypatch):
    calls = _feature_writes(monkeypatch)
    w = writer(tmp_path / "e.zarr")
    write_rows(w, "train", 4, 7)  # less than a chunk: it waits
    assert calls == []
    write_rows(w, "train", 0, 4)  # not its continuation: the waiting block goes first
    assert calls == [(4, 7), (0, 4)]
    write_rows(w, "train", 7, 11, block=4)  # ends the split: written at once
    assert calls == [(4, 7), (0, 4), (7, 11)]
    write_rows(w, "test", 0, 3)
    w.mark_complete("test")  # what waits is written
    assert calls[-1] == (0, 3)
    w.mark_complete("train")
    store = arrays(tmp_path / "e.zarr")
    feats, labels, keys = DATA["train"]
    np.testing.assert_array_equal(store["train/features"], feats.astype(np.float16))
    np.testing.assert_array_equal(store["train/labels"], labels)
    assert list(store["train/keys"]) == keys
    np.testing.assert_array_equal(
        store["test/features"][:3], DATA["test"][0][:3].astype(np.float16)
    )
