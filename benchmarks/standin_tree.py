"""Stand-in image trees for split lists whose images cannot be had here (ImageNet-LT, Places-LT),
so the real `imagenet_lt` / `places_lt` sources and every stage run on the real class structure,
file layout and sizes, with real JPEG decoding:

    python benchmarks/standin_tree.py imagenet-lt-train \\
        --val ../shared/data/imagenet_lt/ImageNet_LT_val.txt \\
        --out /work/standin/imagenet_lt/ImageNet_LT_train.txt
    python benchmarks/standin_tree.py tree --root /work/standin/imagenet_lt \\
        /work/standin/imagenet_lt/ImageNet_LT_train.txt \\
        ../shared/data/imagenet_lt/ImageNet_LT_{val,test}.txt
    python benchmarks/standin_tree.py tree --root /work/standin/places_lt \\
        ../shared/data/places_lt/Places_LT_{train,val,test}.txt
    python benchmarks/standin_tree.py subset --fraction 0.02 \\
        --out-dir /work/standin/lists_2pct/places_lt ../shared/data/places_lt/Places_LT_*.txt

`tree` writes one JPEG (`--size` px square, default 64, quality 90) at every path the lists
name, under `--root`. Pixels: a CIFAR-100 image from the 500-per-class pool
(`../shared/data/cifar100/cifar100_train.npz`), upscaled bicubically, of CIFAR class
`label mod 100`, the image drawn with `--seed` per listed line; without the pool, seeded smooth
noise (8×8 noise upscaled). So each file decodes like a real photo and the content carries some
class signal, but labels that share `label mod 100` look alike: accuracies from a stand-in run
measure nothing. The same lists and seed give the same bytes, whatever `--workers`. A path
listed twice (Places-LT's val images also sit under `train/`) is written once.

`imagenet-lt-train` writes the ImageNet-LT train list, which is not published with the others
here, from the published profile: 1,000 classes (those of the val list), 115,846 images,
1,280 down to 5 per class, and the published Many / Medium / Few sizes 385 / 479 / 136 classes
(> 100, 20–100, < 20 images). The per-class counts n(r), r = 0..999 the rank of a class:

- r = 385..863 (Medium, 479 classes): log-linear from 100 down to 20;
- r = 864..999 (Few, 136 classes): log-linear from 19 down to 5;
- r = 0..384 (Many, 385 classes): n(r) = 101 · (1280/101)^((1 − r/384)^q), 1,280 at r = 0 and
  101 at r = 384; q (≈ 3.73) is the one free shape, set so that the total is 115,846
  (a plain log-linear head would hold 178k images: the published head falls off fast).

Each is rounded to an integer (and any remainder of the rounding goes ±1 to the largest
classes after the first), so max, min, total and group sizes are exact. Ranks go to the val
list's labels in a seeded random order (the real list's counts are not in label order either).
Paths follow ImageNet's `train/<wnid>/<wnid>_<N>.JPEG`, the wnid read from the class's val
paths; N counts up from 1 skipping the numbers the val list uses for that wnid, as ImageNet-LT's
val images are ImageNet train images, so no train path is also a val path.

`subset` keeps `--fraction` of every class's lines of each list (at least one per class, the
first ones in list order): every class stays, the long tail keeps its shape, for a short
end-to-end rehearsal at the full class count.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing as mp
import os
import re
import resource
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

POOL = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar100" / "cifar100_train.npz"

IMAGENET_LT_TRAIN = 115_846
IMAGENET_LT_MAX, IMAGENET_LT_MIN = 1280, 5
IMAGENET_LT_GROUPS = (385, 479, 136)  # Many (> 100), Medium (20-100), Few (< 20) classes

# --------------------------------------------------------------------------------------------
# Lists


def read_list(path: Path) -> list[tuple[str, int]]:
    """`relative/path label` lines (blank lines skipped)."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            rel, label = line.rsplit(maxsplit=1)
            rows.append((rel, int(label)))
    return rows


def write_list(path: Path, rows: list[tuple[str, int]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text("".join(f"{rel} {label}\n" for rel, label in rows), encoding="utf-8")
    tmp.replace(path)


def _loglinear(start: float, stop: float, n: int) -> np.ndarray:
    return np.exp(np.linspace(math.log(start), math.log(stop), n))


def imagenet_lt_profile(
    total: int = IMAGENET_LT_TRAIN,
    n_max: int = IMAGENET_LT_MAX,
    n_min: int = IMAGENET_LT_MIN,
    groups: tuple[int, int, int] = IMAGENET_LT_GROUPS,
    many_above: int = 100,
    few_below: int = 20,
) -> np.ndarray:
    """Per-rank train counts (descending) with the published max, min, total and group sizes
    (module docstring); deterministic, no randomness."""
    many, medium, few = groups
    med = np.rint(_loglinear(many_above, few_below, medium))
    tail = np.rint(_loglinear(few_below - 1, n_min, few))
    head_total = total - med.sum() - tail.sum()
    u = np.arange(many) / (many - 1)
    low = many_above + 1

    def head(q: float) -> np.ndarray:
        return low * (n_max / low) ** ((1.0 - u) ** q)

    lo, hi = 1.0, 50.0  # the head's sum falls as q grows
    if not head(hi).sum() <= head_total <= head(lo).sum():
        raise ValueError(f"no head shape gives {total} images with these bounds")
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if head(mid).sum() > head_total else (lo, mid)
    top = np.rint(head(0.5 * (lo + hi)))
    rest = int(head_total - top.sum())  # what rounding left over: a few images at most
    if abs(rest) >= many - 1:
        raise ValueError("rounding remainder too large")
    top[1 : 1 + abs(rest)] += np.sign(rest)
    counts = np.concatenate([top, med, tail]).astype(np.int64)
    if not (np.all(np.diff(counts) <= 0) and counts.sum() == total):
        raise AssertionError("profile construction broke its own invariants")
    return counts


def imagenet_lt_train_rows(val_rows: list[tuple[str, int]], seed: int = 0) -> list[tuple[str, int]]:
    """ImageNet-LT train lines over the val list's classes, with `imagenet_lt_profile`'s counts
    given to the classes in a seeded random order."""
    wnid_of: dict[int, str] = {}
    used: dict[int, set[int]] = defaultdict(set)
    for rel, label in val_rows:
        wnid = Path(rel).parent.name
        if wnid_of.setdefault(label, wnid) != wnid:
            raise ValueError(f"label {label} is listed under {wnid_of[label]} and {wnid}")
        m = re.fullmatch(rf"{wnid}_(\d+)", Path(rel).stem)
        if m:
            used[label].add(int(m.group(1)))
    labels = sorted(wnid_of)
    if labels != list(range(len(labels))):
        raise ValueError("the val list's labels are not 0..K-1")
    counts = imagenet_lt_profile()
    if len(counts) != len(labels):
        raise ValueError(f"the profile has {len(counts)} classes, the val list {len(labels)}")
    rank = np.random.default_rng(seed).permutation(len(labels))  # class c gets counts[rank[c]]
    rows = []
    for label in labels:
        wnid, taken, n = wnid_of[label], used[label], int(counts[rank[label]])
        number = 0
        for _ in range(n):
            number += 1
            while number in taken:
                number += 1
            rows.append((f"train/{wnid}/{wnid}_{number}.JPEG", label))
    return rows


def subset_rows(rows: list[tuple[str, int]], fraction: float) -> list[tuple[str, int]]:
    """The first `max(1, round(fraction * n_c))` lines of every class c, in list order."""
    per_class: dict[int, int] = defaultdict(int)
    for _, label in rows:
        per_class[label] += 1
    keep = {c: max(1, round(fraction * n)) for c, n in per_class.items()}
    out, seen = [], defaultdict(int)
    for rel, label in rows:
        if seen[label] < keep[label]:
            seen[label] += 1
            out.append((rel, label))
    return out


# --------------------------------------------------------------------------------------------
# Images

NOISE_IMAGES = 50_000  # without the pool: this many seeded noise images, as many as the pool
_POOL: np.ndarray | None = None  # the pool's images, class-sorted, set once per process
_JPEG: dict[int, bytes] = {}  # pool index -> its stand-in JPEG, encoded once per process


def _load_pool(path: Path | None) -> tuple[np.ndarray, np.ndarray] | None:
    """(images, labels) of the npz pool, sorted by label; None without one."""
    if path is None or not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        images, labels = z["images"], z["labels"]
    order = np.argsort(labels, kind="stable")
    return images[order], labels[order]


def pool_indices(labels: np.ndarray, seed: int, pool_labels: np.ndarray | None) -> np.ndarray:
    """Per listed line, the pool image it shows: one of CIFAR class `label mod 100`'s images
    (one of `NOISE_IMAGES` noise images without a pool), drawn with `seed` in list order."""
    rng = np.random.default_rng(seed)
    if pool_labels is None:
        return rng.integers(NOISE_IMAGES, size=len(labels))
    classes, first, size = np.unique(pool_labels, return_index=True, return_counts=True)
    c = labels % len(classes)
    return first[c] + (rng.random(len(labels)) * size[c]).astype(np.int64)


def _init_worker(pool_path: str | None) -> None:
    global _POOL
    loaded = _load_pool(Path(pool_path) if pool_path else None)
    _POOL = None if loaded is None else loaded[0]
    _JPEG.clear()


def stand_in_jpeg(index: int, seed: int, size: int) -> bytes:
    """The JPEG of pool image `index` upscaled to `size` px (seeded smooth noise without a pool)."""
    data = _JPEG.get(index)
    if data is None:
        if _POOL is not None:
            small = _POOL[index]
        else:
            small = np.random.default_rng([seed, index]).integers(0, 256, (8, 8, 3), np.uint8)
        buf = io.BytesIO()
        Image.fromarray(small).resize((size, size), Image.BICUBIC).save(
            buf, format="JPEG", quality=90
        )
        data = _JPEG[index] = buf.getvalue()
    return data


def _write_chunk(args: tuple[str, list[str], list[int], int, int]) -> int:
    root, rels, indices, seed, size = args
    base = Path(root)
    nbytes = 0
    for rel, index in zip(rels, indices, strict=True):
        data = stand_in_jpeg(index, seed, size)
        (base / rel).write_bytes(data)
        nbytes += len(data)
    return nbytes


def write_tree(
    lists: list[Path],
    root: Path,
    *,
    seed: int = 0,
    size: int = 64,
    pool: Path | None = POOL,
    workers: int = 0,
    chunk: int = 4000,
) -> dict:
    """A JPEG at every path of `lists` under `root`; returns counts, bytes and seconds."""
    start, cpu = time.perf_counter(), _cpu_seconds()
    rows: dict[str, int] = {}
    for path in lists:
        for rel, label in read_list(path):
            if rows.setdefault(rel, label) != label:
                raise ValueError(f"{rel} is listed with labels {rows[rel]} and {label}")
    for folder in sorted({str(Path(rel).parent) for rel in rows}):
        (root / folder).mkdir(parents=True, exist_ok=True)
    rels = sorted(rows)
    pool_arg = str(pool) if pool is not None and pool.is_file() else None
    loaded = _load_pool(Path(pool_arg)) if pool_arg else None
    indices = pool_indices(
        np.array([rows[r] for r in rels], dtype=np.int64),
        seed,
        None if loaded is None else loaded[1],
    ).tolist()
    del loaded
    jobs = [
        (str(root), rels[i : i + chunk], indices[i : i + chunk], seed, size)
        for i in range(0, len(rels), chunk)
    ]
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    if workers > 1:
        with mp.get_context("fork").Pool(
            workers, initializer=_init_worker, initargs=(pool_arg,)
        ) as p:
            nbytes = sum(p.imap_unordered(_write_chunk, jobs))
    else:
        _init_worker(pool_arg)
        nbytes = sum(map(_write_chunk, jobs))
    return {
        "root": str(root),
        "files": len(rels),
        "bytes": int(nbytes),
        "pixels": "cifar100 pool" if pool_arg else "seeded noise",
        "size": size,
        "seed": seed,
        "workers": workers,
        "seconds": round(time.perf_counter() - start, 2),
        "cpu_seconds": round(_cpu_seconds() - cpu, 2),
    }


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children."""
    own, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


# --------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)

    t = sub.add_parser("tree", help="write a JPEG at every path the lists name")
    t.add_argument("lists", nargs="+", type=Path)
    t.add_argument("--root", type=Path, required=True, help="image root the lists are under")
    t.add_argument("--size", type=int, default=64)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--pool", type=Path, default=POOL, help="CIFAR-100 npz pool (noise if absent)")
    t.add_argument("--workers", type=int, default=0, help="processes; 0 = one per core")

    g = sub.add_parser("imagenet-lt-train", help="write ImageNet_LT_train.txt from the profile")
    g.add_argument("--val", type=Path, required=True, help="ImageNet_LT_val.txt")
    g.add_argument("--out", type=Path, required=True)
    g.add_argument("--seed", type=int, default=0)

    s = sub.add_parser("subset", help="keep a fraction of every class's lines")
    s.add_argument("lists", nargs="+", type=Path)
    s.add_argument("--fraction", type=float, required=True)
    s.add_argument("--out-dir", type=Path, required=True)

    args = ap.parse_args(argv)
    if args.command == "tree":
        if args.root.resolve().is_relative_to(Path(__file__).resolve().parents[1]):
            ap.error("--root lies inside the repository: write stand-in trees outside it")
        info = write_tree(
            args.lists,
            args.root,
            seed=args.seed,
            size=args.size,
            pool=args.pool,
            workers=args.workers,
        )
        print(json.dumps(info))
    elif args.command == "imagenet-lt-train":
        start = time.perf_counter()
        rows = imagenet_lt_train_rows(read_list(args.val), seed=args.seed)
        write_list(args.out, rows)
        counts = np.bincount([label for _, label in rows])
        print(
            json.dumps(
                {
                    "out": str(args.out),
                    "images": len(rows),
                    "classes": len(counts),
                    "max": int(counts.max()),
                    "min": int(counts.min()),
                    "seconds": round(time.perf_counter() - start, 2),
                }
            )
        )
    else:
        for path in args.lists:
            rows = subset_rows(read_list(path), args.fraction)
            write_list(args.out_dir / path.name, rows)
            print(f"{args.out_dir / path.name}: {len(rows)} lines")


if __name__ == "__main__":
    main()
