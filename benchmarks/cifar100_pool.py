"""One CIFAR-100 split as an npz pool (`images` N×32×32×3 uint8, `labels`, `classes`), read from
the official `cifar-100-python/` files: what the `npz` source reads.

    python benchmarks/cifar100_pool.py --root data/raw/cifar100 --download \\
        --out data/raw/cifar100/cifar100_train.npz

The train split is 500 images per class, in the official order. Use it in a CIFAR-100-LT
preset with `shard.source: {name: npz, train: data/raw/cifar100/cifar100_train.npz}`: the long
tail and the balanced val split are drawn from it, and there is no test split
(`test_per_class: 0`); `--split test` writes the official test split for
`shard.test_source: {name: npz, test: <file>}`.

The files are read as the `cifar100` source reads them (`--download` fetches the archive with
torchvision, which needs internet): only files whose MD5 matches the official release, through
an unpickler that builds nothing but arrays. The npz is written under a temporary name and
renamed when complete; an existing file is replaced only with `--force`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from ecvl.data.sources import Cifar100Source
from ecvl.errors import DataError


def write_pool(root: Path, out: Path, split: str = "train", download: bool = False) -> int:
    """Write `split` of the CIFAR-100 files under `root` to `out`; returns the image count.

    Raises:
        DataError: the files are missing (and `download` is off), fail their MD5, or the
            download failed.
    """
    loaded = Cifar100Source(root=root, download=download).load()
    data = loaded.splits[split]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.npz")
    try:
        np.savez(tmp, images=data.images, labels=data.labels, classes=np.asarray(loaded.classes))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return len(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="holds cifar-100-python/")
    parser.add_argument("--out", type=Path, required=True, help="the .npz to write")
    parser.add_argument("--split", choices=("train", "test"), default="train")
    parser.add_argument("--download", action="store_true", help="fetch the archive (internet)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    if args.out.suffix != ".npz":
        parser.error(f"--out must end in .npz, got {args.out}")
    if args.out.exists() and not args.force:
        parser.error(f"{args.out} exists (--force replaces it)")
    if not args.download and not (args.root / "cifar-100-python").is_dir():
        print(
            f"error: {args.root / 'cifar-100-python'} not found (--download fetches it)",
            file=sys.stderr,
        )
        return 1
    try:
        n = write_pool(args.root, args.out, args.split, args.download)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {n:,} images of the {args.split} split")
    return 0


if __name__ == "__main__":
    sys.exit(main())
