"""Where images come from: the embedded `digits`, CIFAR-100, ImageNet-LT / Places-LT lists,
image folders, `path label` lists and `.npz` arrays.

Each source is a small frozen config (the fields a user sets) whose `load()` returns the
class names and the splits the source itself defines. Carving held-out, long-tailed and
validation splits is `ecvl.data.splits`' job, not the source's.
"""

from __future__ import annotations

import hashlib
import io
import logging
import pickle
import re
import string
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image

from ecvl.data.textfiles import read_text, shorten
from ecvl.errors import DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp")
# The PIL decoder each extension may use: bytes are opened only with the format their name
# promises, so a `.png` holding TIFF, GIF or EPS (PIL's Ghostscript plugin) is refused.
PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP", "bmp": "BMP"}
GENERIC_TEMPLATES = ("a photo of a {}.",)
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass
class Split:
    """One split: stable keys, integer labels and, per sample, a pixel array or a file."""

    keys: list[str]
    labels: np.ndarray
    images: np.ndarray | None = None  # N×H×W×3 uint8, for array sources
    paths: list[Path] | None = None  # encoded image files, for file sources

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        n = len(self.keys)
        if len(self.labels) != n:
            raise DataError(f"{n} keys but {len(self.labels)} labels")
        if (self.images is None) == (self.paths is None):
            raise ValueError("a Split holds either images or paths")
        if len(self.images if self.images is not None else self.paths) != n:
            raise DataError(f"{n} keys but a different number of images")

    def __len__(self) -> int:
        return len(self.keys)

    def subset(self, idx: np.ndarray) -> Split:
        idx = np.asarray(idx, dtype=np.int64)
        return Split(
            keys=[self.keys[i] for i in idx],
            labels=self.labels[idx],
            images=None if self.images is None else self.images[idx],
            paths=None if self.paths is None else [self.paths[i] for i in idx],
        )

    def describe(self, i: int) -> str:
        """Where sample `i` comes from, for messages: its file, else its key."""
        return str(self.paths[i]) if self.paths is not None else self.keys[i]

    def image_bytes(self, i: int) -> tuple[bytes, str]:
        """The encoded image and its extension: the file's own bytes, or a PNG of the array."""
        if self.paths is not None:
            path = self.paths[i]
            try:
                data = path.read_bytes()
            except OSError as e:
                raise DataError(f"cannot read image {path}: {e.strerror or e}") from None
            ext = path.suffix.lower().lstrip(".")
            return data, "jpg" if ext == "jpeg" else ext
        return encode_png(self.images[i]), "png"


@dataclass
class LoadedSource:
    """What a source provides before any carving: class names and its own splits."""

    classes: tuple[str, ...]
    splits: dict[str, Split]

    def __post_init__(self) -> None:
        check_classes(self.classes, where="class names")
        for name, split in self.splits.items():
            check_labels(split.labels, len(self.classes), where=f"{name} split")


def default_prompt_templates(source: object) -> tuple[str, ...]:
    """The eval prompt templates a source's images suit (`GENERIC_TEMPLATES` unless it says)."""
    return tuple(getattr(source, "prompt_templates", GENERIC_TEMPLATES))


def encode_png(image: np.ndarray) -> bytes:
    """Deterministic PNG bytes (no timestamps or metadata) for an H×W×3 uint8 array."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def make_key(text: str) -> str:
    """A tar- and webdataset-safe key (ASCII letters, digits, `_` and `-`: no dots or slashes)
    derived from a source id.

    An ASCII id keeps the key it always had (existing shards stay byte-identical). An id with
    other characters (`猫/0`, `кошка/0`) would lose them and collide with its neighbours, so it
    gets the first 8 hex digits of its SHA-256 appended (`0_1b4f0e98`): unique and stable.
    """
    key = _KEY_UNSAFE.sub("_", text).strip("_") or "_"
    if text.isascii():
        return key
    return f"{key}_{_short_hash(text)}"


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:8]


_PUNCTUATION = str.maketrans("", "", string.punctuation)


def prompt_form(name: str) -> str:
    """What a class name can be reduced to on its way into a prompt's tokens: underscores shown
    as spaces (as `ecvl.text.build_prompts` shows them), Unicode NFC, lower case, whitespace
    collapsed, ASCII punctuation dropped. open_clip's tokenizers lower-case (CLIP's) or also
    drop punctuation (`canonicalize`, SigLIP's): two names with one form may get one prompt,
    one text embedding, and could never be told apart."""
    shown = unicodedata.normalize("NFC", name).replace("_", " ")
    return " ".join(shown.translate(_PUNCTUATION).lower().split())


def check_classes(classes: tuple[str, ...], where: str) -> None:
    """Refuse an empty class list, empty names, duplicates, and names that read alike to the
    text encoder (`prompt_form`).

    Raises:
        DataError: naming both classes.
    """
    if not classes:
        raise DataError(f"{where}: no classes")
    seen: dict[str, int] = {}
    forms: dict[str, int] = {}
    for i, name in enumerate(classes):
        if not name.strip():
            raise DataError(f"{where}: class {i} has an empty name")
        if name in seen:
            raise DataError(
                f"{where}: duplicate class name {shorten(name)!r} (classes {seen[name]} and {i})"
            )
        seen[name] = i
        form = prompt_form(name)
        if form in forms:
            j = forms[form]
            raise DataError(
                f"{where}: classes {j} {shorten(classes[j])!r} and {i} {shorten(name)!r} read "
                "alike to the text encoder (prompts ignore case, underscores and punctuation), "
                "so their prompts would be the same; rename one"
            )
        forms[form] = i


def check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        i = int(bad[0])
        raise DataError(
            f"{where}: label {int(labels[i])} at row {i} is out of range [0, {num_classes})"
            + (f" ({len(bad)} such rows)" if len(bad) > 1 else "")
        )


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    return path


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{what} not found: {path}")
    return path


# --------------------------------------------------------------------------------------------
# Array sources


@dataclass(frozen=True)
class DigitsSource:
    """scikit-learn's bundled digits (1,797 real 8×8 images), upscaled to RGB.

    Ships with scikit-learn, so the default pipeline needs no download. The source has no
    test split of its own: hold one out with the split plan.
    """

    name: ClassVar[str] = "digits"
    # "number" prompts fit these images only: other sources default to GENERIC_TEMPLATES
    prompt_templates: ClassVar[tuple[str, ...]] = (
        "a photo of a {}.",
        "a photo of the number {}.",
        "a picture of a {}.",
    )
    image_size: int = field(default=32, metadata={"ge": 8, "le": 1024})

    def load(self) -> LoadedSource:
        from sklearn.datasets import load_digits

        digits = load_digits()
        gray = np.clip(digits.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
        size = (self.image_size, self.image_size)
        images = np.stack(
            [
                np.asarray(Image.fromarray(g, "L").resize(size, Image.BICUBIC).convert("RGB"))
                for g in gray
            ]
        )
        names = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
        keys = [f"digits_{i:05d}" for i in range(len(images))]
        return LoadedSource(names, {"train": Split(keys, digits.target, images=images)})


@dataclass(frozen=True)
class NpzSource:
    """One `.npz` per split with `images` (N×H×W×3 uint8), `labels` (int), `classes` (str).

    Read with `allow_pickle=False`: an object array (which would need unpickling) is refused.
    """

    name: ClassVar[str] = "npz"
    train: Path | None = None
    val: Path | None = None
    test: Path | None = None

    def load(self) -> LoadedSource:
        classes: tuple[str, ...] | None = None
        splits = {}
        for split_name in SPLITS:
            path = getattr(self, split_name)
            if path is None:
                continue
            split, split_classes = load_npz_split(Path(path), prefix=split_name)
            if classes is None:
                classes = split_classes
            elif split_classes != classes:
                raise DataError(f"{path}: `classes` differ from those of the other splits")
            splits[split_name] = split
        if classes is None:
            raise DataError("npz source: give at least one of `train`, `val`, `test`")
        return LoadedSource(classes, splits)


def load_npz_split(path: Path, prefix: str) -> tuple[Split, tuple[str, ...]]:
    """Read one split from an `.npz` file without unpickling anything."""
    _require_file(path, "npz file")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = {"images", "labels", "classes"} - set(z.files)
            if missing:
                raise DataError(f"{path}: missing array(s) {sorted(missing)}")
            images, labels, classes = z["images"], z["labels"], z["classes"]
    except ValueError as e:  # object arrays need pickle, which we refuse
        raise DataError(f"{path}: cannot read without unpickling ({e})") from None
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npz file ({e})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(
            f"{path}: `images` must be N×H×W×3 uint8, got shape {images.shape} dtype {images.dtype}"
        )
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{path}: `labels` must be a 1-D integer array, got {labels.dtype} {labels.shape}"
        )
    if len(labels) != len(images):
        raise DataError(f"{path}: {len(images)} images but {len(labels)} labels")
    if classes.dtype.kind != "U" or classes.ndim != 1:
        raise DataError(f"{path}: `classes` must be a 1-D string array, got {classes.dtype}")
    names = tuple(str(c) for c in classes)
    check_classes(names, where=f"{path}: classes")
    check_labels(labels, len(names), where=str(path))
    keys = [f"{prefix}_{i:07d}" for i in range(len(images))]
    return Split(keys, labels, images=images), names


# The official CIFAR-100 python files are pickles. We unpickle only files whose MD5 matches
# the published release, and even then through an unpickler that can build nothing but
# numpy arrays, lists, dicts and strings.
CIFAR100_MD5 = {
    "train": "16019d7e3df5f24257cddd939b257f8d",
    "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    "meta": "7973b15100ade9c7d40fb424638fde48",
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Builds numpy arrays and plain containers, nothing else."""

    def find_class(self, module: str, name: str):
        import codecs

        from numpy._core.multiarray import _reconstruct

        allowed = {
            ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
            ("_codecs", "encode"): codecs.encode,  # bytes in protocol-2 pickles written by py3
        }
        try:
            return allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def load_restricted_pickle(path: Path, expected_md5: str | None) -> object:
    data = _require_file(path, "CIFAR-100 file").read_bytes()
    if expected_md5 is not None and hashlib.md5(data).hexdigest() != expected_md5:
        raise DataError(
            f"{path}: MD5 does not match the official CIFAR-100 release; refusing to unpickle it"
        )
    try:
        return _ArrayOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise DataError(f"{path}: not a CIFAR-100 python file ({e})") from None


@dataclass(frozen=True)
class Cifar100Source:
    """The standard `cifar-100-python/` files under `root` (fine labels, official order).

    With `download: true`, torchvision fetches and verifies the archive first (needs internet).
    """

    name: ClassVar[str] = "cifar100"
    root: Path = Path("data/raw")
    download: bool = False
    verify_md5: bool = True

    def load(self) -> LoadedSource:
        base = Path(self.root) / "cifar-100-python"
        if not base.is_dir():
            if not self.download:
                raise DataError(
                    f"CIFAR-100 not found: {base} "
                    "(set `download: true` to fetch it with torchvision)"
                )
            _download_cifar100(Path(self.root))
        md5 = CIFAR100_MD5 if self.verify_md5 else dict.fromkeys(CIFAR100_MD5)
        meta = load_restricted_pickle(base / "meta", md5["meta"])
        classes = tuple(str(c) for c in meta["fine_label_names"])
        splits = {}
        for split_name in ("train", "test"):
            raw = load_restricted_pickle(base / split_name, md5[split_name])
            images = (
                np.asarray(raw["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            )
            labels = np.asarray(raw["fine_labels"], dtype=np.int64)
            keys = [f"cifar100_{split_name}_{i:05d}" for i in range(len(labels))]
            splits[split_name] = Split(keys, labels, images=np.ascontiguousarray(images))
        return LoadedSource(classes, splits)


def _download_cifar100(root: Path, timeout_s: float = 60.0) -> None:
    """Fetch and unpack the official archive into `root` with torchvision.

    torchvision opens its connections without a timeout, so a network that drops packets would
    hang the stage; the socket default is set for the download and restored after it.

    Raises:
        DataError: the download failed (no network, a proxy, a server error, a bad archive),
            with where to put the files by hand.
    """
    import http.client
    import socket
    import urllib.error

    from torchvision.datasets import CIFAR100

    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)
    try:
        CIFAR100(str(root), train=True, download=True)
    except (
        urllib.error.URLError,
        TimeoutError,
        ConnectionError,
        http.client.HTTPException,
        RuntimeError,  # torchvision: the archive's MD5 does not match
    ) as e:
        reason = getattr(e, "reason", None) or e
        raise DataError(
            f"CIFAR-100 download failed ({reason}); without internet, fetch {CIFAR100.url} on a "
            f"machine that has it and unpack it into {root} (giving {root / 'cifar-100-python'}/)"
        ) from None
    finally:
        socket.setdefaulttimeout(before)


# --------------------------------------------------------------------------------------------
# File sources


def read_classnames(path: Path) -> tuple[str, ...]:
    """Class names, one per line; also reads Places365's `categories_places365.txt`
    (`/a/airfield 0`) and strips its `/x/` prefix."""
    names = []
    for raw in read_text(_require_file(path, "class-names file")).splitlines():
        line = raw.strip()
        if not line:
            continue
        m = re.fullmatch(r"/[a-z]/(\S+)\s+\d+", line)
        names.append(m.group(1).replace("/", " ").replace("_", " ") if m else line)
    return tuple(names)


def read_list_file(path: Path, root: Path) -> tuple[list[Path], np.ndarray]:
    """Parse `relative/path label` lines (whitespace or comma separated; `#` comments)."""
    paths, labels = [], []
    text = read_text(_require_file(path, "split list"))
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = re.split(r"\s*,\s*|\s+(?=\S+$)", line)
        if len(parts) != 2:
            raise DataError(f"{path}:{lineno}: expected `path label`, got {shorten(raw)!r}")
        rel, label = parts
        try:
            labels.append(int(label))
        except ValueError:
            raise DataError(
                f"{path}:{lineno}: label {shorten(label)!r} is not an integer"
            ) from None
        paths.append(root / rel)
    if not paths:
        raise DataError(f"{path}: no samples listed")
    return paths, np.asarray(labels, dtype=np.int64)


def _file_split(paths: list[Path], labels: np.ndarray, root: Path, where: str) -> Split:
    """A split of image files, keyed by their path under `root` without the extension
    (`cat/0.png` -> `cat_0`, as ever). Files whose keys would collide (`0.png` beside `0.jpg`,
    `a b/0.png` beside `a_b/0.png`) get their extension and, if still alike, a hash of their
    path appended; only a file listed twice is an error."""
    rels = []
    for p in paths:
        try:
            rels.append(str(p.relative_to(root)))
        except ValueError:
            rels.append(str(p))
    keys = [make_key(str(Path(rel).with_suffix(""))) for rel in rels]
    for rename in (lambda i: make_key(rels[i]), lambda i: f"{keys[i]}_{_short_hash(rels[i])}"):
        clashes = _colliding(keys)
        if not clashes:
            break
        for i in clashes:
            keys[i] = rename(i)
    clashes = _colliding(keys)
    if clashes:
        raise DataError(f"{where}: {shorten(rels[clashes[0]])} is listed more than once")
    return Split(keys, labels, paths=list(paths))


def _colliding(keys: list[str]) -> list[int]:
    """Indices of every key that another index shares."""
    count: dict[str, int] = {}
    for k in keys:
        count[k] = count.get(k, 0) + 1
    return [i for i, k in enumerate(keys) if count[k] > 1]


@dataclass(frozen=True)
class ListSource:
    """Split lists of `relative/path label` lines plus an image root (any user's data)."""

    name: ClassVar[str] = "list"
    root: Path = Path(".")
    train: Path | None = None
    val: Path | None = None
    test: Path | None = None
    classnames: Path | None = None

    def default_classnames(
        self, num_classes: int, listed: dict[str, tuple[Path, list[Path], np.ndarray]] | None = None
    ) -> tuple[str, ...]:
        """Class names when no `classnames` file is given; `listed` maps each split to (its
        list file, image paths, labels), for sources whose paths name the classes."""
        log.warning(
            "no `classnames` file given: %d classes named 'class 0' ... 'class %d', so prompts "
            "read 'a photo of a class 0.', which a pretrained text encoder cannot relate to the "
            "images; give `classnames` (one name per line, in label order)",
            num_classes,
            num_classes - 1,
        )
        return tuple(f"class {i}" for i in range(num_classes))

    def load(self) -> LoadedSource:
        root = _require_dir(Path(self.root), "image root")
        listed = {}
        for split_name in SPLITS:
            path = getattr(self, split_name)
            if path is not None:
                listed[split_name] = (Path(path), *read_list_file(Path(path), root))
        if not listed:
            raise DataError(f"{self.name} source: give at least one of `train`, `val`, `test`")
        if self.classnames is not None:
            classes = read_classnames(Path(self.classnames))
        else:
            num = 1 + max(int(labels.max()) for _, _, labels in listed.values())
            classes = self.default_classnames(num, listed)
        splits = {}
        for split_name, (path, paths, labels) in listed.items():
            check_labels(labels, len(classes), where=str(path))
            splits[split_name] = _file_split(paths, labels, root, where=str(path))
        return LoadedSource(classes, splits)


@dataclass(frozen=True)
class ImageNetLTSource(ListSource):
    """ImageNet-LT: `ImageNet_LT_{train,val,test}.txt` over an ImageNet root; class names
    from open_clip's ImageNet list unless a file is given."""

    name: ClassVar[str] = "imagenet_lt"

    def default_classnames(self, num_classes: int, listed: dict | None = None) -> tuple[str, ...]:
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        if num_classes > len(IMAGENET_CLASSNAMES):
            raise DataError(f"labels go up to {num_classes - 1}; ImageNet has 1000 classes")
        names = list(IMAGENET_CLASSNAMES)
        # CLIP's curated list names two pairs of synsets alike; use the other WordNet lemma
        # (744 "projectile, missile", 836 "sunglass") so every class has its own prompt.
        names[744], names[836] = "projectile", "sunglass"
        return tuple(names)


@dataclass(frozen=True)
class PlacesLTSource(ListSource):
    """Places-LT: `Places_LT_{train,val,test}.txt` over a Places365 root; class names from
    Places365's `categories_places365.txt` when given as `classnames`, else from the lists'
    folders, which hold the same names (`train/apartment_building-outdoor/...` for
    `/a/apartment_building/outdoor`: both read "apartment building outdoor")."""

    name: ClassVar[str] = "places_lt"

    def default_classnames(
        self, num_classes: int, listed: dict[str, tuple[Path, list[Path], np.ndarray]] | None = None
    ) -> tuple[str, ...]:
        return classnames_from_folders(num_classes, listed or {})


def classnames_from_folders(
    num_classes: int, listed: dict[str, tuple[Path, list[Path], np.ndarray]]
) -> tuple[str, ...]:
    """Class c's name is the folder its listed images sit in (`_` and `-` read as spaces).

    Raises:
        DataError: a label is listed under two folders, or a label below `num_classes` is
            listed nowhere (its name is unknown).
    """
    folder: dict[int, str] = {}
    for list_path, paths, labels in listed.values():
        for label, name in set(zip(labels.tolist(), (p.parent.name for p in paths), strict=True)):
            if folder.setdefault(label, name) != name:
                raise DataError(
                    f"{list_path}: label {label} is listed under folders {folder[label]!r} and "
                    f"{name!r}, so its class name is ambiguous (give `classnames`)"
                )
    missing = [c for c in range(num_classes) if c not in folder]
    if missing:
        raise DataError(
            f"label {missing[0]} is in no list ({len(missing)} such), so its class name is "
            "unknown (give `classnames`)"
        )
    return tuple(folder[c].replace("-", " ").replace("_", " ") for c in range(num_classes))


@dataclass(frozen=True)
class ImageFolderSource:
    """A folder per class: `root/<split>/<class>/*.jpg`, or `root/<class>/*.jpg` (train only).
    Class names are the train folder names, underscores read as spaces in prompts. Hidden
    entries (`.ipynb_checkpoints/`, `.DS_Store`, ...) are tools' files, never classes or images."""

    name: ClassVar[str] = "imagefolder"
    root: Path = Path(".")

    def load(self) -> LoadedSource:
        root = _require_dir(Path(self.root), "image folder root")
        split_dirs = {s: root / s for s in SPLITS if (root / s).is_dir()}
        if "train" not in split_dirs:
            split_dirs = {"train": root}
        classes = tuple(sorted(d.name for d in _visible_dirs(split_dirs["train"])))
        if not classes:
            raise DataError(f"{split_dirs['train']}: no class folders")
        index = {c: i for i, c in enumerate(classes)}
        splits = {}
        for split_name, split_dir in split_dirs.items():
            paths, labels = [], []
            for class_dir in sorted(_visible_dirs(split_dir)):
                if class_dir.name not in index:
                    raise DataError(f"{class_dir}: class folder not present in the train split")
                for f in sorted(class_dir.iterdir()):
                    if (
                        _visible(f)
                        and f.is_file()
                        and f.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS
                    ):
                        paths.append(f)
                        labels.append(index[class_dir.name])
            if not paths:
                raise DataError(
                    f"{split_dir}: no images (extensions {', '.join(IMAGE_EXTENSIONS)})"
                )
            splits[split_name] = _file_split(paths, np.asarray(labels), root, where=str(split_dir))
        return LoadedSource(classes, splits)


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _visible_dirs(folder: Path) -> list[Path]:
    return [d for d in folder.iterdir() if _visible(d) and d.is_dir()]


SOURCES: dict[str, type] = {
    cls.name: cls
    for cls in (
        DigitsSource,
        Cifar100Source,
        NpzSource,
        ImageNetLTSource,
        PlacesLTSource,
        ImageFolderSource,
        ListSource,
    )
}


__all__ = [
    "SOURCES",
    "SPLITS",
    "LoadedSource",
    "Split",
    "encode_png",
    "make_key",
]
