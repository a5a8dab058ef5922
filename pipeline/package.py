"""Stage `package`: the trained classifier in one directory, for `ecvl predict` and
`ecvl.load_classifier`.

Copies the stage-I model (open_clip `local-dir` format), the stage-II head of `package.mode`,
the class text embeddings and the preprocess config into `paths.classifier` (layout:
`ecvl.classifier`), with a model card: the data, the Many/Medium/Few membership and train
count of every class, and that head's rows of `metrics/eval.json`. Written atomically.
"""

from __future__ import annotations

import logging
import shutil

import numpy as np
import yaml

from ecvl.classifier import write_classifier
from ecvl.data.embeddings import open_embeddings
from ecvl.data.shards import Manifest, load_manifest
from ecvl.data.textfiles import read_json
from ecvl.errors import DataError, ModelError
from ecvl.metrics import SUMMARY_KEYS
from ecvl.models.adapter import ADAPTER_CONFIG, ResidualAdapter, save_head
from pipeline.artifacts import check_embeddings, model_digest, read_stage1_info
from pipeline.evaluate import ROW_NAMES
from pipeline.io import atomic_dir
from pipeline.params import Params

log = logging.getLogger(__name__)

_COLUMNS = {
    "many_acc": "Many",
    "medium_acc": "Medium",
    "few_acc": "Few",
    "all_acc": "All",
    "macro_f1": "Macro F1",
}


def run(params: Params) -> None:
    paths, mode = params.paths, params.package.mode
    manifest = load_manifest(paths.shards)
    emb = open_embeddings(paths.embeddings)
    stage1 = read_stage1_info(paths.stage1)
    if emb.checkpoint_digest != model_digest(paths.stage1):
        raise DataError(
            f"{paths.embeddings} was exported from another stage-I model than {paths.stage1} "
            "(re-run `ecvl export`)"
        )
    check_embeddings(emb, manifest, paths.embeddings, paths.shards)
    head_dir = paths.stage2 / mode
    if mode != "stage1" and not (head_dir / ADAPTER_CONFIG).is_file():
        raise ModelError(f"no trained {mode!r} head in {head_dir} (run `ecvl stage2`)")
    metrics = _metrics(paths.metrics / "eval.json", mode)
    # The head's own record of what trained it (the stage2 params of its run), not params.yaml's.
    stage2 = None if mode == "stage1" else read_json(head_dir / ADAPTER_CONFIG).get("params")

    feature_dtype = np.dtype(emb.split("train", lazy=True).features.dtype).name
    info = {
        "mode": mode,
        "model": stage1["model"],
        "pretrained": stage1.get("pretrained"),
        "templates": list(emb.templates),
        "checkpoint_digest": emb.checkpoint_digest,
        "metrics": metrics,
    }
    with atomic_dir(paths.classifier) as tmp:
        if mode == "stage1":  # no stage-II head: the identity adapter (lambda = 0, eq. 7)
            head_dir = tmp / ".stage1-head"
            identity = ResidualAdapter(emb.embed_dim, 0.0, seed=0)
            save_head(head_dir, identity.state_dict(), identity.config(), mode="stage1")
        write_classifier(
            tmp,
            backbone_dir=paths.stage1,
            head_dir=head_dir,
            text_features=emb.text_features(),
            classes=manifest.classes,
            feature_dtype=feature_dtype,
            info=info,
            card=_card(mode, stage1, stage2, emb.templates, manifest, metrics),
        )
        if mode == "stage1":
            shutil.rmtree(head_dir)
    log.info(
        "wrote %s (%s + head %r, %d classes)",
        paths.classifier,
        stage1["model"],
        mode,
        manifest.num_classes,
    )


def _row(mode: str) -> str:
    """The shipped head's row in `metrics/eval.json`."""
    return "stage1" if mode == "stage1" else f"stage2_{mode}"


def _metrics(path, mode: str) -> dict[str, dict]:
    """The shipped head's row of every evaluated split."""
    if not path.is_file():
        raise DataError(f"{path} not found (run `ecvl evaluate` first)")
    data = read_json(path)
    row = _row(mode)
    if not isinstance(data, dict) or not all(isinstance(r, dict) for r in data.values()):
        raise DataError(f"{path}: not the metrics `ecvl evaluate` writes (re-run it)")
    out = {split: rows[row] for split, rows in data.items() if row in rows}
    if not out:
        raise DataError(f"{path} has no {row!r} row (re-run `ecvl evaluate`)")
    return out


def _percent(value) -> str:
    return "–" if value is None or np.isnan(value) else f"{100 * value:.1f}"


def _weights_licence(model: str, pretrained: str | None) -> str:
    """What the base weights stage I started from are licensed under, as far as ECVL knows."""
    if not pretrained:
        return "none: stage I started from random initialisation, no third-party weights."
    if pretrained == "openai":
        return (
            "OpenAI's CLIP weights (`openai`), released under the MIT licence of "
            "https://github.com/openai/CLIP."
        )
    import open_clip

    if open_clip.is_pretrained_cfg(model, pretrained):
        return (
            f"open_clip's pretrained tag `{pretrained}`: under the licence its provider states "
            "(open_clip's list of pretrained models links to each)."
        )
    return f"a local checkpoint (`{pretrained}`): under the licence its provider states."


def _card(
    mode: str,
    stage1: dict,
    stage2: dict | None,
    templates,
    manifest: Manifest,
    metrics: dict,
) -> str:
    """The model card: what it is, what it is for and not for, the data, what trained it, the
    licence of the weights it started from, its metrics and every class."""
    data = manifest.data
    counts, groups, classes = manifest.train_counts, manifest.class_groups, manifest.classes
    source = data.get("source", {})
    thresholds = data.get("group_thresholds", {})
    sizes = ", ".join(f"{s} {manifest.count(s)}" for s in manifest.splits)
    few = [n for n, g in zip(counts, groups, strict=True) if g == "few"]
    start = stage1.get("pretrained")
    trained = {"seed": stage1.get("params", {}).get("seed")}
    trained["stage1"] = stage1.get("params", {}).get("stage1")
    trained["stage2"] = stage2 if stage2 is not None else f"none (package.mode {mode})"
    lines = [
        f"# Classifier: `{stage1['model']}` + "
        + ("no stage-II head (stage I)" if mode == "stage1" else f"stage-II head `{mode}`"),
        "",
        "Written by `ecvl package`. Use it with `ecvl predict --model <this dir> IMAGES... "
        "--out predictions.csv`, or in Python with `ecvl.load_classifier(<this dir>)`.",
        "",
        "## Model",
        "",
        f"- Backbone: open_clip `{stage1['model']}`, fine-tuned by stage I from "
        + (f"`{start}`" if start else "random init")
        + "; `backbone/` is open_clip's `local-dir` format.",
        f"- Head: {ROW_NAMES.get(_row(mode), mode)} (`adapter.json`"
        + ("; the identity, λ = 0: stage I's own prediction)." if mode == "stage1" else ")."),
        "- Prediction: the class whose text embedding is closest (cosine) to the adapted image "
        "embedding (eq. 6); probabilities are the softmax of the cosines times the model's "
        "logit scale.",
        f"- Class prompts (averaged): {', '.join(f'`{t}`' for t in templates)}.",
        "",
        "## Data",
        "",
        f"- Source: `{source.get('name')}` "
        f"({', '.join(f'{k}: {v}' for k, v in source.items() if k != 'name') or 'defaults'}).",
        f"- {len(classes)} classes; images per split: {sizes}; train imbalance ratio "
        f"{data.get('imbalance_ratio', float('nan')):.1f}.",
        f"- Groups by train images: Many > {thresholds.get('many_above')}, "
        f"Few < {thresholds.get('few_below')}, Medium in between: "
        + ", ".join(f"{g.capitalize()} {groups.count(g)}" for g in ("many", "medium", "few"))
        + ".",
        "- Every class with its group and train images: [Classes](#classes), at the end.",
        "",
        "## Intended use",
        "",
        "- Giving an image one of the classes listed under [Classes](#classes), for images of the "
        "kind the training data holds (the source above). Every image gets one of these "
        'classes: there is no "none of them", so an image of anything else still gets a class '
        "and a probability.",
        "- Long-tailed classification research and applications that check the Few column on "
        "their own held-out images before relying on the rare classes.",
        "",
        "## Limitations",
        "",
        "- The training data is long-tailed (imbalance ratio above): "
        + (
            f"{len(few)} classes had fewer than {thresholds.get('few_below')} train images "
            f"(as few as {min(few)}), and accuracy on them is lower and varies more from run to "
            "run (the Few column below)."
            if few
            else "the rarest classes have the fewest images to learn from (the Few column below)."
        ),
        "- "
        + (
            f"The backbone started from `{start}` and inherits what those weights learned, "
            "biases included."
            if start
            else "The backbone was trained from random initialisation on this data alone: a "
            "small model trained from scratch is far weaker than a pretrained CLIP backbone, "
            "and before stage I it predicts at chance."
        ),
        "- The figures below come from val/test splits of the same source; images from "
        "elsewhere (other cameras, sizes, domains) can score lower.",
        "",
        "## Training",
        "",
        "Stage I's params (from `backbone/`'s `ecvl.json`) and the stage-II head's (from "
        "`adapter.json`):",
        "",
        "```yaml",
        yaml.safe_dump(trained, sort_keys=False).rstrip(),
        "```",
        "",
        "## Licence",
        "",
        f"- Base weights: {_weights_licence(stage1['model'], start)}",
        "- The code that trained this classifier: ECVL, MIT licence. The training images' own "
        "terms apply to what was learned from them.",
        "",
        f"## Evaluation (`metrics/eval.json`, row `{_row(mode)}`, percent)",
        "",
        "| split | " + " | ".join(_COLUMNS[k] for k in SUMMARY_KEYS) + " |",
        "| --- |" + " ---: |" * len(SUMMARY_KEYS),
        *(
            f"| {split} | " + " | ".join(_percent(row.get(k)) for k in SUMMARY_KEYS) + " |"
            for split, row in metrics.items()
        ),
        "",
        # Last, so that at 1,000 classes the evaluation does not sit below a 1,000-row table.
        "## Classes",
        "",
        "| class | group | train images |",
        "| --- | --- | ---: |",
        *(f"| {c} | {g} | {n} |" for c, g, n in zip(classes, groups, counts, strict=True)),
        "",
    ]
    return "\n".join(lines)
