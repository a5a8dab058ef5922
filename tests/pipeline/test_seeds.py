"""`ecvl seeds`: one full pipeline per seed, resumable, and the mean ± std table over seeds."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.seeds import seed_params
from support import ARTIFACTS, write_params


def _invoke(*args):
    return CliRunner().invoke(main, ["seeds", *args])


def test_seed_params_change_only_the_seed_and_the_artifact_paths(tmp_path):
    raw = yaml.safe_load(write_params(tmp_path, stage1={"epochs": 3}).read_text())
    raw["paths"].pop("reports")  # absolute or absent, each path lands under the seed's root
    out = seed_params(raw, 7, Path("runs/x/seed-7"))
    assert out["base"]["seed"] == 7 and raw["base"]["seed"] == 0
    assert out["paths"] == {k: f"runs/x/seed-7/{v}" for k, v in ARTIFACTS.items()}
    for section in ("shard", "stage1", "stage2", "prompts"):
        assert out.get(section) == raw.get(section)


@pytest.mark.parametrize(
    "seeds,message", [("0,x", "comma-separated integers"), ("1,1", "distinct"), ("-1", "non-neg")]
)
def test_bad_seeds_exit_2(tmp_path, seeds, message):
    result = _invoke("--params", str(write_params(tmp_path)), "--seeds", seeds)
    assert result.exit_code == 2 and message in result.output


def test_bad_params_exit_2_before_any_work(tmp_path):
    params = write_params(tmp_path, stage1={"epochs": 0})
    result = _invoke("--params", str(params), "--out", str(tmp_path / "runs"))
    assert result.exit_code == 2 and "stage1.epochs" in result.output
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_two_seeds_run_resume_and_summarise(tmp_path):
    params = write_params(
        tmp_path,
        stage1={"epochs": 1, "batch_size": 32},
        export={"batch_size": 64},
        stage2={"epochs": 1, "batch_size": 32, "modes": ["linear_probe", "ballad"]},
        evaluate={"zero_shot": False},
        package={"mode": "ballad"},
    )
    out = tmp_path / "runs"
    result = _invoke("--params", str(params), "--seeds", "0,1", "--out", str(out))
    assert result.exit_code == 0, result.output

    evals = [json.loads((out / f"seed-{s}/metrics/eval.json").read_text()) for s in (0, 1)]
    seeds = [yaml.safe_load((out / f"seed-{s}/params.yaml").read_text()) for s in (0, 1)]
    assert [p["base"]["seed"] for p in seeds] == [0, 1]
    assert (out / "seed-1/models/stage2/linear_probe/adapter.json").is_file()

    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0, 1]
    cell = summary["table"]["val"]["stage2_linear_probe"]["few_acc"]
    values = [e["val"]["stage2_linear_probe"]["few_acc"] for e in evals]
    assert cell["values"] == values
    assert cell["mean"] == pytest.approx(np.mean(values))
    assert cell["std"] == pytest.approx(np.std(values, ddof=1))
    assert "stage2" not in summary["table"]["test"]  # the alias row is not repeated
    assert set(summary["stage_seconds_mean"]) == {"shard", "stage1", "export", "stage2", "evaluate"}
    # the memorisation diagnostics: the last epoch's row of each seed's plots/stage2.csv
    last = [
        [
            r
            for r in csv.DictReader(open(out / f"seed-{s}/plots/stage2.csv"))
            if r["mode"] == "ballad"
        ][-1]
        for s in (0, 1)
    ]
    memo = summary["memorisation"]
    assert set(memo) == {"ballad"}  # the linear probe has no measurement pass
    for key in ("score_count_spearman", "score_mean_few"):
        assert memo["ballad"][key]["values"] == [float(r[key]) for r in last]
    md = (out / "summary.md").read_text()
    assert "| ballad | " in md and "Spearman per epoch" in md
    assert "| Linear probe (cross-entropy, long-tailed sampling) |" in md and " ± " in md

    # A second call with the same params runs nothing and rewrites the same summary.
    stamp = (out / "seed-0/metrics/eval.json").stat().st_mtime_ns
    result = _invoke("--params", str(params), "--seeds", "0,1", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert (out / "seed-0/metrics/eval.json").stat().st_mtime_ns == stamp
    assert json.loads((out / "summary.json").read_text()) == summary
