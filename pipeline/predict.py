"""`ecvl predict`: the packaged classifier on new images, top-k classes to CSV or JSON lines.

Not a DVC stage: it runs on whatever images the user names. Rows come out in input order
(folders sorted); an unreadable image is skipped and listed on stderr, with a count at the
end. The output is written under a temporary name and renamed when complete, and it replaces
only an earlier predictions file: `--out` naming a folder, an input or any other existing file
is refused before the model loads. `--out -` writes to standard output; a symbolic link is
written through (the file it points at is replaced, the link stays), and a terminal, pipe or
device (`/dev/stdout`, `/dev/null`) is written into as a stream.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import stat
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch
from tqdm import tqdm

from ecvl.classifier import Classifier, load_classifier
from ecvl.errors import DataError
from ecvl.inference import ImageInput, collect_inputs, make_predict_loader, predict_topk
from ecvl.precision import resolve_precision
from pipeline.io import Kind, OutputError, atomic_file, check_replaceable, check_writable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Summary:
    """What a run did: rows written, images skipped."""

    written: int
    skipped: int


_CSV_HEAD = "path,key,class_1,prob_1"
_JSONL_KEYS = {"path", "key", "classes", "probs"}


def _is_predictions(path: Path) -> bool:
    """Whether `path` starts as `ecvl predict` writes: the CSV header or a JSON-lines row."""
    with path.open("rb") as f:
        first = f.readline(1 << 20).decode("utf-8-sig", errors="replace").strip()
    if first.startswith(_CSV_HEAD):
        return True
    try:
        row = json.loads(first)
    except ValueError:
        return False
    return isinstance(row, dict) and set(row) == _JSONL_KEYS


PREDICTIONS = Kind("predictions file", False, "header or rows of `ecvl predict`", _is_predictions)


@dataclass(frozen=True)
class Output:
    """Where the rows go: `path` replaced atomically, or `stream` (a terminal, pipe or device,
    standard output for `-`) written into as rows come."""

    path: Path | None = None
    stream: str | None = None


def resolve_output(out: str, inputs: Sequence[str] = ()) -> Output:
    """Check `--out` before any work; see the module docstring for what it may name.

    Raises:
        OutputError: a folder, one of `inputs`, a file that is not an earlier predictions
            file, or a place that cannot be written; nothing is touched.
    """
    if out == "-":
        return Output(stream="-")
    path = Path(out)
    if path.is_dir():
        raise OutputError(
            f"--out {out} is a folder; name a file in it (e.g. {path / 'predictions.csv'}), "
            "or - for standard output"
        )
    if _is_stream(path):
        return Output(stream=out)  # /dev/stdout, /dev/null, a named pipe: written into
    if path.is_symlink():
        path = Path(os.path.realpath(path))  # written through: the link itself stays
    for item in inputs:
        with contextlib.suppress(OSError):
            if path.exists() and os.path.samefile(path, item):
                raise OutputError(f"--out {out} is one of the inputs; name another file")
    check_writable(path)
    check_replaceable(path, PREDICTIONS)
    return Output(path=path)


_SYSTEM = ("/dev/", "/proc/")


def _is_stream(path: Path) -> bool:
    """A terminal, pipe, socket or device, or a link into /dev or /proc (`/dev/stdout` ->
    `/proc/self/fd/1` -> whatever standard output is): rows are written into it, never
    renamed onto it."""
    hop = path.absolute()
    for _ in range(40):  # the kernel's own limit on a chain of links
        if str(hop).startswith(_SYSTEM):
            return True
        if not hop.is_symlink():
            break
        hop = (hop.parent / os.readlink(hop)).absolute()
    return path.exists() and not stat.S_ISREG(os.stat(path).st_mode)


@contextlib.contextmanager
def _open(output: Output) -> Iterator[TextIO]:
    if output.stream == "-":
        yield sys.stdout
    elif output.stream is not None:
        # appended, not truncated: `--out /dev/stdout >> log` must not empty the log
        with open(output.stream, "a", newline="", encoding="utf-8") as f:
            yield f
    else:
        with (
            atomic_file(output.path, PREDICTIONS) as tmp,
            tmp.open("w", newline="", encoding="utf-8") as f,
        ):
            yield f


class _Rows:
    """Writes one row per image: where it came from, then the top-k classes and probabilities.
    The CSV header goes out with the first row, so a run that reads no image writes nothing
    (also into a stream)."""

    def __init__(self, f: TextIO, fmt: str, k: int) -> None:
        self.f, self.fmt, self.k, self.count = f, fmt, k, 0
        if fmt == "csv":
            self.csv = csv.writer(f)

    def write(self, item: ImageInput, classes: list[str], probs: list[float]) -> None:
        if self.count == 0 and self.fmt == "csv":
            ranks = range(1, self.k + 1)
            self.csv.writerow(
                ["path", "key", *(c for r in ranks for c in (f"class_{r}", f"prob_{r}"))]
            )
        self.count += 1
        if self.fmt == "csv":
            cells = [c for pair in zip(classes, probs, strict=True) for c in pair]
            self.csv.writerow([item.path, item.key or "", *(_fmt(c) for c in cells)])
        else:
            row = {
                "path": item.path,
                "key": item.key,
                "classes": classes,
                "probs": [round(p, 6) for p in probs],
            }
            self.f.write(json.dumps(row) + "\n")


def _fmt(cell: str | float) -> str:
    return f"{cell:.6f}" if isinstance(cell, float) else cell


def run(
    model: Path,
    inputs: list[str],
    out: Path,
    *,
    device: torch.device,
    top_k: int = 5,
    batch_size: int = 32,
    fmt: str = "csv",
    workers: int = 2,
    precision: str = "auto",
    progress: bool = True,
) -> Summary:
    """Classify every image `inputs` name and write `out`.

    Raises:
        DataError: an input is missing or of no known kind, or no image could be read.
        ModelError: `model` is not a packaged classifier.
    """
    output = resolve_output(str(out), inputs)
    items, skipped = collect_inputs(inputs)
    if not items and not skipped:
        raise DataError(f"no images found in {', '.join(map(str, inputs))}")
    classifier = load_classifier(model, device)
    return write_predictions(
        classifier,
        items,
        output,
        device=device,
        skipped=skipped,
        top_k=top_k,
        batch_size=batch_size,
        fmt=fmt,
        workers=workers,
        precision=precision,
        progress=progress,
    )


def write_predictions(
    classifier: Classifier,
    items: list[ImageInput],
    out: Path | Output,
    *,
    device: torch.device,
    skipped: Sequence[str] = (),
    top_k: int = 5,
    batch_size: int = 32,
    fmt: str = "csv",
    workers: int = 2,
    precision: str = "auto",
    progress: bool = True,
) -> Summary:
    """The loaded `classifier` on `items`, rows to `out` (a path, checked here, or a resolved
    `Output`); `skipped` lists inputs already found unreadable. Raises `DataError` when no
    image could be read, `OutputError` when `out` may not be written."""
    output = out if isinstance(out, Output) else resolve_output(str(out))
    skipped = list(skipped)
    k = min(top_k, len(classifier.classes))
    precision = resolve_precision(precision, device)
    loader = make_predict_loader(
        items, classifier.preprocess, batch_size, workers, pin_memory=device.type == "cuda"
    )
    bar = tqdm(total=len(items), desc="predict", unit="img", disable=not progress, file=sys.stderr)
    for reason in skipped:
        bar.write(f"skipped: {reason}", file=sys.stderr)
    with _open(output) as f:
        rows = _Rows(f, fmt, k)
        for pred in predict_topk(classifier, loader, device, precision, k):
            for _, reason in pred.failed:
                bar.write(f"skipped: {reason}", file=sys.stderr)
            skipped += [reason for _, reason in pred.failed]
            for i, classes, probs in zip(
                pred.indices.tolist(), pred.classes.tolist(), pred.probs.tolist(), strict=True
            ):
                rows.write(items[i], [classifier.classes[c] for c in classes], probs)
            bar.update(len(pred.indices) + len(pred.failed))
        bar.close()
        if rows.count == 0:
            raise DataError(f"none of the {len(skipped)} input image(s) could be read")
    if skipped:
        total = rows.count + len(skipped)
        tqdm.write(f"{len(skipped)} of {total} image(s) unreadable, skipped", file=sys.stderr)
    log.info(
        "wrote %s: %d row(s), top %d of %d classes",
        output.path or ("standard output" if output.stream == "-" else output.stream),
        rows.count,
        k,
        len(classifier.classes),
    )
    return Summary(rows.count, len(skipped))
