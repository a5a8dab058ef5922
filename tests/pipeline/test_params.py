"""Bad params stop before any work with one line naming the key, exit code 2."""

from dataclasses import fields

import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.params import Params, PathsParams, load_params
from pipeline.schema import ParamsError
from support import write_params


def _run(params_path):
    return CliRunner().invoke(main, ["shard", "--params", str(params_path)])


def _edit(path, fn):
    data = yaml.safe_load(path.read_text())
    fn(data)
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    "edit,message",
    [
        (
            lambda d: d["shard"].update(imbalance_factr=10),
            "shard.imbalance_factr: unknown key (did you mean 'imbalance_factor'?)",
        ),
        (lambda d: d.update(stage9={}), "stage9: unknown key"),
        (
            lambda d: d["shard"].update(maxcount="ten"),
            "shard.maxcount: must be an integer, got 'ten'",
        ),
        (lambda d: d["shard"].update(maxcount=0), "shard.maxcount: must be >= 1, got 0"),
        (
            lambda d: d["shard"].update(max_bad_fraction=1.5),
            "shard.max_bad_fraction: must be <= 1, got 1.5",
        ),
        (lambda d: d["base"].update(seed=True), "base.seed: must be an integer, got True"),
        (
            lambda d: d["base"].update(device="gpu"),
            "base.device: must be auto, cpu, cuda, cuda:N or mps",
        ),
        (
            lambda d: d["shard"].update(source={"name": "mnist"}),
            "shard.source.name: unknown source 'mnist'",
        ),
        (
            lambda d: d["shard"].update(source={"name": "npz", "train": "/no/such.npz"}),
            "shard.source.train: not found: /no/such.npz",
        ),
        (
            lambda d: d["shard"].update(source={"name": "digits", "size": 3}),
            "shard.source.size: unknown key",
        ),
        (lambda d: d["shard"].update(few_below=500), "shard.few_below: must be <= many_above + 1"),
        (
            lambda d: d.setdefault("stage1", {}).update(label_smoothing=1.0),
            "stage1.label_smoothing: must be < 1, got 1.0",
        ),
    ],
)
def test_bad_params_exit_2_with_one_line(tmp_path, edit, message):
    params = _edit(write_params(tmp_path), edit)
    result = _run(params)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
    assert result.output.strip().count("\n") == 0  # one line
    assert not (tmp_path / "data").exists()  # nothing started


def test_missing_params_file(tmp_path):
    result = _run(tmp_path / "nope.yaml")
    assert result.exit_code == 2 and "nope.yaml: params file not found" in result.output


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("base:\n  seed: 0\n shard: [\n")
    result = _run(path)
    assert result.exit_code == 2 and "not valid YAML at line" in result.output


def test_defaults_file_is_valid_and_frozen(tmp_path):
    params = load_params("params.yaml")
    assert params.shard.source.name == "digits"
    with pytest.raises(AttributeError):
        params.base.seed = 3  # frozen


def test_dataclass_defaults_are_params_yaml_values():
    """The defaults users see are params.yaml's: the dataclasses must say the same, and the
    shipped file must list every key, so the two cannot drift apart again."""
    import dataclasses

    from pipeline.schema import build

    data = yaml.safe_load(open("params.yaml").read())
    assert build(Params, data, "params") == Params()
    for f in dataclasses.fields(Params):
        section = getattr(Params(), f.name)
        keys = {g.metadata.get("key", g.name) for g in dataclasses.fields(section)}
        assert set(data[f.name]) == keys, f.name


def _numeric_fields(cls, prefix=""):
    import dataclasses
    import typing

    from ecvl.data.sources import SOURCES

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.metadata.get('key', f.name)}"
        if dataclasses.is_dataclass(tp):
            yield from _numeric_fields(tp, f"{key}.")
        elif f.name in ("source", "test_source"):
            for source in SOURCES.values():
                yield from _numeric_fields(source, f"{key}({source.name}).")
        elif {int, float} & ({tp} | set(typing.get_args(tp))):
            yield key, f.metadata


def test_every_numeric_param_has_both_bounds():
    """A typo (an extra zero, `.inf`) must stop at validation: no number is unbounded."""
    fields = dict(_numeric_fields(Params))
    assert len(fields) >= 40  # the walk saw every section
    unbounded = [k for k, m in fields.items() if m.get("le") is None and m.get("lt") is None]
    no_floor = [k for k, m in fields.items() if m.get("ge") is None and m.get("gt") is None]
    assert unbounded == [] and no_floor == []


def test_eval_prompts_default_to_the_sources_own(tmp_path):
    """The digits template "a photo of the number {}." must not follow a user to their data."""
    data = yaml.safe_load(open("params.yaml").read())  # the shipped file, as a user copies it
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    assert "a photo of the number {}." in load_params(path).prompts.eval_templates  # digits
    (tmp_path / "imgs").mkdir()
    data["shard"]["source"] = {"name": "imagefolder", "root": str(tmp_path / "imgs")}
    path.write_text(yaml.safe_dump(data))
    templates = load_params(path).prompts.eval_templates
    assert templates and not any("number" in t for t in templates)
    data["prompts"]["eval_templates"] = ["a {} here."]  # an explicit list always wins
    path.write_text(yaml.safe_dump(data))
    assert load_params(path).prompts.eval_templates == ("a {} here.",)


def _raw(tmp_path, text: str):
    path = write_params(tmp_path)
    path.write_text(text)
    return path


def test_a_duplicate_key_names_the_key_and_both_lines(tmp_path):
    text = write_params(tmp_path).read_text()
    nested = text.replace("  seed: 0\n", "  seed: 7\n  seed: 0\n")
    with pytest.raises(ParamsError, match=r"duplicate key 'seed' at lines 2 and 3; keep one"):
        load_params(_raw(tmp_path, nested))
    appended = text + "shard:\n  maxcount: 5\n"
    first = 1 + text.splitlines().index("shard:")
    last = 1 + len(text.splitlines())
    with pytest.raises(ParamsError, match=rf"duplicate key 'shard' at lines {first} and {last}"):
        load_params(_raw(tmp_path, appended))


def alias_bomb(levels: int = 30) -> str:
    """A "billion laughs" as the value of `base.seed`: 10**levels items once expanded."""
    lines = ["base:", "  seed:", "    - &l0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"    - &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]")
    return "\n".join(lines) + "\n"


def test_aliases_are_refused_before_they_expand(tmp_path):
    import tracemalloc

    path = _raw(tmp_path, alias_bomb())
    assert path.stat().st_size < 8000
    tracemalloc.start()
    try:
        with pytest.raises(ParamsError, match=r"line 4: YAML aliases \(\*l0\) are not allowed"):
            load_params(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 << 20  # bytes: nothing was expanded


def test_no_message_quotes_a_whole_value(tmp_path):
    path = _edit(write_params(tmp_path), lambda d: d["shard"].update(maxcount="x" * 100_000))
    result = _run(path)
    assert result.exit_code == 2
    assert "(100,002 characters)" in result.output and len(result.output) < 400


def test_a_params_file_may_start_with_a_bom_and_must_be_utf8(tmp_path):
    path = write_params(tmp_path)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert load_params(path).base.seed == 0
    path.write_bytes(path.read_text(encoding="utf-8-sig").encode("utf-16"))
    with pytest.raises(ParamsError, match="UTF-16 text"):
        load_params(path)


@pytest.mark.parametrize(
    ("paths", "message"),
    [
        (
            {"classifier": "models"},
            "paths.classifier: models contains paths.stage1 (models/stage1)",
        ),
        ({"stage2": "models/stage1/heads"}, "paths.stage2: models/stage1/heads lies inside "),
        ({"shards": "imgs"}, "paths.shards: imgs is the same path as shard.source.root"),
        ({"shards": "."}, "paths.shards: . contains paths.raw"),
        (
            {"image_store": "data/embeddings.zarr"},
            "paths.image_store: data/embeddings.zarr is the same path as paths.embeddings",
        ),
        ({"metrics": "data/shards"}, "paths.metrics: data/shards/stage1.json lies inside paths"),
        ({"raw": "data"}, "paths.shards: data/shards lies inside paths.raw (data)"),
    ],
)
def test_overlapping_paths_are_refused_whichever_stage_runs(tmp_path, monkeypatch, paths, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "imgs").mkdir()
    defaults = {f.name: str(getattr(PathsParams(), f.name)) for f in fields(PathsParams)}
    params = write_params(
        tmp_path,
        paths={**defaults, **paths},
        shard={"source": {"name": "imagefolder", "root": "imgs"}},
    )
    for stage in ("shard", "package"):
        result = CliRunner().invoke(main, [stage, "--params", str(params)])
        assert result.exit_code == 2, result.output
        assert f"params.yaml: {message}" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "params.yaml"]


def test_a_list_as_source_name_is_one_line(tmp_path):
    path = _edit(write_params(tmp_path), lambda d: d["shard"].update(source={"name": ["digits"]}))
    result = _run(path)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "shard.source.name: must be a source name, got ['digits']" in result.output
