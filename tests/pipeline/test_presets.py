"""Shipped params presets: each is a valid params file, and cifar100_lt builds CIFAR-100-LT."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import pipeline
from pipeline.cli import main
from pipeline.params import load_params
from support import ARTIFACTS, CIFAR_POOL

PRESETS = sorted((Path(pipeline.__file__).parent / "presets").glob("*.yaml"))


def test_presets_ship():
    assert [p.stem for p in PRESETS] == [
        "cifar100_lt",
        "cifar100_lt_paper",
        "cifar100_lt_rn50",
        "imagenet_lt_rn50",
        "own_data_rn50",
        "places_lt_rn50",
    ]


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_marks_at_most_three_keys_to_edit(preset):
    assert sum("# EDIT" in line for line in preset.read_text().splitlines()) <= 3


@pytest.mark.parametrize("name", ["own_data_rn50", "imagenet_lt_rn50", "places_lt_rn50"])
def test_rn50_presets_train_as_cifar100_lt_rn50(name):
    """One set of RN50 training values: a change to cifar100_lt_rn50.yaml's stage I, export or
    stage II is made to every RN50 preset. The presets for many classes bound the text tower
    (`text_batch_size`), and those for 1,000 / 365 classes take larger stage-I batches."""
    base = yaml.safe_load((PRESETS[0].parent / "cifar100_lt_rn50.yaml").read_text())
    data = yaml.safe_load((PRESETS[0].parent / f"{name}.yaml").read_text())
    allowed = {"text_batch_size", "batch_size"} if name != "own_data_rn50" else {"text_batch_size"}
    stage1 = {k: v for k, v in data["stage1"].items() if k not in allowed}
    assert stage1 == {k: v for k, v in base["stage1"].items() if k not in allowed}
    assert data["stage1"]["text_batch_size"] == 250
    for section in ("base", "prompts", "export", "stage2", "evaluate", "package"):
        assert data[section] == base[section], section


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_is_a_valid_params_file(preset, tmp_path, tiny_npz):
    data = yaml.safe_load(preset.read_text())
    source = data["shard"]["source"]
    for key in ("train", "val", "test"):  # a tiny stand-in: the recipe is checked, not the data
        if isinstance(source.get(key), str):
            source[key] = str(tiny_npz["train"])
    if "root" in source and not source.get("download") and not Path(source["root"]).exists():
        source["root"] = str(tmp_path)  # the user's image root (marked EDIT)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    params = load_params(path)
    assert params.stage2.modes[-1] == "ecvl"  # the `stage2` metric row is the method's own


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR_POOL.is_file(), reason=f"CIFAR-100 pool not at {CIFAR_POOL}")
def test_cifar100_lt_preset_builds_the_standard_long_tail(tmp_path):
    data = yaml.safe_load((Path(pipeline.__file__).parent / "presets/cifar100_lt.yaml").read_text())
    data["shard"]["source"] = {"name": "npz", "train": str(CIFAR_POOL)}  # the README's pool variant
    data["paths"] = {name: str(tmp_path / rel) for name, rel in ARTIFACTS.items()}
    data["base"]["progress"] = False
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(main, ["shard", "--params", str(path)])
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "data/shards/meta.json").read_text())
    train = meta["splits"]["train"]["per_class"]
    assert sum(train) == 10_847 and max(train) == 500 and min(train) == 5
    assert [len(meta["groups"][g]) for g in ("many", "medium", "few")] == [35, 35, 30]
    val = meta["splits"]["val"]["per_class"]
    # balanced val from what the long tail left: class 0 kept all 500 of its pool images
    assert val[0] == 0 and set(val[1:]) == {20}
    assert "test" not in meta["splits"] or meta["splits"]["test"]["count"] == 0


def _dotted(data: dict, key: str) -> bool:
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_copied_to_params_yaml_satisfies_dvc_yaml(preset):
    """`cp <preset> params.yaml && dvc repro` is the documented use: every `${...}` that dvc.yaml
    interpolates and every params key a stage lists must be in the preset itself."""
    root = Path(pipeline.__file__).parent.parent
    dvc_text = (root / "dvc.yaml").read_text()
    data = yaml.safe_load(preset.read_text())
    wanted = set(re.findall(r"\$\{([\w.]+)\}", dvc_text))
    for stage in yaml.safe_load(dvc_text)["stages"].values():
        wanted.update(stage.get("params", []))
    assert wanted, "dvc.yaml names no params"
    missing = sorted(k for k in wanted if not _dotted(data, k))
    assert not missing, f"{preset.name} lacks {missing}"


@pytest.mark.parametrize("name", ["cifar100_lt", "cifar100_lt_paper", "cifar100_lt_rn50"])
def test_cifar100_preset_without_internet_stops_at_once(name, tmp_path, monkeypatch):
    """`cp pipeline/presets/<name>.yaml params.yaml && dvc repro` in a fresh clone with no
    network: `ecvl shard` stops at its first request with one line saying how to get the data."""
    import urllib.error
    import urllib.request

    requests = []

    def offline(request, *args, **kwargs):
        requests.append(getattr(request, "full_url", request))
        raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data/raw").mkdir(parents=True)  # what a clone holds (data/raw/README.md)
    (tmp_path / "params.yaml").write_text(
        (Path(pipeline.__file__).parent / "presets" / f"{name}.yaml").read_text()
    )
    result = CliRunner().invoke(main, ["shard", "--params", "params.yaml"])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: shard: CIFAR-100 download failed ([Errno -3] Temporary failure in name "
        "resolution); without internet, fetch "
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz on a machine that has it and "
        "unpack it into data/raw/cifar100 (giving data/raw/cifar100/cifar-100-python/)"
    ]
    assert requests and all("cifar-100-python.tar.gz" in str(u) for u in requests)
    assert not (tmp_path / "data/shards").exists()
