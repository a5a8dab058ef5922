"""What users read says what is true now: no development history, tables that are the copies
they claim to be, readings of them that still hold, links that resolve, params and options that
exist, and the set-up commands CI runs."""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from ecvl.metrics import SUMMARY_KEYS
from pipeline.cli import main
from pipeline.params import Params
from support import REPO, history_phrases, load_script

README = REPO / "README.md"
DOCS = sorted((REPO / "docs").rglob("*.md"))
MARKDOWN = [README, *DOCS, REPO / "benchmarks/README.md", REPO / "data/raw/README.md"]
PARAMS_FILES = [
    REPO / "params.yaml",
    *sorted((REPO / "pipeline/presets").glob("*.yaml")),
    *sorted((REPO / "benchmarks/configs").glob("*.yaml")),
]


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


# --- no development history -------------------------------------------------------------------


@pytest.mark.parametrize("path", MARKDOWN + PARAMS_FILES, ids=_rel)
def test_no_development_history(path):
    assert history_phrases(path.read_text(encoding="utf-8")) == []


def _help_texts() -> dict[str, str]:
    runner = CliRunner()
    texts = {"ecvl": runner.invoke(main, ["--help"]).output}
    for name in main.commands:
        texts[f"ecvl {name}"] = runner.invoke(main, [name, "--help"]).output
    return texts


def test_cli_help_tells_no_history():
    texts = _help_texts()
    assert {"ecvl", "ecvl shard", "ecvl predict", "ecvl seeds"} <= set(texts)
    assert {
        name: history_phrases(text) for name, text in texts.items() if history_phrases(text)
    } == {}


@pytest.mark.parametrize(
    "text",
    [
        "Last re-run for issue #14's `stage1.label_smoothing`.",
        "Against the previous committed run (another machine), stage I moved.",
        "On the machine of the previous session this table read 79.8.",
        "The goal of issue 13 is met.",
        "It was +0.54 before #13.",
        "The pre-#16 path took 26 min.",
        "Timed at commit ea883ed on 2 cores.",
        "today's PNG members",
        "no GPU has been lent since",
        "runs 2-3 shared the cores with another engineer's job",
        "the worktree at cf107b4 ran it",
        "These figures predate the raw shards.",
        "<!-- a:start -->\n<!-- a:end -->\nthe worktree at cf107b4 ran it",
        "<!-- a:start -->\nrun for issue #14\n<!-- a:end -->",
    ],
)
def test_history_detector_flags_history(text):
    assert history_phrases(text), text


@pytest.mark.parametrize(
    "text",
    [
        "Stage I keeps its last epoch, not the best.",
        "The view bank costs 8 forwards per sample, once (`train/bank`, N×E×d float16).",
        "See [Resume](#resume-gpus-and-torchrun-with-dvc) and 16,400 img/s at 0x80.",
        "<!-- compare-runs:start params=0123456789abcdef -->",
        "```\n| ├── 4f2a9c1 [t5-ecvl] | 1 |\n```",
        "<!-- compare-runs:start p=1 -->\n| ├── d206dc5 [t5-ecvl] | 1 |\n<!-- compare-runs:end -->",
        "wnid n01440764, ImageNet_LT_val.txt, bf16, cuda:0",
    ],
)
def test_history_detector_passes_what_is_true_now(text):
    assert history_phrases(text) == []


# --- tables copied from reports ---------------------------------------------------------------

COPIED = re.compile(r"^<!-- copied from (\S+) -->$")


def _tables(lines: list[str]) -> list[str]:
    """Every markdown table in `lines`: each run of consecutive lines starting with `|`."""
    tables, current = [], []
    for line in [*lines, ""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append("\n".join(current))
            current = []
    return tables


def _copied_tables(text: str) -> list[tuple[str, str]]:
    """(report path, table) for every table the README marks as a copy: the marker line
    `<!-- copied from reports/x.md -->` right before the table."""
    lines, out = text.splitlines(), []
    for i, line in enumerate(lines):
        match = COPIED.match(line)
        if match:
            (table, *_) = _tables(lines[i + 1 :]) or [""]
            assert lines[i + 1 : i + 2] == table.splitlines()[:1], (
                f"the marker for {match.group(1)} is not right before a table"
            )
            out.append((match.group(1), table))
    return out


def _copy_of(report: str, header: str = "| Method |") -> str:
    """The README's copy of the table from `report` whose header starts with `header`."""
    (table,) = [
        t
        for r, t in _copied_tables(README.read_text(encoding="utf-8"))
        if r == report and t.startswith(header)
    ]
    return table


def test_readme_results_tables_are_verbatim_copies_of_the_reports():
    """Each marked table is, header and rows, one whole table of the report it names."""
    text = README.read_text(encoding="utf-8")
    copies = _copied_tables(text)
    reports = [report for report, _ in copies]
    assert {"reports/results.md", "reports/cifar100_lt.md", "reports/cifar100_lt_paper.md"} <= set(
        reports
    )
    kinds = [(report, table.splitlines()[0]) for report, table in copies]
    assert len(kinds) == len(set(kinds)), "one table of each kind per report"
    for report, table in copies:
        assert report.startswith("reports/") and report.endswith(".md"), report
        assert table.count("\n") >= 3, report
        in_report = _tables((REPO / report).read_text(encoding="utf-8").splitlines())
        assert table in in_report, (
            f"the README's table from {report} is not one of its tables: copy it again"
        )
    # and no results table in the README that does not say where it comes from
    headers = [
        i for i, line in enumerate(text.splitlines()) if line.startswith(("| Method |", "| Mode |"))
    ]
    assert len(headers) == len(copies)


def test_copied_tables_are_found_whole():
    text = "x\n<!-- copied from reports/a.md -->\n| h |\n| - |\n| 1 |\n\nprose\n| other |\n"
    assert _copied_tables(text) == [("reports/a.md", "| h |\n| - |\n| 1 |")]
    # a table cut short is not a copy of the whole one
    report = _tables("| h |\n| - |\n| 1 |\n| 2 |\n".splitlines())
    assert report == ["| h |\n| - |\n| 1 |\n| 2 |"]
    assert "| h |\n| - |\n| 1 |" not in report


def _rows(table: str) -> dict[str, dict[str, float]]:
    """Method → column → value (the mean of `mean ± std` cells)."""
    lines = table.splitlines()
    columns = [c.strip() for c in lines[0].strip("|").split("|")][1:]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = {
            c: float(v.split("±")[0]) for c, v in zip(columns, cells[1:], strict=True)
        }
    return rows


def _stds(table: str) -> dict[str, dict[str, float]]:
    lines = table.splitlines()
    columns = [c.strip() for c in lines[0].strip("|").split("|")][1:]
    return {
        cells[0]: {c: float(v.split("±")[1]) for c, v in zip(columns, cells[1:], strict=True)}
        for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])
    }


STAGE1 = "Stage I (fine-tuned)"
PROBE = "Linear probe (cross-entropy, long-tailed sampling)"
ECVL = "Stage II: full ECVL"
CONTROL = "Stage II: ECVL with every score = the mean (control)"


def test_readme_reading_of_the_tables_still_holds():
    """The sentences under the results tables, as checks: when a re-copied table says otherwise,
    this fails and the reading must be written again."""
    default, cifar = _copy_of("reports/results.md"), _copy_of("reports/cifar100_lt.md")
    rows = _rows(default)
    adapters = [r for r in rows if r.startswith("Stage II:")]
    assert len(adapters) == 4
    # "every stage-II adapter lifts stage I on All, while the linear probe falls far behind on Few"
    assert all(rows[r]["All"] > rows[STAGE1]["All"] for r in adapters)
    assert rows[PROBE]["Few"] < rows[STAGE1]["Few"] / 2
    # "no stage-II row beats stage I on All, Few or macro F1 ... it trades Few accuracy for Many"
    rows = _rows(cifar)
    stage2 = [r for r in rows if r not in ("Zero-shot (before stage I)", STAGE1)]
    assert len(stage2) == 5
    for r in stage2:
        for column in ("All", "Few", "Macro F1"):
            assert rows[r][column] < rows[STAGE1][column], (r, column)
    assert all(rows[r]["Many"] > rows[STAGE1]["Many"] for r in stage2)
    # "full ECVL is level with its control: on every column the two differ by less than the
    # seed spread"
    stds = _stds(cifar)
    for column, value in rows[ECVL].items():
        spread = max(stds[ECVL][column], stds[CONTROL][column])
        assert abs(value - rows[CONTROL][column]) < spread, column
    # the paper's stage I: "balanced sampling lifts stage I's Few accuracy and macro F1; the
    # contrastive loss and the memorisation score add only within the seed spread, and full
    # ECVL is level with its control. The preset packages the control's head, the best mean
    # val macro F1."
    paper = _copy_of("reports/cifar100_lt_paper.md")
    rows, stds = _rows(paper), _stds(paper)
    adapters = [r for r in rows if r.startswith("Stage II:")]
    for r in adapters:
        assert (
            rows[r]["Few"] > rows[STAGE1]["Few"] and rows[r]["Macro F1"] > rows[STAGE1]["Macro F1"]
        )
    ballad = "Stage II: adapter + balanced sampling (BALLAD-like)"
    for r in adapters:
        for column in ("Few", "Macro F1"):
            spread = max(stds[r][column], stds[ballad][column])
            assert abs(rows[r][column] - rows[ballad][column]) < spread, (r, column)
    for column, value in rows[ECVL].items():
        spread = max(stds[ECVL][column], stds[CONTROL][column])
        assert abs(value - rows[CONTROL][column]) < spread, column
    best = max(adapters + [STAGE1, PROBE], key=lambda r: rows[r]["Macro F1"])
    assert best == CONTROL
    assert _preset("cifar100_lt_paper")["package"]["mode"] == "ecvl_uniform"
    assert _preset("cifar100_lt")["package"]["mode"] == "stage1"
    # "the memorisation score hardly separates samples and still rises with class size"
    memo = _copy_of("reports/cifar100_lt_paper.md", "| Mode |")
    for line in memo.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        spearman, many, few = (float(c.split(" ± ")[0]) for c in (cells[1], cells[2], cells[4]))
        assert spearman > 0 and abs(many - few) < 0.05, line


def _preset(name: str) -> dict:
    return yaml.safe_load((REPO / f"pipeline/presets/{name}.yaml").read_text(encoding="utf-8"))


def _section(text: str, title: str) -> str:
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def test_numbers_in_the_results_prose_come_from_the_reports():
    """A number written in the prose of "Results" appears in a report it cites."""
    section = _section(README.read_text(encoding="utf-8"), "Results")
    prose = "\n".join(line for line in section.splitlines() if not line.startswith("|"))
    cited = set(re.findall(r"reports/[\w.]+\.md", section))
    reports = "\n".join((REPO / c).read_text(encoding="utf-8") for c in cited)
    numbers = re.findall(r"(?<![\w.])\d+\.\d+(?![\w])", prose)
    assert numbers, "the reading quotes no figure"
    assert [n for n in numbers if n not in reports] == []


# --- what the docs name exists ----------------------------------------------------------------

PARAM_NAME = re.compile(
    r"(?<![\w/.-])(base|paths|prompts|shard|stage1|export|stage2|evaluate|package)\.([a-z_]+)\b"
)
FILE_SUFFIXES = {"py", "json", "csv", "pt", "yaml", "md", "h5", "png"}


def _unknown_params(text: str) -> list[str]:
    """`section.key` names in `text` that are not params. Keys as params.yaml spells them: a
    field whose name cannot be the key (`lambda`, a Python keyword) carries its YAML spelling
    in its metadata, as the schema reads it. A key quoted in the error for an unknown key is
    misspelt on purpose."""
    sections = {
        name: {f.metadata.get("key", f.name) for f in dataclasses.fields(kind) if f.init}
        for name, kind in typing.get_type_hints(Params).items()
    }
    unknown = []
    for match in PARAM_NAME.finditer(text):
        section, key = match.groups()
        if key in FILE_SUFFIXES or key in SUMMARY_KEYS:
            continue  # stage1.py, metrics/stage1.json, the metric stage1.all_acc
        if text.startswith(": unknown key", match.end()):
            continue
        if key not in sections[section]:
            unknown.append(f"{section}.{key}")
    return unknown


def test_every_param_the_docs_name_exists():
    unknown = {
        f"{_rel(path)}: {name}"
        for path in MARKDOWN
        for name in _unknown_params(path.read_text(encoding="utf-8"))
    }
    assert sorted(unknown) == []


def test_param_check_reads_yaml_keys_and_still_catches_wrong_ones():
    assert _unknown_params("`stage2.lambda`, `stage1.epochs`, metrics/stage1.json") == []
    assert _unknown_params("error: p.yaml: shard.imbalance_factr: unknown key (did you…)") == []
    assert _unknown_params("`stage2.residual_ratio`, `shard.imbalance_factr: 5`") == [
        "stage2.residual_ratio",
        "shard.imbalance_factr",
    ]


def test_every_ecvl_option_the_docs_show_exists():
    for path in MARKDOWN:
        for line in path.read_text(encoding="utf-8").splitlines():
            match = re.search(
                r"\becvl (predict|seeds|shard|stage1|export|stage2|evaluate|package)\b(.*)", line
            )
            if not match:
                continue
            command = main.commands[match.group(1)]
            options = {o for p in command.params for o in getattr(p, "opts", [])}
            options |= {o for p in command.params for o in getattr(p, "secondary_opts", [])}
            shown = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", match.group(2)))
            assert shown <= options, (_rel(path), line)


LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of `path`."""
    out = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


def test_links_between_the_docs_resolve():
    broken = []
    for path in MARKDOWN:
        for target in LINK.findall(path.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):
                continue  # https://, mailto:
            file, _, anchor = target.partition("#")
            resolved = (path.parent / file).resolve() if file else path
            if not resolved.exists() or (anchor and anchor not in _anchors(resolved)):
                broken.append(f"{_rel(path)}: {target}")
    assert broken == []


# --- set-up, limits, licence ------------------------------------------------------------------


def test_readme_gives_the_commands_ci_runs():
    ci = (REPO / ".ci/run").read_text(encoding="utf-8")
    (test_command,) = [line for line in ci.splitlines() if line.startswith("python3 -m venv")]
    readme = README.read_text(encoding="utf-8")
    setup = _section(readme, "Set up")
    assert f"\n{test_command}\n" in setup  # (b), verbatim
    run_command = test_command.removesuffix("&& pytest") + "&& dvc repro"
    assert f"\n{run_command}\n" in setup  # (a)
    assert readme.index("## Set up") < readme.index("## Results")


def test_readme_is_short():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 400


def test_licence_is_the_one_pyproject_states():
    licence = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert licence.startswith("MIT License\n\nCopyright (c) 2026 ECVL contributors\n")
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert 'license = { text = "MIT" }' in pyproject


def test_readme_cites_the_paper():
    readme = README.read_text(encoding="utf-8")
    assert "https://doi.org/10.3390/s23156694" in readme
    assert "doi     = {10.3390/s23156694}" in readme


# --- the generated compare-runs example -------------------------------------------------------


def _compare_runs():
    return load_script("docs/compare_runs.py")


def test_compare_runs_example_was_made_from_these_params():
    script = _compare_runs()
    doc = (REPO / "docs/comparing_runs.md").read_text(encoding="utf-8")
    assert script.recorded_digest(doc) == script.params_digest(), (
        "docs/comparing_runs.md was made from other params: run `python docs/compare_runs.py`"
    )
    block = doc[doc.index(script.START) : doc.index(script.END)]
    rows = [line.split("|")[1].strip() for line in block.splitlines() if line.startswith("|")]
    assert "main" in rows[2:] and all(any(f"t5-{m}" in r for r in rows) for m in script.MODES)
    assert script.render(block.split("```\n\n", 1)[1], script.params_digest()).startswith(block)


def test_compare_runs_digest_follows_the_params_not_their_comments(tmp_path):
    script = _compare_runs()
    text = (REPO / "params.yaml").read_text(encoding="utf-8")
    (tmp_path / "same.yaml").write_text(
        "# a new comment\n" + text.replace("progress: true", "progress: false")
    )
    (tmp_path / "other.yaml").write_text(text.replace("lambda: 0.2", "lambda: 0.3"))
    assert script.params_digest(tmp_path / "same.yaml") == script.params_digest()
    assert script.params_digest(tmp_path / "other.yaml") != script.params_digest()
    assert script.recorded_digest("no generated block") is None


def test_params_comments_state_the_default_reshaping():
    """Where a user first copies params, the embedded default says it reshapes its data."""
    text = (REPO / "params.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text)["shard"]
    assert (data["imbalance_factor"], data["n_max"], data["test_per_class"]) == (20, 110, 40)
    comment = text[text.index("shard:") : text.index("  source:")]
    for stated in ("40 images per class held out as test", "imbalance_factor 20", "n_max 110"):
        assert stated in " ".join(comment.replace("#", "").split())


# --- rehearsal figures ------------------------------------------------------------------------


def test_rehearsal_table_and_reading_come_from_the_committed_comparison():
    """benchmarks/README.md's rehearsal table and the README's one-line reading are what
    `benchmarks/rehearsal_compare.py` makes of the committed rehearsal JSONs."""
    module = load_script("benchmarks/rehearsal_compare.py")
    result = json.loads((REPO / "benchmarks/results/rehearsal_compare.json").read_text())
    assert module.markdown(result) == result["table"]
    assert module.summary(result) == result["summary"]
    assert result["meets_goals"] is True
    assert result["table"] in (REPO / "benchmarks/README.md").read_text(encoding="utf-8")
    flat = " ".join(README.read_text(encoding="utf-8").split())
    assert result["summary"] in flat
