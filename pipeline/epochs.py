"""The resumable epoch loop of stage I and stage II, and the per-epoch files they write.

After every epoch the loop checkpoints, atomically, what the stage needs to continue (plain
tensors and containers, loaded with `weights_only=True`) under a fingerprint of everything that
shapes the run; a re-run with the same fingerprint continues after the last complete epoch and
ends as a run that never stopped, anything else starts over.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from ecvl.metrics import SUMMARY_KEYS as METRIC_KEYS
from pipeline.io import load_checkpoint, save_checkpoint, write_history, write_json

log = logging.getLogger(__name__)


def run_epochs(
    name: str,
    epochs: int,
    ckpt: Path,
    run_id: str,
    eval_split: str,
    *,
    train: Callable[[], tuple[dict, dict]],
    state: Callable[[], dict],
    restore: Callable[[dict], None],
    describe: Callable[[dict], str],
    is_main: bool = True,
    barrier: Callable[[], None] = lambda: None,
) -> list[dict]:
    """Run the epochs of `name` not yet in `ckpt`; returns one row per epoch: the stats plus
    `<eval_split>_<metric>` columns (complete on the main process only).

    `train()` trains and evaluates one epoch: (stats row, metric report). `state()` is what to
    checkpoint besides the rows; every process calls it (it may gather from all ranks).
    `restore(saved)` loads a checkpoint's state. `describe(row)` is the stage's part of the
    epoch's log line. Only the main process logs and saves; `barrier` follows every epoch.
    """
    history: list[dict] = []
    saved = load_checkpoint(ckpt, run_id)
    if saved is not None:
        restore(saved)
        history = list(saved["history"])
        log.info("resuming %s after epoch %d of %d (%s)", name, len(history), epochs, ckpt)
    done = len(history)
    while done < epochs:
        stats, report = train()
        payload = state()
        done += 1
        if is_main:
            history.append({**stats, **{f"{eval_split}_{k}": report[k] for k in METRIC_KEYS}})
            log.info(
                "%s epoch %d/%d %s | %s acc %.4f (many %.4f, medium %.4f, few %.4f) F1 %.4f",
                *(name, done, epochs, describe(history[-1]), eval_split),
                *(report[k] for k in ("all_acc", "many_acc", "medium_acc", "few_acc", "macro_f1")),
            )
            save_checkpoint(ckpt, {"fingerprint": run_id, **payload, "history": history})
        barrier()
    return history


def write_results(paths, name: str, metrics: dict, history: list[dict], index: tuple) -> None:
    """`<paths.metrics>/<name>.json` (`<name>.*` in `dvc exp show`) and the per-epoch rows:
    `<paths.plots>/<name>.csv` without timings, the `index` columns and timings in
    `<paths.logs>/<name>_timings.csv`."""
    metrics_path, plot = paths.metrics / f"{name}.json", paths.plots / f"{name}.csv"
    write_json(metrics_path, {name: metrics})
    write_history(plot, paths.logs / f"{name}_timings.csv", history, index)
    log.info("wrote %s, %s, %s", getattr(paths, name), metrics_path, plot)
