"""The export's artifacts are readable with plain zarr and h5py, without ECVL.

The stores are written by ECVL's writers in a subprocess; this module itself never imports
`ecvl`, and the reading tests use only zarr, h5py, numpy, hashlib and PIL, the way a user
would.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
D = 6
CLASSES = ["ant", "bird", "cow"]
N_TRAIN, N_TEST = 7, 3

WRITE_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    from ecvl.data.embeddings import EmbeddingWriter
    from ecvl.data.image_store import ImageStoreWriter

    src, zarr_path, h5_path = sys.argv[1:4]
    data = np.load(src, allow_pickle=False)
    attrs = {
        "model_name": "tiny",
        "checkpoint_digest": "sha256:0",
        "templates": ["a photo of a {}."],
        "classes": data["classes"].tolist(),
    }
    splits = {"train": len(data["train_labels"]), "test": len(data["test_labels"])}
    w = EmbeddingWriter(zarr_path, splits, data["train_features"].shape[1], attrs, chunk_rows=4)
    for split in splits:
        w.write(split, 0, data[f"{split}_features"], data[f"{split}_labels"],
                data[f"{split}_keys"].tolist())
        w.mark_complete(split)
    w.write_text_features(data["text"])

    blob, offsets = data["blob"], data["offsets"]
    encoded = [blob[offsets[i]:offsets[i + 1]].tobytes() for i in range(len(offsets) - 1)]
    with ImageStoreWriter(h5_path, len(encoded), chunk_rows=4) as iw:
        iw.write(0, encoded, data["train_labels"], data["train_keys"].tolist())
        iw.mark_complete()
    """
)


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    """Inputs (numpy) and the stores ECVL wrote from them in a separate process."""
    root = tmp_path_factory.mktemp("plain")
    rng = np.random.default_rng(7)
    text = rng.standard_normal((len(CLASSES), D)).astype(np.float32)
    pixels = [rng.integers(0, 256, size=(3, 4, 3), dtype=np.uint8) for _ in range(N_TRAIN)]
    encoded = [_png(p) for p in pixels]
    data = {
        "classes": np.array(CLASSES),
        "train_features": rng.standard_normal((N_TRAIN, D)).astype(np.float32),
        "train_labels": rng.integers(0, 3, size=N_TRAIN),
        "train_keys": np.array([f"train/{i}" for i in range(N_TRAIN)]),
        "test_features": rng.standard_normal((N_TEST, D)).astype(np.float32),
        "test_labels": rng.integers(0, 3, size=N_TEST),
        "test_keys": np.array([f"test/{i}" for i in range(N_TEST)]),
        "text": text / np.linalg.norm(text, axis=1, keepdims=True),
        "blob": np.frombuffer(b"".join(encoded), dtype=np.uint8),
        "offsets": np.cumsum([0] + [len(e) for e in encoded]),
    }
    np.savez(root / "src.npz", **data)
    zarr_path, h5_path = root / "embeddings.zarr", root / "train_images.h5"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    subprocess.run(
        [sys.executable, "-c", WRITE_SCRIPT, str(root / "src.npz"), str(zarr_path), str(h5_path)],
        check=True,
        env=env,
        timeout=120,
    )
    return {"data": data, "pixels": pixels, "encoded": encoded, "zarr": zarr_path, "h5": h5_path}


def test_zarr_store_reads_with_plain_zarr(artifacts):
    data = artifacts["data"]
    root = zarr.open_group(artifacts["zarr"], mode="r")  # format auto-detected
    assert root.metadata.zarr_format == 3
    attrs = dict(root.attrs)
    assert attrs["classes"] == CLASSES and attrs["num_classes"] == 3 and attrs["embed_dim"] == D
    assert attrs["model_name"] == "tiny" and attrs["templates"] == ["a photo of a {}."]
    assert attrs["splits"] == {"train": N_TRAIN, "test": N_TEST}
    for split in ("train", "test"):
        grp = root[split]
        assert grp.attrs["complete"] is True
        feats = grp["features"][...]
        assert feats.dtype == np.float16 and feats.shape == (len(data[f"{split}_labels"]), D)
        np.testing.assert_array_equal(feats, data[f"{split}_features"].astype(np.float16))
        np.testing.assert_array_equal(grp["labels"][...], data[f"{split}_labels"])
        assert grp["labels"].dtype == np.int64
        assert [str(k) for k in grp["keys"][...]] == data[f"{split}_keys"].tolist()
    np.testing.assert_array_equal(root["text"]["features"][...], data["text"])


def test_image_store_reads_with_plain_h5py(artifacts):
    data = artifacts["data"]
    with h5py.File(artifacts["h5"], "r") as f:
        assert f.attrs["count"] == N_TRAIN and bool(f.attrs["complete"])
        assert f.attrs["ext"] == "png"
        np.testing.assert_array_equal(f["labels"][...], data["train_labels"])
        assert f["keys"].asstr()[...].tolist() == data["train_keys"].tolist()
        for i in range(N_TRAIN):
            raw = f["images"][i].tobytes()
            assert raw == artifacts["encoded"][i]
            img = Image.open(io.BytesIO(raw), formats=["PNG"]).convert("RGB")
            np.testing.assert_array_equal(np.asarray(img), artifacts["pixels"][i])


def test_image_store_digest_recomputes_from_its_documented_recipe(artifacts):
    # sha256 over each sample: len(bytes) (8 B little-endian), bytes, label (int64 LE),
    # len(key utf-8) (8 B LE), key, ext (ASCII, NUL-padded to 4 B).
    h = hashlib.sha256()
    with h5py.File(artifacts["h5"], "r") as f:
        for img, label, key, ext in zip(
            f["images"][...],
            f["labels"][...],
            f["keys"].asstr()[...],
            f["ext"].asstr()[...],
            strict=True,
        ):
            raw, k = img.tobytes(), key.encode()
            h.update(len(raw).to_bytes(8, "little") + raw + np.int64(label).astype("<i8").tobytes())
            h.update(len(k).to_bytes(8, "little") + k + ext.encode().ljust(4, b"\0"))
        assert f.attrs["content_sha256"] == h.hexdigest()


def test_train_rows_align_across_the_two_stores(artifacts):
    root = zarr.open_group(artifacts["zarr"], mode="r")
    with h5py.File(artifacts["h5"], "r") as f:
        assert [str(k) for k in root["train"]["keys"][...]] == f["keys"].asstr()[...].tolist()
        np.testing.assert_array_equal(root["train"]["labels"][...], f["labels"][...])
