"""`ecvl shard` through the CLI, as DVC runs it."""

import json
import logging

import numpy as np
import pytest
from click.testing import CliRunner

import pipeline.shard
from ecvl.data.longtail import longtail_counts
from pipeline.cli import main
from support import CIFAR_POOL, write_npz, write_params, write_pngs


def _run(params_path):
    return CliRunner().invoke(main, ["shard", "--params", str(params_path)])


def test_digits_default_writes_longtailed_shards(tmp_path):
    result = _run(write_params(tmp_path))
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "data/shards/meta.json").read_text())
    expected = longtail_counts(40, 10, 10)
    assert meta["splits"]["train"]["per_class"] == expected
    assert meta["splits"]["train"]["count"] == sum(expected)
    assert meta["splits"]["test"]["per_class"] == [10] * 10
    assert meta["splits"]["val"]["per_class"] == [5] * 10
    assert meta["classes"][0] == "zero" and meta["imbalance_ratio"] == expected[0] / expected[-1]
    assert expected[:4] == [40, 30, 23, 18]
    assert meta["class_groups"] == ["medium"] * 3 + ["few"] * 7
    assert sum(s["count"] for s in meta["splits"]["train"]["shards"]) == sum(expected)
    assert len(meta["source_fingerprint"]) == 64
    assert not list(tmp_path.glob("data/.*tmp*"))


def test_rerun_is_byte_identical(tmp_path):
    params = write_params(tmp_path)
    _run(params)
    first = {p.name: p.read_bytes() for p in (tmp_path / "data/shards").iterdir()}
    _run(params)
    second = {p.name: p.read_bytes() for p in (tmp_path / "data/shards").iterdir()}
    assert first == second


def test_crash_mid_stage_keeps_previous_output(tmp_path, monkeypatch):
    params = write_params(tmp_path)
    assert _run(params).exit_code == 0
    before = (tmp_path / "data/shards/meta.json").read_bytes()

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(pipeline.shard, "write_manifest", boom)
    result = _run(params)
    assert result.exit_code != 0
    assert (tmp_path / "data/shards/meta.json").read_bytes() == before
    assert not list((tmp_path / "data").glob(".shards.tmp-*"))


def test_crash_on_first_run_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline.shard, "write_manifest", lambda *a: 1 / 0)
    _run(write_params(tmp_path))
    assert not (tmp_path / "data/shards").exists()
    assert not list((tmp_path / "data").glob(".shards.tmp-*"))


def test_npz_label_out_of_range_is_a_clear_error(tmp_path):
    path = tmp_path / "train.npz"
    np.savez(
        path,
        images=np.zeros((3, 4, 4, 3), np.uint8),
        labels=np.array([0, 1, 9]),
        classes=np.array(["a", "b"]),
    )
    params = write_params(
        tmp_path,
        shard={
            "source": {"name": "npz", "train": str(path)},
            "imbalance_factor": None,
            "n_max": None,
        },
    )
    result = _run(params)
    assert result.exit_code == 1
    assert "train.npz: label 9 at row 2 is out of range [0, 2)" in result.output
    assert "Traceback" not in result.output


def test_train_class_without_samples(tmp_path):
    path = write_npz(tmp_path / "train.npz", [0, 0, 2], ["a", "b", "c"])
    params = write_params(
        tmp_path,
        shard={
            "source": {"name": "npz", "train": str(path)},
            "imbalance_factor": None,
            "n_max": None,
            "test_per_class": 0,
            "val_per_class": 0,
        },
    )
    result = _run(params)
    assert result.exit_code == 1 and "1 class(es) have no train sample: 'b'" in result.output


def test_separate_test_source(tmp_path, tiny_npz):
    params = write_params(
        tmp_path,
        shard={
            "source": {"name": "npz", "train": str(tiny_npz["train"])},
            "test_source": {"name": "npz", "test": str(tiny_npz["test"])},
            "imbalance_factor": None,
            "n_max": None,
            "val_per_class": 0,
        },
    )
    result = _run(params)
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "data/shards/meta.json").read_text())
    assert meta["splits"]["train"]["per_class"] == [8, 3, 1]
    assert meta["splits"]["test"]["per_class"] == [2, 2, 2]
    assert meta["class_groups"] == ["few", "few", "few"]


def _kept_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("kept ")]


def test_subsampling_the_source_is_one_log_line(tmp_path, caplog):
    """The defaults hold out a test split and draw a long tail: a user's data shrinks, and the
    log says by how much and which keys did it."""
    caplog.set_level(logging.INFO)
    assert _run(write_params(tmp_path)).exit_code == 0
    meta = json.loads((tmp_path / "data/shards/meta.json").read_text())
    kept = meta["splits"]["train"]["count"]
    assert _kept_lines(caplog) == [
        f"kept {kept} of the source's 1,797 train images: 100 held out as test (test_per_class "
        "10), then a long tail drawn from the rest (imbalance_factor 10, n_max 40: 40 down to 4 "
        "per class). To keep more: shard.imbalance_factor: null skips the long tail; a source "
        "with a test split of its own has none held out"
    ]


def test_source_kept_as_it_is_logs_no_subsampling(tmp_path, tiny_npz, caplog):
    caplog.set_level(logging.INFO)
    shard = {
        "source": {"name": "npz", "train": str(tiny_npz["train"]), "test": str(tiny_npz["test"])},
        "imbalance_factor": None,
        "n_max": None,
        "val_per_class": 0,
    }
    assert _run(write_params(tmp_path, shard=shard)).exit_code == 0
    assert _kept_lines(caplog) == []
    # a long tail on the same data is reported, without a test hold-out (the source has one)
    caplog.clear()
    shard.update(imbalance_factor=8, n_max=8)
    assert _run(write_params(tmp_path, shard=shard)).exit_code == 0
    (line,) = _kept_lines(caplog)
    assert line == (
        "kept 11 of the source's 12 train images: a long tail drawn (imbalance_factor 8, n_max 8: "
        "8 down to 1 per class). To keep more: shard.imbalance_factor: null skips the long tail"
    )


def test_list_source_without_classnames_warns_once(tmp_path, caplog):
    """`class 0`, `class 1`, ... are the prompts a pretrained text encoder would see: say so."""
    caplog.set_level(logging.INFO)
    images = write_pngs(tmp_path / "raw", 6)
    (tmp_path / "raw/train.txt").write_text(
        "".join(f"{p.name} {i % 2}\n" for i, p in enumerate(images))
    )
    params = write_params(
        tmp_path,
        paths={"raw": str(tmp_path / "raw")},
        shard={
            "source": {"name": "list", "root": str(tmp_path / "raw"), "train": "raw/train.txt"},
            "test_per_class": 1,
            "val_per_class": 0,
            "imbalance_factor": None,
            "n_max": None,
        },
    )
    params.write_text(params.read_text().replace("raw/train.txt", str(tmp_path / "raw/train.txt")))
    assert _run(params).exit_code == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "no `classnames` file given: 2 classes named 'class 0' ... 'class 1', so prompts read "
        "'a photo of a class 0.', which a pretrained text encoder cannot relate to the images; "
        "give `classnames` (one name per line, in label order)"
    ]
    meta = json.loads((tmp_path / "data/shards/meta.json").read_text())
    assert meta["classes"] == ["class 0", "class 1"]


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR_POOL.exists(), reason="../shared CIFAR-100 pool not present")
def test_cifar100_lt_if100_from_shared_pool(tmp_path):
    params = write_params(
        tmp_path,
        shard={
            "source": {"name": "npz", "train": str(CIFAR_POOL)},
            "test_per_class": 0,
            "val_per_class": 20,
            "imbalance_factor": 100,
            "n_max": 500,
            "maxcount": 4000,
        },
    )
    result = _run(params)
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "data/shards/meta.json").read_text())
    assert meta["splits"]["train"]["count"] == 10847
    groups = meta["class_groups"]
    assert (groups.count("many"), groups.count("medium"), groups.count("few")) == (35, 35, 30)
    assert meta["classes"][:2] == ["apple", "aquarium_fish"]
