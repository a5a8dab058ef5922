"""Class names in other scripts, end to end: shard -> stage I -> export -> stage II -> evaluate ->
package -> predict keep every name and every image (keys stay unique), and the files they
write hold the names as UTF-8."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import main
from support import write_params

NAMES = ["猫", "犬", "鳥", "кошка", "собака"]


@pytest.mark.slow
def test_non_ascii_class_names_end_to_end(tmp_path):
    rng = np.random.default_rng(0)
    for c, name in enumerate(NAMES):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(12):
            pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            pixels[..., c % 3] = 40 * c  # something to learn
            Image.fromarray(pixels).save(tmp_path / "imgs" / name / f"{i}.png")
    params = write_params(
        tmp_path,
        shard={
            "source": {"name": "imagefolder", "root": str(tmp_path / "imgs")},
            "test_per_class": 4,
            "val_per_class": 0,
            "imbalance_factor": None,
            "n_max": None,
        },
        stage1={"epochs": 1, "batch_size": 16},
        export={"batch_size": 32, "bank_views": 2},
        stage2={"epochs": 1, "batch_size": 16, "modes": ["ballad", "ecvl"]},
        evaluate={"zero_shot": False},
    )
    for stage in ("shard", "stage1", "export", "stage2", "evaluate", "package"):
        result = CliRunner().invoke(main, [stage, "--params", str(params)])
        assert result.exit_code == 0, (stage, result.output)
    meta = json.loads((tmp_path / "data/shards/meta.json").read_text())
    assert meta["classes"] == sorted(NAMES)
    assert meta["splits"]["train"]["count"] + meta["splits"]["test"]["count"] == 60
    card = (tmp_path / "models/classifier/card.md").read_text(encoding="utf-8")
    assert all(f"| {name} |" in card for name in NAMES)
    with open(tmp_path / "plots/per_class.csv", encoding="utf-8", newline="") as f:
        assert sorted(row["class"] for row in csv.DictReader(f)) == sorted(NAMES)
    out = tmp_path / "p.csv"
    result = CliRunner().invoke(
        main,
        [
            "predict",
            "--model",
            str(tmp_path / "models/classifier"),
            str(tmp_path / "imgs"),
            "--out",
            str(out),
            "--workers",
            "0",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    with open(out, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 60 and {r["class_1"] for r in rows} <= set(NAMES)
