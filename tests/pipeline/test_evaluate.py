"""`ecvl evaluate`: tables, metrics JSON, per-class CSV and plot."""

import csv
import json

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from support import write_params

UP = {"stage1": {"epochs": 1, "batch_size": 32}, "export": {"batch_size": 64}}


def _invoke(stage, params):
    return CliRunner().invoke(main, [stage, "--params", str(params)])


def _run_all(root, lam):
    params = write_params(
        root,
        **UP,
        stage2={"epochs": 2, "batch_size": 32, "modes": ["ballad", "ecvl"], "lambda": lam},
    )
    for stage in ("shard", "stage1", "export", "stage2", "evaluate"):
        result = _invoke(stage, params)
        assert result.exit_code == 0, (stage, result.output)
    return root


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    return _run_all(tmp_path_factory.mktemp("evaluate"), 0.2)


def test_outputs(evaluated):
    root = evaluated
    metrics = json.loads((root / "metrics/eval.json").read_text())
    assert set(metrics) == {"test", "val"}
    assert set(metrics["test"]) == {"zero_shot", "stage1", "stage2_ballad", "stage2_ecvl", "stage2"}
    assert metrics["test"]["stage2"] == metrics["test"]["stage2_ecvl"]
    for row in metrics["test"].values():
        assert set(row) == {"many_acc", "medium_acc", "few_acc", "all_acc", "macro_f1"}
    table = (root / "reports/results.md").read_text()
    assert "| Stage II: full ECVL |" in table and "### val split" in table
    assert "random init, so its row is chance level" in table
    with open(root / "plots/per_class.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10 and rows[0]["class"] == "zero"
    assert {"train_count", "group", "acc_stage1", "acc_stage2_ecvl"} <= set(rows[0])
    assert (root / "reports/per_class.png").read_bytes()[:4] == b"\x89PNG"
    assert (root / "reports/class_scores.png").read_bytes()[:4] == b"\x89PNG"
    with open(root / "plots/predictions.csv") as f:
        preds = list(csv.DictReader(f))
    assert len(preds) == 10 * 10  # every test sample (10 classes × test_per_class 10)
    hits = sum(r["actual"] == r["predicted"] for r in preds)
    assert hits / len(preds) == pytest.approx(metrics["test"]["stage2_ecvl"]["all_acc"])


def test_lambda_zero_reproduces_stage1_exactly(tmp_path):
    root = _run_all(tmp_path, 0.0)
    metrics = json.loads((root / "metrics/eval.json").read_text())
    for split in ("test", "val"):
        assert metrics[split]["stage2_ballad"] == metrics[split]["stage1"]
        assert metrics[split]["stage2_ecvl"] == metrics[split]["stage1"]
