"""Image store: round trip, fork-safe reading in DataLoader workers, pickling, validation."""

from __future__ import annotations

import io
import os
import pickle

import h5py
import numpy as np
import pytest
import torch
from PIL import Image, features

from ecvl.data.image_store import ImageStore, ImageStoreWriter, content_digest, sniff_format
from ecvl.errors import DataError

FORMATS = ["PNG", "JPEG", "BMP"] + (["WEBP"] if features.check("webp") else [])


def encode(pixels: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buf.getvalue()


def make_samples(
    n: int, fmts: list[str]
) -> tuple[list[np.ndarray], list[bytes], np.ndarray, list[str]]:
    rng = np.random.default_rng(n)
    pixels = [
        rng.integers(0, 256, size=(4 + i % 3, 5 + i % 2, 3), dtype=np.uint8) for i in range(n)
    ]
    encoded = [encode(p, fmts[i % len(fmts)]) for i, p in enumerate(pixels)]
    labels = rng.integers(0, 4, size=n)
    keys = [f"sample-{i:03d}" for i in range(n)]
    return pixels, encoded, labels, keys


N = 10
PIXELS, ENCODED, LABELS, KEYS = make_samples(N, FORMATS)


def write_store(path, n=N, encoded=ENCODED, labels=LABELS, keys=KEYS, block=3) -> str:
    with ImageStoreWriter(path, n, chunk_rows=4) as w:
        for a in range(0, n, block):
            b = min(n, a + block)
            w.write(a, encoded[a:b], labels[a:b], keys[a:b])
        return w.mark_complete()


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "train.h5"
    write_store(path)
    return path


def test_round_trip_bytes_pixels_and_alignment(store_path):
    store = ImageStore(store_path)
    assert len(store) == N
    np.testing.assert_array_equal(store.labels, LABELS)
    assert store.keys.tolist() == KEYS
    for i in range(N):
        assert store.get_bytes(i) == ENCODED[i]
        img = store.get_image(i)
        assert img.mode == "RGB"
        got = np.asarray(img)
        if store.exts[i] == "jpg":  # lossy: compare with PIL's own decode of the same bytes
            want = np.asarray(Image.open(io.BytesIO(ENCODED[i])).convert("RGB"))
        else:
            want = PIXELS[i]
        np.testing.assert_array_equal(got, want, err_msg=f"sample {i}")
    assert len(store.content_sha256) == 64
    store.close()


def test_ext_attribute_uniform_or_mixed(tmp_path, store_path):
    with h5py.File(store_path) as f:
        assert f.attrs["ext"] == "mixed"
    _, encoded, labels, keys = make_samples(3, ["PNG"])
    path = tmp_path / "png.h5"
    write_store(path, 3, encoded, labels, keys)
    with h5py.File(path) as f:
        assert f.attrs["ext"] == "png"
        assert f["ext"].asstr()[...].tolist() == ["png"] * 3


def test_sniff_format():
    assert sniff_format(encode(PIXELS[0], "PNG")) == "png"
    assert sniff_format(encode(PIXELS[0], "JPEG")) == "jpg"
    assert sniff_format(encode(PIXELS[0], "BMP")) == "bmp"
    assert sniff_format(b"\x80\x04\x95pickle") is None
    assert sniff_format(b"") is None


class _BytesDataset(torch.utils.data.Dataset):
    def __init__(self, store: ImageStore) -> None:
        self.store = store

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int):
        return i, self.store.get_bytes(i), os.getpid(), self.store._pid


def test_dataloader_workers_open_their_own_handle(store_path):
    store = ImageStore(store_path)
    main_bytes = [store.get_bytes(i) for i in range(N)]  # the parent holds an open handle now
    assert store._pid == os.getpid()
    loader = torch.utils.data.DataLoader(_BytesDataset(store), batch_size=None, num_workers=2)
    seen = {}
    pids = set()
    for i, data, pid, handle_pid in loader:
        seen[int(i)] = data
        assert pid == handle_pid  # each worker reads through a handle it opened itself
        pids.add(pid)
    assert seen == dict(enumerate(main_bytes))
    assert os.getpid() not in pids and len(pids) == 2
    assert store.get_bytes(0) == ENCODED[0]  # the parent's handle still works
    store.close()


def test_pickle_drops_handle(store_path):
    store = ImageStore(store_path)
    store.get_bytes(0)
    clone = pickle.loads(pickle.dumps(store))
    assert clone._h5 is None
    assert clone.get_bytes(3) == ENCODED[3]
    np.testing.assert_array_equal(clone.labels, LABELS)
    store.close()
    clone.close()


def test_writer_replaces_any_file(tmp_path):
    """No resume inside the file: an interrupted export writes the store again."""
    path = tmp_path / "train.h5"
    path.write_bytes(b"not hdf5 at all")
    write_store(path)
    assert ImageStore(path).content_sha256 == write_store(tmp_path / "ref.h5")


def test_writer_validation(tmp_path):
    with ImageStoreWriter(tmp_path / "train.h5", N) as w:
        with pytest.raises(DataError, match=r"sample 1 \(key 'sample-001'\) is not an allowed"):
            w.write(0, [ENCODED[0], b"\x80\x04\x95 a pickle"], LABELS[:2], KEYS[:2])
        with pytest.raises(DataError, match="empty key"):
            w.write(0, ENCODED[:2], LABELS[:2], ["a", ""])
        with pytest.raises(ValueError, match="outside the store's 10 rows"):
            w.write(9, ENCODED[2:4], LABELS[2:4], KEYS[2:4])


def test_reader_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        ImageStore(tmp_path / "missing.h5")
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"garbage")
    with pytest.raises(DataError, match="not a readable HDF5"):
        ImageStore(bad)
    partial = tmp_path / "partial.h5"
    with ImageStoreWriter(partial, N) as w:
        w.write(0, ENCODED[:3], LABELS[:3], KEYS[:3])
    with pytest.raises(DataError, match="incomplete; the export was interrupted"):
        ImageStore(partial)


def test_reader_refuses_bytes_that_are_not_the_recorded_format(tmp_path):
    path = tmp_path / "train.h5"
    write_store(path)
    with h5py.File(path, "r+") as f:
        f["ext"][0] = "png" if f["ext"].asstr()[0] != "png" else "bmp"
    store = ImageStore(path)
    with pytest.raises(DataError, match="sample 0"):
        store.get_image(0)
    store.close()


def test_raw_pixel_members_round_trip(tmp_path):
    from ecvl.data.pixels import encode_npy

    gray = np.arange(20, dtype=np.uint8).reshape(4, 5, 1)
    raw = [encode_npy(p) for p in PIXELS[:3]] + [encode_npy(gray)]
    assert sniff_format(raw[0]) == "npy"
    path = tmp_path / "raw.h5"
    write_store(path, 4, raw, LABELS[:4], KEYS[:4])
    store = ImageStore(path)
    assert store.exts.tolist() == ["npy"] * 4
    for i in range(3):
        assert np.array_equal(np.asarray(store.get_image(i)), PIXELS[i])
    assert np.array_equal(np.asarray(store.get_image(3)), np.repeat(gray, 3, axis=2))
    assert store.raw_pixels() is None  # two shapes: not one array


def test_raw_pixels_of_one_shape_load_as_one_array(tmp_path, store_path):
    from ecvl.data.pixels import encode_npy

    same = np.random.default_rng(1).integers(0, 256, size=(3, 6, 7, 3), dtype=np.uint8)
    path = tmp_path / "raw.h5"
    write_store(path, 3, [encode_npy(p) for p in same], LABELS[:3], KEYS[:3])
    store = ImageStore(path)
    pixels = store.raw_pixels()
    assert pixels.dtype == np.uint8 and np.array_equal(pixels, same)
    assert store.raw_pixel_bytes == pixels.nbytes
    png = ImageStore(store_path)  # encoded files: read and decoded per request instead
    assert png.raw_pixel_bytes is None and png.raw_pixels() is None


def test_raw_member_that_does_not_decode_names_the_sample(tmp_path):
    from ecvl.data.pixels import encode_npy

    data = encode_npy(PIXELS[0])
    path = tmp_path / "raw.h5"
    write_store(path, 1, [data[:-3]], LABELS[:1], KEYS[:1])
    with pytest.raises(DataError, match=r"sample 0 \(key 'sample-000'\) does not decode: .npy"):
        ImageStore(path).get_image(0)


def test_digest_is_the_stores_content_however_rows_arrive(tmp_path):
    """The writer hashes rows as they arrive in order; the digest it records is the one
    `content_digest` computes from the file, and blocks written out of order (hashed from
    the file instead) give the same digest."""
    in_order = write_store(tmp_path / "a.h5")
    with h5py.File(tmp_path / "a.h5", "r") as f:
        assert content_digest(f) == in_order
    with ImageStoreWriter(tmp_path / "b.h5", N, chunk_rows=4) as w:
        for a in reversed(range(0, N, 3)):
            w.write(a, ENCODED[a : a + 3], LABELS[a : a + 3], KEYS[a : a + 3])
        assert w.mark_complete() == in_order
    other = write_store(tmp_path / "c.h5", keys=[*KEYS[:-1], "another-key"])
    assert other != in_order
