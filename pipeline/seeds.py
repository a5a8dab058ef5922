"""`ecvl seeds`: the whole pipeline once per seed, then the table of mean ± std over seeds.

On small long-tailed data the seed moves Few accuracy by points, so a comparison between
rows needs the spread, not one run. Each seed runs every stage in its own directory
(`<out>/seed-<s>/`, every `paths` entry re-rooted under it) from its own copy of the params
with only `base.seed` changed. A seed whose `metrics/eval.json` exists for identical params
is not run again, so the command resumes after a kill (stage I and stage II also resume
from their checkpoints), and seeds can run as parallel processes (`--seeds 1`, `--seeds 2`)
and be summarised by a last call over all of them.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ecvl.metrics import SUMMARY_KEYS
from pipeline.evaluate import ROW_NAMES
from pipeline.io import write_json, write_text
from pipeline.params import Params, PathsParams, load_params
from pipeline.stages import TABLE_STAGES as STAGES

log = logging.getLogger(__name__)

COLUMN_NAMES = {
    "many_acc": "Many",
    "medium_acc": "Medium",
    "few_acc": "Few",
    "all_acc": "All",
    "macro_f1": "Macro F1",
}


def seed_params(raw: dict[str, Any], seed: int, root: Path) -> dict[str, Any]:
    """The params of one seed's run: `base.seed` set and every artifact under `root`, laid out
    as the default `paths` are (whatever the file's own paths say, so that no two seeds share
    one); `paths.raw`, the input data, stays where it is."""
    out = copy.deepcopy(raw)
    out.setdefault("base", {})["seed"] = seed
    inputs = raw.get("paths", {}).get("raw")  # the source data is shared, never re-rooted
    out["paths"] = {k: str(root / v) for k, v in vars(PathsParams()).items() if k != "raw"}
    if inputs is not None:
        out["paths"]["raw"] = inputs
    return out


def run(
    params_path: Path,
    seeds: Sequence[int],
    out: Path,
    run_stage: Callable[[str, Params], None],
) -> dict[str, Any]:
    """Run every stage for each seed (skipping finished seeds), then write the summary.

    `run_stage(stage, params)` runs one stage; the CLI passes its error-handling wrapper.

    Returns:
        The summary written to `<out>/summary.json`.

    Raises:
        ParamsError: the params file is invalid (checked once for every seed before any work).
    """
    load_params(params_path)  # the file itself is valid before any seed starts
    raw = yaml.safe_load(Path(params_path).read_text()) or {}
    runs = []
    for seed in seeds:
        root = out / f"seed-{seed}"
        text = yaml.safe_dump(seed_params(raw, seed, root), sort_keys=False)
        runs.append((seed, root, text))
    for seed, root, text in runs:
        params_file = root / "params.yaml"
        eval_json = root / "metrics" / "eval.json"
        if params_file.is_file() and params_file.read_text() == text and eval_json.is_file():
            log.info("seed %d: already done in %s", seed, root)
            continue
        write_text(params_file, text)
        params = load_params(params_file)
        timings = {}
        for stage in STAGES:
            log.info("seed %d: %s", seed, stage)
            start = time.perf_counter()
            run_stage(stage, params)
            timings[stage] = round(time.perf_counter() - start, 1)
        write_json(root / "timings.json", timings)
    summary = summarize(out, [seed for seed, _, _ in runs])
    log.info("wrote %s and %s", out / "summary.json", out / "summary.md")
    return summary


def summarize(out: Path, seeds: Sequence[int]) -> dict[str, Any]:
    """Mean and sample std (ddof 1) over seeds of every split × row × column; stage timings."""
    evals = {s: json.loads((out / f"seed-{s}/metrics/eval.json").read_text()) for s in seeds}
    timings = {}
    for s in seeds:
        path = out / f"seed-{s}/timings.json"
        if path.is_file():
            timings[s] = json.loads(path.read_text())
    first = evals[seeds[0]]
    table: dict[str, Any] = {}
    for split, rows in first.items():
        table[split] = {}
        for row in rows:
            if row == "stage2":  # an alias of the last mode's row
                continue
            table[split][row] = {}
            for col in SUMMARY_KEYS:
                values = [evals[s][split][row][col] for s in seeds]
                values = [math.nan if v is None else float(v) for v in values]
                table[split][row][col] = {
                    "mean": float(np.mean(values)),
                    "std": float(np.std(values, ddof=1)) if len(values) > 1 else math.nan,
                    "values": values,
                }
    stage_seconds = {
        stage: float(np.mean([t[stage] for t in timings.values()]))
        for stage in STAGES
        if timings and all(stage in t for t in timings.values())
    }
    summary = {"seeds": list(seeds), "table": table, "stage_seconds_mean": stage_seconds}
    write_json(out / "summary.json", summary)
    write_text(out / "summary.md", _markdown(summary))
    return summary


def _markdown(summary: dict[str, Any]) -> str:
    seeds = summary["seeds"]
    parts = []
    for split, rows in summary["table"].items():
        lines = [
            f"### {split} split: mean ± std over seeds {', '.join(map(str, seeds))} (percent)",
            "",
            "| Method | " + " | ".join(COLUMN_NAMES[c] for c in SUMMARY_KEYS) + " |",
            "| --- |" + " ---: |" * len(SUMMARY_KEYS),
        ]
        for row, cols in rows.items():
            cells = []
            for c in SUMMARY_KEYS:
                mean, std = 100 * cols[c]["mean"], 100 * cols[c]["std"]
                cells.append(f"{mean:.1f}" if math.isnan(std) else f"{mean:.1f} ± {std:.1f}")
            lines.append(f"| {ROW_NAMES.get(row, row)} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    if summary["stage_seconds_mean"]:
        secs = summary["stage_seconds_mean"]
        total = sum(secs.values())
        parts.append(
            "Mean wall time per seed: "
            + ", ".join(f"{s} {v / 60:.1f} min" for s, v in secs.items())
            + f"; total {total / 60:.1f} min."
        )
    return "\n\n".join(parts) + "\n"
