"""`dvc repro` in a temporary git repo: the way users run the pipeline."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _sh(cwd, *cmd):
    bindir = str(Path(sys.executable).parent)
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "HOME": str(cwd), "DVC_NO_ANALYTICS": "1"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)


@pytest.fixture
def repo(tmp_path):
    for name in ("dvc.yaml", "params.yaml", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    for pkg in ("ecvl", "pipeline"):
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["base"].update(num_workers=0, progress=False)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _sh(tmp_path, "git", "init", "-q").returncode == 0
    assert _sh(tmp_path, "dvc", "init", "-q").returncode == 0
    return tmp_path


@pytest.mark.slow
def test_dvc_repro_shard_then_nothing_to_do(repo):
    run = _sh(repo, "dvc", "repro", "shard")
    assert run.returncode == 0, run.stderr + run.stdout
    assert (repo / "data/shards/meta.json").is_file()
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert lock["stages"]["shard"]["params"]["params.yaml"]["shard"]["imbalance_factor"] == 20
    again = _sh(repo, "dvc", "repro", "shard")
    assert again.returncode == 0
    assert "didn't change, skipping" in again.stdout
    status = _sh(repo, "dvc", "status")
    assert "up to date" in status.stdout
