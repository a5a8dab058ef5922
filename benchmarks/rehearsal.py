"""Every stage of one params file, timed: what `dvc repro` runs, one `ecvl` subprocess per stage,
with per stage the wall time, CPU time, peak RSS and the size of what it wrote, in one JSON:

    python benchmarks/rehearsal.py --params benchmarks/configs/rehearsal_imagenet_lt.yaml \\
        --workdir /work/standin/runs/imagenet_lt --out benchmarks/results/rehearsal_imagenet_lt.json

The params file is copied to `<workdir>/params.yaml` with every `paths.*` entry but `raw` moved
under the workdir (artifacts never land in the repository); `--lists-dir D` swaps each list
file of `shard.source` for the file of the same name in D (a `standin_tree.py subset` of it,
for a short rehearsal at the full class count); `--set key=value` overrides one value (YAML),
e.g. `--set stage1.epochs=1` to run another preset, such as CIFAR-100-LT, on the same schedule
for a side-by-side comparison. `--predict` adds `ecvl predict` of the packaged classifier on the
test split's images. `--threads N` sets OMP_NUM_THREADS for every stage.

`--dvc` runs it the way users do: the workdir holds a `git clone` of this repository's HEAD
with the params file as its `params.yaml` (artifact paths as the file names them, inside the
clone; list files made absolute), each stage is `dvc repro --single-item <stage>` there (so
the times include DVC's hashing and caching), and then a second plain `dvc repro` is timed and
its output recorded: it must find nothing to run (`second_repro.up_to_date`).

Peak RSS is the child's own (`os.wait4`), so each stage has its own figure. Per-unit times
divide a stage's wall time by what it processed (from `meta.json` and the params): images
sharded, train images × stage-I epochs, images encoded by export (every split once, train
E more times for the bank), stage-II draws (N × epochs × modes), images evaluated (zero-shot
pass) and predicted. The machine's load average before and after each stage is recorded: on a
shared machine a slow stage may be another job's doing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES = ("shard", "stage1", "export", "stage2", "evaluate", "package")
# What each stage writes, as `paths` keys (files of `metrics`/`plots`/`reports` by name).
OUTPUTS = {
    "shard": ["shards"],
    "stage1": ["stage1", "checkpoints", "metrics/stage1.json", "plots/stage1.csv"],
    "export": ["embeddings", "image_store"],
    "stage2": ["stage2", "metrics/stage2.json", "plots/stage2.csv"],
    "evaluate": [
        "metrics/eval.json",
        "reports/results.md",
        "reports/per_class.png",
        "reports/class_scores.png",
        "plots/per_class.csv",
        "plots/predictions.csv",
    ],
    "package": ["classifier", "classifier/card.md"],
}
LIST_KEYS = ("train", "val", "test", "classnames")


def workdir_params(
    params: dict,
    workdir: Path,
    lists_dir: Path | None,
    overrides: list[str],
    move_paths: bool = True,
) -> dict:
    """The params to run: artifact paths under `workdir` (unless `move_paths` is False, for a
    clone whose own folders hold them), list files absolute or swapped, values overridden."""
    data = json.loads(json.dumps(params))  # a deep copy
    raw = data.get("paths", {}).get("raw")
    if raw and not Path(raw).is_absolute():  # the input data, named from the repository
        data["paths"]["raw"] = str(REPO / raw)
    if move_paths:
        data["paths"] = {
            key: value if key == "raw" else str(workdir / value)
            for key, value in data.get("paths", {}).items()
        }
    source = data["shard"]["source"]
    for key in LIST_KEYS:
        if source.get(key):
            path = Path(source[key])
            if lists_dir is not None and key != "classnames":
                path = lists_dir / path.name
            source[key] = str(path if path.is_absolute() else REPO / path)
    for item in overrides:
        key, _, value = item.partition("=")
        node = data
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    return data


def tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def artifact_sizes(stage: str, paths: dict) -> dict[str, int]:
    sizes = {}
    for out in OUTPUTS.get(stage, []):
        key, _, rest = out.partition("/")
        path = Path(paths[key]) / rest if rest else Path(paths[key])
        if path.exists():
            sizes[out] = tree_bytes(path)
    return sizes


def run_child(cmd: list[str], log_path: Path, env: dict | None = None, cwd: Path = REPO) -> dict:
    """Run `cmd` with its output in `log_path`; its own wall time, CPU time and peak RSS."""
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "returncode": proc.returncode,
        "seconds": round(seconds, 2),
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # Linux reports KiB
        "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
    }


def processed(stage: str, params: dict, meta: dict | None, predicted: int) -> tuple[int, str]:
    """What a stage's time is per: (count, unit)."""
    if meta is None:
        return 0, ""
    counts = {s: v["count"] for s, v in meta["splits"].items()}
    train, total = counts.get("train", 0), sum(counts.values())
    modes = params["stage2"]["modes"]
    if stage == "shard":
        return total, "image"
    if stage == "stage1":
        return train * params["stage1"]["epochs"], "train image-epoch"
    if stage == "export":
        return total + train * params["export"]["bank_views"], "image encoded"
    if stage == "stage2":
        draws = params["stage2"]["draws_per_epoch"] or train
        return draws * params["stage2"]["epochs"] * len(modes), "draw"
    if stage == "evaluate":
        splits = [s for s in params["evaluate"]["splits"] if s in counts]
        return sum(counts[s] for s in splits), "image evaluated"
    if stage == "predict":
        return predicted, "image"
    return 0, ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=Path, required=True)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="JSON to write")
    ap.add_argument("--lists-dir", type=Path, default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated, in order")
    ap.add_argument("--predict", action="store_true", help="then `ecvl predict` on test images")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="OMP_NUM_THREADS for every stage (default: torch's own choice, as users run it); "
        "1 keeps the figures steadier on a machine other jobs share",
    )
    ap.add_argument(
        "--dvc",
        action="store_true",
        help="run each stage as `dvc repro --single-item` in a clone of HEAD, then a second "
        "`dvc repro` that must find nothing to run",
    )
    args = ap.parse_args()
    env = dict(os.environ)
    # The venv's `ecvl` and `dvc` for the children, whether or not the venv is activated.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)

    workdir = args.workdir.resolve()
    if workdir.is_relative_to(REPO):
        ap.error("--workdir lies inside the repository: artifacts of a rehearsal are large")
    workdir.mkdir(parents=True, exist_ok=True)
    clone = workdir / "repo"
    if args.dvc:
        if clone.exists():
            ap.error(f"{clone} exists: give a fresh --workdir for a --dvc rehearsal")
        subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
    params = workdir_params(
        yaml.safe_load(args.params.read_text()),
        workdir,
        args.lists_dir.resolve() if args.lists_dir else None,
        args.overrides,
        move_paths=not args.dvc,
    )
    params_path = (clone if args.dvc else workdir) / "params.yaml"
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    if args.dvc:  # the clone's params name its own folders; this script reads them from here
        params["paths"] = {key: str(clone / value) for key, value in params["paths"].items()}
    ecvl = str(Path(sys.executable).with_name("ecvl"))
    dvc = str(Path(sys.executable).with_name("dvc"))
    stages = [s for s in args.stages.split(",") if s]
    unknown = set(stages) - set(STAGES)
    if unknown:
        ap.error(f"unknown stage(s) {sorted(unknown)}; known: {', '.join(STAGES)}")

    result = {
        "params": str(args.params),
        "workdir": str(workdir),
        "lists_dir": str(args.lists_dir) if args.lists_dir else None,
        "overrides": args.overrides,
        "threads": args.threads,
        "dvc": args.dvc,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "stages": [],
    }
    meta_path = Path(params["paths"]["shards"]) / "meta.json"

    def record(name: str, cmd: list[str], predicted: int = 0) -> bool:
        print(f"{name}: {' '.join(cmd)}", flush=True)
        cwd = clone if args.dvc else REPO
        entry = {"stage": name, **run_child(cmd, workdir / f"{name}.log", env, cwd)}
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
        entry["artifact_bytes"] = artifact_sizes(name, params["paths"])
        count, unit = processed(name, params, meta, predicted)
        if count:
            entry["per_unit"] = {"count": count, "unit": unit}
            entry["ms_per_unit"] = round(1000 * entry["seconds"] / count, 4)
        if entry["returncode"]:
            entry["log_tail"] = (workdir / f"{name}.log").read_text()[-3000:]
        result["stages"].append(entry)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(
            f"  {entry['seconds']} s, CPU {entry['cpu_seconds']} s, peak RSS "
            f"{entry['peak_rss_mb']} MB, rc {entry['returncode']}",
            flush=True,
        )
        return entry["returncode"] == 0

    for stage in stages:
        cmd = (
            [dvc, "repro", "--single-item", stage]
            if args.dvc
            else [ecvl, stage, "--params", str(params_path)]
        )
        if not record(stage, cmd):
            sys.exit(f"{stage} failed: see {workdir / (stage + '.log')}")
    if args.dvc:
        again = run_child([dvc, "repro"], workdir / "repro_again.log", env, clone)
        output = (workdir / "repro_again.log").read_text()
        status = subprocess.run([dvc, "status"], cwd=clone, env=env, capture_output=True, text=True)
        result["second_repro"] = {
            **again,
            "output": output[-2000:],
            "dvc_status": status.stdout.strip(),
            "up_to_date": again["returncode"] == 0
            and "Running stage" not in output
            and "up to date" in status.stdout,
        }
        print(
            f"second dvc repro: {again['seconds']} s, up to date: "
            f"{result['second_repro']['up_to_date']}",
            flush=True,
        )
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        result["dataset"] = {
            "classes": meta["num_classes"],
            "counts": {s: v["count"] for s, v in meta["splits"].items()},
            "shards": {s: len(v["shards"]) for s, v in meta["splits"].items()},
            "groups": {g: len(v) for g, v in meta["groups"].items()},
            "meta_json_bytes": meta_path.stat().st_size,
        }
    if args.predict:
        source = params["shard"]["source"]
        root = Path(source["root"])
        test_list = Path(source["test"])
        if not test_list.is_absolute():
            test_list = REPO / test_list
        images = [
            str(root / line.rsplit(maxsplit=1)[0])
            for line in test_list.read_text().splitlines()
            if line.strip()
        ]
        listing = workdir / "test_images.txt"
        listing.write_text("\n".join(images) + "\n")
        cmd = [
            ecvl,
            "predict",
            "--model",
            params["paths"]["classifier"],
            str(listing),
            "--out",
            str(workdir / "predictions.csv"),
            "--no-progress",
        ]
        if not record("predict", cmd, predicted=len(images)):
            sys.exit(f"predict failed: see {workdir / 'predict.log'}")
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    total = sum(s["seconds"] for s in result["stages"])
    print(f"all stages: {total:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
