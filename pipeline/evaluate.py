"""Stage `evaluate`: the results tables, per-class plots and metrics for `dvc metrics diff`.

Rows: zero-shot (the backbone before stage I, through the shards), stage I (eq. 6 on the
export's cached embeddings) and stage II, one row per trained mode (the paper's Table 5
ablations). Columns: Many / Medium / Few / All accuracy and macro F1, on test and on val when
the dataset has one. Group membership comes from the shard manifest. Plots: per-class
accuracy against train count (`per_class.png`) and, from the stage-II momentum traces, each
class's mean memorisation score against its train count (`class_scores.png`).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import yaml

from ecvl.data.embeddings import open_embeddings
from ecvl.data.shards import load_manifest
from ecvl.data.textfiles import read_json
from ecvl.distributed import resolve_device
from ecvl.errors import DataError
from ecvl.evaluation import evaluate_clip
from ecvl.metrics import SUMMARY_KEYS as COLUMNS
from ecvl.metrics import classification_report, per_class_accuracy
from ecvl.models.adapter import load_adapter
from ecvl.models.clip import create_model
from ecvl.precision import resolve_precision
from ecvl.stage2 import predict_cached
from pipeline.artifacts import check_embeddings, check_heads
from pipeline.io import atomic_file, write_csv, write_json, write_text
from pipeline.params import Params
from pipeline.schema import to_plain

log = logging.getLogger(__name__)

ROW_NAMES = {
    "zero_shot": "Zero-shot (before stage I)",
    "stage1": "Stage I (fine-tuned)",
    "stage2_linear_probe": "Linear probe (cross-entropy, long-tailed sampling)",
    "stage2_ballad": "Stage II: adapter + balanced sampling (BALLAD-like)",
    "stage2_contrast_standard": "Stage II: + two base views and the contrastive loss",
    "stage2_ecvl_uniform": "Stage II: ECVL with every score = the mean (control)",
    "stage2_ecvl": "Stage II: full ECVL",
}
TRACE = "momentum_trace.h5"


def run(params: Params) -> None:
    p, paths = params.evaluate, params.paths
    device = resolve_device(params.base.device)
    manifest = load_manifest(paths.shards)
    emb = open_embeddings(paths.embeddings)
    text = torch.from_numpy(emb.text_features())
    splits = [s for s in ("test", "val") if s in emb.splits and s in p.splits]
    groups = manifest.class_groups
    k = manifest.num_classes

    check_embeddings(emb, manifest, paths.embeddings, paths.shards)
    adapters = _load_adapters(params)  # checked before any (slow) zero-shot pass
    check_heads(adapters, emb.embed_dim, k, paths.stage2, paths.embeddings)
    predictions: dict[str, dict[str, np.ndarray]] = {s: {} for s in splits}
    truth = {s: emb.split(s).labels for s in splits}
    if p.zero_shot:
        for split, pred in _zero_shot(params, manifest, splits, device).items():
            predictions[split]["zero_shot"] = pred
    for split in splits:
        feats = emb.split(split).features
        predictions[split]["stage1"] = predict_cached(
            torch.nn.Identity(), feats, text, device, p.batch_size
        ).numpy()
        for mode, adapter in adapters.items():
            predictions[split][f"stage2_{mode}"] = predict_cached(
                adapter, feats, text, device, p.batch_size
            ).numpy()

    metrics, tables = {}, []
    for split in splits:
        metrics[split] = {}
        for row, pred in predictions[split].items():
            report = classification_report(truth[split], pred, groups, k)
            metrics[split][row] = {c: report[c] for c in COLUMNS}
        tables.append(_markdown_table(split, metrics[split], manifest))
        # `stage2` = the last mode listed (the method's own row), so that experiments that
        # each train one mode (`dvc exp run -S 'stage2.modes=[ballad]'`) share metric keys.
        metrics[split]["stage2"] = metrics[split][f"stage2_{params.stage2.modes[-1]}"]
    note = (
        "Zero-shot uses the backbone as configured in `stage1` "
        f"(`{params.stage1.model}`, pretrained: `{params.stage1.pretrained}`)"
    )
    if params.stage1.pretrained is None:
        note += ": random init, so its row is chance level by construction, not a CLIP result"
    write_json(paths.metrics / "eval.json", metrics)
    write_text(
        paths.reports / "results.md",
        "\n\n".join(tables) + f"\n\n{note}.\n\n" + _params_record(params),
    )
    _per_class_outputs(params, manifest, predictions, truth)
    log.info("wrote %s, %s", paths.metrics / "eval.json", paths.reports / "results.md")
    for split in splits:
        for row, m in metrics[split].items():
            log.info(
                "%s %-26s many %.4f medium %.4f few %.4f all %.4f F1 %.4f",
                split,
                row,
                *(m[c] for c in COLUMNS),
            )


def _zero_shot(params: Params, manifest, splits, device) -> dict[str, np.ndarray]:
    s1 = params.stage1
    torch.manual_seed(params.base.seed)  # the initialisation stage I started from
    bundle = create_model(s1.model, s1.pretrained, device=device)
    precision = resolve_precision(s1.precision, device)
    return {
        split: evaluate_clip(
            bundle,
            manifest.shard_paths(split),
            manifest.classes,
            params.prompts.eval_templates,
            manifest.class_groups,
            device=device,
            precision=precision,
            batch_size=s1.eval_batch_size,  # images; evaluate.batch_size counts cached rows
            num_workers=params.base.num_workers,
        )[2]
        for split in splits
    }


def _load_adapters(params: Params) -> dict:
    """Every mode's adapter, all from one stage-II run trained with these params.

    Raises:
        DataError: a mode was not trained, the adapters come from different runs (copied in,
            or written by a version that replaced one mode at a time), or the run used other
            stage-II params or another seed than `params` (stage2 not re-run after an edit).
    """
    root, records = params.paths.stage2, {}
    for mode in params.stage2.modes:
        path = root / mode / "adapter.json"
        if not path.is_file():
            raise DataError(f"{path}: not found: mode {mode!r} not trained (run `ecvl stage2`)")
        records[mode] = read_json(path)
        if not isinstance(records[mode], dict):
            raise DataError(f"{path}: not the record `ecvl stage2` writes (re-run it)")
    runs = {mode: info.get("run") for mode, info in records.items()}
    if None in runs.values() or len(set(runs.values())) > 1:
        raise DataError(
            f"{root}: the adapters of {', '.join(runs)} come from different stage-II runs "
            "(re-run `ecvl stage2`)"
        )
    info = next(iter(records.values()))
    wanted = {"seed": params.base.seed, **to_plain(params.stage2)}
    trained = {"seed": info.get("seed"), **info.get("params", {})}
    for key, value in wanted.items():
        if trained.get(key) != value:
            name = "base.seed" if key == "seed" else f"stage2.{key}"
            raise DataError(
                f"{root} was trained with {name}={trained.get(key)!r}, the params say "
                f"{value!r} (re-run `ecvl stage2`)"
            )
    return {mode: load_adapter(root / mode) for mode in records}


def _params_record(params: Params) -> str:
    """The params behind the tables (all but the artifact paths), for the report to stand alone;
    stage II's are checked against its adapters' own record above."""
    plain = {k: v for k, v in to_plain(params).items() if k != "paths"}
    plain["base"] = {"seed": params.base.seed}  # the rest of `base` does not change results
    for key in ("source", "test_source"):
        source = getattr(params.shard, key)
        if source is not None:
            plain["shard"][key] = {"name": source.name, **plain["shard"][key]}
    text = yaml.safe_dump(plain, sort_keys=False, default_flow_style=False)
    return f"Params that produced these tables:\n\n```yaml\n{text}```\n"


def _markdown_table(split: str, rows: dict, manifest) -> str:
    counts = manifest.train_counts
    groups = manifest.class_groups
    sizes = {g: groups.count(g) for g in ("many", "medium", "few")}
    thresholds = manifest.data.get("group_thresholds", {})
    head = (
        f"### {split} split ({len(manifest.classes)} classes; Many {sizes['many']} / "
        f"Medium {sizes['medium']} / Few {sizes['few']}; train images per class "
        f"{max(counts)}…{min(counts)}, Many > {thresholds.get('many_above')}, "
        f"Few < {thresholds.get('few_below')})"
    )
    lines = [
        head,
        "",
        "| Method | Many | Medium | Few | All | Macro F1 |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row, m in rows.items():
        cells = " | ".join(
            "–" if m[c] is None or np.isnan(m[c]) else f"{100 * m[c]:.1f}" for c in COLUMNS
        )
        lines.append(f"| {ROW_NAMES.get(row, row)} | {cells} |")
    return "\n".join(lines)


def _per_class_outputs(params: Params, manifest, predictions, truth) -> None:
    paths, k = params.paths, manifest.num_classes
    split = "test" if "test" in predictions else next(iter(predictions))
    rows = []
    accs = {
        row: per_class_accuracy(truth[split], pred, k) for row, pred in predictions[split].items()
    }
    for c in range(k):
        rows.append(
            {
                "class": manifest.classes[c],
                "train_count": manifest.train_counts[c],
                "group": manifest.class_groups[c],
                **{f"acc_{row}": float(a[c]) for row, a in accs.items()},
            }
        )
    write_csv(paths.plots / "per_class.csv", rows)
    _plot_per_class(paths.reports / "per_class.png", manifest, accs, split)
    _plot_class_scores(paths.reports / "class_scores.png", manifest, params)
    last = list(predictions[split])[-1]
    write_csv(
        paths.plots / "predictions.csv",
        prediction_rows(truth[split], predictions[split][last], manifest),
    )


# Above this many classes `plots/predictions.csv` names Many/Medium/Few instead of classes.
CONFUSION_MAX_CLASSES = 100


def prediction_rows(y_true: np.ndarray, y_pred: np.ndarray, manifest) -> list[dict]:
    """One row per sample (DVC's confusion template counts them): the actual and predicted
    class, or above `CONFUSION_MAX_CLASSES` classes their groups (`many`, `medium`, `few`).
    A 1,000 × 1,000 confusion cannot be read; the 3 × 3 one shows how often tail samples go to
    head classes, the bias stage II corrects. Per-sample classes: `ecvl predict`."""
    names = manifest.classes
    if manifest.num_classes > CONFUSION_MAX_CLASSES:
        names = manifest.class_groups
    return [
        {"actual": names[int(t)], "predicted": names[int(p)]}
        for t, p in zip(y_true, y_pred, strict=True)
    ]


def _group_bounds(manifest) -> list[tuple[float, str]]:
    """Where on the train-count axis one group ends and the next begins (the geometric mean of
    the neighbouring classes' counts), from the manifest's membership."""
    counts = np.asarray(manifest.train_counts, dtype=float)
    groups = np.asarray(manifest.class_groups)
    present = [g for g in ("few", "medium", "many") if (groups == g).any()]
    bounds = []
    for lower, upper in zip(present, present[1:], strict=False):
        hi, lo = counts[groups == lower].max(), counts[groups == upper].min()
        bounds.append((float(np.sqrt(hi * max(lo, hi))), f"{lower} | {upper}"))
    return bounds


def _count_axis(ax, manifest) -> None:
    """Log train-count x axis with the Many/Medium/Few bounds marked."""
    ax.set_xscale("log")
    ax.set_xlabel("train images of the class (log scale)")
    for x, label in _group_bounds(manifest):
        ax.axvline(x, color="0.4", lw=0.8, ls="--")
        ax.annotate(
            label,
            (x, 1.0),
            xycoords=("data", "axes fraction"),
            ha="center",
            va="bottom",
            fontsize=7,
            color="0.3",
        )
    ax.grid(alpha=0.3)


def _count_bins(counts: np.ndarray, bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Classes grouped by train count into at most `bins` log-spaced bins: (bin of each class,
    the bins that hold a class, each such bin's geometric-mean count)."""
    positive = np.maximum(np.asarray(counts, dtype=float), 1.0)
    bins = min(bins, len(np.unique(positive)))
    if bins > 1:
        edges = np.geomspace(positive.min(), positive.max() * 1.0001, bins + 1)
        which = np.clip(np.searchsorted(edges, positive, side="right") - 1, 0, bins - 1)
    else:
        which = np.zeros(len(positive), dtype=int)
    used = np.unique(which)
    centres = np.array([np.exp(np.log(positive[which == b]).mean()) for b in used])
    return which, used, centres


def _plot_per_class(path, manifest, accs, split) -> None:
    """One line per model: the mean accuracy of the classes in each log-spaced train-count bin
    (dots: the bins' classes), legend beside the axes, so six models stay readable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    which, used, centres = _count_bins(manifest.train_counts)
    fig, ax = plt.subplots(figsize=(9, 4.2), dpi=120)
    for row, acc in accs.items():
        means = np.array([acc[which == b].mean() for b in used])
        ax.plot(centres, means, marker="o", ms=4, lw=1.5, label=ROW_NAMES.get(row, row))
    _count_axis(ax, manifest)
    ax.set_ylabel(f"{split} accuracy (mean over the bin's classes)")
    ax.set_ylim(-0.03, 1.03)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _plot_class_scores(path, manifest, params: Params) -> None:
    """Class mean memorisation score M after the last epoch against the class's train count,
    one series per stage-II mode with a momentum trace; the legend gives Spearman's rho.

    Each class is a dot and each mode's line joins the mean M of the classes in each
    log-spaced train-count bin (as in `per_class.png`): at hundreds of classes the dots of
    four modes cover one another, so they fade with K and the lines carry the comparison."""
    import h5py
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ecvl.metrics import spearman

    counts = np.asarray(manifest.train_counts, dtype=float)
    k = manifest.num_classes
    which, used, centres = _count_bins(counts)
    dot_size, dot_alpha = (12, 0.7) if k <= 50 else (5, max(0.15, min(0.5, 25 / k)))
    fig, ax = plt.subplots(figsize=(9, 4.2), dpi=120)
    for mode in params.stage2.modes:
        trace = params.paths.stage2 / mode / TRACE
        if not trace.is_file():
            continue  # a mode without a measurement pass (linear_probe)
        with h5py.File(trace, "r") as f:
            m, labels = f["M"][-1].astype(float), f["labels"][:]
        per_class = np.bincount(labels, weights=m, minlength=k) / np.maximum(
            np.bincount(labels, minlength=k), 1
        )
        rho = spearman(per_class, counts)
        label = f"{ROW_NAMES.get(f'stage2_{mode}', mode)} (Spearman {rho:+.2f})"
        dots = ax.scatter(counts, per_class, s=dot_size, alpha=dot_alpha, linewidths=0)
        means = np.array([per_class[which == b].mean() for b in used])
        colour = dots.get_facecolor()[0][:3]
        ax.plot(centres, means, marker="o", ms=4, lw=1.5, color=colour, label=label)
    _count_axis(ax, manifest)
    ax.set_ylabel("class mean memorisation score M (last epoch)\nlines: mean over the bin")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
