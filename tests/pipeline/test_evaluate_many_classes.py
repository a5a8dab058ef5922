"""`ecvl evaluate`'s per-class outputs at ImageNet-LT's 1,000 classes: the plots keep one legend
entry per model and plot binned lines, and the confusion CSV stays readable."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from pipeline import evaluate

K = 1000
MODES = ["linear_probe", "ballad", "contrast_standard", "ecvl_uniform", "ecvl"]


def _manifest(k: int) -> SimpleNamespace:
    counts = np.maximum(5, (1280 * np.exp(-np.arange(k) / (k / 5.5)))).astype(int)
    groups = ["many" if c > 100 else "few" if c < 20 else "medium" for c in counts]
    return SimpleNamespace(
        classes=tuple(f"class {i}" for i in range(k)),
        num_classes=k,
        train_counts=counts.tolist(),
        class_groups=groups,
        data={},
    )


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions close, kept for inspection."""
    import matplotlib.pyplot as plt

    kept = []
    monkeypatch.setattr(plt, "close", kept.append)
    return kept


def test_plots_at_1000_classes_have_one_legend_entry_per_model(tmp_path, figures):
    manifest = _manifest(K)
    rng = np.random.default_rng(0)
    rows = ["zero_shot", "stage1", *(f"stage2_{m}" for m in MODES)]
    accs = {row: rng.random(K) for row in rows}
    evaluate._plot_per_class(tmp_path / "per_class.png", manifest, accs, "test")

    labels = np.repeat(np.arange(K), manifest.train_counts)
    for mode in MODES[1:]:
        (tmp_path / mode).mkdir()
        with h5py.File(tmp_path / mode / evaluate.TRACE, "w") as f:
            f["M"] = rng.random((2, len(labels))).astype(np.float32)
            f["labels"] = labels
    params = SimpleNamespace(
        stage2=SimpleNamespace(modes=MODES), paths=SimpleNamespace(stage2=Path(tmp_path))
    )
    evaluate._plot_class_scores(tmp_path / "class_scores.png", manifest, params)

    per_class, scores = (fig.axes[0] for fig in figures)
    assert len(per_class.get_legend().get_texts()) == len(rows)
    assert len(scores.get_legend().get_texts()) == len(MODES) - 1  # linear_probe has no trace
    # every model is a line over at most 10 train-count bins, not a point per class
    assert all(
        len(line.get_xdata()) <= 10 for line in per_class.get_lines() if line.get_label()[0] != "_"
    )
    assert len(scores.get_lines()) >= len(MODES) - 1
    for name in ("per_class.png", "class_scores.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("k", [10, 100, 101, K])
def test_prediction_rows_name_classes_up_to_100_then_groups(k):
    manifest = _manifest(k)
    rng = np.random.default_rng(1)
    truth = rng.integers(k, size=500)
    pred = np.where(rng.random(500) < 0.5, truth, rng.integers(k, size=500))
    rows = evaluate.prediction_rows(truth, pred, manifest)
    assert len(rows) == 500
    names = manifest.classes if k <= 100 else manifest.class_groups
    assert rows[7] == {"actual": names[truth[7]], "predicted": names[pred[7]]}
    values = {r["actual"] for r in rows} | {r["predicted"] for r in rows}
    assert values <= ({"many", "medium", "few"} if k > 100 else set(manifest.classes))
