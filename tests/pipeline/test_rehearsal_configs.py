"""The rehearsal params files in `benchmarks/configs/` and the helper that runs them: each is a
whole valid params file that `dvc repro` can run, and `benchmarks/rehearsal.py` moves every
artifact under its workdir."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.params import load_params
from support import load_script

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "benchmarks" / "configs").glob("rehearsal_*.yaml"))


def _rehearsal():
    return load_script("benchmarks/rehearsal.py")


def _with_standin_lists(data: dict, tmp_path: Path) -> dict:
    """The config with its source pointing at a one-image tree in tmp_path (the check is of the
    recipe, not of the stand-in data, which may be absent here)."""
    source = data["shard"]["source"]
    data["paths"]["raw"] = str(tmp_path)
    if source["name"] == "npz":  # the CIFAR-100-LT side by side: a one-image pool
        path = tmp_path / "pool.npz"
        np.savez(path, images=np.zeros((1, 32, 32, 3), np.uint8), labels=np.zeros(1, np.int64))
        source["train"] = str(path)
        return data
    for key in ("train", "val", "test"):
        path = tmp_path / Path(source[key]).name
        path.write_text("train/x/1.jpg 0\n")
        source[key] = str(path)
    source["root"] = str(tmp_path)
    return data


def test_both_datasets_have_a_config():
    assert [c.stem for c in CONFIGS] == [
        "rehearsal_cifar100_lt",
        "rehearsal_imagenet_lt",
        "rehearsal_places_lt",
    ]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_is_a_valid_params_file_for_dvc(config, tmp_path):
    data = _with_standin_lists(yaml.safe_load(config.read_text()), tmp_path)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    params = load_params(path)
    assert params.shard.source.name in ("imagenet_lt", "places_lt", "npz")
    assert params.stage1.model == "ecvl-tiny-rn" and params.stage1.epochs == 1
    assert params.stage2.epochs == 2 and params.stage2.modes[-1] == "ecvl"
    dvc_text = (REPO / "dvc.yaml").read_text()
    wanted = set(re.findall(r"\$\{([\w.]+)\}", dvc_text))
    for stage in yaml.safe_load(dvc_text)["stages"].values():
        wanted.update(stage.get("params", []))
    for key in wanted:
        node = data
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"{config.name} lacks {key}"
            node = node[part]


def test_workdir_params_moves_artifacts_and_swaps_lists(tmp_path):
    rehearsal = _rehearsal()
    data = yaml.safe_load(CONFIGS[1].read_text())
    out = rehearsal.workdir_params(
        data, tmp_path / "w", tmp_path / "lists", ["stage1.epochs=3", "stage2.modes=[ecvl]"]
    )
    assert out["paths"]["raw"] == data["paths"]["raw"]
    assert out["paths"]["shards"] == str(tmp_path / "w" / "data/shards")
    assert all(
        Path(v).is_relative_to(tmp_path / "w") for k, v in out["paths"].items() if k != "raw"
    )
    assert out["shard"]["source"]["val"] == str(tmp_path / "lists" / "ImageNet_LT_val.txt")
    assert out["stage1"]["epochs"] == 3 and out["stage2"]["modes"] == ["ecvl"]
    assert data["stage1"]["epochs"] == 1  # the loaded config is left as it was


def test_workdir_params_for_a_clone_keeps_paths_and_makes_lists_absolute(tmp_path):
    """`--dvc` runs in a clone of the repository: artifact paths stay as the file names them,
    and a list file named relative to the repository still resolves from the clone."""
    rehearsal = _rehearsal()
    data = yaml.safe_load(CONFIGS[0].read_text())
    out = rehearsal.workdir_params(data, tmp_path / "w", None, [], move_paths=False)
    assert out["paths"]["raw"] == str(REPO / data["paths"]["raw"])  # input data, not the clone's
    assert {k: v for k, v in out["paths"].items() if k != "raw"} == {
        k: v for k, v in data["paths"].items() if k != "raw"
    }
    train = data["shard"]["source"]["train"]
    assert not Path(train).is_absolute()
    assert out["shard"]["source"]["train"] == str(REPO / train)


def _keys(data: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in data.items():
        out.add(prefix + key)
        if isinstance(value, dict) and key not in ("source", "test_source"):
            out |= _keys(value, f"{prefix}{key}.")
    return out


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_spells_out_every_params_yaml_key(config):
    """A whole params file, as the presets are: a key params.yaml gains or loses shows here."""
    assert _keys(yaml.safe_load(config.read_text())) == _keys(
        yaml.safe_load((REPO / "params.yaml").read_text())
    )


def _compare_module():
    return load_script("benchmarks/rehearsal_compare.py")


def _fake_run(ms: dict[str, float], count: int, second_ok: bool = True) -> dict:
    stages = [
        {
            "stage": name,
            "returncode": 0,
            "seconds": value * count / 1000,
            "peak_rss_mb": 900.0,
            "load_before": 1.0,
            "load_after": 1.0,
            "per_unit": {"count": count, "unit": "image"},
            "ms_per_unit": value,
        }
        for name, value in ms.items()
    ]
    return {
        "params": "p.yaml",
        "machine": {"cpus": 2},
        "stages": stages,
        "second_repro": {"seconds": 5.0, "up_to_date": second_ok},
    }


def test_compare_flags_a_stage_slower_per_image_than_the_baseline():
    compare = _compare_module().compare
    stages = ("shard", "stage1", "export", "stage2", "evaluate", "package")
    base = _fake_run(dict.fromkeys(stages, 1.0), 10_000)
    fine = compare(base, _fake_run(dict.fromkeys(stages, 1.4), 100_000), 60, 8, 1.5)
    assert all(fine["goals"].values())
    assert [s["ratio"] for s in fine["stages"]] == [1.4] * 6
    slow = compare(
        base, _fake_run({**dict.fromkeys(stages, 1.0), "stage2": 1.6}, 100_000), 60, 8, 1.5
    )
    assert not slow["goals"]["per_image_within_ratio"]
    assert [s["stage"] for s in slow["stages"] if not s["meets_ratio"]] == ["stage2"]
    long = compare(base, _fake_run(dict.fromkeys(stages, 1.0), 1_000_000), 60, 8, 1.5)
    assert not long["goals"]["within_minutes"]  # 6 stages × 1,000 s
    stale = compare(base, _fake_run(dict.fromkeys(stages, 1.0), 100, second_ok=False), 60, 8, 1.5)
    assert not stale["goals"]["second_repro_changes_nothing"]


def test_compare_table_and_summary_follow_the_figures(tmp_path):
    module = _compare_module()
    stages = ("shard", "stage1", "export", "stage2", "evaluate", "package")
    base = _fake_run(dict.fromkeys(stages, 1.0), 10_000)
    run = _fake_run({**dict.fromkeys(stages, 1.0), "export": 1.25}, 100_000)
    run["params"] = "benchmarks/configs/rehearsal_places_lt.yaml"
    run["dataset"] = {"classes": 365, "counts": {"train": 62_500}}
    paths = [tmp_path / "rehearsal_cifar100_lt.json", tmp_path / "rehearsal_places_lt.json"]
    for path, data in zip(paths, (base, run), strict=True):
        path.write_text(json.dumps(data))
    out = tmp_path / "compare.json"
    argv = ["x", "--baseline", str(paths[0]), str(paths[1]), "--out", str(out)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.argv", argv)
        module.main()
    result = json.loads(out.read_text())
    table = result["table"].splitlines()
    assert (
        table[0]
        == "| stage | CIFAR-100-LT (? classes, 0 train) | Places-LT (365 classes, 62,500 train) |"
    )
    assert len(table) == 2 + len(stages) + 1
    assert "(**1.25×**)" in next(line for line in table if line.startswith("| export |"))
    assert "at most 1.25× CIFAR-100-LT's" in result["summary"]
    assert "Places-LT 10 min" in result["summary"]  # 6 stages × 100 s
    assert result["meets_goals"] is True
