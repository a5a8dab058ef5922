import hashlib
import io
import json
import logging
import os
import pickle

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from ecvl.data.reader import (
    check_shard_count,
    decode_sample,
    eval_pipeline,
    iter_samples,
    make_loader,
    rank_shards,
    take,
    train_pipeline,
)
from ecvl.data.shards import (
    SHARD_MTIME,
    image_member,
    load_manifest,
    write_manifest,
    write_split_shards,
)
from ecvl.data.sources import ListSource, Split
from ecvl.errors import DataError
from support import make_images

CLASSES = ("a", "b", "c")


def _split(n=23, seed=0):
    labels = np.arange(n) % 3
    return Split([f"k{i:03d}" for i in range(n)], labels, images=make_images(n, 8, seed))


def _write(tmp_path, split, maxcount=5, name="train", encoding="png"):
    out = tmp_path / "shards"
    res = write_split_shards(
        split,
        name,
        CLASSES,
        out,
        maxcount=maxcount,
        max_bad_fraction=0.0,
        encoding=encoding,
        progress=False,
    )
    write_manifest(
        out,
        {
            "classes": list(CLASSES),
            "class_groups": ["many"] * 3,
            "splits": {name: res.to_json()},
            "source_fingerprint": res.fingerprint,
        },
    )
    return out, res


def _to_array(img):
    return np.asarray(img.convert("RGB"))


def test_shard_counts_are_exact(tmp_path):
    out, res = _write(tmp_path, _split(23))
    assert [s["count"] for s in res.shards] == [5, 5, 5, 5, 3]
    assert sorted(p.name for p in out.glob("*.tar")) == [s["name"] for s in res.shards]
    manifest = load_manifest(out)
    assert manifest.count("train") == 23 and manifest.shard_counts("train") == [5, 5, 5, 5, 3]
    assert sum(1 for _ in iter_samples(manifest.shard_paths("train"))) == 23
    assert res.per_class == [8, 8, 7]


def test_round_trip_ecvl_reader_and_plain_webdataset(tmp_path):
    split = _split(12)
    out, _ = _write(tmp_path, split)
    urls = load_manifest(out).shard_paths("train")
    ours = list(iter_samples(urls))
    plain = list(
        wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("__key__", "png", "cls")
    )
    assert [s["key"] for s in ours] == [k for k, _, _ in plain] == split.keys
    for s, (_, img, cls), i in zip(ours, plain, range(12), strict=True):
        assert s["label"] == cls == split.labels[i]
        assert np.array_equal(_to_array(s["image"]), split.images[i])
        assert np.array_equal(_to_array(img), split.images[i])
    # the batched evaluation pipeline yields the same, in order
    to_tensor = lambda im: torch.from_numpy(_to_array(im).copy())  # noqa: E731
    loader = make_loader(eval_pipeline(urls, to_tensor, 5), 0)
    keys, labels, pixels = [], [], []
    for x, y, k in loader:
        keys += k
        labels += y.tolist()
        pixels.append(x)
    assert keys == split.keys and labels == split.labels.tolist()
    assert torch.equal(torch.cat(pixels), torch.from_numpy(split.images))


def test_rewrite_is_byte_identical(tmp_path):
    a, _ = _write(tmp_path / "1", _split())
    b, _ = _write(tmp_path / "2", _split())
    digest = lambda d: {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in d.glob("*.tar")}  # noqa: E731
    assert digest(a) == digest(b) and len(digest(a)) == 5


def test_tar_headers_are_fixed(tmp_path):
    import tarfile

    out, _ = _write(tmp_path, _split(3))
    with tarfile.open(out / "train-000000.tar") as tf:
        members = tf.getmembers()
    assert {m.mtime for m in members} == {SHARD_MTIME}
    assert [m.name for m in members][:3] == ["k000.cls", "k000.json", "k000.png"]


def _corrupt_list_source(tmp_path, n_good=9, n_bad=1):
    root = tmp_path / "imgs"
    root.mkdir()
    lines = []
    for i in range(n_good):
        Image.fromarray(make_images(1, 8, i)[0]).save(root / f"g{i}.png")
        lines.append(f"g{i}.png {i % 2}")
    for i in range(n_bad):
        (root / f"bad{i}.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
        lines.append(f"bad{i}.jpg 0")
    (tmp_path / "train.txt").write_text("\n".join(lines))
    return ListSource(root=root, train=tmp_path / "train.txt").load().splits["train"]


def _write_list(tmp_path, split, encoding="png"):
    """A list source's split written with a 20 % allowance for unreadable images."""
    return write_split_shards(
        split, "train", ("x", "y"), tmp_path / "out", 1000, 0.2, encoding=encoding, progress=False
    )


def test_corrupt_image_is_skipped_and_listed(tmp_path):
    split = _corrupt_list_source(tmp_path)
    res = _write_list(tmp_path, split)
    assert res.count == 9 and len(res.bad) == 1
    assert res.bad[0]["key"] == "bad0" and "not a readable JPEG image" in res.bad[0]["error"]
    assert res.bad[0]["source"].endswith("bad0.jpg")  # the file, for the user to find


def test_too_many_corrupt_images_fail(tmp_path):
    split = _corrupt_list_source(tmp_path, n_good=3, n_bad=2)
    with pytest.raises(
        DataError,
        match=r"train: 2 of 5 images are unreadable .*first: \S+/bad0\.jpg: not a readable JPEG",
    ):
        _write_list(tmp_path, split)


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("ext", ["pyd", "pickle"])
def test_pickle_members_are_never_unpickled(tmp_path, ext):
    marker = tmp_path / "pwned"
    png = io.BytesIO()
    Image.fromarray(make_images(1, 8)[0]).save(png, format="PNG")
    tar = tmp_path / "evil.tar"
    with wds.TarWriter(str(tar), encoder=False) as sink:
        sink.write(
            {"__key__": "x", "png": png.getvalue(), "cls": b"1", ext: pickle.dumps(_Evil(marker))}
        )
    samples = list(iter_samples([str(tar)]))
    assert len(samples) == 1 and samples[0]["label"] == 1
    assert ext not in samples[0] and "image" in samples[0]
    assert not marker.exists()


def test_decode_rejects_sample_without_image():
    with pytest.raises(DataError, match="sample 'x' in s.tar: expected one image member"):
        decode_sample({"__key__": "x", "__url__": "s.tar", "cls": b"0", "pyd": b"..."})


def test_rank_shards_disjoint_and_covering():
    urls = [f"s{i}.tar" for i in range(7)]
    for world, workers in [(2, 1), (3, 2), (1, 3)]:
        parts = [
            rank_shards(urls, 5, 2, 0, r, world, w, workers)
            for r in range(world)
            for w in range(workers)
        ]
        flat = [u for p in parts for u in p]
        assert sorted(flat) == sorted(urls) and len(flat) == len(set(flat))


def test_ranks_read_disjoint_samples(tmp_path, monkeypatch):
    out, _ = _write(tmp_path, _split(20), maxcount=5)
    urls = load_manifest(out).shard_paths("train")
    seen = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        pipe = train_pipeline(urls, lambda im: 0, batch_size=1, seed=0, epoch=0, shuffle_buffer=0)
        seen.append({k[0] for _, _, k in take(make_loader(pipe, 0), 10)})
    assert len(seen[0]) == len(seen[1]) == 10
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 20


def test_train_pipeline_is_seeded_per_epoch(tmp_path):
    out, _ = _write(tmp_path, _split(20), maxcount=5)
    urls = load_manifest(out).shard_paths("train")

    def keys(epoch):
        pipe = train_pipeline(
            urls, lambda im: 0, batch_size=4, seed=1, epoch=epoch, shuffle_buffer=10
        )
        return [k for _, _, ks in take(make_loader(pipe, 0), 5) for k in ks]

    assert keys(0) == keys(0)
    assert keys(0) != keys(1)
    assert sorted(keys(0)) == sorted(f"k{i:03d}" for i in range(20))  # 5×4 = one exact pass


def test_check_shard_count():
    assert check_shard_count(4, 2, 8) == 2
    assert check_shard_count(4, 2, 0) == 0  # `base.num_workers: 0` reads in the process
    with pytest.raises(DataError, match="1 shard\\(s\\) for 2 ranks"):
        check_shard_count(1, 2, 1)


def test_missing_manifest_and_missing_shard(tmp_path):
    with pytest.raises(DataError, match="shard manifest not found"):
        load_manifest(tmp_path)
    out, _ = _write(tmp_path, _split(6))
    (out / "train-000001.tar").unlink()
    with pytest.raises(DataError, match="listed shard is missing: .*train-000001.tar"):
        load_manifest(out)


def test_check_shard_count_reports_a_reduced_worker_count_once(caplog):
    caplog.set_level(logging.INFO, logger="ecvl.data.reader")
    for _ in range(3):  # e.g. the val split read once per epoch
        assert check_shard_count(3, 1, 7) == 3
    assert [r.getMessage() for r in caplog.records] == [
        "using 3 data worker(s) instead of 7: 3 shard(s) per rank"
    ]


# --- raw pixel members (`shard.encoding`) -------------------------------------------------


def test_raw_shards_read_back_exactly_by_ecvl_and_plain_webdataset(tmp_path):
    split = _split(12)
    out, res = _write(tmp_path, split, encoding="raw")
    assert res.encoding == "raw" and res.to_json()["encoding"] == "raw"
    urls = load_manifest(out).shard_paths("train")
    ours = list(iter_samples(urls))
    # plain webdataset decodes `.npy` itself, with allow_pickle=False
    plain = list(wds.WebDataset(urls, shardshuffle=False).decode().to_tuple("__key__", "npy"))
    assert [s["key"] for s in ours] == [k for k, _ in plain] == split.keys
    for s, (_, arr), i in zip(ours, plain, range(12), strict=True):
        assert s["ext"] == "npy"
        assert np.array_equal(_to_array(s["image"]), split.images[i])
        assert np.array_equal(arr, split.images[i])


def test_raw_and_png_shards_give_the_same_pixels_and_batches(tmp_path):
    split = _split(12)
    urls = {
        enc: load_manifest(_write(tmp_path / enc, split, encoding=enc)[0]).shard_paths("train")
        for enc in ("raw", "png")
    }
    to_tensor = lambda im: torch.from_numpy(_to_array(im).copy())  # noqa: E731
    batches = {
        enc: torch.cat([x for x, _, _ in make_loader(eval_pipeline(u, to_tensor, 5), 0)])
        for enc, u in urls.items()
    }
    assert torch.equal(batches["raw"], batches["png"])
    assert torch.equal(batches["raw"], torch.from_numpy(split.images))


def test_raw_rewrite_is_byte_identical(tmp_path):
    a, _ = _write(tmp_path / "1", _split(), encoding="raw")
    b, _ = _write(tmp_path / "2", _split(), encoding="raw")
    digest = lambda d: {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in d.glob("*.tar")}  # noqa: E731
    assert digest(a) == digest(b) and len(digest(a)) == 5


def test_auto_encoding_is_raw_for_small_arrays_only(tmp_path):
    from ecvl.data.pixels import MAX_RAW_SIDE
    from ecvl.data.shards import resolve_encoding

    small = Split(["a"], np.zeros(1), images=make_images(1, MAX_RAW_SIDE))
    large = Split(["a"], np.zeros(1), images=make_images(1, MAX_RAW_SIDE + 1))
    files = _corrupt_list_source(tmp_path, n_good=2, n_bad=0)
    assert resolve_encoding("auto", small) == "raw"
    assert resolve_encoding("auto", large) == "png"
    assert resolve_encoding("auto", files) == "png"
    assert resolve_encoding("png", small) == "png" and resolve_encoding("raw", files) == "raw"
    with pytest.raises(ValueError, match="unknown encoding 'jpeg'"):
        resolve_encoding("jpeg", small)


def test_raw_file_source_stores_the_decoded_pixels_and_still_skips_bad_files(tmp_path):
    split = _corrupt_list_source(tmp_path)
    res = write_split_shards(
        split, "train", ("x", "y"), tmp_path / "out", 1000, 0.2, encoding="raw", progress=False
    )
    assert res.count == 9 and [b["key"] for b in res.bad] == ["bad0"]
    samples = list(iter_samples([str(tmp_path / "out" / res.shards[0]["name"])]))
    for s in samples:
        expected = np.asarray(Image.open(tmp_path / "imgs" / f"{s['key']}.png").convert("RGB"))
        assert s["ext"] == "npy" and np.array_equal(_to_array(s["image"]), expected)


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (np.zeros((4, 4, 3), np.float32), "dtype float32, expected uint8"),
        (np.zeros((4, 4), np.uint8), r"shape \(4, 4\), expected H×W×1 or H×W×3"),
        (np.array([1, 2], dtype=object), "dtype object"),
    ],
)
def test_raw_member_of_another_kind_is_refused_naming_the_sample(tmp_path, payload, error):
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    np.save(buf, payload, allow_pickle=True)
    tar = tmp_path / "odd.tar"
    with wds.TarWriter(str(tar), encoder=False) as sink:
        sink.write({"__key__": "x", "npy": buf.getvalue(), "cls": b"1"})
    with pytest.raises(DataError, match=rf"sample 'x' in \S+odd.tar: cannot decode \(.*{error}"):
        list(iter_samples([str(tar)]))
    assert not marker.exists()


def test_pickled_npy_member_is_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    np.save(buf, np.array([_Evil(marker)], dtype=object), allow_pickle=True)
    tar = tmp_path / "evil.tar"
    with wds.TarWriter(str(tar), encoder=False) as sink:
        sink.write({"__key__": "x", "npy": buf.getvalue(), "cls": b"1"})
    with pytest.raises(DataError, match="dtype object"):
        list(iter_samples([str(tar)]))
    assert not marker.exists()


def test_truncated_raw_member_is_refused(tmp_path):
    from ecvl.data.pixels import decode_npy, encode_npy

    data = encode_npy(make_images(1, 4)[0])
    assert np.array_equal(decode_npy(data), make_images(1, 4)[0])
    with pytest.raises(ValueError, match="holds 47 bytes of pixels, its header says 48"):
        decode_npy(data[:-1])
    with pytest.raises(ValueError, match="not a .npy array"):
        decode_npy(b"\x89PNG\r\n\x1a\n" + data)


def _edited_manifest(tmp_path, edit):
    out, _ = _write(tmp_path, _split(6))
    data = json.loads((out / "meta.json").read_text())
    edit(data)
    (out / "meta.json").write_text(json.dumps(data))
    return out


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: d.clear() or d.update(format=None), "format None"),
        (lambda d: d.pop("classes"), "classes: missing"),
        (
            lambda d: d.update(classes=["a", "b"]),
            r"splits.train.per_class: 3 counts, but `classes` names only 2",
        ),
        (lambda d: d["splits"]["train"].pop("shards"), "splits.train.shards: missing"),
        (
            lambda d: d["splits"]["train"].update(count="6"),
            "splits.train.count: must be an integer",
        ),
        (
            lambda d: d["splits"]["train"]["shards"][0].update(name="../x.tar"),
            "must be a file name",
        ),
        (lambda d: d["splits"]["train"]["shards"][0].update(count=4), "hold 5 samples, but"),
        (lambda d: d.update(class_groups=["many"]), "class_groups: must give"),
        (lambda d: d.update(splits={"val": d["splits"]["train"]}), "splits: no train split"),
    ],
)
def test_a_manifest_is_checked_field_by_field(tmp_path, edit, match):
    out = _edited_manifest(tmp_path, edit)
    with pytest.raises(DataError, match=match):
        load_manifest(out)


def test_a_manifest_that_is_not_an_object_or_not_utf8_is_one_error(tmp_path):
    out, _ = _write(tmp_path, _split(6))
    (out / "meta.json").write_text("[]")
    with pytest.raises(DataError, match=r"meta.json: a JSON list, not a shard manifest"):
        load_manifest(out)
    (out / "meta.json").write_bytes(b'{"a": "\xe9"}')
    with pytest.raises(DataError, match=r"meta.json: not UTF-8 text \(byte 7 is 0xe9\)"):
        load_manifest(out)


def test_leakage_digests_are_one_per_written_image(tmp_path):
    split = _split(6)
    _, res = _write(tmp_path, split)
    assert len(res.digests) == 6
    assert res.digests[0] == hashlib.sha256(image_member(split, 0, "png")[0]).digest()
