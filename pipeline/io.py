"""Atomic outputs that replace only what ECVL wrote: write under a temporary name next to the
target, check that the target is absent or ECVL's own earlier output, then rename.

An interrupted stage leaves the previous output (or nothing) and a `.tmp-*` sibling that the
next run removes; never a half-written file or directory that looks complete. An existing
target that ECVL did not write (a user's folder at `paths.classifier`, the input folder given
as `--out`, a symbolic link) is never swapped out or deleted: the write stops with one line
naming it (`OutputError`) and the temporary output is removed.

What counts as ECVL's own is read from the target itself, so outputs written by any earlier
version count: a folder holding the marker its stage writes (`meta.json` of shards,
`ecvl.json` of a stage-I model, `classifier.json`, the embedding store's `zarr.json`, adapter
folders), or a file of the kind being written (JSON, text, PNG, HDF5, a torch checkpoint). An
empty folder or file holds nothing to lose and may be replaced.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ecvl.errors import EcvlError
from ecvl.metrics import to_jsonable


class OutputError(EcvlError):
    """An output path holds something this command did not write, or cannot be written; the
    message names it, and nothing was replaced."""


@dataclass(frozen=True)
class Kind:
    """A kind of output: how to recognise one that ECVL wrote."""

    name: str  # for messages: "shard folder"
    folder: bool
    mark: str  # what identifies it, for messages: "meta.json of format ecvl-shards/1"
    owns: Callable[[Path], bool]


_SNIFF = 1 << 16  # bytes read to tell a file's kind
_JSON_MAX = 64 << 20  # larger "JSON" files are no output of ECVL's
_MAGIC = {
    b"\x89HDF\r\n\x1a\n": "hdf5",
    b"\x89PNG\r\n\x1a\n": "png",
    b"PK\x03\x04": "zip",
}


def _json_of(path: Path) -> Any:
    try:
        if path.stat().st_size > _JSON_MAX:
            return None
        return json.loads(path.read_bytes().decode("utf-8-sig"))
    except (OSError, ValueError):
        return None


def _has_format(path: Path, prefix: str) -> bool:
    data = _json_of(path)
    return isinstance(data, dict) and str(data.get("format", "")).startswith(prefix)


def _is_embedding_store(path: Path) -> bool:
    data = _json_of(path / "zarr.json")
    attrs = data.get("attributes") if isinstance(data, dict) else None
    return isinstance(attrs, dict) and attrs.get("format") == "ecvl-embeddings"


def _is_adapter_folder(path: Path) -> bool:
    entries = [e for e in path.iterdir() if not e.name.startswith(".")]
    return bool(entries) and all((e / "adapter.json").is_file() for e in entries)


def _signature(path: Path) -> str:
    """What a file is, from its first bytes: hdf5, png, zip (torch checkpoints), json, text,
    or binary."""
    with path.open("rb") as f:
        head = f.read(_SNIFF)
    for magic, name in _MAGIC.items():
        if head.startswith(magic):
            return name
    if b"\0" in head:
        return "binary"
    try:
        head.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:  # not just a character cut by the sniff window
            return "binary"
    return "json" if _json_of(path) is not None else "text"


def _file_kind(signature: str, name: str, mark: str) -> Kind:
    return Kind(name, False, mark, lambda p: _signature(p) == signature)


SHARDS = Kind(
    "shard folder",
    True,
    "meta.json of ECVL's shards",
    lambda p: _has_format(p / "meta.json", "ecvl-shards/"),
)
STAGE1_MODEL = Kind(
    "stage-I model",
    True,
    "ecvl.json and open_clip_config.json",
    lambda p: (p / "ecvl.json").is_file() and (p / "open_clip_config.json").is_file(),
)
ADAPTERS = Kind("stage-II adapters", True, "mode folders with adapter.json", _is_adapter_folder)
CLASSIFIER = Kind(
    "packaged classifier",
    True,
    "classifier.json of ECVL's format",
    lambda p: _has_format(p / "classifier.json", "ecvl-classifier/"),
)
EMBEDDINGS = Kind(
    "embedding store", True, "zarr.json of an ECVL embedding store", _is_embedding_store
)
FOLDER = Kind("folder", True, "content ECVL wrote", lambda p: False)  # only absent or empty
IMAGE_STORE = _file_kind("hdf5", "HDF5 file", "HDF5 signature")
CHECKPOINT = _file_kind("zip", "checkpoint", "torch checkpoint signature")
PNG = _file_kind("png", "PNG image", "PNG signature")
JSON = _file_kind("json", "JSON file", "valid JSON")
# CSV, Markdown, YAML: any text (a text output may replace one that happens to parse as JSON)
TEXT = Kind("text file", False, "UTF-8 text", lambda p: _signature(p) in ("text", "json"))
_FOLDER_KINDS = (SHARDS, CLASSIFIER, STAGE1_MODEL, EMBEDDINGS, ADAPTERS)
_FILE_KINDS = {"hdf5": IMAGE_STORE, "zip": CHECKPOINT, "png": PNG, "json": JSON, "text": TEXT}


def kind_of(path: Path) -> Kind:
    """The kind of a finished output (what is about to replace a target)."""
    if path.is_dir():
        return next((k for k in _FOLDER_KINDS if k.owns(path)), FOLDER)
    signature = _signature(path)
    return _FILE_KINDS.get(signature) or _file_kind(signature, f"{signature} file", "its kind")


def check_replaceable(path: Path, kind: Kind) -> None:
    """Refuse unless `path` is absent, empty, or ECVL's own earlier output of `kind`.

    Raises:
        OutputError: a symbolic link (neither replaced nor written through), a file where the
            output is a folder or the reverse, or something ECVL did not write.
    """
    if path.is_symlink():
        raise OutputError(
            f"{path} is a symbolic link (to {os.readlink(path)}); ECVL neither replaces a link "
            "nor writes through it: remove the link, or point the path at its target"
        )
    if not path.exists():
        return
    if kind.folder:
        if not path.is_dir():
            raise OutputError(
                f"{path} is a file, where ECVL writes its {kind.name} (a folder); "
                "move it away or write elsewhere"
            )
        if kind.owns(path) or not any(path.iterdir()):
            return
        raise OutputError(
            f"{path} is a folder ECVL did not write (no {kind.mark}); ECVL replaces only its "
            f"own {kind.name}: move it away or write elsewhere"
        )
    if path.is_dir():
        raise OutputError(
            f"{path} is a folder, where ECVL writes a {kind.name}; move it away or write elsewhere"
        )
    if not stat.S_ISREG(path.stat().st_mode):
        raise OutputError(f"{path} is not a regular file; write elsewhere")
    if path.stat().st_size == 0 or kind.owns(path):
        return
    raise OutputError(
        f"{path} is a file ECVL did not write (not a {kind.name}: no {kind.mark}); ECVL "
        "replaces only its own outputs: move it away or write elsewhere"
    )


def check_writable(path: Path) -> None:
    """Refuse, before any work, an output whose folder cannot be made or written: a file where
    a folder belongs, a read-only file system, a folder without write permission.

    Raises:
        OutputError: naming the folder and what to do.
    """
    folder = path.parent
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise OutputError(
            f"{folder} is a file where a folder belongs (to hold {path}); "
            "move it away or change the path"
        )
    if os.access(folder, os.W_OK | os.X_OK):
        return
    try:
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    why = "is on a read-only file system" if read_only else "is not writable (permission denied)"
    raise OutputError(f"cannot write {path}: {folder} {why}; write it elsewhere")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _tmp_sibling(path: Path, kind: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        _remove(stale)
    # mkdtemp/mkstemp create private (0700/0600) entries; give outputs the usual modes.
    if kind == "dir":
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        tmp.chmod(0o777 & ~_umask())
        return tmp
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    Path(name).chmod(0o666 & ~_umask())
    return Path(name)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_dir(path: Path | str) -> Iterator[Path]:
    """Yield a fresh temp directory that replaces `path` only if the block succeeds and `path`
    is absent or ECVL's own (see `replace`); otherwise the temp directory is removed."""
    path = Path(path)
    tmp = _tmp_sibling(path, "dir")
    try:
        yield tmp
        _usual_modes(tmp)
        replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _usual_modes(root: Path) -> None:
    """Give every file and folder under `root` the usual modes (0644 / 0755 under umask 022):
    writers such as safetensors create private 0600 files, which other users of a shared
    DVC cache or checkout could not read."""
    mask = _umask()
    for path in root.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_file(path: Path | str, kind: Kind | None = None) -> Iterator[Path]:
    """Yield a temp file path that replaces `path` only if the block succeeds and `path` is
    absent or ECVL's own (`kind`, default: the kind of what was written; see `replace`)."""
    path = Path(path)
    tmp = _tmp_sibling(path, "file")
    try:
        yield tmp
        _fsync(tmp)
        replace(tmp, path, kind)
    except BaseException:
        _remove(tmp)
        raise


def replace(src: Path, dst: Path, kind: Kind | None = None) -> None:
    """Move `src` onto `dst`, which must be absent, empty or ECVL's own output of `kind`
    (default: the kind of `src`); an existing directory at `dst` is swapped out, then removed.

    Across filesystems (`paths.*` on different mounts) `src` is first copied next to `dst`, so
    the final step is still a rename on `dst`'s filesystem.

    Raises:
        OutputError: `dst` is something ECVL did not write (`check_replaceable`); `src` is left
            where it is.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    check_replaceable(dst, kind or kind_of(src))
    if os.stat(src).st_dev != os.stat(dst.parent).st_dev:
        staged = _tmp_sibling(dst, "dir" if src.is_dir() else "file")
        _remove(staged)
        try:
            if src.is_dir():
                shutil.copytree(src, staged)
            else:
                shutil.copy2(src, staged)
        except BaseException:
            _remove(staged)
            raise
        _remove(src)
        src = staged
    if dst.is_dir() and not dst.is_symlink():
        old = dst.with_name(f".{dst.name}.tmp-old")
        _remove(old)
        os.replace(dst, old)
        os.replace(src, dst)
        _remove(old)
    else:
        os.replace(src, dst)


def write_json(path: Path | str, data: Any) -> None:
    """Atomically write `data` as indented JSON (NaN/inf become null)."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(to_jsonable(data), indent=2) + "\n", encoding="utf-8")


def write_text(path: Path | str, text: str) -> None:
    """Atomically write `text` as UTF-8 (class names may be in any script)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def save_checkpoint(path: Path | str, payload: dict) -> None:
    """Atomically `torch.save` a checkpoint (a kill mid-write keeps the previous one).

    Saved through a Python file object: torch's own file writer reports a full disk as an
    "unexpected pos" RuntimeError, Python's as the OSError it is (one line in the CLI)."""
    import torch

    with atomic_file(path) as tmp, tmp.open("wb") as f:
        torch.save(payload, f)


def load_checkpoint(path: Path | str, fingerprint: str) -> dict | None:
    """The checkpoint at `path` if it was written by a run with the same `fingerprint`.

    Loaded with `weights_only=True`: a checkpoint can hold tensors and plain containers,
    never code. A missing, unreadable or foreign checkpoint means "start over" (logged).
    """
    import logging

    import torch

    log = logging.getLogger(__name__)
    path = Path(path)
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, foreign pickle, ...
        log.warning("ignoring unreadable checkpoint %s (%s); starting over", path, e)
        return None
    if not isinstance(payload, dict) or payload.get("fingerprint") != fingerprint:
        log.info("checkpoint %s is from other params or data; starting over", path)
        return None
    return payload


def fingerprint(*parts: Any) -> str:
    """A stable digest of JSON-able parts (params sections, upstream fingerprints)."""
    import hashlib

    blob = json.dumps(to_jsonable(list(parts)), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def is_timing(key: str) -> bool:
    """Wall-clock columns (`seconds`, `encode_seconds`, `images_per_s`, ...): they differ on
    every run, so they never go into a file DVC hashes into dvc.lock."""
    return key.endswith("seconds") or key.endswith("_per_s")


def write_history(
    plot_path: Path | str, log_path: Path | str, rows: list[dict], index: tuple[str, ...]
) -> None:
    """Per-epoch rows split in two: everything but timings to `plot_path` (a DVC plot, the same
    bytes on every identical run), the `index` columns plus timings to `log_path` (not DVC's)."""
    write_csv(plot_path, [{k: v for k, v in r.items() if not is_timing(k)} for r in rows])
    write_csv(log_path, [{k: v for k, v in r.items() if k in index or is_timing(k)} for r in rows])


def write_csv(path: Path | str, rows: list[dict]) -> None:
    """Atomically write rows (dicts with the same keys) as CSV, for `dvc plots`."""
    import csv

    with atomic_file(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: to_jsonable(v) for k, v in row.items()})


def code_digest() -> str:
    """Digest of the installed `ecvl` and `pipeline` sources (and shipped model configs).

    Part of every resume fingerprint: after a code change DVC re-runs the stage, and the
    stage must then not resume from (or reuse) state that older code produced.
    """
    import hashlib

    import ecvl
    import pipeline

    h = hashlib.sha256()
    for package in (ecvl, pipeline):
        root = Path(package.__file__).parent
        for path in sorted(root.rglob("*")):
            if path.suffix in (".py", ".json") and path.is_file():
                h.update(str(path.relative_to(root.parent)).encode() + b"\0")
                h.update(path.read_bytes())
    return h.hexdigest()
