"""Helpers shared by the tests: tiny datasets and params files in tmp dirs."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
CIFAR_POOL = SHARED / "data" / "cifar100" / "cifar100_train.npz"


def device_under_test() -> str:
    """The device tests run on: ECVL_TEST_DEVICE, default cpu."""
    return os.environ.get("ECVL_TEST_DEVICE", "cpu")


def make_images(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    """Distinct random RGB images (each differs from the others)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def write_npz(path: Path, labels, classes, size: int = 16, seed: int = 0) -> Path:
    labels = np.asarray(labels, dtype=np.int64)
    np.savez(
        path,
        images=make_images(len(labels), size, seed),
        labels=labels,
        classes=np.asarray(classes),
    )
    return path


def tiny_npz_files(tmp_path: Path) -> dict:
    """Three classes with 8/3/1 train images, 2 test images each."""
    classes = ["cat", "dog", "sea_lion"]
    train = write_npz(tmp_path / "train.npz", [0] * 8 + [1] * 3 + [2] * 1, classes, seed=1)
    test = write_npz(tmp_path / "test.npz", [0, 0, 1, 1, 2, 2], classes, seed=2)
    return {"train": train, "test": test, "classes": classes}


ARTIFACTS = {
    "shards": "data/shards",
    "stage1": "models/stage1",
    "checkpoints": "checkpoints",
    "embeddings": "data/embeddings.zarr",
    "image_store": "data/train_images.h5",
    "stage2": "models/stage2",
    "classifier": "models/classifier",
    "metrics": "metrics",
    "plots": "plots",
    "reports": "reports",
    "logs": "logs",
}


def upstream_paths(upstream: Path, *names: str) -> dict:
    """`paths` entries that point at artifacts another test run wrote under `upstream`."""
    return {name: str(upstream / ARTIFACTS[name]) for name in names}


def edited_model_copy(upstream: Path, directory: Path, edit) -> Path:
    """A copy of `upstream`'s stage-I model dir whose `ecvl.json` went through `edit(info)`."""
    import json
    import shutil

    model = directory / "model"
    shutil.copytree(upstream / ARTIFACTS["stage1"], model)
    info = json.loads((model / "ecvl.json").read_text())
    edit(info)
    (model / "ecvl.json").write_text(json.dumps(info))
    return model


def write_params(tmp_path: Path, **sections) -> Path:
    """A params file whose artifacts all live under tmp_path; `sections` override keys."""
    data = {
        "base": {"seed": 0, "device": "cpu", "num_workers": 0, "progress": False},
        "paths": {name: str(tmp_path / rel) for name, rel in ARTIFACTS.items()},
        "shard": {
            "source": {"name": "digits"},
            "test_per_class": 10,
            "val_per_class": 5,
            "imbalance_factor": 10,
            "n_max": 40,
            "maxcount": 100,
        },
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class CountingEncoder(torch.nn.Module):
    """Wraps an open_clip model and records every image batch `encode_image` receives."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.batches: list[torch.Tensor] = []

    @property
    def images_seen(self) -> int:
        return sum(b.shape[0] for b in self.batches)

    def encode_image(self, x, normalize: bool = False):
        self.batches.append(x.clone())
        return self.model.encode_image(x, normalize=normalize)


def cached_world(
    directory: Path, pixels: np.ndarray, labels: np.ndarray, bank_views: int = 4
) -> dict:
    """A random-init tiny ViT, `pixels` as PNGs in an image store, their embedding cache and a
    view bank of `bank_views` base views per image (what the export writes), for stage-II
    tests."""
    import io

    from PIL import Image

    from ecvl.bank import encode_bank_block
    from ecvl.data.embeddings import ViewBank
    from ecvl.data.image_store import ImageStore, ImageStoreWriter
    from ecvl.models.clip import create_model
    from ecvl.views import ViewRenderer

    with torch.random.fork_rng():
        torch.manual_seed(0)
        bundle = create_model("ecvl-tiny-vit")
    model = bundle.model.eval()
    encoded = []
    for p in pixels.astype(np.uint8):
        buf = io.BytesIO()
        Image.fromarray(p).save(buf, format="PNG")
        encoded.append(buf.getvalue())
    path = directory / "train.h5"
    with ImageStoreWriter(path, len(pixels)) as w:
        w.write(0, encoded, labels, [f"s{i}" for i in range(len(pixels))])
        w.mark_complete()
    store = ImageStore(path)
    with torch.inference_mode():
        x = torch.stack([bundle.eval_transform(store.get_image(i)) for i in range(len(pixels))])
        cache = model.encode_image(x, normalize=False).numpy().astype(np.float16)
    renderer = ViewRenderer.for_model(model)
    feats, boxes, flips = encode_bank_block(
        model,
        store,
        range(len(pixels)),
        bank_views,
        0,
        renderer,
        torch.device("cpu"),
        "fp32",
        batch_size=64,
    )
    bank = ViewBank(feats.astype(np.float16), boxes, flips)
    return {
        "model": model,
        "transform": bundle.eval_transform,
        "renderer": renderer,
        "store": store,
        "cache": cache,
        "bank": bank,
    }


def tiny_classifier(directory: Path, num_classes: int = 4, seed: int = 0) -> Path:
    """A packaged classifier built without the pipeline: a random-init tiny ViT, a random
    residual adapter and random class text embeddings, written by `write_classifier`."""

    from ecvl.classifier import write_classifier
    from ecvl.models.adapter import ResidualAdapter, save_head
    from ecvl.models.clip import create_model, save_open_clip_dir

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        bundle = create_model("ecvl-tiny-vit")
        text = torch.randn(num_classes, bundle.embed_dim)
    save_open_clip_dir(bundle, None, directory / "stage1")
    head = directory / "head"
    adapter = ResidualAdapter(bundle.embed_dim, 0.5, seed=seed)
    save_head(head, adapter.state_dict(), adapter.config())
    out = directory / "classifier"
    out.mkdir()
    write_classifier(
        out,
        backbone_dir=directory / "stage1",
        head_dir=head,
        text_features=text.numpy(),
        classes=[f"class_{c}" for c in range(num_classes)],
        feature_dtype="float16",
        info={"mode": "ecvl", "model": "ecvl-tiny-vit"},
        card="# test classifier\n",
    )
    return out


def write_pngs(directory: Path, n: int, size: int = 24, seed: int = 0) -> list[Path]:
    """`n` random RGB PNGs named 000.png, 001.png, ... in `directory`."""
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, pixels in enumerate(make_images(n, size, seed)):
        paths.append(directory / f"{i:03d}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def sh(cwd: Path, *cmd: str):
    """Run `cmd` in `cwd` as a user's shell would in a fresh clone: this interpreter's `dvc` and
    `ecvl` on PATH, HOME in `cwd`, no DVC analytics; `ecvl` runs `cwd`'s copy of the code."""
    import subprocess
    import sys

    bindir = str(Path(sys.executable).parent)
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "HOME": str(cwd), "DVC_NO_ANALYTICS": "1"}
    env["PYTHONPATH"] = str(cwd)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)


def dvc_project(directory: Path) -> Path:
    """What a clone holds for `dvc repro` (dvc.yaml, params.yaml, the code, data/raw/README.md,
    DVC's plot templates), as a new git + DVC repository in `directory`."""
    import shutil

    for name in ("dvc.yaml", "params.yaml", "pyproject.toml", ".gitignore", "data/raw/README.md"):
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, directory / name)
    for pkg in ("ecvl", "pipeline"):
        shutil.copytree(REPO / pkg, directory / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    assert sh(directory, "git", "init", "-q").returncode == 0
    assert sh(directory, "dvc", "init", "-q").returncode == 0
    shutil.copytree(REPO / ".dvc/plots", directory / ".dvc/plots")
    return directory


# Development history has no place in what users read (README, docs, model card, CLI help,
# comments in params files): they need what is true now and why; history is in git log.
HISTORY_PATTERNS = (
    (r"(?<![\w/&])#\d+\b", "an issue or pull-request number"),
    (r"\bissues?\b", "an issue"),
    (
        r"\b(previous|last|earlier|other|another) (session|machine|engineer)s?\b",
        "a session or machine",
    ),
    (r"\b(this|that|the) session\b", "a session"),
    (r"\b(dev|development) machines?\b", "the development machines"),
    (r"\bengineers?\b|\bthe lead\b", "a person's role"),
    (r"\btoday('s)?\b|\byesterday\b", "a day"),
    (r"\b(before|after|since|until) (#|commit|issue|the fix|the change)", "before/after a change"),
    (r"\bcommit [0-9a-f]{7,40}\b", "a commit"),
    (r"\b(has|have) been lent\b|\bwas lent\b", "a lent machine"),
    (r"\bat the last commit\b|\bpredate\b", "a point in history"),
)
_HEX = r"(?<![0-9A-Za-z])(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}(?![0-9A-Za-z])"


def history_phrases(text: str) -> list[str]:
    """Every phrase of `text` that tells development history (an issue number, a session, a
    machine, a commit, before/after a change), as `what: 'phrase'`. Commit-hash-like tokens
    count in prose only: code blocks, HTML comments (digests) and generated blocks (between
    `<!-- name:start ... -->` and `<!-- name:end -->`, such as `dvc exp show`'s experiment
    ids) are skipped for them."""
    import re

    found = [
        f"{what}: {m.group(0)!r}"
        for pattern, what in HISTORY_PATTERNS
        for m in re.finditer(pattern, text, flags=re.IGNORECASE)
    ]
    generated = r"<!-- ([\w-]+):start\b.*?<!-- \1:end -->"
    prose = re.sub(rf"```.*?```|{generated}|<!--.*?-->", "", text, flags=re.DOTALL)
    found += [f"a commit hash: {m.group(0)!r}" for m in re.finditer(_HEX, prose)]
    return found


def load_script(relpath: str) -> ModuleType:
    """A script of the repository (`benchmarks/`, `docs/`: not a package) as a module, for
    tests of its functions; registered under its name, as pickling its functions needs, and
    importing its neighbours as it does when run (its folder on the path)."""
    path = REPO / relpath
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module
