"""Byte-reproducible webdataset shards and their manifest (`meta.json`).

A sample is `<key>.<npy|png|jpg|...>`, `<key>.cls` (the label as ASCII) and `<key>.json` (key,
label, class name). The image member follows `shard.encoding` (`ENCODINGS`): `raw` stores the
pixels as a uint8 `.npy` array (`ecvl.data.pixels`), `png` the original file bytes of file
sources and PNG for arrays, `auto` raw for array sources of at most `MAX_RAW_SIDE` px (CIFAR,
digits: decoding PNG cost more than the model) and png otherwise (JPEG files stay ~10x smaller
than their pixels). Tar headers carry
a fixed mtime, owner and mode, and samples are written in the order given, so the same input
gives the same bytes. Images that cannot be decoded are skipped, counted and listed.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from ecvl.data.pixels import ENCODINGS, MAX_RAW_SIDE, RAW_EXT, encode_npy, to_rgb
from ecvl.data.sources import PIL_FORMATS, Split
from ecvl.data.tar_reader import pax_path
from ecvl.data.textfiles import read_json
from ecvl.errors import DataError, EcvlError

log = logging.getLogger(__name__)

MANIFEST = "meta.json"
MANIFEST_FORMAT = "ecvl-shards/1"
SHARD_MTIME = 0  # 1970-01-01, an int: a float mtime makes tarfile add a PAX header per member


@dataclass
class SplitShards:
    """What was written for one split."""

    name: str
    count: int = 0
    per_class: list[int] = field(default_factory=list)
    shards: list[dict] = field(default_factory=list)
    bad: list[dict] = field(default_factory=list)
    fingerprint: str = ""
    encoding: str = "png"
    # SHA-256 of every written image member, in order: `ecvl shard` compares the splits
    # (the same bytes in train and test is leakage). Not part of the manifest.
    digests: list[bytes] = field(default_factory=list, repr=False)

    def to_json(self) -> dict:
        return {
            "encoding": self.encoding,
            "count": self.count,
            "per_class": self.per_class,
            "shards": self.shards,
            "bad": self.bad,
            "fingerprint": self.fingerprint,
        }


def open_image(data: bytes, ext: str) -> Image.Image:
    """Open encoded bytes with the one PIL decoder their extension names (by content, not by
    name: a `.png` holding TIFF, GIF or EPS bytes is refused, never handed to that plugin).

    Raises:
        ValueError: an extension outside the allow-list, or bytes that are not such an image;
            the message never carries PIL's `<_io.BytesIO ...>` repr.
    """
    fmt = PIL_FORMATS.get(ext.lower())
    if fmt is None:
        raise ValueError(f"unsupported image format {ext!r} (allowed: {', '.join(PIL_FORMATS)})")
    try:
        return Image.open(io.BytesIO(data), formats=[fmt])
    except Image.UnidentifiedImageError:
        raise ValueError(f"not a readable {fmt} image (starts with {bytes(data[:8])!r})") from None
    except Exception as e:  # PIL raises many types for broken headers
        raise ValueError(f"cannot decode {fmt} image: {e}") from None


def check_image(data: bytes, ext: str) -> None:
    """Raise ValueError unless `data` is a fully decodable image in an allowed format."""
    with open_image(data, ext) as im:
        try:
            im.load()
        except Exception as e:  # truncated or corrupt pixel data
            raise ValueError(f"cannot decode {im.format} image: {e}") from None


def resolve_encoding(encoding: str, split: Split) -> str:
    """`raw` or `png` for `encoding` (one of `ENCODINGS`) on this split."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; choose from {ENCODINGS}")
    if encoding != "auto":
        return encoding
    small = split.images is not None and max(split.images.shape[1:3]) <= MAX_RAW_SIDE
    return "raw" if small else "png"


def image_member(split: Split, i: int, encoding: str) -> tuple[bytes, str]:
    """Sample `i`'s image member (bytes, extension) in `encoding` (`raw` or `png`).

    Raises:
        ValueError: the image is unreadable, or in a format outside the allow-list.
        EcvlError: its file cannot be read.
    """
    if encoding == "raw" and split.images is not None:
        return encode_npy(split.images[i]), RAW_EXT
    data, ext = split.image_bytes(i)
    if encoding != "raw":
        check_image(data, ext)
        return data, ext
    with open_image(data, ext) as im:
        try:
            pixels = np.asarray(to_rgb(im))
        except Exception as e:  # truncated or corrupt pixel data
            raise ValueError(f"cannot decode {im.format} image: {e}") from None
    return encode_npy(pixels), RAW_EXT


def write_split_shards(
    split: Split,
    split_name: str,
    classes: tuple[str, ...],
    out_dir: Path,
    maxcount: int,
    max_bad_fraction: float,
    *,
    encoding: str,
    progress: bool = True,
) -> SplitShards:
    """Write `split` as `<out_dir>/<split_name>-NNNNNN.tar` shards of at most `maxcount` samples,
    images in `encoding` (one of `ENCODINGS`).

    Raises:
        DataError: more than `max_bad_fraction` of the split's images are unreadable.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    result = SplitShards(
        split_name, per_class=[0] * len(classes), encoding=resolve_encoding(encoding, split)
    )
    digest = hashlib.sha256()
    pattern = str(out_dir / f"{split_name}-%06d.tar")
    # Shards roll over on count only (no size limit), so shard i holds samples
    # [i*maxcount, (i+1)*maxcount) of those written.
    with wds.ShardWriter(
        pattern,
        maxcount=maxcount,
        maxsize=float("inf"),
        verbose=0,
        mtime=SHARD_MTIME,
        encoder=False,
    ) as sink:
        it = tqdm(range(len(split)), desc=f"shard {split_name}", unit="img", disable=not progress)
        for i in it:
            key, label = split.keys[i], int(split.labels[i])
            try:
                data, ext = image_member(split, i, result.encoding)
            except (ValueError, EcvlError) as e:
                result.bad.append({"key": key, "source": split.describe(i), "error": str(e)})
                continue
            meta = {"key": key, "label": label, "class": classes[label]}
            sink.write(
                {
                    "__key__": key,
                    ext: data,
                    "cls": str(label).encode("ascii"),
                    "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
                }
            )
            member_digest = hashlib.sha256(data).digest()
            digest.update(f"{key}\t{label}\t".encode() + member_digest)
            result.digests.append(member_digest)
            result.count += 1
            result.per_class[label] += 1
    sizes = [maxcount] * (result.count // maxcount) + [result.count % maxcount] * bool(
        result.count % maxcount
    )
    result.shards = [{"name": Path(pattern % i).name, "count": n} for i, n in enumerate(sizes)]
    result.fingerprint = digest.hexdigest()
    total = len(split)
    if result.bad:
        log.warning("%s: skipped %d unreadable image(s) of %d", split_name, len(result.bad), total)
        if len(result.bad) > max_bad_fraction * total:
            first = result.bad[0]
            raise DataError(
                f"{split_name}: {len(result.bad)} of {total} images are unreadable "
                f"(more than shard.max_bad_fraction={max_bad_fraction}); first: "
                f"{first['source']}: {first['error']}"
            )
    return result


@dataclass(frozen=True)
class Manifest:
    """The parsed `meta.json` of a shard directory."""

    root: Path
    data: dict

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.data["classes"])

    @property
    def num_classes(self) -> int:
        return len(self.data["classes"])

    @property
    def class_groups(self) -> list[str]:
        return list(self.data["class_groups"])

    @property
    def train_counts(self) -> list[int]:
        return list(self.data["splits"]["train"]["per_class"])

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.data["splits"])

    def count(self, split: str) -> int:
        return int(self._split(split)["count"])

    def shard_paths(self, split: str) -> list[str]:
        return [str(self.root / s["name"]) for s in self._split(split)["shards"]]

    def shard_counts(self, split: str) -> list[int]:
        return [int(s["count"]) for s in self._split(split)["shards"]]

    def eval_split(self) -> str:
        """The split to evaluate on during training: val when there is one, else test."""
        for name in ("val", "test"):
            if name in self.data["splits"]:
                return name
        raise DataError(f"{self.root}: no val or test split to evaluate on")

    def _split(self, split: str) -> dict:
        try:
            return self.data["splits"][split]
        except KeyError:
            raise DataError(
                f"{self.root / MANIFEST}: no split {split!r} "
                f"(have: {', '.join(self.data['splits'])})"
            ) from None


def write_manifest(out_dir: Path, data: dict) -> None:
    payload = {"format": MANIFEST_FORMAT, **data}
    (out_dir / MANIFEST).write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")


def load_manifest(shard_dir: Path | str) -> Manifest:
    """Read and check a shard directory's manifest, and every shard against its count.

    Raises:
        DataError: the directory, manifest or a listed shard is missing, a shard holds another
            number of samples than listed (truncated), or the format is not one this version
            reads.
    """
    root = Path(shard_dir)
    path = root / MANIFEST
    if not path.is_file():
        raise DataError(f"shard manifest not found: {path} (run `ecvl shard` first)")
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(
            f"{path}: a JSON {type(data).__name__}, not a shard manifest (an object); "
            "re-run `ecvl shard`"
        )
    if data.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{path}: format {data.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    check_manifest(data, path)
    manifest = Manifest(root, data)
    for split in manifest.splits:
        for shard, expected in zip(
            manifest.shard_paths(split), manifest.shard_counts(split), strict=True
        ):
            if not Path(shard).is_file():
                raise DataError(f"{path}: listed shard is missing: {shard}")
            found = count_samples(shard)
            if found != expected:
                raise DataError(
                    f"{shard}: {found} sample(s), but {MANIFEST} lists {expected} "
                    "(truncated or replaced; re-run `ecvl shard`)"
                )
    return manifest


def check_manifest(data: dict, path: Path) -> None:
    """The fields every stage reads, checked against each other before any use: a hand-edited
    or foreign `meta.json` stops here with the field named, not with an IndexError in epoch 1.

    Raises:
        DataError: a field is missing or of the wrong type, or the class list and the per-class
            counts, the shard counts and a split's count, or the groups disagree.
    """

    def fail(field_name: str, problem: str) -> None:
        raise DataError(f"{path}: {field_name}: {problem} (re-run `ecvl shard`)")

    def need(container: dict, key: str, kind: type, where: str) -> Any:
        if key not in container:
            fail(where, "missing")
        value = container[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            fail(where, f"must be {_TYPE_NAMES[kind]}, got {type(value).__name__}")
        return value

    need(data, "source_fingerprint", str, "source_fingerprint")
    classes = need(data, "classes", list, "classes")
    if not classes or not all(isinstance(c, str) and c.strip() for c in classes):
        fail("classes", "must be a non-empty list of class names")
    k = len(classes)
    splits = need(data, "splits", dict, "splits")
    if "train" not in splits:
        fail("splits", "no train split")
    for name, split in splits.items():
        where = f"splits.{name}"
        if not isinstance(split, dict):
            fail(where, f"must be an object, got {type(split).__name__}")
        count = need(split, "count", int, f"{where}.count")
        per_class = need(split, "per_class", list, f"{where}.per_class")
        if len(per_class) != k:
            fail(
                f"{where}.per_class",
                f"{len(per_class)} counts, but `classes` names only {k} classes, so the shards "
                "hold labels without a name"
                if len(per_class) > k
                else f"{len(per_class)} counts for {k} classes",
            )
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in per_class):
            fail(f"{where}.per_class", "must be non-negative integers")
        if sum(per_class) != count:
            fail(f"{where}.per_class", f"sums to {sum(per_class)}, but {where}.count is {count}")
        shards = need(split, "shards", list, f"{where}.shards")
        total = 0
        for i, shard in enumerate(shards):
            entry = f"{where}.shards[{i}]"
            if not isinstance(shard, dict):
                fail(entry, f"must be an object, got {type(shard).__name__}")
            shard_name = need(shard, "name", str, f"{entry}.name")
            if Path(shard_name).name != shard_name or shard_name in ("", ".", ".."):
                fail(f"{entry}.name", f"must be a file name in the folder, got {shard_name!r}")
            total += need(shard, "count", int, f"{entry}.count")
        if total != count:
            fail(f"{where}.shards", f"hold {total} samples, but {where}.count is {count}")
    groups = need(data, "class_groups", list, "class_groups")
    if len(groups) != k or not set(groups) <= {"many", "medium", "few"}:
        fail("class_groups", f"must give many, medium or few for each of the {k} classes")


_TYPE_NAMES = {list: "a list", dict: "an object", int: "an integer", str: "a string"}


def count_samples(shard: Path | str) -> int:
    """Complete samples (`.cls` members) in a tar, reading headers only (seeks over data).

    A tar cut short counts the samples before the cut, a file that is not a tar none.
    webdataset itself stops silently at a truncated tar, so a stage that trusted it would
    train on part of the data; every stage checks the counts before reading.

    Counts what `tarfile` iterates (tested against it on cut and corrupted shards): headers
    are read where `tarfile` reads them and their checksums verified, and the count stops
    where it would stop (a short or invalid header, an end-of-archive block, a member whose
    data runs past the end of the file). `tarfile` itself builds an object per member, about
    80 µs per three-member sample: 15 s at every stage start for ImageNet-LT's 186k samples.
    """
    n = 0
    try:
        with open(shard, "rb") as f:
            offset, long_name = 0, None
            while True:
                f.seek(offset)
                header = f.read(BLOCK)  # short past the end: the last member was cut
                if len(header) < BLOCK or header.count(0) == BLOCK:
                    break
                if not _checksum_ok(header):
                    break
                size = _octal(header[124:136])
                if size is None:
                    break
                kind = header[156:157]
                offset += BLOCK + size + (-size % BLOCK)
                if kind in (b"L", b"x"):  # GNU long name / PAX record of the next member
                    data = f.read(size)
                    if len(data) < size:
                        break
                    if kind == b"L":
                        long_name = data.rstrip(b"\0") or long_name
                        continue
                    try:
                        long_name = pax_path(data) or long_name
                    except ValueError:
                        pass  # a corrupt record names nothing: the member keeps its own name
                    continue
                name = long_name if long_name is not None else header[0:100].split(b"\0", 1)[0]
                long_name = None
                if kind in (b"0", b"\0", b"7") and name.endswith(b".cls"):
                    n += 1
    except OSError:
        pass
    return n


BLOCK = 512


def _checksum_ok(header: bytes) -> bool:
    """The header's checksum field matches its bytes (unsigned or signed sum, as `tarfile`)."""
    stored = _octal(header[148:156])
    if stored is None:
        return False
    unsigned = sum(header) - sum(header[148:156]) + 8 * 32
    if stored == unsigned:
        return True
    high = sum(1 for b in header[:148] + header[156:] if b >= 128)
    return stored == unsigned - 256 * high


def _octal(field: bytes) -> int | None:
    """A numeric header field (octal text, or GNU base-256); None when unreadable."""
    if field[:1] in (b"\x80", b"\xff"):
        value = int.from_bytes(field[1:], "big")
        return value - 256 ** (len(field) - 1) if field[0] == 0xFF else value
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        return None
