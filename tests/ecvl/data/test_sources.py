import os
import pickle

import numpy as np
import pytest
from PIL import Image

from ecvl.data.sources import (
    Cifar100Source,
    DigitsSource,
    ImageFolderSource,
    ImageNetLTSource,
    ListSource,
    NpzSource,
    PlacesLTSource,
    check_classes,
    load_restricted_pickle,
    make_key,
    read_classnames,
    read_list_file,
)
from ecvl.errors import DataError
from support import write_npz


def test_digits_is_real_and_rgb():
    src = DigitsSource(image_size=32).load()
    train = src.splits["train"]
    assert len(train) == 1797 and len(src.classes) == 10
    assert train.images.shape == (1797, 32, 32, 3) and train.images.dtype == np.uint8
    assert np.bincount(train.labels).min() >= 170
    data, ext = train.image_bytes(0)
    assert ext == "png" and data.startswith(b"\x89PNG")


def test_npz_round_trip(tiny_npz):
    src = NpzSource(train=tiny_npz["train"], test=tiny_npz["test"]).load()
    assert src.classes == ("cat", "dog", "sea_lion")
    assert np.bincount(src.splits["train"].labels).tolist() == [8, 3, 1]
    assert len(src.splits["test"]) == 6


def test_npz_object_array_is_refused(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(
        path,
        images=np.zeros((1, 2, 2, 3), np.uint8),
        labels=np.array([0]),
        classes=np.array(["a", None], dtype=object),
    )
    with pytest.raises(DataError, match="without unpickling"):
        NpzSource(train=path).load()


@pytest.mark.parametrize(
    "images,labels,classes,match",
    [
        (np.zeros((2, 4, 4), np.uint8), [0, 1], ["a", "b"], "N×H×W×3 uint8"),
        (
            np.zeros((2, 4, 4, 3), np.uint8),
            [0, 5],
            ["a", "b"],
            r"label 5 at row 1 is out of range \[0, 2\)",
        ),
        (np.zeros((2, 4, 4, 3), np.uint8), [0, 1], ["a", "a"], "duplicate class name 'a'"),
        (np.zeros((2, 4, 4, 3), np.uint8), [0], ["a", "b"], "2 images but 1 labels"),
    ],
)
def test_npz_bad_input(tmp_path, images, labels, classes, match):
    path = tmp_path / "bad.npz"
    np.savez(path, images=images, labels=np.array(labels), classes=np.array(classes))
    with pytest.raises(DataError, match=match) as e:
        NpzSource(train=path).load()
    assert "bad.npz" in str(e.value)


def test_npz_missing_file(tmp_path):
    with pytest.raises(DataError, match="npz file not found: .*nope.npz"):
        NpzSource(train=tmp_path / "nope.npz").load()


def test_npz_classes_must_agree(tmp_path):
    a = write_npz(tmp_path / "a.npz", [0, 1], ["x", "y"])
    b = write_npz(tmp_path / "b.npz", [0, 1], ["x", "z"])
    with pytest.raises(DataError, match="`classes` differ"):
        NpzSource(train=a, test=b).load()


def _image_tree(root, layout):
    for rel in layout:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (6, 6), (len(rel) * 9 % 255, 10, 20)).save(path)


def test_imagefolder_with_split_dirs(tmp_path):
    _image_tree(
        tmp_path, ["train/cat/1.png", "train/cat/2.png", "train/dog/a.jpg", "test/dog/b.png"]
    )
    (tmp_path / "train/dog/notes.txt").write_text("not an image")
    src = ImageFolderSource(root=tmp_path).load()
    assert src.classes == ("cat", "dog")
    assert src.splits["train"].labels.tolist() == [0, 0, 1]
    assert src.splits["test"].labels.tolist() == [1]
    data, ext = src.splits["train"].image_bytes(2)
    assert ext == "jpg" and data == (tmp_path / "train/dog/a.jpg").read_bytes()
    assert src.splits["train"].keys[0] == "train_cat_1"


def test_imagefolder_unknown_test_class(tmp_path):
    _image_tree(tmp_path, ["train/cat/1.png", "test/cow/1.png"])
    with pytest.raises(DataError, match="cow: class folder not present in the train split"):
        ImageFolderSource(root=tmp_path).load()


def test_list_source(tmp_path):
    _image_tree(tmp_path, ["img/a.png", "img/b.png", "img/c.png"])
    (tmp_path / "train.txt").write_text("# comment\nimg/a.png 0\nimg/b.png,1\n\n")
    (tmp_path / "test.txt").write_text("img/c.png 1\n")
    (tmp_path / "names.txt").write_text("red fox\nblue_whale\n")
    src = ListSource(
        root=tmp_path,
        train=tmp_path / "train.txt",
        test=tmp_path / "test.txt",
        classnames=tmp_path / "names.txt",
    ).load()
    assert src.classes == ("red fox", "blue_whale")
    assert src.splits["train"].keys == ["img_a", "img_b"]
    assert src.splits["train"].labels.tolist() == [0, 1]


@pytest.mark.parametrize(
    "line,match",
    [
        ("img/a.png", "train.txt:1: expected `path label`"),
        ("img/a.png x", "train.txt:1: label 'x' is not an integer"),
        ("img/a.png 7", r"label 7 at row 0 is out of range \[0, 2\)"),
    ],
)
def test_list_source_bad_lines(tmp_path, line, match):
    (tmp_path / "train.txt").write_text(line + "\n")
    (tmp_path / "names.txt").write_text("a\nb\n")
    with pytest.raises(DataError, match=match):
        ListSource(
            root=tmp_path, train=tmp_path / "train.txt", classnames=tmp_path / "names.txt"
        ).load()


def test_list_source_duplicate_entry(tmp_path):
    (tmp_path / "train.txt").write_text("a.png 0\na.png 0\n")
    with pytest.raises(DataError, match="a.png is listed more than once"):
        ListSource(root=tmp_path, train=tmp_path / "train.txt").load()


def test_missing_root_and_split_file(tmp_path):
    with pytest.raises(DataError, match="image root not found: .*missing"):
        ListSource(root=tmp_path / "missing", train=tmp_path / "t.txt").load()
    with pytest.raises(DataError, match="split list not found: .*t.txt"):
        ListSource(root=tmp_path, train=tmp_path / "t.txt").load()


def test_imagenet_lt_uses_open_clip_classnames(tmp_path):
    (tmp_path / "ImageNet_LT_train.txt").write_text("train/x.JPEG 0\ntrain/y.JPEG 999\n")
    src = ImageNetLTSource(root=tmp_path, train=tmp_path / "ImageNet_LT_train.txt").load()
    assert len(src.classes) == 1000 and src.classes[0] == "tench"


def test_imagenet_lt_prompts_are_unique():
    """CLIP's curated list names two pairs of synsets alike ("missile", "sunglasses"); the
    source renames one of each, so no two classes share a prompt."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    names = ImageNetLTSource().default_classnames(1000)
    assert len(set(IMAGENET_CLASSNAMES)) == 998  # what the rename is for
    assert len(set(names)) == 1000
    assert names[657] == "missile" and names[744] == "projectile"
    assert names[836] == "sunglass" and names[837] == "sunglasses"


def test_imagenet_lt_source_on_a_small_tree(tmp_path):
    """The source's own layout (`train/<wnid>/<wnid>_N.JPEG`), JPEG bytes kept as they are."""
    lines = {
        "train": ["train/n01440764/n01440764_1.JPEG 0", "train/n01443537/n01443537_7.JPEG 1"],
        "val": ["train/n01440764/n01440764_9.JPEG 0", "train/n01443537/n01443537_2.JPEG 1"],
        "test": ["val/n01440764/ILSVRC2012_val_00000293.JPEG 0"],
    }
    for split, rows in lines.items():
        (tmp_path / f"ImageNet_LT_{split}.txt").write_text("\n".join(rows) + "\n")
    _image_tree(tmp_path, [r.split()[0] for rows in lines.values() for r in rows])
    src = ImageNetLTSource(
        root=tmp_path, **{s: tmp_path / f"ImageNet_LT_{s}.txt" for s in lines}
    ).load()
    assert src.classes[:2] == ("tench", "goldfish") and len(src.classes) == 1000
    train = src.splits["train"]
    assert train.keys == ["train_n01440764_n01440764_1", "train_n01443537_n01443537_7"]
    assert train.labels.tolist() == [0, 1] and len(src.splits["test"]) == 1
    data, ext = train.image_bytes(1)
    assert ext == "jpg"
    assert data == (tmp_path / "train/n01443537/n01443537_7.JPEG").read_bytes()


def _places_lists(tmp_path, rows: dict[str, list[str]]) -> dict:
    for split, lines in rows.items():
        (tmp_path / f"Places_LT_{split}.txt").write_text("\n".join(lines) + "\n")
    return {s: tmp_path / f"Places_LT_{s}.txt" for s in rows}


def test_places_lt_class_names_from_list_folders(tmp_path):
    """Without `categories_places365.txt` the names come from the folders the lists name, and
    read as the categories file's names do."""
    lists = _places_lists(
        tmp_path,
        {
            "train": [
                "train/airfield/00000001.jpg 0",
                "train/apartment_building-outdoor/00000002.jpg 1",
                "train/airfield/00000003.jpg 0",
            ],
            "test": ["val/bazaar-indoor/Places365_val_00000004.jpg 2"],
        },
    )
    _image_tree(
        tmp_path, [ln.split()[0] for f in lists.values() for ln in f.read_text().split("\n") if ln]
    )
    src = PlacesLTSource(root=tmp_path, **lists).load()
    assert src.classes == ("airfield", "apartment building outdoor", "bazaar indoor")
    (tmp_path / "cat.txt").write_text(
        "/a/airfield 0\n/a/apartment_building/outdoor 1\n/b/bazaar/indoor 2\n"
    )
    from_file = PlacesLTSource(root=tmp_path, classnames=tmp_path / "cat.txt", **lists).load()
    assert from_file.classes == src.classes
    assert src.splits["train"].labels.tolist() == [0, 1, 0]


@pytest.mark.parametrize(
    "rows,match",
    [
        (
            {"train": ["train/airfield/1.jpg 0", "train/airport/2.jpg 0"]},
            "label 0 is listed under folders '(airfield|airport)' and '(airfield|airport)'",
        ),
        (
            {"train": ["train/airfield/1.jpg 0", "train/bazaar/2.jpg 2"]},
            "label 1 is in no list",
        ),
    ],
)
def test_places_lt_folder_names_must_be_unambiguous(tmp_path, rows, match):
    lists = _places_lists(tmp_path, rows)
    with pytest.raises(DataError, match=match):
        PlacesLTSource(root=tmp_path, **lists).load()


def test_places_category_file_format(tmp_path):
    (tmp_path / "cat.txt").write_text("/a/airfield 0\n/a/apartment_building/outdoor 1\n")
    assert read_classnames(tmp_path / "cat.txt") == ("airfield", "apartment building outdoor")


def _fake_cifar(root, rows=4):
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        # the official files are py2 pickles: str keys once read with encoding="latin1"
        payload = {
            "data": rng.integers(0, 256, (rows, 3072), dtype=np.uint8),
            "fine_labels": [0, 1, 2, 1][:rows],
        }
        (base / split).write_bytes(pickle.dumps(payload, protocol=2))
    meta = {"fine_label_names": ["apple", "aquarium_fish", "baby"]}
    (base / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return base


def test_cifar100_reader_layout(tmp_path):
    base = _fake_cifar(tmp_path)
    src = Cifar100Source(root=tmp_path, verify_md5=False).load()
    raw = pickle.loads((base / "train").read_bytes())["data"][0]
    assert src.classes == ("apple", "aquarium_fish", "baby")
    train = src.splits["train"]
    assert train.images.shape == (4, 32, 32, 3)
    # channel-major rows: pixel (0,0) of image 0 is (R, G, B) = raw[0], raw[1024], raw[2048]
    assert train.images[0, 0, 0].tolist() == [raw[0], raw[1024], raw[2048]]


def test_cifar100_md5_mismatch_is_refused(tmp_path):
    _fake_cifar(tmp_path)
    with pytest.raises(DataError, match="MD5 does not match"):
        Cifar100Source(root=tmp_path).load()


def test_cifar100_missing_without_download(tmp_path):
    with pytest.raises(DataError, match="CIFAR-100 not found: .*download: true"):
        Cifar100Source(root=tmp_path).load()


def test_cifar100_download_without_internet_is_one_clear_error(tmp_path, monkeypatch):
    """No network: torchvision's download fails at its first request; the error says where the
    archive is and where to unpack it, and the socket timeout set for the download is undone."""
    import socket
    import urllib.error
    import urllib.request

    calls = []

    def offline(request, *args, **kwargs):
        calls.append(socket.getdefaulttimeout())
        raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    before = socket.getdefaulttimeout()
    with pytest.raises(DataError) as info:
        Cifar100Source(root=tmp_path / "cifar100", download=True).load()
    message = str(info.value)
    assert message == (
        "CIFAR-100 download failed ([Errno -3] Temporary failure in name resolution); without "
        "internet, fetch https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz on a machine "
        f"that has it and unpack it into {tmp_path / 'cifar100'} (giving "
        f"{tmp_path / 'cifar100' / 'cifar-100-python'}/)"
    )
    assert calls and all(t == 60.0 for t in calls)  # a dropped connection cannot hang the stage
    assert socket.getdefaulttimeout() == before


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_restricted_unpickler_refuses_code(tmp_path):
    path = tmp_path / "evil"
    path.write_bytes(pickle.dumps({"x": _Evil()}))
    with pytest.raises(DataError, match="refusing to load posix.system"):
        load_restricted_pickle(path, expected_md5=None)
    assert not (tmp_path / "pwned").exists() and not os.path.exists("pwned")


def test_make_key_is_tar_safe():
    assert make_key("n01440764/n01440764_10026.JPEG") == "n01440764_n01440764_10026_JPEG"
    assert "." not in make_key("a.b.c") and "/" not in make_key("a/b")


def test_keys_of_ascii_paths_are_unchanged_and_others_get_a_short_hash():
    # ASCII ids keep the keys existing shards and dvc.lock were made with
    assert make_key("cat/0") == "cat_0"
    assert make_key("my cat/IMG 1") == "my_cat_IMG_1"
    # non-ASCII characters would be lost: a hash of the whole id keeps keys apart
    cat, dog = make_key("猫/0"), make_key("犬/0")
    assert cat != dog and cat.startswith("0_") and dog.startswith("0_")
    assert make_key("кошка/0") not in (cat, dog) and make_key("猫/0") == cat  # stable
    assert all(k.isascii() and "." not in k and "/" not in k for k in (cat, dog))


def _png(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def test_non_ascii_class_folders_keep_their_names_and_unique_keys(tmp_path):
    names = ["кошка", "собака", "犬", "猫", "鳥"]
    for c, name in enumerate(names):
        for i in range(2):
            _png(tmp_path / name / f"{i}.png", 10 * c + i)
    src = ImageFolderSource(root=tmp_path).load()
    assert src.classes == tuple(sorted(names))
    keys = src.splits["train"].keys
    assert len(keys) == 10 and len(set(keys)) == 10


def test_a_png_beside_a_jpg_of_the_same_name_are_two_images(tmp_path):
    _png(tmp_path / "cat" / "0.png", 1)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "cat" / "0.jpg")
    _png(tmp_path / "cat" / "1.png", 2)
    _png(tmp_path / "dog" / "0.png", 3)
    keys = ImageFolderSource(root=tmp_path).load().splits["train"].keys
    # only the colliding pair is told apart; every other key is as it always was
    assert keys == ["cat_0_jpg", "cat_0_png", "cat_1", "dog_0"]


@pytest.mark.parametrize(
    "names",
    [("Dog", "dog"), ("sea_lion", "sea lion"), ("t-shirt", "tshirt"), ("a  b", "A b")],
)
def test_class_names_that_read_alike_to_the_text_encoder_are_refused(tmp_path, names):
    write_npz(tmp_path / "train.npz", [0, 1], list(names))
    with pytest.raises(DataError, match=rf"classes 0 '{names[0]}' and 1 '{names[1]}' read alike"):
        NpzSource(train=tmp_path / "train.npz").load()


def test_class_names_that_only_look_alike_are_kept(tmp_path):
    write_npz(tmp_path / "train.npz", [0, 1, 2], ["crane", "crane bird", "猫"])
    assert NpzSource(train=tmp_path / "train.npz").load().classes == ("crane", "crane bird", "猫")


def test_text_inputs_may_start_with_a_bom_and_must_be_utf8(tmp_path):
    (tmp_path / "names.txt").write_bytes("\ufeffcat\ndog\n".encode())
    assert read_classnames(tmp_path / "names.txt") == ("cat", "dog")
    (tmp_path / "img").mkdir()
    (tmp_path / "train.txt").write_bytes("\ufeffa.png 0\n".encode())
    paths, labels = read_list_file(tmp_path / "train.txt", tmp_path / "img")
    assert paths == [tmp_path / "img/a.png"] and labels.tolist() == [0]
    (tmp_path / "latin.txt").write_bytes("chat\nb\xe9b\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.txt: not UTF-8 text \(byte 6 is 0xe9\)"):
        read_classnames(tmp_path / "latin.txt")
    (tmp_path / "utf16.txt").write_bytes("cat\n".encode("utf-16"))
    with pytest.raises(DataError, match="utf16.txt: UTF-16 text"):
        read_list_file(tmp_path / "utf16.txt", tmp_path)


def test_imagenet_class_names_do_not_read_alike():
    check_classes(ImageNetLTSource().default_classnames(1000), "imagenet")  # no error
