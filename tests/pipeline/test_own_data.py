"""The README's promise for your own data: clone, copy one preset, change at most 3 keys, and
`dvc repro` gives a trained, packaged classifier that `ecvl predict` uses. The GPU preset runs
here as its CPU-sized twin (`tests/own_data_twin.yaml`: model, epochs and device-sized keys
only) on a small image folder."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
import yaml

from support import REPO, dvc_project, sh, write_pngs

PRESET = REPO / "pipeline/presets/own_data_rn50.yaml"
TWIN = REPO / "tests/own_data_twin.yaml"
# Keys a CPU twin may change: the model, the epochs, and what is sized for the device.
TWIN_KEYS = {
    "base.device",
    "base.num_workers",
    "base.progress",
    "stage1.model",
    "stage1.pretrained",
    "stage1.epochs",
    "stage1.batch_size",
    "stage1.eval_batch_size",
    "stage1.text_batch_size",
    "export.batch_size",
    "stage2.epochs",
    "stage2.batch_size",
    "stage2.encode_batch_size",
    "stage2.eval_batch_size",
    "evaluate.batch_size",
}


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and key != "source":
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def edit_keys(text: str) -> list[str]:
    """The dotted keys the preset marks `# EDIT`: what a user sets."""
    keys, stack = [], []
    for line in text.splitlines():
        match = re.match(r"^( *)([\w]+):", line)
        if not match or line.lstrip().startswith("#"):
            continue
        depth = len(match.group(1)) // 2
        stack[depth:] = [match.group(2)]
        if "# EDIT" in line:
            keys.append(".".join(stack))
    return keys


def _set(data: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        data = data[part]
    data[last] = value


def test_preset_marks_at_most_three_keys_to_edit():
    assert edit_keys(PRESET.read_text()) == [
        "paths.raw",
        "shard.source.root",
        "shard.test_per_class",
    ]


def test_twin_differs_from_the_preset_only_in_model_epochs_and_device_keys():
    preset = _flat(yaml.safe_load(PRESET.read_text()))
    twin = _flat(yaml.safe_load(TWIN.read_text()))
    assert set(twin) <= TWIN_KEYS, sorted(set(twin) - TWIN_KEYS)
    assert set(twin) <= set(preset)  # it overrides keys the preset has, adds none
    assert preset["stage1.text_batch_size"] is not None  # the GPU preset bounds the text tower


def _image_folder(root: Path) -> None:
    """Three classes, long-tailed (12 / 6 / 3 train images), 2 test images each."""
    for i, (name, n) in enumerate([("cat", 12), ("dog", 6), ("sea_lion", 3)]):
        write_pngs(root / "train" / name, n, size=40, seed=i)
        write_pngs(root / "test" / name, 2, size=40, seed=10 + i)


@pytest.mark.slow
def test_own_image_folder_to_packaged_classifier_with_dvc(tmp_path):
    project = dvc_project(tmp_path / "clone")
    images = tmp_path / "photos"  # the user's data, outside the clone
    _image_folder(images)

    # cp pipeline/presets/own_data_rn50.yaml params.yaml, then set the keys marked EDIT
    params = yaml.safe_load(PRESET.read_text())
    user = {"paths.raw": str(images), "shard.source.root": str(images), "shard.test_per_class": 0}
    assert sorted(user) == sorted(edit_keys(PRESET.read_text()))
    for key, value in user.items():
        _set(params, key, value)
    for key, value in _flat(yaml.safe_load(TWIN.read_text())).items():
        _set(params, key, value)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    run = sh(project, "dvc", "repro")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    classifier = project / "models/classifier"
    assert (classifier / "classifier.json").is_file() and (classifier / "card.md").is_file()
    card = (classifier / "card.md").read_text()
    assert "- Source: `imagefolder`" in card and "| sea_lion | few | 3 |" in card

    predicted = sh(
        project, "ecvl", "predict", str(images / "test"), "--out", "p.csv", "--top-k", "2"
    )
    assert predicted.returncode == 0, predicted.stderr
    with open(project / "p.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6
    assert {r["class_1"] for r in rows} <= {"cat", "dog", "sea_lion"}
