"""Finding and reading the images `ecvl predict` classifies."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from ecvl.data.batch_norm import split_normalize
from ecvl.data.pixels import encode_npy
from ecvl.data.reader import decode_image
from ecvl.errors import DataError
from ecvl.inference import ImageInput, collect_inputs, make_predict_loader
from ecvl.models.clip import create_model
from support import make_images, write_pngs


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(make_images(1, 12, seed)[0]).save(buf, format="PNG")
    return buf.getvalue()


def _tar(path, members: list[tuple[str, bytes]]):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_folders_are_walked_sorted_without_hidden_entries(tmp_path):
    write_pngs(tmp_path / "b", 2)
    write_pngs(tmp_path / "a" / "deep", 1)
    write_pngs(tmp_path / ".cache", 1)
    (tmp_path / "a" / ".hidden.png").write_bytes(_png(0))
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    items, failed = collect_inputs([tmp_path])
    rel = [i.path[len(str(tmp_path)) + 1 :] for i in items]
    assert rel == ["a/deep/000.png", "b/000.png", "b/001.png"]
    assert failed == []


def test_list_file_paths_are_relative_to_the_list(tmp_path):
    (img,) = write_pngs(tmp_path / "imgs", 1)
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "files.txt").write_text(f"../imgs/000.png\n\n{img}\n  ../imgs/missing.png  \n")
    items, _ = collect_inputs([lists / "files.txt"])
    assert [i.path for i in items] == [
        str(lists / "../imgs/000.png"),
        str(img),
        str(lists / "../imgs/missing.png"),
    ]
    assert items[0].read() == img.read_bytes()


def test_tar_members_grouped_as_webdataset_and_read_through_the_allow_list(tmp_path):
    a, b = _png(1), _png(2)
    raw = encode_npy(np.full((4, 5, 3), 7, np.uint8))
    shard = _tar(
        tmp_path / "shard.tar",
        [
            ("__meta__", b"x"),
            ("s1.png", a),
            ("s1.pyd", b"\x80\x04 never unpickled"),
            ("s1.cls", b"3"),
            ("dir/s2.JPG", b),  # a key may hold a directory; the suffix is matched case-blind
            ("s3.json", b"{}"),
            ("s4.png", a),
            ("s4.webp", b),
            ("s5.npy", raw),  # ECVL's raw pixel members
        ],
    )
    items, failed = collect_inputs([shard])
    assert [(i.path, i.key) for i in items] == [
        (str(shard), "s1"),
        (str(shard), "dir/s2"),
        (str(shard), "s5"),
    ]
    assert [i.read() for i in items] == [a, b, raw]
    pixels = np.asarray(decode_image(raw, items[2].where, items[2].extension))
    assert np.array_equal(pixels, np.full((4, 5, 3), 7, np.uint8))
    assert items[1].where == f"{shard}:dir/s2"
    assert failed == [
        f"{shard}:s3: expected one image member, found none",
        f"{shard}:s4: expected one image member, found ['png', 'webp']",
    ]


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: p / "nope.png", "not found"),
        (lambda p: (p / "blob.bin").write_bytes(b"\xff\xfe\x00\x81") and p / "blob.bin", "neither"),
        (lambda p: (p / "x.tar").write_bytes(b"not a tar at all" * 64) and p / "x.tar", "tar"),
    ],
    ids=["missing", "binary", "bad-tar"],
)
def test_bad_inputs_name_the_file(tmp_path, make, match):
    path = make(tmp_path)
    with pytest.raises(DataError, match=match) as e:
        collect_inputs([path])
    assert str(path) in str(e.value)


def test_loader_keeps_order_reports_failures_and_normalises_like_the_transform(tmp_path):
    paths = write_pngs(tmp_path, 5, size=40)
    (tmp_path / "002.png").write_bytes(b"broken")
    transform = create_model("ecvl-tiny-vit").eval_transform
    items = [ImageInput(str(p)) for p in paths] + [ImageInput(str(tmp_path / "gone.png"))]
    indices, failed, images = [], [], []
    for index, batch, bad in make_predict_loader(items, transform, batch_size=4, num_workers=0):
        indices += index.tolist()
        failed += bad
        images += list(batch)
    assert indices == [0, 1, 3, 4]
    assert [i for i, _ in failed] == [2, 5]
    assert "002.png: cannot decode" in failed[0][1] and "gone.png" in failed[1][1]
    per_image, per_batch = split_normalize(transform)
    assert per_batch is not None  # the batched normalisation really ran
    for i, x in zip(indices, images, strict=True):
        with Image.open(paths[i]) as im:
            assert torch.equal(x, transform(im.convert("RGB")))
