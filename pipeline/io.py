"""Atomic outputs: write under a temporary name next to the target, then rename.

An interrupted stage leaves the previous output (or nothing) and a `.tmp-*` sibling that the
next run removes; never a half-written file or directory that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ecvl.metrics import to_jsonable


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
    """Yield a fresh temp directory that replaces `path` only if the block succeeds."""
    path = Path(path)
    tmp = _tmp_sibling(path, "dir")
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    _usual_modes(tmp)
    replace(tmp, path)


def _usual_modes(root: Path) -> None:
    """Give every file and folder under `root` the usual modes (0644 / 0755 under umask 022):
    writers such as safetensors create private 0600 files, which other users of a shared
    DVC cache or checkout could not read."""
    mask = _umask()
    for path in root.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_file(path: Path | str) -> Iterator[Path]:
    """Yield a temp file path that replaces `path` only if the block succeeds."""
    path = Path(path)
    tmp = _tmp_sibling(path, "file")
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    _fsync(tmp)
    replace(tmp, path)


def replace(src: Path, dst: Path) -> None:
    """Move `src` onto `dst`; an existing directory at `dst` is swapped out, then removed.

    Across filesystems (`paths.*` on different mounts) `src` is first copied next to `dst`, so
    the final step is still a rename on `dst`'s filesystem."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if os.stat(src).st_dev != os.stat(dst.parent).st_dev:
        staged = _tmp_sibling(dst, "dir" if src.is_dir() else "file")
        _remove(staged)
        if src.is_dir():
            shutil.copytree(src, staged)
        else:
            shutil.copy2(src, staged)
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
        tmp.write_text(json.dumps(to_jsonable(data), indent=2) + "\n")


def write_text(path: Path | str, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def save_checkpoint(path: Path | str, payload: dict) -> None:
    """Atomically `torch.save` a checkpoint (a kill mid-write keeps the previous one)."""
    import torch

    with atomic_file(path) as tmp:
        torch.save(payload, tmp)


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

    with atomic_file(path) as tmp, tmp.open("w", newline="") as f:
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
