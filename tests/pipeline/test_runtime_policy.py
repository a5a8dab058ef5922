"""The CLI sets OpenMP's wait policy for the streaming stages only, before torch loads, and
never over the user's own value."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Runs the CLI's stage wrapper with a stub stage that reports what the stage would see.
PROBE = """
import os, sys, types
from pipeline import cli
from pipeline.params import load_params
params = load_params(sys.argv[2])
params.base.__dict__["num_workers"] = int(sys.argv[3])
report = lambda p: print(os.environ.get("OMP_WAIT_POLICY"), "torch" in sys.modules)
stub = types.SimpleNamespace(run=report)
cli.importlib = types.SimpleNamespace(import_module=lambda name: stub)
cli.run_loaded_stage(sys.argv[1], params)
"""


def probe(stage: str, workers: int = 2, given: str | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    args = [sys.executable, "-c", PROBE, stage, str(ROOT / "params.yaml"), str(workers)]
    out = subprocess.run(args, env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.parametrize(
    ("stage", "workers", "given", "expected"),
    [
        ("stage1", 2, None, "PASSIVE False"),  # set, and torch not yet loaded
        ("export", 2, None, "PASSIVE False"),
        ("stage1", 0, None, "None False"),  # no data workers to make room for
        ("stage2", 2, None, "None False"),  # no worker processes: OpenMP's default is faster
        ("evaluate", 2, None, "None False"),
        ("stage1", 2, "ACTIVE", "ACTIVE False"),  # the user's value wins
    ],
)
def test_openmp_wait_policy(stage, workers, given, expected):
    assert probe(stage, workers, given) == expected
