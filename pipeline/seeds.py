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
import csv
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
    summary = {
        "seeds": list(seeds),
        "table": table,
        "memorisation": _memorisation(out, seeds),
        "stage_seconds_mean": stage_seconds,
    }
    write_json(out / "summary.json", summary)
    write_text(out / "summary.md", _markdown(summary))
    return summary


# the columns of plots/stage2.csv the memorisation diagnostics read, at a mode's last epoch
MEMORISATION_KEYS = {
    "score_count_spearman": "Spearman(class-mean M, train count)",
    "score_mean_many": "mean M Many",
    "score_mean_medium": "mean M Medium",
    "score_mean_few": "mean M Few",
    "reencoded_fraction": "views re-encoded",
}


def _memorisation(out: Path, seeds: Sequence[int]) -> dict[str, Any]:
    """Per stage-II mode, the memorisation score's diagnostics over seeds: at the last epoch the
    rank correlation of class-mean score with class size and the mean score of Many/Medium/Few
    samples (mean ± std), the correlation at every epoch (per seed), and the fraction of views
    re-encoded (mean over epochs). Whether the score tracks memorisation or class size shows
    here, not in the accuracy table."""
    per_seed: dict[str, dict[int, list[dict[str, str]]]] = {}
    for s in seeds:
        path = out / f"seed-{s}" / PathsParams().plots / "stage2.csv"
        if not path.is_file():
            return {}
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                per_seed.setdefault(row["mode"], {}).setdefault(s, []).append(row)
    result: dict[str, Any] = {}
    for mode, by_seed in per_seed.items():
        if set(by_seed) != set(seeds) or not all(
            _number(by_seed[s][-1]["score_count_spearman"]) for s in seeds
        ):
            continue  # a mode without a measurement pass (the linear probe) has no scores
        entry: dict[str, Any] = {}
        for key in MEMORISATION_KEYS:
            if key == "reencoded_fraction":
                values = [float(np.mean([_float(r[key]) for r in by_seed[s]])) for s in seeds]
            else:
                values = [_float(by_seed[s][-1][key]) for s in seeds]
            entry[key] = {
                "mean": float(np.mean(values)),
                "std": float(np.std(values, ddof=1)) if len(values) > 1 else math.nan,
                "values": values,
            }
        entry["spearman_per_epoch"] = {
            str(s): [round(_float(r["score_count_spearman"]), 4) for r in by_seed[s]] for s in seeds
        }
        result[mode] = entry
    return result


def _float(text: str) -> float:
    """A CSV cell as a float; an empty cell (no value that epoch) is NaN."""
    return float(text) if text.strip() else math.nan


def _number(text: str) -> bool:
    return not math.isnan(_float(text))


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
    if summary.get("memorisation"):
        keys = list(MEMORISATION_KEYS)
        lines = [
            "### memorisation scores at the last epoch: mean ± std over seeds "
            + ", ".join(map(str, seeds)),
            "",
            "| Mode | " + " | ".join(MEMORISATION_KEYS[k] for k in keys) + " |",
            "| --- |" + " ---: |" * len(keys),
        ]
        for mode, entry in summary["memorisation"].items():
            cells = []
            for k in keys:
                scale, fmt = (
                    (100, "{:.0f}%")
                    if k == "reencoded_fraction"
                    else (1, "{:+.2f}" if "spearman" in k else "{:.3f}")
                )
                mean, std = scale * entry[k]["mean"], scale * entry[k]["std"]
                cell = fmt.format(mean)
                if not math.isnan(std):
                    cell += " ± " + fmt.format(std).lstrip("+")
                cells.append(cell)
            lines.append(f"| {mode} | " + " | ".join(cells) + " |")
        lines += ["", "Spearman per epoch (seed: epochs 1 → last):", ""]
        for mode, entry in summary["memorisation"].items():
            for s, values in entry["spearman_per_epoch"].items():
                lines.append(f"- {mode}, seed {s}: " + " ".join(f"{v:+.2f}" for v in values))
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
