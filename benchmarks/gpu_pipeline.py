"""The CIFAR-100-LT presets' stages end to end on one GPU, timed per stage, JSON out.

A GPU machine without internet can download nothing (no CIFAR-100 archive, no `openai`
weights) and may not have the 500-per-class pool, and a working tree travels only up to a few
tens of MB.
So the data go in two steps:

    # here, where the images are: the preset's own shard stage, its long-tailed train split
    # and its val split written as two compact npz files (about 40 MB; git-ignored folder).
    # --pool takes them from a 500-per-class npz pool (benchmarks/cifar100_pool.py) instead of
    # the preset's source, which torchvision downloads
    python benchmarks/gpu_pipeline.py prepare --out gpu_data [--pool cifar100_train.npz]

    # on the GPU machine: every stage of a preset on those images (`ecvl` subprocesses,
    # `benchmarks/rehearsal.py` records wall time, CPU time, peak RSS and artifact size per stage)
    python benchmarks/gpu_pipeline.py run --data gpu_data --out $OUT/gpu_pipeline.json \\
        --preset pipeline/presets/cifar100_lt_rn50.yaml --workdir /tmp/gpu_pipeline

`run` keeps the preset's schedule and reads the prepared splits as they are (no second long
tail: `imbalance_factor: null`, `val_per_class: 0`), so the shards hold exactly the preset's
images; `stage1.pretrained` becomes null (random init: the figures are speed, not accuracy).
`--set key=value` overrides more values, e.g. `--set stage2.epochs=10` for a shorter run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]


def prepare(preset: Path, out: Path, pool: Path | None) -> int:
    """The preset's train and val splits as `<out>/train.npz` and `<out>/val.npz`, the train
    images from `pool` (an npz of the whole train split) when given. Returns the exit status:
    that of `ecvl shard` when it fails (it has said why), 2 when either file exists already (it
    is never replaced). Each file appears whole: written under a temporary name, then renamed."""
    from ecvl.data.reader import iter_samples
    from ecvl.data.shards import load_manifest

    targets = {split: out / f"{split}.npz" for split in ("train", "val")}
    if existing := [str(t) for t in targets.values() if t.exists()]:
        print(
            f"error: {', '.join(existing)}: already there, and prepare never replaces a file "
            "(move it away or choose another --out)",
            file=sys.stderr,
        )
        return 2
    params = yaml.safe_load(preset.read_text())
    if pool is not None:  # the long tail and val drawn from the pool; it has no test split
        params["shard"].update(
            source={"name": "npz", "train": str(pool.resolve())},
            test_source=None,
            test_per_class=0,
        )
        params["paths"]["raw"] = str(pool.resolve().parent)
    with tempfile.TemporaryDirectory() as tmp:
        params["paths"] = {
            k: (v if k == "raw" else str(Path(tmp) / v)) for k, v in params["paths"].items()
        }
        path = Path(tmp) / "params.yaml"
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        ecvl = str(Path(sys.executable).with_name("ecvl"))
        done = subprocess.run([ecvl, "shard", "--params", str(path)], cwd=REPO)
        if done.returncode:
            return done.returncode
        manifest = load_manifest(params["paths"]["shards"])
        out.mkdir(parents=True, exist_ok=True)
        for split, target in targets.items():
            samples = list(iter_samples(manifest.shard_paths(split)))
            partial = target.with_name(f".{target.name}.partial")
            try:
                with open(partial, "wb") as f:
                    np.savez(
                        f,
                        images=np.stack([np.asarray(s["image"]) for s in samples]),
                        labels=np.array([s["label"] for s in samples], dtype=np.int64),
                        classes=np.array(manifest.classes),
                    )
                os.replace(partial, target)
            finally:
                partial.unlink(missing_ok=True)  # its own temporary file, left only on an error
            print(f"{target}: {len(samples)} images")
    return 0


def run(data: Path, preset: Path, workdir: Path, out: Path, overrides: list[str]) -> int:
    source = {"name": "npz", "train": str(data / "train.npz"), "val": str(data / "val.npz")}
    sets = [
        f"shard.source={yaml.safe_dump(source, default_flow_style=True).strip()}",
        "shard.imbalance_factor=null",
        "shard.n_max=null",
        "shard.val_per_class=0",
        "shard.test_per_class=0",
        "stage1.pretrained=null",
        f"paths.raw={data}",
        *overrides,
    ]
    cmd = [sys.executable, str(REPO / "benchmarks/rehearsal.py"), "--params", str(preset)]
    cmd += ["--workdir", str(workdir), "--out", str(out)]
    for item in sets:
        cmd += ["--set", item]
    return subprocess.run(cmd, cwd=REPO).returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="write the preset's train/val splits as npz (here)")
    p.add_argument("--preset", type=Path, default=REPO / "pipeline/presets/cifar100_lt.yaml")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--pool", type=Path, help="npz of the whole train split (benchmarks/cifar100_pool.py)"
    )
    r = sub.add_parser("run", help="every stage on the prepared splits (on the GPU machine)")
    r.add_argument("--data", type=Path, required=True)
    r.add_argument("--preset", type=Path, default=REPO / "pipeline/presets/cifar100_lt_rn50.yaml")
    r.add_argument("--workdir", type=Path, default=Path("/tmp/gpu_pipeline"))
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    if args.command == "prepare":
        sys.exit(prepare(args.preset, args.out, args.pool))
    else:
        sys.exit(run(args.data.resolve(), args.preset, args.workdir, args.out, args.overrides))


if __name__ == "__main__":
    main()
