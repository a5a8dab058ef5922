"""The rehearsals side by side: each stage's time per image at ImageNet-LT's and Places-LT's shape
against the same stage on CIFAR-100-LT, with the rehearsal goals checked, in one JSON:

    cd benchmarks/results && python ../rehearsal_compare.py --baseline rehearsal_cifar100_lt.json \\
        rehearsal_places_lt.json rehearsal_imagenet_lt.json --out rehearsal_compare.json

Every input is a `benchmarks/rehearsal.py` JSON of the same stages, model and schedule (the
`benchmarks/configs/rehearsal_*.yaml` files differ in their data only, and ImageNet-LT's stage-I
batch). Run them back to back on an otherwise idle machine: each stage's load average before and
after is in its JSON, and this script names any stage that ran while the load was above the
core count. Per-image time includes each stage's fixed cost (start-up, model load, DVC hashing),
which weighs most on CIFAR-100-LT's 10,847 images.

Goals: every rehearsal completes and takes at most `--minutes` (60) minutes, every stage's peak
RSS is under `--rss-gb` (8), each stage's time per image is at most `--ratio` (1.5) times
CIFAR-100-LT's, and a second `dvc repro` finds nothing to run.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from rehearsal import STAGES


def stage_table(result: dict) -> dict[str, dict]:
    return {s["stage"]: s for s in result["stages"]}


def compare(baseline: dict, run: dict, minutes: float, rss_gb: float, ratio: float) -> dict:
    """One rehearsal against the baseline: per stage both figures, their ratio and the goals."""
    base = stage_table(baseline)
    stages = []
    for name, entry in stage_table(run).items():
        row = {
            "stage": name,
            "seconds": entry["seconds"],
            "peak_rss_mb": entry["peak_rss_mb"],
            "returncode": entry["returncode"],
            "unit": entry.get("per_unit", {}).get("unit"),
            "count": entry.get("per_unit", {}).get("count"),
            "ms_per_unit": entry.get("ms_per_unit"),
        }
        other = base.get(name, {})
        if row["ms_per_unit"] and other.get("ms_per_unit"):
            row["baseline_count"] = other["per_unit"]["count"]
            row["baseline_ms_per_unit"] = other["ms_per_unit"]
            row["ratio"] = round(row["ms_per_unit"] / other["ms_per_unit"], 3)
            row["meets_ratio"] = row["ratio"] <= ratio
        stages.append(row)
    total = sum(s["seconds"] for s in run["stages"])
    pipeline_total = sum(s["seconds"] for s in run["stages"] if s["stage"] != "predict")
    second = run.get("second_repro")
    cpus = run["machine"]["cpus"]
    busy = [
        s["stage"]
        for s in run["stages"]
        if max(s.get("load_before", 0), s.get("load_after", 0)) > cpus + 0.5
    ]
    ratios = [s for s in stages if "ratio" in s]
    peak = max(s["peak_rss_mb"] for s in run["stages"])
    return {
        "params": run["params"],
        "dataset": run.get("dataset"),
        "stages": stages,
        "pipeline_seconds": round(pipeline_total, 1),
        "seconds_with_predict": round(total, 1),
        "max_peak_rss_mb": peak,
        "second_repro_seconds": second["seconds"] if second else None,
        "stages_run_under_load": busy,
        "goals": {
            "completes": all(s["returncode"] == 0 for s in run["stages"])
            and set(STAGES) <= {s["stage"] for s in run["stages"]},
            "within_minutes": pipeline_total <= minutes * 60,
            "peak_rss_under": peak < rss_gb * 1024,
            "per_image_within_ratio": bool(ratios) and all(s["meets_ratio"] for s in ratios),
            "second_repro_changes_nothing": bool(second and second.get("up_to_date")),
        },
    }


def markdown(result: dict) -> str:
    """The side-by-side table for benchmarks/README.md: per stage the wall time, peak RSS and
    time per unit of each rehearsal, with its ratio to the baseline's time per unit."""
    names = list(result["rehearsals"])
    base_label = _label({"params": result["baseline"], "dataset": result["baseline_dataset"]})
    head = ["stage", base_label] + [_label(result["rehearsals"][n]) for n in names]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    base = {s["stage"]: s for s in result["baseline_stages"]}
    order = [s["stage"] for s in result["rehearsals"][names[0]]["stages"]]
    for stage in order:
        cells = [stage, _cell(base.get(stage))]
        for n in names:
            row = {s["stage"]: s for s in result["rehearsals"][n]["stages"]}.get(stage)
            cell = _cell(row)
            if row and "ratio" in row:
                cell += f" (**{row['ratio']:.2f}×**)"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    base_total = sum(s["seconds"] for s in result["baseline_stages"] if s["stage"] != "predict")
    base_peak = max(s["peak_rss_mb"] for s in result["baseline_stages"])
    totals = ["whole pipeline", f"{base_total / 60:.1f} min, peak {base_peak / 1024:.2f} GB"]
    for n in names:
        r = result["rehearsals"][n]
        totals.append(
            f"{r['pipeline_seconds'] / 60:.1f} min, peak {r['max_peak_rss_mb'] / 1024:.2f} GB"
        )
    lines.append("| " + " | ".join(totals) + " |")
    return "\n".join(lines) + "\n"


def summary(result: dict) -> str:
    """The README's one-sentence reading of the comparison (a test keeps the two in step)."""
    parts = []
    for r in result["rehearsals"].values():
        name = Path(r["params"]).stem.removeprefix("rehearsal_")
        parts.append(f"{DATASETS.get(name, name)} {r['pipeline_seconds'] / 60:.0f} min")
    peak = max(r["max_peak_rss_mb"] for r in result["rehearsals"].values()) / 1024
    worst = max(
        s["ratio"] for r in result["rehearsals"].values() for s in r["stages"] if "ratio" in s
    )
    return (
        f"{' and '.join(parts)} for the whole pipeline, at most {peak:.1f} GB in any stage, "
        f"every stage's time per image at most {worst:.2f}× CIFAR-100-LT's"
    )


DATASETS = {"imagenet_lt": "ImageNet-LT", "places_lt": "Places-LT", "cifar100_lt": "CIFAR-100-LT"}


def _label(r: dict) -> str:
    name = Path(r["params"]).stem.removeprefix("rehearsal_")
    data = r["dataset"] or {}
    train = data.get("counts", {}).get("train", 0)
    classes = data.get("classes")
    count = f"{classes:,}" if isinstance(classes, int) else "?"
    return f"{DATASETS.get(name, name)} ({count} classes, {train:,} train)"


def _cell(row: dict | None) -> str:
    """`seconds s · ms per unit`: the unit is the stage's (see rehearsal.py)."""
    if not row:
        return "–"
    per = row.get("ms_per_unit")
    peak = row["peak_rss_mb"] / 1024
    text = f"{row['seconds']:.0f} s, {peak:.1f} GB"
    return text + (f", {per:.2f} ms" if per else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="rehearsal JSONs to compare")
    ap.add_argument("--baseline", type=Path, required=True, help="the CIFAR-100-LT rehearsal JSON")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--rss-gb", type=float, default=8.0)
    ap.add_argument("--ratio", type=float, default=1.5)
    args = ap.parse_args()
    baseline = json.loads(args.baseline.read_text())
    runs = {p.name: json.loads(p.read_text()) for p in args.runs}
    for name, run in runs.items():
        if run["machine"] != baseline["machine"]:
            ap.error(f"{name} ran on another machine than {args.baseline.name}: {run['machine']}")
    result = {
        "baseline": str(args.baseline),
        "machine": baseline["machine"],
        "baseline_dataset": baseline.get("dataset"),
        "goal": {"minutes": args.minutes, "rss_gb": args.rss_gb, "per_image_ratio": args.ratio},
        "baseline_stages": [
            {k: s.get(k) for k in ("stage", "seconds", "peak_rss_mb", "ms_per_unit", "per_unit")}
            for s in baseline["stages"]
        ],
        "rehearsals": {
            name: compare(baseline, run, args.minutes, args.rss_gb, args.ratio)
            for name, run in runs.items()
        },
    }
    result["meets_goals"] = all(all(r["goals"].values()) for r in result["rehearsals"].values())
    result["table"] = markdown(result)
    result["summary"] = summary(result)
    tmp = args.out.with_name(args.out.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.out)
    for name, r in result["rehearsals"].items():
        print(f"{name}: {r['pipeline_seconds'] / 60:.1f} min, peak {r['max_peak_rss_mb']:.0f} MB")
        for s in r["stages"]:
            if "ratio" in s:
                print(
                    f"  {s['stage']:9s} {s['ms_per_unit']:8.3f} ms/{s['unit']} vs "
                    f"{s['baseline_ms_per_unit']:8.3f}: {s['ratio']:.2f}x"
                )
        print(f"  goals: {r['goals']}")
    print(f"meets goals: {result['meets_goals']}; wrote {args.out}")


if __name__ == "__main__":
    main()
