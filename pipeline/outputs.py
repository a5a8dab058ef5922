"""What every stage writes, from the params: checked before the stage starts any work.

A stage may run for hours before it writes its outputs; an output it may not replace (a folder
the user owns, a symbolic link) or cannot write (a read-only file system, a file where a
folder belongs) stops it at the start instead, with one line and nothing touched. The same
checks run again at the final rename (`pipeline.io.replace`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import io
from pipeline.stages import STAGES

if TYPE_CHECKING:
    from pipeline.params import Params, PathsParams


def stage_outputs(
    stage: str, paths: PathsParams, modes: tuple[str, ...]
) -> list[tuple[str, Path, io.Kind]]:
    """The outputs `stage` replaces: the `paths` key each comes from, its path and its kind
    (`pipeline.io`); `modes` are `stage2.modes` (one checkpoint each)."""
    history = [
        ("paths.metrics", paths.metrics / f"{stage}.json", io.JSON),
        ("paths.plots", paths.plots / f"{stage}.csv", io.TEXT),
        ("paths.logs", paths.logs / f"{stage}_timings.csv", io.TEXT),
    ]
    if stage == "shard":
        return [("paths.shards", paths.shards, io.SHARDS)]
    if stage == "stage1":
        return [
            ("paths.stage1", paths.stage1, io.STAGE1_MODEL),
            ("paths.checkpoints", paths.checkpoints / "stage1.pt", io.CHECKPOINT),
            *history,
        ]
    if stage == "export":
        return [
            ("paths.embeddings", paths.embeddings, io.EMBEDDINGS),
            ("paths.image_store", paths.image_store, io.IMAGE_STORE),
        ]
    if stage == "stage2":
        checkpoints = [
            ("paths.checkpoints", paths.checkpoints / f"stage2-{m}.pt", io.CHECKPOINT)
            for m in modes
        ]
        return [("paths.stage2", paths.stage2, io.ADAPTERS), *checkpoints, *history]
    if stage == "evaluate":
        return [
            ("paths.metrics", paths.metrics / "eval.json", io.JSON),
            ("paths.reports", paths.reports / "results.md", io.TEXT),
            ("paths.reports", paths.reports / "per_class.png", io.PNG),
            ("paths.reports", paths.reports / "class_scores.png", io.PNG),
            ("paths.plots", paths.plots / "per_class.csv", io.TEXT),
            ("paths.plots", paths.plots / "predictions.csv", io.TEXT),
        ]
    if stage == "package":
        return [("paths.classifier", paths.classifier, io.CLASSIFIER)]
    raise ValueError(f"unknown stage {stage!r}")


def check_stage_outputs(stage: str, params: Params) -> None:
    """Refuse to start `stage` when one of its outputs could not be written or replaced.

    Raises:
        pipeline.io.OutputError: naming the output.
    """
    for _, path, kind in stage_outputs(stage, params.paths, params.stage2.modes):
        io.check_writable(path)
        io.check_replaceable(path, kind)


def check_overlaps(params: Params, where: str) -> None:
    """Refuse outputs that overlap each other or an input, whichever stage is about to run.

    A stage replaces each of its outputs whole (`pipeline.io.replace`), so an output equal to,
    inside or containing another output or an input would take that one with it: the
    classifier at `models` would take `models/stage1`, shards at an image-folder source's
    root would take the images. Inputs are `paths.raw` and every path of `shard.source` and
    `shard.test_source`. Paths are compared resolved (symbolic links followed).

    Raises:
        ParamsError: naming both keys and paths.
    """
    from pipeline.schema import ParamsError

    outputs = [
        (key, path)
        for stage in STAGES
        for key, path, _ in stage_outputs(stage, params.paths, params.stage2.modes)
    ]
    inputs = [("paths.raw", params.paths.raw)]
    for section in ("source", "test_source"):
        source = getattr(params.shard, section)
        for f in dataclasses.fields(source) if source is not None else ():
            value = getattr(source, f.name)
            if isinstance(value, Path):
                inputs.append((f"shard.{section}.{f.name}", value))
    resolved = {id(p): p.resolve() for _, p in outputs + inputs}
    for j, (key, path) in enumerate(outputs):
        for other_key, other in inputs + outputs[:j]:
            relation = _relation(resolved[id(path)], resolved[id(other)])
            if relation:
                raise ParamsError(
                    f"{where}.{key}: {path} {relation} {other_key} ({other}); a stage replaces "
                    "its outputs whole, so outputs and inputs must not overlap: choose "
                    "separate paths"
                )


def _relation(a: Path, b: Path) -> str | None:
    if a == b:
        return "is the same path as"
    if a.is_relative_to(b):
        return "lies inside"
    if b.is_relative_to(a):
        return "contains"
    return None
