"""`ecvl predict`: the packaged classifier on new images, top-k classes to CSV or JSON lines.

Not a DVC stage: it runs on whatever images the user names. Rows come out in input order
(folders sorted); an unreadable image is skipped and listed on stderr, with a count at the
end. The output is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch
from tqdm import tqdm

from ecvl.classifier import Classifier, load_classifier
from ecvl.errors import DataError
from ecvl.inference import ImageInput, collect_inputs, make_predict_loader, predict_topk
from ecvl.precision import resolve_precision
from pipeline.io import atomic_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Summary:
    """What a run did: rows written, images skipped."""

    written: int
    skipped: int


class _Rows:
    """Writes one row per image: where it came from, then the top-k classes and probabilities."""

    def __init__(self, f: TextIO, fmt: str, k: int) -> None:
        self.f, self.fmt, self.count = f, fmt, 0
        if fmt == "csv":
            self.csv = csv.writer(f)
            ranks = range(1, k + 1)
            self.csv.writerow(
                ["path", "key", *(c for r in ranks for c in (f"class_{r}", f"prob_{r}"))]
            )

    def write(self, item: ImageInput, classes: list[str], probs: list[float]) -> None:
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
    items, skipped = collect_inputs(inputs)
    if not items and not skipped:
        raise DataError(f"no images found in {', '.join(map(str, inputs))}")
    classifier = load_classifier(model, device)
    return write_predictions(
        classifier,
        items,
        out,
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
    out: Path,
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
    """The loaded `classifier` on `items`, rows to `out`; `skipped` lists inputs already
    found unreadable. Raises `DataError` when no image could be read."""
    skipped = list(skipped)
    k = min(top_k, len(classifier.classes))
    precision = resolve_precision(precision, device)
    loader = make_predict_loader(
        items, classifier.preprocess, batch_size, workers, pin_memory=device.type == "cuda"
    )
    bar = tqdm(total=len(items), desc="predict", unit="img", disable=not progress, file=sys.stderr)
    for reason in skipped:
        bar.write(f"skipped: {reason}", file=sys.stderr)
    with atomic_file(out) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
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
        "wrote %s: %d row(s), top %d of %d classes", out, rows.count, k, len(classifier.classes)
    )
    return Summary(rows.count, len(skipped))
