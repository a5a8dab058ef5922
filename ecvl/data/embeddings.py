"""The embedding cache stage II reads: one zarr v3 store written by the export stage.

Layout (readable with plain ``zarr.open_group(path, mode="r")``, no ECVL code needed)::

    /                       attrs: format, format_version, model_name, embed_dim,
                            checkpoint_digest, templates, classes, num_classes,
                            splits ({name: rows}), plus any extra attrs of the caller
    /<split>/features       float16 N×d  projected image embedding, NOT normalised
    /<split>/labels         int64 N
    /<split>/keys           string N     zarr v3 variable-length UTF-8 ("string", vlen-utf8)
    /<split>               attrs: num_rows, rows_written (num_rows once complete), complete
    /text/features          float32 K×d  class text embeddings u_c, L2-normalised
    /text                   attrs: complete

With a view bank (root attr ``bank_views`` E > 0; DESIGN.md §1, "Base views and the view bank")
the train group also holds, for every sample, E base views (random resized crop + flip) of it
encoded by the same frozen encoder, and what made each one::

    /train/bank             float16 N×E×d  the banked views' embeddings (not normalised)
    /train/bank_boxes       int32   N×E×4  crop box (x0, y0, x1, y1) in the stored image's pixels
    /train/bank_flips       bool    N×E    mirrored after the crop
    /train/bank             attrs: views, seed, checkpoint_digest, rows_written, complete

`bank` is stored uncompressed in zarr v3 shards of `bank_shard_rows(E, d)` samples whose inner
chunks are one sample's E views, so a batch of random draws reads only its own samples' bytes
and a bank too large for memory is never loaded whole (`ViewBank`). Such a bank is read straight
from its shard files (`_BankFiles`: one `pread` per run of consecutive samples, the offsets
checked against each shard's index once), because zarr's per-chunk machinery costs
milliseconds per sample, which made reading the bank, not training, the cost of an epoch.

All per-sample arrays are chunked along N (4096 rows by default) so that a block of rows is a
few chunk files. Keys use zarr's variable-length ``string`` data type because it is the one
string type with a registered zarr v3 specification; the fixed-width numpy types ("U", "S")
are stored by zarr-python as ``fixed_length_utf32`` / ``null_terminated_bytes``, which zarr
warns may change and other zarr libraries may not read.

Resume is per split: a writer reopened with ``resume=True`` keeps the splits already written
and a split written again replaces its rows (zarr's local store replaces each chunk file
atomically), so the final arrays equal an uninterrupted run. Which splits are done is the
caller's record (the export's completion mark). There is one writer process.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ecvl.data.textfiles import read_json
from ecvl.errors import DataError

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CHUNK_ROWS",
    "FORMAT",
    "FORMAT_VERSION",
    "BANK_MEMORY_BYTES",
    "BANK_SPLIT",
    "EmbeddingWriter",
    "Embeddings",
    "SplitData",
    "ViewBank",
    "bank_shard_rows",
    "open_embeddings",
]

FORMAT = "ecvl-embeddings"
FORMAT_VERSION = 1
DEFAULT_CHUNK_ROWS = 4096
TEXT = "text"
REQUIRED_ATTRS = ("model_name", "checkpoint_digest", "templates", "classes")
# Keys the writer sets itself; a caller's attrs may repeat them only with the same value.
_OWN_ATTRS = (
    "format",
    "format_version",
    "embed_dim",
    "num_classes",
    "splits",
    "bank_views",
    "initialized",
)
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
# zarr's LocalStore writes `<file>.<uuid4 hex>.partial` then renames; a kill leaves them behind.
_PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial$")
_NORM_TOL = 1e-3
BANK_SPLIT = "train"
# Target bytes of one bank shard file (a few MB: few files, cheap rewrites of one block).
_BANK_SHARD_BYTES = 8 << 20
# Banks up to this size are read into memory by `Embeddings.bank`; larger ones stay on disk.
BANK_MEMORY_BYTES = 1 << 30


def bank_shard_rows(views: int, dim: int) -> int:
    """Samples per bank shard (the export writes and resumes the bank one shard at a time)."""
    return max(1, _BANK_SHARD_BYTES // (2 * max(1, views) * max(1, dim)))


def _jsonable(value: Any) -> Any:
    """`value` as it reads back from zarr attributes (tuples become lists, ...)."""
    return json.loads(json.dumps(value))


def _to_numpy(x: Any) -> np.ndarray:
    """numpy view of an array-like or a torch tensor, without importing torch."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


class EmbeddingWriter:
    """Create (or resume) an embedding store and fill it block by block.

    Args:
        path: store directory. Atomic publication (temp name + rename) is the caller's job.
        splits: rows per split, e.g. ``{"train": 10847, "val": 2000, "test": 10000}``.
        embed_dim: d, the width of the projected image and text embeddings.
        attrs: root attributes; must hold ``model_name``, ``checkpoint_digest``,
            ``templates`` (list of str) and ``classes`` (list of K names). JSON values only.
        resume: reopen an existing store written with the same splits, d and attrs, keeping
            what it holds; if False an existing store is replaced.
        chunk_rows: rows per chunk of the per-sample arrays.

    Raises:
        DataError: `path` exists but is not an embedding store, or it is one written for other
            splits / embed_dim / attrs (delete it or pass ``resume=False``).
        ValueError: missing required attrs, bad split names or sizes.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        splits: Mapping[str, int],
        embed_dim: int,
        attrs: Mapping[str, Any],
        *,
        resume: bool = True,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        bank_views: int = 0,
        bank_seed: int = 0,
    ) -> None:
        self.path = Path(path)
        self._splits = {str(k): int(v) for k, v in splits.items()}
        self.embed_dim = int(embed_dim)
        self.bank_views = int(bank_views)
        self._bank_seed = int(bank_seed)
        self._check_args(attrs, chunk_rows)
        if self.bank_views < 0:
            raise ValueError(f"bank_views must be >= 0, got {self.bank_views}")
        if self.bank_views and BANK_SPLIT not in self._splits:
            raise ValueError(f"a view bank needs a {BANK_SPLIT!r} split")
        self.num_classes = len(attrs["classes"])
        self._chunk_rows = int(chunk_rows)
        self._attrs = self._root_attrs(attrs)
        # Consecutive blocks of a split wait here until they fill whole chunks (see `write`).
        self._pending: dict[str, list[tuple[int, np.ndarray, np.ndarray, list[str]]]] = {}

        if resume and self._is_store(self.path) and self._try_resume():
            return
        self._create()

    # -- construction -------------------------------------------------------------------------

    def _check_args(self, attrs: Mapping[str, Any], chunk_rows: int) -> None:
        if self.embed_dim < 1:
            raise ValueError(f"embed_dim must be >= 1, got {self.embed_dim}")
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        if not self._splits:
            raise ValueError("splits is empty: give the number of rows of at least one split")
        for name, n in self._splits.items():
            if name == TEXT or not _SPLIT_NAME.match(name):
                raise ValueError(f"invalid split name {name!r}")
            if n < 0:
                raise ValueError(f"split {name!r} has a negative row count {n}")
        missing = [k for k in REQUIRED_ATTRS if k not in attrs]
        if missing:
            raise ValueError(f"attrs lacks {missing}; required: {list(REQUIRED_ATTRS)}")
        if not attrs["classes"]:
            raise ValueError("attrs['classes'] is empty")

    def _root_attrs(self, attrs: Mapping[str, Any]) -> dict[str, Any]:
        own = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "embed_dim": self.embed_dim,
            "num_classes": self.num_classes,
            "splits": dict(self._splits),
            "bank_views": self.bank_views,
        }
        for key in _OWN_ATTRS:
            if key in attrs and key in own and _jsonable(attrs[key]) != _jsonable(own[key]):
                raise ValueError(f"attrs[{key!r}] = {attrs[key]!r} contradicts {own[key]!r}")
        try:
            merged = _jsonable({**attrs, **own})
        except TypeError as err:
            raise ValueError(f"attrs must hold JSON values only: {err}") from err
        merged.pop("initialized", None)
        return merged

    @staticmethod
    def _is_store(path: Path) -> bool:
        return (path / "zarr.json").is_file()

    def _try_resume(self) -> bool:
        """Reopen an existing store; False if it never finished being created."""
        try:
            root = zarr.open_group(self.path, mode="r+", zarr_format=3)
        except Exception as err:  # any unreadable store: refuse rather than wipe it
            raise DataError(f"{self.path} exists but is not a zarr v3 group: {err}") from err
        stored = dict(root.attrs)
        if not stored and not list(root.keys()):
            log.warning("%s: empty store (creation was interrupted); starting it over", self.path)
            return False
        if stored.get("format") != FORMAT:
            raise DataError(
                f"{self.path} exists and is not an ECVL embedding store "
                f"(format={stored.get('format')!r}); delete it or write elsewhere"
            )
        if not stored.get("initialized"):
            log.warning("%s: creation was interrupted; starting it over", self.path)
            return False
        stored.pop("initialized", None)
        if stored != self._attrs:
            diff = sorted(
                k for k in stored.keys() | self._attrs.keys() if stored.get(k) != self._attrs.get(k)
            )
            raise DataError(
                f"{self.path} was written with different {diff}; "
                "delete it or pass resume=False to start over"
            )
        self._root = root
        removed = _remove_partials(self.path)
        if removed:
            log.info(
                "%s: removed %d leftover partial file(s) of a killed write", self.path, removed
            )
        log.info("reopened embedding store %s", self.path)
        return True

    def _create(self) -> None:
        if self.path.exists() and not self._is_store(self.path):
            if self.path.is_file() or any(self.path.iterdir()):
                raise DataError(
                    f"{self.path} exists and is not a zarr store; refusing to overwrite it"
                )
        root = zarr.open_group(self.path, mode="w", zarr_format=3)
        root.attrs.update({**self._attrs, "initialized": False})
        d = self.embed_dim
        for name, n in self._splits.items():
            grp = root.create_group(name)
            rows = max(1, min(self._chunk_rows, n))
            grp.create_array("features", shape=(n, d), chunks=(rows, d), dtype="float16")
            grp.create_array("labels", shape=(n,), chunks=(rows,), dtype="int64", fill_value=-1)
            grp.create_array("keys", shape=(n,), chunks=(rows,), dtype=str)
            grp.attrs.update({"num_rows": n, "rows_written": 0, "complete": False})
        if self.bank_views:
            self._create_bank(root[BANK_SPLIT])
        text = root.create_group(TEXT)
        text.create_array("features", shape=(self.num_classes, d), dtype="float32")
        text.attrs["complete"] = False
        # Last: a store without this flag was killed while being created and is redone.
        root.attrs["initialized"] = True
        self._root = root
        log.info("created embedding store %s: splits %s, d=%d", self.path, self._splits, d)

    def _create_bank(self, grp: zarr.Group) -> None:
        n, e, d = self._splits[BANK_SPLIT], self.bank_views, self.embed_dim
        rows = max(1, min(bank_shard_rows(e, d), n))
        bank = grp.create_array(
            "bank",
            shape=(n, e, d),
            chunks=(1, e, d),
            shards=(rows, e, d),
            dtype="float16",
            compressors=None,  # embeddings do not compress; raw bytes read fastest
        )
        bank.attrs.update(
            {
                "views": e,
                "seed": self._bank_seed,
                # the encoder that made the views: a bank copied from another export shows
                "checkpoint_digest": self._attrs["checkpoint_digest"],
                "rows_written": 0,
                "complete": False,
            }
        )
        grp.create_array("bank_boxes", shape=(n, e, 4), chunks=(rows, e, 4), dtype="int32")
        grp.create_array("bank_flips", shape=(n, e), chunks=(rows, e), dtype="bool")

    # -- writing ------------------------------------------------------------------------------

    def _split(self, split: str) -> zarr.Group:
        if split not in self._splits:
            raise ValueError(f"unknown split {split!r}; the store has {list(self._splits)}")
        return self._root[split]

    @property
    def splits(self) -> dict[str, int]:
        """Rows per split."""
        return dict(self._splits)

    def is_complete(self, split: str) -> bool:
        """True once `mark_complete(split)` was called (also in an earlier run)."""
        return bool(self._split(split).attrs["complete"])

    def write(
        self,
        split: str,
        start: int,
        features: Any,
        labels: Any,
        keys: Sequence[str],
    ) -> None:
        """Write rows ``start .. start + len(features)`` of `split`.

        Blocks that continue the previous one are held in memory until they fill whole chunks
        (at most a chunk and a block per split), so each chunk is compressed and written once
        instead of read back, decompressed and rewritten for every block that touches it (blocks
        of one shard, ~1,000 rows, against chunks of 4,096). `mark_complete` writes what is
        left; rows not yet written when the process dies are rewritten by the split's
        re-export, which a store without the split's completion mark gets anyway.

        Args:
            split: split name.
            start: first row of the block.
            features: n×d array or tensor of projected image embeddings; stored as float16.
            labels: n class indices in [0, K).
            keys: n non-empty sample keys.

        Raises:
            DataError: non-finite features (also after the float16 cast), a label outside
                [0, K) or an empty key; the message names the split and row.
            ValueError: a block outside the split or wrong shapes.
        """
        grp = self._split(split)
        n_rows = self._splits[split]
        feats = _to_numpy(features)
        n = len(feats)
        if start < 0 or start + n > n_rows:
            raise ValueError(f"block [{start}, {start + n}) is outside {split!r}'s {n_rows} rows")
        if feats.ndim != 2 or feats.shape[1] != self.embed_dim:
            raise ValueError(f"features must be n×{self.embed_dim}, got shape {feats.shape}")
        lab = _to_numpy(labels)
        if lab.shape != (n,) or (n and not np.issubdtype(lab.dtype, np.integer)):
            raise ValueError(f"labels must be {n} integers, got shape {lab.shape} {lab.dtype}")
        key_list = [str(k) for k in keys]
        if len(key_list) != n:
            raise ValueError(f"got {len(key_list)} keys for {n} rows")

        with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below
            f16 = feats.astype(np.float16)
        finite = np.isfinite(f16).all(axis=1)
        if not finite.all():
            row = start + int(np.flatnonzero(~finite)[0])
            raise DataError(
                f"{self.path}/{split}: features of row {row} (key {key_list[row - start]!r}) are "
                "not finite in float16 (NaN, inf or |x| > 65504)"
            )
        lab = lab.astype(np.int64)
        bad = (lab < 0) | (lab >= self.num_classes)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"{self.path}/{split}: label {int(lab[i])} of row {start + i} "
                f"(key {key_list[i]!r}) is not in [0, {self.num_classes})"
            )
        if not all(key_list):
            i = key_list.index("")
            raise DataError(f"{self.path}/{split}: row {start + i} has an empty key")
        if n == 0:
            return

        waiting = self._pending.get(split)
        if waiting and start != waiting[-1][0] + len(waiting[-1][1]):
            self._flush(split)  # not the next block: write what waits as it is
        pending = self._pending.setdefault(split, [])
        pending.append((start, f16, lab, key_list))
        chunk = int(grp["features"].chunks[0])
        first, end = pending[0][0], start + n
        whole = end if end == n_rows else end // chunk * chunk  # the last full chunk's end
        if whole > first and (whole - first >= chunk or whole == n_rows):
            self._flush(split, until=whole)

    def _flush(self, split: str, until: int | None = None) -> None:
        """Write the waiting blocks of `split` (rows before `until`; all if None)."""
        pending = self._pending.get(split)
        if not pending:
            return
        first = pending[0][0]
        f16 = np.concatenate([b[1] for b in pending])
        lab = np.concatenate([b[2] for b in pending])
        keys = [k for b in pending for k in b[3]]
        end = first + len(f16) if until is None else until
        cut = end - first
        grp = self._root[split]
        grp["features"][first:end] = f16[:cut]
        grp["labels"][first:end] = lab[:cut]
        grp["keys"][first:end] = np.array(keys[:cut], dtype=object)
        self._pending[split] = [(end, f16[cut:], lab[cut:], keys[cut:])] if cut < len(f16) else []

    def mark_complete(self, split: str) -> None:
        """Mark `split` finished (the caller wrote all its rows); the reader refuses a store with
        an unfinished split."""
        self._flush(split)
        n = self._splits[split]
        self._split(split).attrs.update({"rows_written": n, "complete": True})
        log.info("%s: split %r complete (%d rows)", self.path, split, n)

    @property
    def bank_shard_rows(self) -> int:
        """Samples per bank shard: write the bank in blocks of this many rows."""
        return int(self._root[BANK_SPLIT]["bank"].shards[0])

    @property
    def bank_rows_written(self) -> int:
        """Bank rows written so far (also by an earlier, interrupted run): resume here."""
        return int(self._root[BANK_SPLIT]["bank"].attrs["rows_written"])

    def write_bank(self, start: int, features: Any, boxes: Any, flips: Any) -> None:
        """Write bank rows ``start .. start + n`` (n×E×d features, n×E×4 boxes, n×E flips) and
        record them as written; blocks should be whole shards (`bank_shard_rows`).

        Raises:
            DataError: non-finite features in float16 (names the row).
            ValueError: no bank, a block outside the split or out of order, wrong shapes.
        """
        if not self.bank_views:
            raise ValueError("this store has no view bank (bank_views=0)")
        grp = self._root[BANK_SPLIT]
        n_rows, e, d = self._splits[BANK_SPLIT], self.bank_views, self.embed_dim
        feats = _to_numpy(features)
        n = len(feats)
        if feats.shape != (n, e, d):
            raise ValueError(f"bank features must be n×{e}×{d}, got shape {feats.shape}")
        box = _to_numpy(boxes).astype(np.int32)
        flip = _to_numpy(flips).astype(bool)
        if box.shape != (n, e, 4) or flip.shape != (n, e):
            raise ValueError(f"bank boxes/flips must be {n}×{e}×4 / {n}×{e}")
        if start != self.bank_rows_written or start + n > n_rows:
            raise ValueError(
                f"bank block [{start}, {start + n}) does not continue the "
                f"{self.bank_rows_written} rows written (of {n_rows})"
            )
        with np.errstate(over="ignore", invalid="ignore"):
            f16 = feats.astype(np.float16)
        finite = np.isfinite(f16).all(axis=(1, 2))
        if not finite.all():
            row = start + int(np.flatnonzero(~finite)[0])
            raise DataError(f"{self.path}/{BANK_SPLIT}/bank: row {row} is not finite in float16")
        end = start + n
        grp["bank"][start:end] = f16
        grp["bank_boxes"][start:end] = box
        grp["bank_flips"][start:end] = flip
        grp["bank"].attrs["rows_written"] = end  # after the rows: a kill redoes this block

    def mark_bank_complete(self) -> None:
        """Mark the bank finished (every row written)."""
        bank = self._root[BANK_SPLIT]["bank"]
        n = self._splits[BANK_SPLIT]
        if int(bank.attrs["rows_written"]) != n:
            raise ValueError(f"the bank has {bank.attrs['rows_written']} of {n} rows")
        bank.attrs["complete"] = True

    def write_text_features(self, features: Any) -> None:
        """Write the K class text embeddings u_c (already L2-normalised) and mark them complete.

        Raises:
            ValueError: the shape is not K×d, or a row is not finite or not of unit norm.
        """
        text = _to_numpy(features).astype(np.float32)
        expected = (self.num_classes, self.embed_dim)
        if text.shape != expected:
            raise ValueError(f"text features must have shape {expected}, got {text.shape}")
        norms = np.linalg.norm(text, axis=1)
        if not np.all(np.abs(norms - 1.0) <= _NORM_TOL):
            i = int(np.flatnonzero(~(np.abs(norms - 1.0) <= _NORM_TOL))[0])
            raise ValueError(f"text features must be L2-normalised; row {i} has norm {norms[i]}")
        self._root[TEXT]["features"][...] = text
        self._root[TEXT].attrs["complete"] = True


def _remove_partials(root: Path) -> int:
    removed = 0
    for p in root.rglob("*.partial"):
        if p.is_file() and _PARTIAL.search(p.name):
            p.unlink(missing_ok=True)
            removed += 1
    return removed


# -- reading ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitData:
    """One split's rows; numpy arrays, or zarr arrays (sliceable the same way) when lazy.

    Attributes:
        features: float16 N×d projected image embeddings (not normalised).
        labels: int64 N.
        keys: N sample keys (object array of str when loaded).
    """

    features: Any
    labels: Any
    keys: Any

    def __len__(self) -> int:
        return int(self.labels.shape[0])


class Embeddings:
    """A validated, complete embedding store (see `open_embeddings`)."""

    def __init__(self, path: Path, root: zarr.Group) -> None:
        self.path = path
        self._root = root
        self.attrs: dict[str, Any] = dict(root.attrs)

    @property
    def model_name(self) -> str:
        return str(self.attrs["model_name"])

    @property
    def checkpoint_digest(self) -> str:
        return str(self.attrs["checkpoint_digest"])

    @property
    def embed_dim(self) -> int:
        return int(self.attrs["embed_dim"])

    @property
    def precision(self) -> str | None:
        """The resolved encoder precision of the export (None for stores that predate it)."""
        value = self.attrs.get("precision")
        return None if value is None else str(value)

    @property
    def num_classes(self) -> int:
        return int(self.attrs["num_classes"])

    @property
    def classes(self) -> list[str]:
        return list(self.attrs["classes"])

    @property
    def templates(self) -> list[str]:
        return list(self.attrs["templates"])

    @property
    def splits(self) -> tuple[str, ...]:
        """Split names in the order they were written."""
        return tuple(self.attrs["splits"])

    def __contains__(self, split: object) -> bool:
        return split in self.attrs["splits"]

    def split(self, name: str, *, lazy: bool = False) -> SplitData:
        """Features, labels and keys of split `name`.

        Args:
            name: split name.
            lazy: return the zarr arrays instead of loading them into memory.

        Raises:
            DataError: the store has no such split.
        """
        if name not in self:
            raise DataError(f"{self.path} has no split {name!r}; it has {list(self.splits)}")
        grp = self._root[name]
        if lazy:
            return SplitData(grp["features"], grp["labels"], grp["keys"])
        return SplitData(
            grp["features"][...],
            grp["labels"][...],
            np.asarray(grp["keys"][...], dtype=object),
        )

    def text_features(self) -> np.ndarray:
        """float32 K×d L2-normalised class text embeddings."""
        return self._root[TEXT]["features"][...]

    @property
    def bank_views(self) -> int:
        """E, the base views banked per train sample (0: no bank)."""
        return int(self.attrs.get("bank_views", 0))

    def bank(self, max_memory: int | None = BANK_MEMORY_BYTES) -> ViewBank:
        """The train split's view bank: loaded when its features take at most `max_memory`
        bytes (None: always; random reads from memory cost nothing), else read lazily per
        batch of samples and never copied whole (ImageNet-LT's is 1.9 GB at d = 1024, E = 8).

        Raises:
            DataError: the store has no bank (exported with ``bank_views: 0``).
        """
        if not self.bank_views:
            raise DataError(f"{self.path} has no view bank (it was exported with 0 bank views)")
        grp = self._root[BANK_SPLIT]
        features = grp["bank"]
        files = None
        if max_memory is None or features.nbytes <= max_memory:
            features = features[...]
        else:
            files = _BankFiles.open(self.path / BANK_SPLIT / "bank", features)
        return ViewBank(
            features,
            grp["bank_boxes"][...],
            grp["bank_flips"][...],
            seed=int(grp["bank"].attrs["seed"]),
            checkpoint_digest=str(grp["bank"].attrs.get("checkpoint_digest", "")),
            path=f"{self.path}/{BANK_SPLIT}/bank",
            files=files,
        )


class ViewBank:
    """E base views of each of N train samples: their embeddings and the crop/flip of each.

    Args:
        features: N×E×d float16, a numpy array or a zarr array (read per batch of samples,
            never whole: one read of the distinct samples a batch needs).
        boxes: N×E×4 int crop boxes ``(x0, y0, x1, y1)`` in the stored image's pixels.
        flips: N×E bool, mirrored after the crop.
        seed: the seed the bank was drawn with (a record).
        checkpoint_digest: the digest of the model that encoded the views (a record).
        path: where it lives, for messages.
        files: direct reads of a zarr `features` array's shard files (`_BankFiles`), used
            instead of zarr's reads when given.

    Raises:
        DataError: the three arrays disagree in N or E.
    """

    def __init__(
        self,
        features: Any,
        boxes: Any,
        flips: Any,
        *,
        seed: int = 0,
        checkpoint_digest: str = "",
        path: str = "bank",
        files: _BankFiles | None = None,
    ) -> None:
        self.features = features if isinstance(features, zarr.Array) else np.asarray(features)
        self._files = files
        self.boxes = np.asarray(boxes, dtype=np.int64)
        self.flips = np.asarray(flips, dtype=bool)
        self.seed = int(seed)
        self.checkpoint_digest = checkpoint_digest
        self.path = path
        n, e = self.features.shape[:2]
        if (
            len(self.features.shape) != 3
            or self.boxes.shape != (n, e, 4)
            or self.flips.shape != (n, e)
        ):
            raise DataError(
                f"{path}: features {tuple(self.features.shape)}, boxes {self.boxes.shape} and "
                f"flips {self.flips.shape} do not describe the same N×E views"
            )

    @property
    def num_samples(self) -> int:
        return int(self.features.shape[0])

    @property
    def num_views(self) -> int:
        return int(self.features.shape[1])

    @property
    def dim(self) -> int:
        return int(self.features.shape[2])

    def rows(self, indices: Any, entries: Any) -> np.ndarray:
        """float16 (B, d): view ``entries[j]`` of sample ``indices[j]`` for every j."""
        idx = np.asarray(indices, dtype=np.int64)
        ent = np.asarray(entries, dtype=np.int64)
        if isinstance(self.features, np.ndarray):
            return self.features[idx, ent]
        if idx.size == 0:
            return np.zeros((0, self.dim), dtype=np.float16)
        uniq, inverse = np.unique(idx, return_inverse=True)
        if self._files is not None:
            block = self._files.read(uniq)
        else:
            block = self.features.get_orthogonal_selection((uniq, slice(None), slice(None)))
        return block[inverse, ent]

    def base_view(self, index: int, entry: int) -> tuple[tuple[int, int, int, int], bool]:
        """The crop box and flip that made view `entry` of sample `index`."""
        box = tuple(int(v) for v in self.boxes[index, entry])
        return box, bool(self.flips[index, entry])  # type: ignore[return-value]


class _BankFiles:
    """Reads of an uncompressed, sharded bank straight from its shard files.

    The export writes each bank shard in one piece, so a shard file holds its samples' E×d
    float16 views back to back, then zarr's shard index. `open` checks that layout against
    the array's metadata and every shard's index once (else it returns None and zarr reads
    the bank); `read` then costs one `pread` per run of consecutive samples.
    """

    def __init__(self, directory: Path, shard_rows: int, row_shape: tuple[int, int], n: int):
        self.directory = directory
        self.shard_rows = shard_rows
        self.row_shape = row_shape
        self.row_bytes = 2 * row_shape[0] * row_shape[1]
        self.num_samples = n
        self._fds: dict[int, int] = {}

    @classmethod
    def open(cls, directory: Path, array: zarr.Array) -> _BankFiles | None:
        meta = read_json(directory / "zarr.json")
        n, e, d = (int(v) for v in array.shape)
        try:
            (codec,) = meta["codecs"]
            conf = codec["configuration"]
            plain = (
                codec["name"] == "sharding_indexed"
                and conf["chunk_shape"] == [1, e, d]
                and conf["codecs"] == [{"name": "bytes", "configuration": {"endian": "little"}}]
                and conf.get("index_location", "end") == "end"
                and meta["data_type"] == "float16"
                and meta["chunk_key_encoding"]["configuration"]["separator"] == "/"
            )
            rows = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
        except (KeyError, TypeError, ValueError):
            plain = False
        if not plain:
            return None
        files = cls(directory, rows, (e, d), n)
        for shard in range(-(-n // rows)):
            count = min(rows, n - shard * rows)
            path = files._path(shard)
            size = path.stat().st_size if path.is_file() else -1
            # index: (offset, nbytes) uint64 pairs for every inner chunk of a full shard
            index_bytes = 16 * rows + 4
            if size != count * files.row_bytes + index_bytes:
                return None
            with path.open("rb") as f:
                f.seek(-index_bytes, os.SEEK_END)
                index = np.frombuffer(f.read(16 * rows), dtype="<u8").reshape(rows, 2)
            expect = np.arange(count, dtype=np.uint64) * np.uint64(files.row_bytes)
            if not (
                np.array_equal(index[:count, 0], expect)
                and np.all(index[:count, 1] == files.row_bytes)
            ):
                return None
        return files

    def _path(self, shard: int) -> Path:
        return self.directory / "c" / str(shard) / "0" / "0"

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self._path(shard), os.O_RDONLY)
        return fd

    def read(self, samples: np.ndarray) -> np.ndarray:
        """(len(samples), E, d) float16 views of sorted, distinct `samples`."""
        out = np.empty((samples.size, *self.row_shape), dtype=np.float16)
        flat = out.reshape(samples.size, -1).view(np.uint8)
        # runs of consecutive samples within one shard: one read each
        shard = samples // self.shard_rows
        breaks = np.flatnonzero((np.diff(samples) != 1) | (np.diff(shard) != 0)) + 1
        for a, b in zip(np.r_[0, breaks], np.r_[breaks, samples.size], strict=True):
            first = int(samples[a])
            offset = (first - int(shard[a]) * self.shard_rows) * self.row_bytes
            size = (b - a) * self.row_bytes
            data = os.pread(self._fd(int(shard[a])), size, offset)
            if len(data) != size:
                raise DataError(f"{self._path(int(shard[a]))}: truncated at sample {first}")
            flat[a:b] = np.frombuffer(data, dtype=np.uint8).reshape(b - a, -1)
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        self.close()


def _array(grp: zarr.Group, name: str, where: str) -> zarr.Array:
    node = grp.get(name)
    if not isinstance(node, zarr.Array):
        raise DataError(f"{where}: array {name!r} is missing")
    return node


def _check_array(arr: zarr.Array, where: str, shape: tuple[int, ...], dtype: str) -> None:
    if tuple(arr.shape) != shape:
        raise DataError(f"{where}: shape {tuple(arr.shape)}, expected {shape}")
    ok = arr.dtype.kind in "TOU" if dtype == "string" else arr.dtype == np.dtype(dtype)
    if not ok:
        raise DataError(f"{where}: dtype {arr.dtype}, expected {dtype}")


def open_embeddings(path: str | os.PathLike[str], *, splits: Sequence[str] = ()) -> Embeddings:
    """Open and validate a finished embedding store.

    Every split listed in the store and the text features must be complete and have the
    shapes the attributes announce, so a consumer never sees a half-written export.

    Args:
        path: store directory.
        splits: splits the caller needs; each must be present.

    Returns:
        The validated store.

    Raises:
        DataError: the store is missing or unreadable, lacks attributes, a split or an array,
            holds an incomplete split or text features, or an array has the wrong shape/dtype.
            The message names the path and what is wrong.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"embedding store not found: {p}")
    try:
        root = zarr.open_group(p, mode="r", zarr_format=3)
    except Exception as err:
        raise DataError(f"{p} is not a zarr v3 group: {err}") from err
    attrs = dict(root.attrs)
    if attrs.get("format") != FORMAT:
        raise DataError(f"{p} is not an ECVL embedding store (format={attrs.get('format')!r})")
    if attrs.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{p} has format_version {attrs.get('format_version')!r}; "
            f"this ECVL reads version {FORMAT_VERSION}"
        )
    missing = [k for k in (*REQUIRED_ATTRS, "embed_dim", "num_classes", "splits") if k not in attrs]
    if missing:
        raise DataError(f"{p}: root attributes {missing} are missing")
    if not attrs.get("initialized"):
        raise DataError(f"{p}: the store was never fully created (export interrupted)")
    d, k = int(attrs["embed_dim"]), int(attrs["num_classes"])
    if len(attrs["classes"]) != k:
        raise DataError(f"{p}: {len(attrs['classes'])} class names but num_classes = {k}")

    for name, n in attrs["splits"].items():
        grp = root.get(name)
        if not isinstance(grp, zarr.Group):
            raise DataError(f"{p}: split group {name!r} is missing")
        where = f"{p}/{name}"
        if not grp.attrs.get("complete"):
            raise DataError(f"{where} is incomplete; the export was interrupted: re-run it")
        for array, shape, dtype in (
            ("features", (n, d), "float16"),
            ("labels", (n,), "int64"),
            ("keys", (n,), "string"),
        ):
            _check_array(_array(grp, array, where), f"{where}/{array}", shape, dtype)
    views = int(attrs.get("bank_views", 0))
    if views:
        n, where = int(attrs["splits"].get(BANK_SPLIT, -1)), f"{p}/{BANK_SPLIT}"
        grp = root.get(BANK_SPLIT)
        if n < 0 or not isinstance(grp, zarr.Group):
            raise DataError(f"{p}: bank_views = {views} but there is no {BANK_SPLIT!r} split")
        for array, shape, dtype in (
            ("bank", (n, views, d), "float16"),
            ("bank_boxes", (n, views, 4), "int32"),
            ("bank_flips", (n, views), "bool"),
        ):
            _check_array(_array(grp, array, where), f"{where}/{array}", shape, dtype)
        if not grp["bank"].attrs.get("complete"):
            raise DataError(f"{where}/bank is incomplete; the export was interrupted: re-run it")
    text = root.get(TEXT)
    if not isinstance(text, zarr.Group):
        raise DataError(f"{p}: group {TEXT!r} is missing")
    if not text.attrs.get("complete"):
        raise DataError(f"{p}/{TEXT}: class text features were never written (export interrupted)")
    _check_array(_array(text, "features", f"{p}/{TEXT}"), f"{p}/{TEXT}/features", (k, d), "float32")

    store = Embeddings(p, root)
    for name in splits:
        if name not in store:
            raise DataError(f"{p} has no split {name!r}; it has {list(store.splits)}")
    return store
