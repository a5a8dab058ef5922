"""Every bad input in `tests/bad_inputs.py`: one `error:` line naming the file, key or value,
its exit code, no traceback, no line longer than 1,000 characters, no temporary file left, and
nothing already written changed (the case's directory is the working directory, so even
relative default paths would land there); a case that exits 0 keeps every file it did not
write itself."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from click.testing import CliRunner

from bad_inputs import CASES, TABLE_DOC, UP, Case, doc_with_table, render_table
from pipeline.cli import main
from support import write_params

SKIP = {"checkpoints", "logs"}  # resumable state and timings may be written before a failure


def _snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` and a digest of its bytes (folders alone are no output)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).parts[0] not in SKIP
    }


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """shard → stage1 → export → stage2 once (1 epoch each), for the cases that need artifacts."""
    root = tmp_path_factory.mktemp("upstream")
    params = write_params(root, **UP)
    for stage in ("shard", "stage1", "export", "stage2"):
        result = CliRunner().invoke(main, [stage, "--params", str(params)])
        assert result.exit_code == 0, (stage, result.output)
    return root


def _temporaries(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if ".tmp-" in p.name]


def test_at_least_seventy_kinds_each_once():
    assert len(CASES) >= 70
    assert len({c.id for c in CASES}) == len(CASES)
    assert all(c.code != 0 or c.check is not None for c in CASES)  # exit 0 only when harmless


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input(case: Case, tmp_path, request, monkeypatch, caplog):
    up = request.getfixturevalue("upstream") if case.upstream else None
    monkeypatch.chdir(tmp_path)
    args = case.setup(tmp_path, up, monkeypatch)
    before = _snapshot(tmp_path)
    result = CliRunner().invoke(main, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"uncaught {result.exception!r}: a traceback"
    )
    assert "Traceback" not in result.output
    assert result.exit_code == case.code, result.output
    lines = result.output.splitlines() + [r.getMessage() for r in caplog.records]
    assert max(map(len, lines), default=0) <= 1000
    assert _temporaries(tmp_path) == []  # nothing half-written left behind
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    if case.code == 0:
        assert errors == []
        case.check(tmp_path, result.output + "\n" + caplog.text)
        after = _snapshot(tmp_path)
        kept = {p: h for p, h in before.items() if p not in case.writes}
        assert {p: after.get(p) for p in kept} == kept  # every file the user had is intact
        return
    assert len(errors) == 1, result.output
    assert errors[0].replace(f"{tmp_path}/", "") == f"error: {case.message}"
    assert _snapshot(tmp_path) == before  # nothing written, replaced or half-written


def test_bad_input_table_is_up_to_date():
    text = TABLE_DOC.read_text()
    assert doc_with_table(text, render_table()) == text, (
        f"{TABLE_DOC.name}'s bad-input table is stale: run `python tests/bad_inputs.py`"
    )
