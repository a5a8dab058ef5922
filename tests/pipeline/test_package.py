"""`ecvl package` and `ecvl predict` on a tiny pipeline: the classifier reproduces `evaluate`."""

from __future__ import annotations

import csv
import json

import open_clip
import pytest
import torch
import yaml
from click.testing import CliRunner

import ecvl
from ecvl.data.embeddings import open_embeddings
from ecvl.data.reader import eval_pipeline, make_loader
from ecvl.data.shards import load_manifest
from ecvl.metrics import SUMMARY_KEYS
from ecvl.models.adapter import load_adapter
from ecvl.stage2 import predict_cached
from pipeline.cli import main
from pipeline.package import _weights_licence
from pipeline.params import load_params
from pipeline.schema import ParamsError
from support import upstream_paths, write_params, write_pngs

EXPORT_BATCH = 64
SECTIONS = {
    "stage1": {"epochs": 1, "batch_size": 32},
    "export": {"batch_size": EXPORT_BATCH},
    "stage2": {"epochs": 1, "batch_size": 32, "modes": ["linear_probe", "ecvl"]},
    "evaluate": {"zero_shot": False},
}


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("package")
    params = write_params(root, **SECTIONS)
    for stage in ("shard", "stage1", "export", "stage2", "evaluate", "package"):
        result = _invoke(stage, "--params", params)
        assert result.exit_code == 0, (stage, result.output)
    return root


def _test_split_predictions(classifier_dir, root):
    """The classifier on the test shards, batched as the export batched them."""
    classifier = ecvl.load_classifier(classifier_dir)
    urls = load_manifest(root / "data/shards").shard_paths("test")
    preds = []
    with torch.no_grad():
        for x, _, _ in make_loader(eval_pipeline(urls, classifier.preprocess, EXPORT_BATCH), 0):
            preds.append(classifier(x).argmax(dim=1))
    return torch.cat(preds)


@pytest.mark.parametrize("mode", ["ecvl", "linear_probe", "stage1"])
def test_classifier_reproduces_evaluate_exactly(pipeline_run, tmp_path, mode):
    root = pipeline_run
    classifier_dir = root / "models/classifier"
    if mode != "ecvl":  # the default ships ecvl; package the probe beside it
        classifier_dir = tmp_path / "probe"
        params = write_params(
            tmp_path,
            **SECTIONS,
            paths={**_upstream(root), "classifier": str(classifier_dir)},
            package={"mode": mode},
        )
        assert _invoke("package", "--params", params).exit_code == 0
    emb = open_embeddings(root / "data/embeddings.zarr")
    features = torch.from_numpy(emb.split("test").features).float()
    text = torch.from_numpy(emb.text_features())
    if mode == "stage1":  # no head: eq. 6 on the cached embedding, as evaluate's stage I row
        evaluated = (torch.nn.functional.normalize(features, dim=-1) @ text.T).argmax(dim=1)
        shipped = json.loads((classifier_dir / "classifier.json").read_text())
        rows = json.loads((root / "metrics/eval.json").read_text())
        assert shipped["metrics"]["test"] == rows["test"]["stage1"]
        assert "stage2: none (package.mode stage1)" in (classifier_dir / "card.md").read_text()
    else:
        evaluated = predict_cached(
            load_adapter(root / "models/stage2" / mode), features, text, "cpu"
        )
    got = _test_split_predictions(classifier_dir, root)
    assert got.shape == (100,)
    assert torch.equal(got, evaluated)
    if mode == "ecvl":  # and what evaluate wrote: the last mode's test predictions
        with open(root / "plots/predictions.csv") as f:
            written = [r["predicted"] for r in csv.DictReader(f)]
        classes = ecvl.load_classifier(classifier_dir).classes
        assert [classes[i] for i in got] == written


def _upstream(root):
    return upstream_paths(root, "shards", "stage1", "embeddings", "stage2", "metrics")


def test_package_contents_and_card(pipeline_run):
    root = pipeline_run
    out = root / "models/classifier"
    config = json.loads((out / "classifier.json").read_text())
    meta = json.loads((root / "data/shards/meta.json").read_text())
    metrics = json.loads((root / "metrics/eval.json").read_text())
    assert config["format"] == "ecvl-classifier/1" and config["mode"] == "ecvl"
    assert config["classes"] == meta["classes"] and config["feature_dtype"] == "float16"
    assert config["metrics"] == {s: metrics[s]["stage2_ecvl"] for s in ("test", "val")}
    assert (out / "adapter.safetensors").read_bytes() == (
        root / "models/stage2/ecvl/adapter.safetensors"
    ).read_bytes()
    # plain open_clip reads the backbone
    model = open_clip.create_model(f"local-dir:{out / 'backbone'}", weights_only=True)
    assert model.visual.image_size == (32, 32)
    card = (out / "card.md").read_text()
    counts, groups = meta["splits"]["train"]["per_class"], meta["class_groups"]
    for name, group, count in zip(meta["classes"], groups, counts, strict=True):
        assert f"| {name} | {group} | {count} |" in card
    for split in ("test", "val"):
        row = metrics[split]["stage2_ecvl"]
        cells = ["–" if row[k] is None else f"{100 * row[k]:.1f}" for k in SUMMARY_KEYS]
        assert f"| {split} | {' | '.join(cells)} |" in card
    assert "Stage II: full ECVL" in card and "`digits`" in card
    assert card.index("## Evaluation") < card.index("## Classes")  # the long table comes last
    sections = [line for line in card.splitlines() if line.startswith("## ")]
    assert sections == [
        "## Model",
        "## Data",
        "## Intended use",
        "## Limitations",
        "## Training",
        "## Licence",
        "## Evaluation (`metrics/eval.json`, row `stage2_ecvl`, percent)",
        "## Classes",
    ]
    few = [n for n, g in zip(counts, groups, strict=True) if g == "few"]
    assert f"{len(few)} classes had fewer than 20 train images (as few as {min(few)})" in card
    assert "trained from random initialisation on this data alone" in card
    assert "- Base weights: none: stage I started from random initialisation" in card
    # the Training block is what trained the shipped parts, read back from them
    block = card.split("## Training")[1].split("```yaml\n")[1].split("```")[0]
    trained = yaml.safe_load(block)
    stage1 = json.loads((out / "backbone/ecvl.json").read_text())["params"]
    head = json.loads((out / "adapter.json").read_text())
    assert trained == {"seed": 0, "stage1": stage1["stage1"], "stage2": head["params"]}
    assert trained["stage2"]["modes"] == ["linear_probe", "ecvl"]
    assert not list(out.parent.glob(".classifier.tmp-*"))


def test_package_mode_must_be_trained(tmp_path):
    params = write_params(
        tmp_path, stage2={"modes": ["linear_probe", "ecvl"]}, package={"mode": "ballad"}
    )
    with pytest.raises(ParamsError, match=r"package\.mode: 'ballad' is not trained"):
        load_params(params)
    result = _invoke("shard", "--params", params)  # every stage refuses before any work
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "stage2.modes: linear_probe, ecvl" in result.output
    assert not (tmp_path / "data").exists()


def test_package_needs_evaluate_and_keeps_the_old_output(pipeline_run, tmp_path):
    root = pipeline_run
    out = tmp_path / "classifier"
    out.mkdir()  # an earlier classifier: its own to replace, but only when complete
    (out / "classifier.json").write_text('{"format": "ecvl-classifier/1"}')
    (out / "old").write_text("kept")
    params = write_params(
        tmp_path,
        **SECTIONS,
        paths={**_upstream(root), "metrics": str(tmp_path / "no-metrics"), "classifier": str(out)},
    )
    result = _invoke("package", "--params", params)
    assert result.exit_code == 1
    assert result.output.strip().endswith("not found (run `ecvl evaluate` first)")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert (out / "old").read_text() == "kept"


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_predict_on_shards_matches_evaluate(pipeline_run, tmp_path):
    root = pipeline_run
    out = tmp_path / "pred.csv"
    shards = load_manifest(root / "data/shards").shard_paths("test")
    result = _invoke(
        "predict",
        "--model",
        root / "models/classifier",
        *shards,
        "--out",
        out,
        "--batch-size",
        EXPORT_BATCH,
        "--top-k",
        3,
        "--workers",
        0,
    )
    assert result.exit_code == 0, result.output
    rows = _rows(out)
    keys = open_embeddings(root / "data/embeddings.zarr").split("test").keys
    assert [(r["path"], r["key"]) for r in rows] == [(shards[0], k) for k in keys]
    assert list(rows[0]) == ["path", "key", "class_1", "prob_1", "class_2", "prob_2"] + [
        "class_3",
        "prob_3",
    ]
    written = [r["predicted"] for r in _rows(root / "plots/predictions.csv")]
    assert [r["class_1"] for r in rows] == written
    for r in rows:
        probs = [float(r[f"prob_{i}"]) for i in (1, 2, 3)]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-5


def test_predict_folders_lists_and_unreadable_images(pipeline_run, tmp_path):
    root = pipeline_run
    images = tmp_path / "images"
    good = write_pngs(images / "a", 3, size=40)
    write_pngs(images / ".thumbs", 2)
    (images / "a" / "broken.png").write_bytes(b"not a png")
    listing = tmp_path / "list.txt"
    listing.write_text("images/a/000.png\nimages/missing.jpg\n")
    out = tmp_path / "pred.jsonl"
    result = _invoke(
        "predict", "--model", root / "models/classifier", images, listing, "--out", out
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"] for r in rows] == [str(p) for p in good] + [str(good[0])]
    assert rows[0]["key"] is None and len(rows[0]["classes"]) == 5 == len(rows[0]["probs"])
    assert rows[0] == {**rows[-1], "path": rows[0]["path"]}  # the same image, the same answer
    assert "skipped: " + str(images / "a" / "broken.png") in result.stderr
    assert "missing.jpg" in result.stderr
    assert "2 of 6 image(s) unreadable, skipped" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize("case", ["nothing-readable", "not-a-classifier", "no-images"])
def test_predict_fails_with_one_line_and_writes_nothing(pipeline_run, tmp_path, case):
    root = pipeline_run
    model = root / ("models/stage1" if case == "not-a-classifier" else "models/classifier")
    (tmp_path / "in").mkdir()
    if case != "no-images":
        (tmp_path / "in" / "bad.png").write_bytes(b"broken")
        if case == "not-a-classifier":
            write_pngs(tmp_path / "in", 1)
    out = tmp_path / "pred.csv"
    result = _invoke("predict", "--model", model, tmp_path / "in", "--out", out)
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    (line,) = [s for s in result.stderr.splitlines() if s.startswith("error:")]
    expected = {
        "nothing-readable": "none of the 1 input image(s) could be read",
        "not-a-classifier": "is not a packaged classifier",
        "no-images": "no images found in",
    }[case]
    assert expected in line
    assert not out.exists() and not list(tmp_path.glob(".pred.csv*"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_predict_on_a_missing_device_is_one_line(pipeline_run, tmp_path):
    write_pngs(tmp_path / "in", 1)
    out = tmp_path / "pred.csv"
    result = _invoke(
        "predict",
        "--model",
        pipeline_run / "models/classifier",
        tmp_path / "in",
        "--out",
        out,
        "--device",
        "cuda",
    )
    assert result.exit_code == 2, result.output
    (line,) = [s for s in result.stderr.splitlines() if s.startswith("error:")]
    assert line == "error: --device: device 'cuda' asked for, but no CUDA device is visible"
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not out.exists()


@pytest.mark.parametrize(
    "pretrained, licence",
    [
        (None, "none: stage I started from random initialisation, no third-party weights."),
        (
            "openai",
            "OpenAI's CLIP weights (`openai`), released under the MIT licence of "
            "https://github.com/openai/CLIP.",
        ),
        (
            "yfcc15m",
            "open_clip's pretrained tag `yfcc15m`: under the licence its provider states "
            "(open_clip's list of pretrained models links to each).",
        ),
        (
            "weights/rn50.pt",
            "a local checkpoint (`weights/rn50.pt`): under the licence its provider states.",
        ),
    ],
)
def test_card_names_the_base_weights_licence(pretrained, licence):
    assert _weights_licence("RN50", pretrained) == licence
