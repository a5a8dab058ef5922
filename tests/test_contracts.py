"""Architecture contracts: the import direction, and dvc.yaml ↔ CLI ↔ params agreeing."""

import ast
from pathlib import Path

import yaml

from pipeline.cli import STAGES, main
from pipeline.params import Params, PathsParams

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"pipeline", "click", "yaml", "dvc"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_library_never_imports_the_application():
    offenders = {
        str(p.relative_to(ROOT)): sorted(_imports(p) & FORBIDDEN)
        for p in (ROOT / "ecvl").rglob("*.py")
        if _imports(p) & FORBIDDEN
    }
    assert offenders == {}
    assert len(list((ROOT / "ecvl").rglob("*.py"))) > 5  # the walk really saw the library


def test_dvc_stages_match_cli_modules_and_params_sections():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert list(dvc) == list(STAGES)
    sections = set(Params.__dataclass_fields__)
    produced: set[str] = set()
    for name, stage in dvc.items():
        assert stage["cmd"] == f"ecvl {name} --params params.yaml"
        assert name in main.commands
        assert (ROOT / "pipeline" / f"{name}.py").is_file()
        assert f"pipeline/{name}.py" in stage["deps"]
        assert name in stage["params"], f"{name} must list its own params section"
        for dep in stage["deps"]:
            if dep == "${paths.raw}":  # the source data: the one input from outside
                assert name == "shard", f"{name}: only `shard` reads the source data"
                continue
            if dep.startswith("${paths."):  # an upstream artifact, named once in params.yaml
                root = dep[len("${paths.") : dep.index("}")]
                assert root in PathsParams.__dataclass_fields__, dep
                assert dep in produced, f"{name}: {dep} is not an output of an earlier stage"
                continue
            assert (ROOT / dep).exists(), f"{name}: dep {dep} does not exist"
        for kind in ("outs", "metrics", "plots"):  # a later stage may read any of them
            produced |= {next(iter(o)) if isinstance(o, dict) else o for o in stage.get(kind, [])}
        for param in stage["params"]:
            assert param.split(".")[0] in sections


def test_stage_deps_cover_the_library_modules_it_imports():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in dvc.items():
        module = ROOT / "pipeline" / f"{name}.py"
        imported = {
            node.module
            for node in ast.walk(ast.parse(module.read_text()))
            if isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.startswith("ecvl.")
            and node.module != "ecvl.errors"
        }
        for mod in imported:
            rel = mod.replace(".", "/")
            covered = any(
                dep == f"{rel}.py" or rel.startswith(dep.rstrip("/") + "/") or dep == rel
                for dep in stage["deps"]
            )
            assert covered, f"stage {name} imports {mod} but does not list it in deps"


def test_params_file_has_a_section_per_stage():
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert set(STAGES) <= set(data)
