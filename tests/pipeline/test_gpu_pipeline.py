"""`benchmarks/gpu_pipeline.py prepare`: the GPU run's data are the preset's own long-tailed
train split and val split, drawn here by `ecvl shard`, from a pool when the preset's source
would need a download; a failed shard step is its exit status, not a traceback; a file already
at the output is never replaced."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from support import load_script

REPO = Path(__file__).resolve().parents[2]


def _small_preset(tmp_path: Path) -> Path:
    """The CIFAR-100-LT preset with a long tail small enough for a test pool."""
    params = yaml.safe_load((REPO / "pipeline/presets/cifar100_lt.yaml").read_text())
    params["shard"].update(
        n_max=12,
        imbalance_factor=4,
        membership_imbalance_factor=4,
        val_per_class=2,
        many_above=8,
        few_below=4,
    )
    path = tmp_path / "preset.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _pool(path: Path, classes: int, per_class: int, with_classes: bool = True) -> Path:
    rng = np.random.default_rng(0)
    arrays = {
        "images": rng.integers(0, 256, (classes * per_class, 32, 32, 3), dtype=np.uint8),
        "labels": np.repeat(np.arange(classes), per_class),
    }
    if with_classes:
        arrays["classes"] = np.array([f"class{i}" for i in range(classes)])
    np.savez(path, **arrays)
    return path


def test_prepare_writes_the_presets_long_tail_and_val_from_a_pool(tmp_path):
    gpu_pipeline = load_script("benchmarks/gpu_pipeline.py")
    pool = _pool(tmp_path / "pool.npz", classes=5, per_class=15)
    out = tmp_path / "data"
    assert gpu_pipeline.prepare(_small_preset(tmp_path), out, pool) == 0
    assert sorted(p.name for p in out.iterdir()) == ["train.npz", "val.npz"]  # no partial left
    train, val = np.load(out / "train.npz"), np.load(out / "val.npz")
    # the long tail: 12 images of the head class down to 12 / 4 = 3 of the tail class
    counts = np.bincount(train["labels"])
    assert counts.max() == 12 and counts.min() == 3 and (np.diff(counts) <= 0).all()
    assert np.bincount(val["labels"]).tolist() == [2] * 5
    assert train["images"].shape[1:] == (32, 32, 3) and train["images"].dtype == np.uint8
    assert train["classes"].tolist() == [f"class{i}" for i in range(5)]
    # every image comes from the pool, none is both train and val
    pool_rows = {img.tobytes() for img in np.load(pool)["images"]}
    train_rows = {img.tobytes() for img in train["images"]}
    val_rows = {img.tobytes() for img in val["images"]}
    assert train_rows <= pool_rows and val_rows <= pool_rows and not train_rows & val_rows


def test_prepare_returns_the_shard_steps_failure(tmp_path, capfd):
    gpu_pipeline = load_script("benchmarks/gpu_pipeline.py")
    pool = _pool(tmp_path / "pool.npz", classes=5, per_class=15, with_classes=False)
    out = tmp_path / "data"
    assert gpu_pipeline.prepare(_small_preset(tmp_path), out, pool) != 0
    err = capfd.readouterr().err
    assert "classes" in err and "Traceback" not in err
    assert not out.exists()


def test_prepare_never_replaces_a_file_it_finds(tmp_path, capfd):
    gpu_pipeline = load_script("benchmarks/gpu_pipeline.py")
    pool = _pool(tmp_path / "pool.npz", classes=5, per_class=15)
    out = tmp_path / "data"
    out.mkdir()
    (out / "val.npz").write_bytes(b"the user's file")
    assert gpu_pipeline.prepare(_small_preset(tmp_path), out, pool) == 2
    assert "val.npz: already there" in capfd.readouterr().err
    assert (out / "val.npz").read_bytes() == b"the user's file"
    assert sorted(p.name for p in out.iterdir()) == ["val.npz"]
