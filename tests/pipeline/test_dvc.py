"""`dvc repro` in a temporary git repo: the way users run the pipeline."""

import json

import pytest
import yaml

from support import dvc_project, sh


@pytest.fixture
def repo(tmp_path):
    dvc_project(tmp_path)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["base"].update(num_workers=0, progress=False)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return tmp_path


def test_plots_show_draws_one_line_per_stage2_mode_and_its_output_is_ignored(repo):
    (repo / "plots").mkdir()
    (repo / "plots/stage2.csv").write_text(
        "mode,epoch,val_few_acc\nballad,1,0.1\nballad,2,0.2\necvl,1,0.3\necvl,2,0.4\n"
    )
    _git_commit(repo, "plots")
    shown = sh(repo, "dvc", "plots", "show", "--json", "plots/stage2.csv")
    assert shown.returncode == 0, shown.stderr
    spec = json.loads(shown.stdout)["data"]["plots/stage2.csv"][0]["content"]
    assert spec["encoding"]["color"]["field"] == "mode"  # not one line through all modes
    assert sh(repo, "dvc", "plots", "show", "plots/stage2.csv").returncode == 0
    assert (repo / "dvc_plots/index.html").is_file()
    assert sh(repo, "git", "status", "--porcelain").stdout == ""  # dvc_plots/ is ignored


@pytest.mark.slow
def test_dvc_repro_shard_then_nothing_to_do(repo):
    run = sh(repo, "dvc", "repro", "shard")
    assert run.returncode == 0, run.stderr + run.stdout
    assert (repo / "data/shards/meta.json").is_file()
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert lock["stages"]["shard"]["params"]["params.yaml"]["shard"]["imbalance_factor"] == 20
    again = sh(repo, "dvc", "repro", "shard")
    assert again.returncode == 0
    assert "didn't change, skipping" in again.stdout
    status = sh(repo, "dvc", "status", "shard")
    assert "up to date" in status.stdout


def _git_commit(repo, message):
    sh(repo, "git", "add", "-A")
    run = sh(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message)
    assert run.returncode == 0, run.stderr


def _ran(output: str) -> list[str]:
    return [
        line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")
    ]


@pytest.mark.slow
def test_dvc_whole_pipeline_caching_and_metrics_diff(repo):
    params_path = repo / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params["stage1"].update(epochs=2, batch_size=32)
    params["stage2"].update(epochs=2, batch_size=64)
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))

    first = sh(repo, "dvc", "repro")
    assert first.returncode == 0, first.stderr[-3000:] + first.stdout[-3000:]
    assert _ran(first.stdout) == ["shard", "stage1", "export", "stage2", "evaluate", "package"]
    assert (repo / "models/classifier/card.md").is_file()
    table = (repo / "reports/results.md").read_text()
    for row in (
        "Zero-shot",
        "Stage I (fine-tuned)",
        "BALLAD-like",
        "two base views",
        "(control)",
        "full ECVL",
    ):
        assert row in table
    assert (repo / "reports/per_class.png").stat().st_size > 1000
    assert (repo / "dvc.lock").is_file()
    _git_commit(repo, "first run")

    again = sh(repo, "dvc", "repro")
    assert again.returncode == 0 and _ran(again.stdout) == []
    # every stage again: identical outputs, so dvc.lock, plots and reports stay as committed
    forced = sh(repo, "dvc", "repro", "-f")
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert sh(repo, "git", "status", "--porcelain").stdout == ""
    assert (repo / "logs/stage1_timings.csv").is_file()  # timings went where git ignores them

    params["stage2"]["lambda"] = 0.5
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    changed = sh(repo, "dvc", "repro")
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert _ran(changed.stdout) == ["stage2", "evaluate", "package"]

    params["package"]["mode"] = "ballad"  # another head: only the package is rebuilt
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    shipped = sh(repo, "dvc", "repro")
    assert shipped.returncode == 0, shipped.stderr[-3000:]
    assert _ran(shipped.stdout) == ["package"]
    assert '"mode": "ballad"' in (repo / "models/classifier/classifier.json").read_text()

    diff = sh(repo, "dvc", "metrics", "diff", "--all")
    assert diff.returncode == 0, diff.stderr
    assert "metrics/eval.json" in diff.stdout
    assert "test.stage2_ecvl.all_acc" in diff.stdout
    assert "test.stage1.few_acc" in diff.stdout
