"""Random-access store of the encoded train images, for stage II's re-encoding of augmented views.

One HDF5 file, index i = row i of ``/train`` in the embedding store (same order). Layout
(readable with plain h5py)::

    images   vlen uint8 (N,)          the image member's bytes as they were in the shards
                                      (PNG/JPEG/..., or raw `.npy` pixels, `ecvl.data.pixels`)
    labels   int64 (N,)
    keys     UTF-8 variable-length string (N,)
    ext      ASCII fixed-length string (N,): "png", "jpg", "webp", "bmp" or "npy", sniffed from
             the bytes
    attrs    format, format_version, count, rows_written (count once complete), complete,
             ext ("png", ... when every sample shares it, else "mixed"),
             content_sha256 (over bytes, labels, keys and exts in order; see `content_digest`)

Images stay as the shards hold them: re-encoding only augmented views reads few of them, and
storing the pixels of JPEGs would multiply the size by ~10 (small images are raw pixels in the
shards already). Decoding goes through PIL restricted to the format recorded for the sample,
from an allow-list, or through `ecvl.data.pixels` for `.npy`; nothing is ever unpickled.

There is no resume inside the file (HDF5 has no journal, and rewritten rows would leave old
bytes behind): an interrupted export writes the store again from the start.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from PIL import Image, UnidentifiedImageError

from ecvl.data.pixels import RAW_EXT, decode_rgb, to_rgb
from ecvl.errors import DataError

log = logging.getLogger(__name__)

__all__ = [
    "ALLOWED_FORMATS",
    "FORMAT",
    "FORMAT_VERSION",
    "ImageStore",
    "ImageStoreWriter",
    "content_digest",
    "sniff_format",
]

FORMAT = "ecvl-image-store"
FORMAT_VERSION = 1
DEFAULT_CHUNK_ROWS = 1024
# Canonical extension -> the only PIL decoder allowed for it.
ALLOWED_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP", "bmp": "BMP", RAW_EXT: "NPY"}
_EXT_DTYPE = h5py.string_dtype("ascii", 4)
_KEY_DTYPE = h5py.string_dtype("utf-8")
_IMG_DTYPE = h5py.vlen_dtype(np.uint8)
_DATASETS = ("images", "labels", "keys", "ext")


def sniff_format(data: bytes | bytearray | memoryview) -> str | None:
    """Canonical extension of encoded image bytes from their magic number, None if not allowed."""
    head = bytes(data[:12])
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith(b"BM"):
        return "bmp"
    if head.startswith(b"\x93NUMPY"):
        return RAW_EXT
    return None


def _as_bytes(x: Any) -> bytes:
    if isinstance(x, np.ndarray):
        return x.astype(np.uint8, copy=False).tobytes()
    return bytes(x)


def content_digest(f: h5py.File, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> str:
    """SHA-256 over every sample's (bytes, label, key, ext), length-prefixed, in order.

    Identifies the content independently of HDF5's file layout, which differs between an
    uninterrupted and a resumed write.
    """
    h = hashlib.sha256()
    n = int(f["labels"].shape[0])
    for a in range(0, n, chunk_rows):
        b = min(n, a + chunk_rows)
        images = [img.tobytes() for img in f["images"][a:b]]
        _digest_update(h, images, f["labels"][a:b], f["keys"].asstr()[a:b], f["ext"].asstr()[a:b])
    return h.hexdigest()


def _digest_update(
    h: Any, images: Sequence[bytes], labels: np.ndarray, keys: Sequence[str], exts: Sequence[str]
) -> None:
    """Feed `content_digest`'s bytes for a block of rows to `h`: per row the image's length (8
    bytes, little-endian) and bytes, the label (int64 little-endian), the key's UTF-8 length and
    bytes, the ext padded to 4 bytes. The image bytes go in as they are, never copied."""
    for raw, label, key, ext in zip(images, labels.astype("<i8"), keys, exts, strict=True):
        k = key.encode("utf-8")
        h.update(len(raw).to_bytes(8, "little"))
        h.update(raw)
        h.update(
            label.tobytes() + len(k).to_bytes(8, "little") + k + ext.encode("ascii").ljust(4, b"\0")
        )


class ImageStoreWriter:
    """Create an image store of `n` samples (replacing any file at `path`) and fill it block by
    block.

    Args:
        path: HDF5 file to write. Atomic publication (temp name + rename) is the caller's job.
        n: number of samples (the train split's rows in the embedding store).
        chunk_rows: rows per HDF5 chunk.
    """

    def __init__(
        self, path: str | os.PathLike[str], n: int, *, chunk_rows: int = DEFAULT_CHUNK_ROWS
    ) -> None:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        self.path = Path(path)
        self.n = int(n)
        self._chunk_rows = int(chunk_rows)
        self._f: h5py.File | None = None
        # `content_digest` of the rows written so far, while they arrive in order from row 0
        # (None after any other write): export writes in order, so the digest costs no read-back
        self._digest: Any = hashlib.sha256()
        self._digested = 0
        self._create()

    def _create(self) -> None:
        f = h5py.File(self.path, "w")
        rows = (max(1, min(self._chunk_rows, self.n)),)
        f.attrs.update(
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "count": self.n,
                "rows_written": 0,
                "complete": False,
                "ext": "",
                "content_sha256": "",
                "initialized": False,
            }
        )
        n = (self.n,)
        f.create_dataset("images", shape=n, dtype=_IMG_DTYPE, chunks=rows)
        f.create_dataset("labels", shape=n, dtype="int64", chunks=rows, fillvalue=-1)
        f.create_dataset("keys", shape=n, dtype=_KEY_DTYPE, chunks=rows)
        f.create_dataset("ext", shape=n, dtype=_EXT_DTYPE, chunks=rows)
        f.attrs["initialized"] = True
        f.flush()
        self._f = f
        log.info("created image store %s for %d samples", self.path, self.n)

    @property
    def _file(self) -> h5py.File:
        if self._f is None:
            raise ValueError(f"image store writer for {self.path} is closed")
        return self._f

    def write(
        self,
        start: int,
        encoded: Sequence[bytes | bytearray | memoryview | np.ndarray],
        labels: Any,
        keys: Sequence[str],
    ) -> None:
        """Write samples ``start .. start + len(encoded)``.

        Args:
            start: first row of the block.
            encoded: the encoded image bytes of each sample, as stored in the shards.
            labels: class index of each sample.
            keys: non-empty key of each sample.

        Raises:
            DataError: empty bytes, a format outside the allow-list (png, jpg, webp, bmp, npy), a
                negative label or an empty key; the message names the row and key.
            ValueError: a block outside the store or mismatched lengths.
        """
        f = self._file
        m = len(encoded)
        if start < 0 or start + m > self.n:
            raise ValueError(f"block [{start}, {start + m}) is outside the store's {self.n} rows")
        lab = np.asarray(labels)
        if lab.shape != (m,) or (m and not np.issubdtype(lab.dtype, np.integer)):
            raise ValueError(f"labels must be {m} integers, got shape {lab.shape} {lab.dtype}")
        key_list = [str(k) for k in keys]
        if len(key_list) != m:
            raise ValueError(f"got {len(key_list)} keys for {m} images")
        if m == 0:
            return

        images = np.empty(m, dtype=_IMG_DTYPE)
        exts, raws = [], []
        for j, (item, key) in enumerate(zip(encoded, key_list, strict=True)):
            raw = _as_bytes(item)
            raws.append(raw)
            ext = sniff_format(raw)
            if ext is None:
                raise DataError(
                    f"{self.path}: sample {start + j} (key {key!r}) is not an allowed image "
                    f"format {sorted(ALLOWED_FORMATS)} (starts with {raw[:8]!r})"
                )
            if not key:
                raise DataError(f"{self.path}: sample {start + j} has an empty key")
            images[j] = np.frombuffer(raw, dtype=np.uint8)
            exts.append(ext)
        if (lab < 0).any():
            j = int(np.flatnonzero(lab < 0)[0])
            raise DataError(
                f"{self.path}: sample {start + j} (key {key_list[j]!r}) has label {lab[j]}"
            )

        end = start + m
        # Not `f["images"][start:end] = images`: h5py turns a block of equal-length images
        # into a 2-D array and fails to broadcast it; write_direct takes the vlen array as is.
        f["images"].write_direct(images, dest_sel=np.s_[start:end])
        f["labels"][start:end] = lab.astype(np.int64)
        f["keys"][start:end] = key_list
        f["ext"][start:end] = exts
        if self._digest is not None and start == self._digested:
            _digest_update(self._digest, raws, lab, key_list, exts)
            self._digested = end
        else:
            self._digest = None

    def mark_complete(self) -> str:
        """Compute the content digest, record it and mark the store complete (the caller wrote
        every row). Returns the ``content_sha256`` attribute."""
        f = self._file
        f.attrs["rows_written"] = self.n
        exts = set(f["ext"].asstr()[...].tolist())
        if self._digest is not None and self._digested == self.n:
            digest = self._digest.hexdigest()
        else:
            digest = content_digest(f, self._chunk_rows)
        f.attrs["ext"] = exts.pop() if len(exts) == 1 else ("mixed" if exts else "")
        f.attrs["content_sha256"] = digest
        f.flush()  # the flushes place HDF5's metadata: other calls give other (equal) bytes
        f.attrs["complete"] = True
        f.flush()
        log.info("%s: image store complete (%d samples, sha256 %s)", self.path, self.n, digest)
        return digest

    def close(self) -> None:
        """Close the file."""
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> ImageStoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ImageStore:
    """Read-only random access to a complete image store, safe in DataLoader workers.

    The HDF5 file is opened lazily, once per process: an h5py handle must not cross a fork,
    so a forked worker that finds its parent's handle closes that copy and opens its own.
    Pickling (spawned workers) drops the handle. Labels, keys and formats are read into
    memory when the store is opened; image bytes are read on demand.

    Args:
        path: the HDF5 file written by `ImageStoreWriter`.

    Raises:
        DataError: the file is missing, not HDF5, not an image store, incomplete, or its
            datasets disagree in length with ``count``.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"image store not found: {self.path}")
        try:
            f = h5py.File(self.path, "r")
        except OSError as err:
            raise DataError(f"{self.path} is not a readable HDF5 file: {err}") from err
        with f:
            self._validate(f)
            self._labels = f["labels"][...].astype(np.int64, copy=False)
            self._keys = np.asarray(f["keys"].asstr()[...], dtype=object)
            self._exts = np.asarray(f["ext"].asstr()[...], dtype=object)
            self.content_sha256 = str(f.attrs["content_sha256"])
        self._h5: h5py.File | None = None
        self._pid: int | None = None

    def _validate(self, f: h5py.File) -> None:
        attrs = f.attrs
        if attrs.get("format") != FORMAT:
            raise DataError(
                f"{self.path} is not an ECVL image store (format={attrs.get('format')!r})"
            )
        if attrs.get("format_version") != FORMAT_VERSION:
            raise DataError(
                f"{self.path} has format_version {attrs.get('format_version')!r}; "
                f"this ECVL reads version {FORMAT_VERSION}"
            )
        n = int(attrs["count"])
        if not attrs.get("complete"):
            raise DataError(f"{self.path} is incomplete; the export was interrupted: re-run it")
        for name in _DATASETS:
            if name not in f:
                raise DataError(f"{self.path}: dataset {name!r} is missing")
            if f[name].shape != (n,):
                raise DataError(f"{self.path}/{name}: shape {f[name].shape}, expected ({n},)")

    def __len__(self) -> int:
        return int(self._labels.shape[0])

    @property
    def labels(self) -> np.ndarray:
        """int64 class index per sample."""
        return self._labels

    @property
    def keys(self) -> np.ndarray:
        """Key per sample (object array of str), equal to the embedding store's train keys."""
        return self._keys

    @property
    def exts(self) -> np.ndarray:
        """Canonical extension per sample (object array of str)."""
        return self._exts

    def _images(self) -> h5py.Dataset:
        pid = os.getpid()
        if self._h5 is None or self._pid != pid:
            if self._h5 is not None:
                # Inherited through fork: close this process's copy of the parent's handle
                # (read-only, so nothing is flushed) and open an independent one.
                try:
                    self._h5.close()
                except Exception:  # a stale handle must not stop the worker
                    log.debug("closing an inherited handle of %s failed", self.path, exc_info=True)
            self._h5 = h5py.File(self.path, "r")
            self._pid = pid
        return self._h5["images"]

    def _index(self, i: int) -> int:
        n = len(self)
        idx = int(i)
        if not 0 <= idx < n:
            raise IndexError(f"index {i} out of range for image store of {n} samples")
        return idx

    def get_bytes(self, i: int) -> bytes:
        """Encoded bytes of sample `i`, as they were in the shards."""
        return self._images()[self._index(i)].tobytes()

    def get_many_bytes(self, indices: Sequence[int]) -> list[bytes]:
        """Encoded bytes of several samples from one sorted HDF5 read.

        One fancy-indexed read of the sorted unique rows costs a few microseconds per row; a
        read per row costs hundreds, which dominates re-encoding small images.
        """
        idx = [self._index(i) for i in indices]
        rows = np.unique(np.asarray(idx, dtype=np.int64))
        if rows.size == 0:
            return []
        data = self._images()[rows]
        lookup = {int(r): d for r, d in zip(rows.tolist(), data, strict=True)}
        return [lookup[i].tobytes() for i in idx]

    def get_image(self, i: int) -> Image.Image:
        """Sample `i` decoded to an RGB PIL image.

        Raises:
            DataError: the bytes do not decode as the format recorded for the sample.
        """
        idx = self._index(i)
        return self.decode(idx, self.get_bytes(idx))

    def decode(self, i: int, data: bytes) -> Image.Image:
        """Decode sample `i`'s bytes (from `get_bytes` / `get_many_bytes`) to RGB.

        Raises:
            DataError: the bytes do not decode as the format recorded for the sample.
        """
        idx = self._index(i)
        ext = self._exts[idx]
        if ext not in ALLOWED_FORMATS or sniff_format(data) != ext:
            raise DataError(
                f"{self.path}: sample {idx} (key {self._keys[idx]!r}) is recorded as {ext!r} "
                f"but its bytes are {sniff_format(data)!r}"
            )
        try:
            if ext == RAW_EXT:
                return Image.fromarray(decode_rgb(data))
            with Image.open(io.BytesIO(data), formats=[ALLOWED_FORMATS[ext]]) as img:
                return to_rgb(img)
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise DataError(
                f"{self.path}: sample {idx} (key {self._keys[idx]!r}) does not decode: {err}"
            ) from err

    @property
    def raw_pixel_bytes(self) -> int | None:
        """Bytes of `raw_pixels()`: every member raw `.npy` pixels of one shape, RGB; else None
        (without reading the images: from the first member's header)."""
        if len(self) == 0 or not (self._exts == RAW_EXT).all():
            return None
        h, w, _ = self.decode_pixels(0, self.get_bytes(0)).shape
        return len(self) * h * w * 3

    def raw_pixels(self) -> np.ndarray | None:
        """Every image as one uint8 N×H×W×3 array, when every member is raw `.npy` pixels of
        one shape (what `ecvl shard` stores for small array sources); else None. Stage II
        then gathers a batch's pixels with one index instead of reading and decoding each.

        Raises:
            DataError: a member does not decode.
        """
        if self.raw_pixel_bytes is None:
            return None
        n = len(self)
        first = self.decode_pixels(0, self.get_bytes(0))
        out = np.empty((n, *first.shape), dtype=np.uint8)
        for a in range(0, n, 8192):  # a block of members in memory at a time
            rows = range(a, min(n, a + 8192))
            for i, data in zip(rows, self.get_many_bytes(rows), strict=True):
                pixels = self.decode_pixels(i, data)
                if pixels.shape != first.shape:
                    return None
                out[i] = pixels
        return out

    def decode_pixels(self, i: int, data: bytes) -> np.ndarray:
        """`decode`, as H×W×3 uint8 pixels; raw `.npy` members are viewed in place, no PIL.

        Raises:
            DataError: as `decode`.
        """
        idx = self._index(i)
        if self._exts[idx] == RAW_EXT and sniff_format(data) == RAW_EXT:
            try:
                return decode_rgb(data)
            except ValueError as err:
                raise DataError(
                    f"{self.path}: sample {idx} (key {self._keys[idx]!r}) does not decode: {err}"
                ) from err
        return np.asarray(self.decode(idx, data))

    def close(self) -> None:
        """Close this process's handle (reopened on the next read)."""
        if self._h5 is not None and self._pid == os.getpid():
            self._h5.close()
        self._h5 = None
        self._pid = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_h5"] = None
        state["_pid"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
