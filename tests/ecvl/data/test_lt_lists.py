"""ImageNet-LT and Places-LT: the real split lists parse to the published profile, and the
stand-in trees of `benchmarks/standin_tree.py` go through the real sources and the shard writer.

The real lists live in `../shared/data/{imagenet_lt,places_lt}/` (no images); those tests skip
when it is absent. Parsing needs no image: a source reads its lists and checks only the root.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ecvl.data.shards import write_split_shards
from ecvl.data.sources import ImageNetLTSource, PlacesLTSource
from support import SHARED, load_script

REPO = Path(__file__).resolve().parents[3]
IMAGENET = SHARED / "data" / "imagenet_lt"
PLACES = SHARED / "data" / "places_lt"
needs_lists = pytest.mark.skipif(
    not (IMAGENET.is_dir() and PLACES.is_dir()), reason="../shared split lists not present"
)


def _standin():
    return load_script("benchmarks/standin_tree.py")


standin = _standin()


def _groups(counts: np.ndarray) -> tuple[int, int, int]:
    return (
        int((counts > 100).sum()),
        int(((counts >= 20) & (counts <= 100)).sum()),
        int((counts < 20).sum()),
    )


# --------------------------------------------------------------------------------------------
# The generated ImageNet-LT train profile (no shared data needed)


def test_imagenet_lt_profile_matches_the_published_numbers():
    counts = standin.imagenet_lt_profile()
    assert len(counts) == 1000 and counts.sum() == 115_846
    assert counts.max() == 1280 and counts.min() == 5
    assert np.all(np.diff(counts) <= 0)
    assert _groups(counts) == (385, 479, 136)


def test_imagenet_lt_train_rows_avoid_val_paths_and_follow_the_layout():
    val = [(f"train/n0{c:07d}/n0{c:07d}_{i}.JPEG", c) for c in range(1000) for i in (1, 3)]
    rows = standin.imagenet_lt_train_rows(val, seed=0)
    assert len(rows) == 115_846 and len({r for r, _ in rows}) == len(rows)
    assert not {r for r, _ in rows} & {r for r, _ in val}
    assert rows[0] == ("train/n00000000/n00000000_2.JPEG", 0)  # 1 and 3 are val images
    counts = np.bincount([label for _, label in rows], minlength=1000)
    assert sorted(counts.tolist(), reverse=True) == standin.imagenet_lt_profile().tolist()
    assert counts[0] != 1280  # the ranks are shuffled over the labels, not in label order
    assert rows == standin.imagenet_lt_train_rows(val, seed=0)
    assert rows != standin.imagenet_lt_train_rows(val, seed=1)


def test_subset_keeps_every_class():
    rows = [(f"a/{c}/{i}.jpg", c) for c in range(3) for i in range(c * 100 + 1)]
    kept = Counter(label for _, label in standin.subset_rows(rows, 0.02))
    assert kept == {0: 1, 1: 2, 2: 4}


# --------------------------------------------------------------------------------------------
# Stand-in trees through the real sources and the shard writer


def _write_places_lists(tmp_path: Path) -> dict[str, Path]:
    rows = {
        "train": [f"train/airfield/{i:08d}.jpg 0" for i in range(4)]
        + [f"train/apartment_building-outdoor/{i:08d}.jpg 1" for i in range(2)],
        # Places-LT's val images are train images of Places365: same folders
        "val": ["train/airfield/00000009.jpg 0", "train/apartment_building-outdoor/00000009.jpg 1"],
        "test": [
            f"val/{c}/Places365_val_{i:08d}.jpg {label}"
            for label, c, i in [(0, "airfield", 1), (1, "apartment_building-outdoor", 2)]
        ],
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, lines in rows.items():
        out[split] = tmp_path / f"Places_LT_{split}.txt"
        out[split].write_text("\n".join(lines) + "\n")
    return out


def test_standin_tree_writes_decodable_deterministic_jpegs(tmp_path):
    lists = _write_places_lists(tmp_path / "lists")
    info = standin.write_tree(list(lists.values()), tmp_path / "a", pool=None, workers=1)
    again = standin.write_tree(list(lists.values()), tmp_path / "b", pool=None, workers=2, chunk=3)
    assert info["files"] == again["files"] == 10 and info["pixels"] == "seeded noise"
    for line in "".join(p.read_text() for p in lists.values()).split("\n"):
        if line:
            rel = line.split()[0]
            data = (tmp_path / "a" / rel).read_bytes()
            assert data == (tmp_path / "b" / rel).read_bytes()
            with Image.open(tmp_path / "a" / rel, formats=["JPEG"]) as im:
                im.load()
                assert im.size == (64, 64) and im.mode == "RGB"
    other = standin.write_tree([lists["train"]], tmp_path / "c", pool=None, seed=1, workers=1)
    assert other["files"] == 6
    first = "train/airfield/00000000.jpg"
    assert (tmp_path / "c" / first).read_bytes() != (tmp_path / "a" / first).read_bytes()


def test_pool_indices_draw_from_the_labels_cifar_class():
    pool_labels = np.repeat(np.arange(100), 5)  # class-sorted, as `_load_pool` returns it
    labels = np.array([0, 99, 100, 257, 999])
    idx = standin.pool_indices(labels, seed=0, pool_labels=pool_labels)
    assert pool_labels[idx].tolist() == (labels % 100).tolist()
    assert np.array_equal(idx, standin.pool_indices(labels, seed=0, pool_labels=pool_labels))


def test_places_lt_source_shards_a_standin_tree(tmp_path):
    lists = _write_places_lists(tmp_path / "lists")
    root = tmp_path / "places365"
    standin.write_tree(list(lists.values()), root, pool=None, workers=1)
    src = PlacesLTSource(root=root, **lists).load()
    assert src.classes == ("airfield", "apartment building outdoor")
    for name, split in src.splits.items():
        written = write_split_shards(
            split,
            name,
            src.classes,
            tmp_path / "shards",
            4,
            0.0,
            encoding="auto",
            progress=False,
        )
        assert written.count == len(split) and not written.bad
        assert written.encoding == "png"  # a file source keeps its JPEG bytes
    assert sorted(p.name for p in (tmp_path / "shards").glob("train-*.tar")) == [
        "train-000000.tar",
        "train-000001.tar",
    ]


def test_imagenet_lt_source_on_a_standin_tree(tmp_path):
    val = [(f"train/n0144076{c}/n0144076{c}_{i}.JPEG", c) for c in range(2) for i in (5, 6)]
    standin.write_list(tmp_path / "ImageNet_LT_val.txt", val)
    root = tmp_path / "imagenet"
    standin.write_tree([tmp_path / "ImageNet_LT_val.txt"], root, pool=None, workers=1)
    src = ImageNetLTSource(root=root, val=tmp_path / "ImageNet_LT_val.txt").load()
    split = src.splits["val"]
    assert src.classes[:2] == ("tench", "goldfish")
    written = write_split_shards(
        split, "val", src.classes, tmp_path / "shards", 10, 0.0, encoding="raw", progress=False
    )
    assert written.count == 4 and written.per_class[:2] == [2, 2]


# --------------------------------------------------------------------------------------------
# The real lists, parsed by the real sources (no image needed)


@needs_lists
def test_places_lt_real_lists_parse_exactly(tmp_path):
    src = PlacesLTSource(
        root=tmp_path, **{s: PLACES / f"Places_LT_{s}.txt" for s in ("train", "val", "test")}
    ).load()
    assert len(src.classes) == 365 and src.classes[:2] == ("airfield", "airplane cabin")
    assert len(set(src.classes)) == 365
    train = np.bincount(src.splits["train"].labels, minlength=365)
    assert train.sum() == 62_500 and train.max() == 4980 and train.min() == 5
    assert _groups(train) == (131, 163, 71)
    assert np.bincount(src.splits["val"].labels, minlength=365).tolist() == [20] * 365
    assert np.bincount(src.splits["test"].labels, minlength=365).tolist() == [100] * 365
    assert len(set(src.splits["train"].keys) | set(src.splits["val"].keys)) == 62_500 + 7_300


@needs_lists
def test_imagenet_lt_real_lists_parse_exactly(tmp_path):
    lists = {s: IMAGENET / f"ImageNet_LT_{s}.txt" for s in ("val", "test")}
    standin.write_list(
        tmp_path / "ImageNet_LT_train.txt",
        standin.imagenet_lt_train_rows(standin.read_list(lists["val"])),
    )
    src = ImageNetLTSource(root=tmp_path, train=tmp_path / "ImageNet_LT_train.txt", **lists).load()
    assert len(src.classes) == 1000
    assert np.bincount(src.splits["val"].labels, minlength=1000).tolist() == [20] * 1000
    assert np.bincount(src.splits["test"].labels, minlength=1000).tolist() == [50] * 1000
    train = np.bincount(src.splits["train"].labels, minlength=1000)
    assert train.sum() == 115_846 and train.max() == 1280 and train.min() == 5
    assert _groups(train) == (385, 479, 136)
    assert not set(src.splits["train"].keys) & set(src.splits["val"].keys)
    # Labels follow sorted wnids, ImageNet's standard order, which open_clip's names follow.
    wnids = {}
    for path, label in zip(src.splits["test"].paths, src.splits["test"].labels, strict=True):
        wnids.setdefault(int(label), path.parent.name)
    assert [wnids[c] for c in range(1000)] == sorted(wnids.values())
    assert wnids[0] == "n01440764" and src.classes[0] == "tench"


@needs_lists
def test_lt_prompts_tokenize_apart(tmp_path):
    """No two classes of either dataset give the same prompt tokens (the tokenizer lowercases
    and drops punctuation, so distinct strings are not enough)."""
    import open_clip

    tokenizer = open_clip.get_tokenizer("RN50")
    places = PlacesLTSource(root=tmp_path, train=PLACES / "Places_LT_train.txt").load().classes
    for classes in (ImageNetLTSource().default_classnames(1000), places):
        tokens = tokenizer([f"a photo of a {c.replace('_', ' ')}." for c in classes])
        assert len({tuple(t.tolist()) for t in tokens}) == len(classes)
        assert int((tokens != 0).sum(dim=1).max()) <= 32  # the tiny models' context length
