"""Stage `stage2`: train the residual adapter on the cached embeddings, once per mode.

Each mode in `stage2.modes` (the paper's Table 5 rows) trains its own adapter in
`<paths.stage2>/<mode>/`. Clean views are read from the export's cache; only views that were
actually augmented are decoded from the image store and re-encoded by the frozen stage-I image
encoder. Resumable per mode (checkpoint after every epoch, including the momentum EMA).
`<paths.stage2>` is replaced once, atomically, with every mode of the run: a run killed
between two modes leaves the previous run whole, never adapters of two runs side by side
(each `adapter.json` records its run id and params, which `evaluate` checks).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import h5py
import numpy as np
import torch

from ecvl.data.embeddings import SplitData, open_embeddings
from ecvl.data.image_store import ImageStore
from ecvl.data.shards import Manifest, load_manifest
from ecvl.distributed import resolve_device
from ecvl.errors import DataError
from ecvl.metrics import SUMMARY_KEYS as METRIC_KEYS
from ecvl.metrics import classification_report
from ecvl.models.adapter import save_head
from ecvl.models.clip import ClipBundle
from ecvl.precision import resolve_precision
from ecvl.reencode import SelectiveEncoder
from ecvl.stage2 import Stage2Config, Stage2Trainer, predict_cached
from pipeline.artifacts import load_stage1, model_digest
from pipeline.epochs import run_epochs, write_results
from pipeline.io import atomic_dir, code_digest, fingerprint
from pipeline.params import Params
from pipeline.schema import ParamsError, to_plain

log = logging.getLogger(__name__)

EPOCH_KEYS = (
    "epoch",
    "loss",
    "loss_cls",
    "loss_dcvl",
    "reencoded_fraction",
    "reencoded_views",
    "clean_views",
    "score_std",
    "score_mean_many",
    "score_mean_medium",
    "score_mean_few",
    "lr",
    "seconds",
)


@dataclass(frozen=True)
class _Inputs:
    """What every mode trains from, read and checked once per run."""

    bundle: ClipBundle
    train: SplitData
    store: ImageStore
    text: np.ndarray
    logit_scale: float
    manifest: Manifest
    evaluation: SplitData
    eval_split: str
    device: torch.device
    precision: str
    run_digest: str  # code + stage-I weights: part of every mode's resume fingerprint


def run(params: Params) -> None:
    p, paths = params.stage2, params.paths
    device = resolve_device(params.base.device)
    manifest = load_manifest(paths.shards)
    emb = open_embeddings(paths.embeddings)
    precision = _encoder_precision(p.precision, emb.precision, device, paths.embeddings)
    store = ImageStore(paths.image_store)
    train = emb.split("train")
    digest = model_digest(paths.stage1)
    _check_caches(params, emb, train, store, manifest, digest)
    bundle, _ = load_stage1(paths.stage1, device)
    eval_split = "val" if "val" in emb.splits else "test"
    inputs = _Inputs(
        bundle=bundle,
        train=train,
        store=store,
        text=emb.text_features(),
        logit_scale=float(bundle.model.logit_scale.detach().float().item()),
        manifest=manifest,
        evaluation=emb.split(eval_split),
        eval_split=eval_split,
        device=device,
        precision=precision,
        run_digest=fingerprint(code_digest(), digest),
    )

    results, history, trained = {}, [], {}
    for mode in p.modes:
        trainer, rows, trace = _train_mode(mode, params, inputs)
        results[mode] = {k: rows[-1][f"{eval_split}_{k}"] for k in METRIC_KEYS}
        history += rows
        results[mode]["reencoded_fraction"] = float(
            np.mean([r["reencoded_fraction"] for r in rows])
        )
        head = trainer.head
        state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
        trained[mode] = (state, head.config(), trace)
    # What the run trained from and with (not the code digest: the adapters' files, and so their
    # DVC hash, must not change when unrelated code is edited).
    record = {
        "run": fingerprint(digest, to_plain(p), params.base.seed, precision),
        "seed": params.base.seed,
        "params": to_plain(p),
    }
    with atomic_dir(paths.stage2) as tmp:  # every mode of this run, or the previous run's
        for mode, (state, config, trace) in trained.items():
            _write_mode(tmp / mode, mode, state, config, trace, train, record)
    write_results(paths, "stage2", {"split": eval_split, **results}, history, ("mode", "epoch"))


def _encoder_precision(asked: str, exported: str | None, device, store) -> str:
    """The frozen encoder's precision: the export's, so that a clean view re-encoded equals its
    cached row. `auto` follows the export; an explicit other value is refused."""
    precision = resolve_precision(exported if asked == "auto" and exported else asked, device)
    if exported is None or precision == exported:
        return precision
    if asked != "auto":
        raise ParamsError(
            f"stage2.precision: {asked} ({precision} on {device}), but {store} was exported in "
            f"{exported} (export.precision); re-encoded views would not match the cached ones: "
            "set both alike, or stage2.precision: auto"
        )
    log.warning(
        "%s was exported in %s, which %s cannot run: re-encoding in %s, so re-encoded views "
        "differ from the cache in the last bits",
        store,
        exported,
        device,
        precision,
    )
    return precision


def _check_caches(params: Params, emb, train, store: ImageStore, manifest, digest: str) -> None:
    paths = params.paths
    if len(store) != len(train.labels):
        raise DataError(
            f"{paths.image_store} holds {len(store)} images but {paths.embeddings} "
            f"has {len(train.labels)} train rows (re-run `ecvl export`)"
        )
    if list(store.keys) != list(train.keys):
        raise DataError(
            f"{paths.image_store} and {paths.embeddings} list the train samples in "
            "a different order (re-run `ecvl export`)"
        )
    if emb.checkpoint_digest != digest:
        raise DataError(
            f"{paths.embeddings} was exported from another stage-I model than "
            f"{paths.stage1} (re-run `ecvl export`)"
        )
    if list(emb.classes) != list(manifest.classes):
        raise DataError(f"{paths.embeddings} and {paths.shards} have different classes")


def _train_mode(mode: str, params: Params, inputs: _Inputs):
    p, paths = params.stage2, params.paths
    train = inputs.train
    draws = p.draws_per_epoch or len(train.labels)
    steps = math.ceil(draws / p.batch_size)
    config = Stage2Config(
        epochs=p.epochs,
        batch_size=p.batch_size,
        logit_scale=inputs.logit_scale,
        lr=p.lr,
        weight_decay=p.weight_decay,
        warmup_steps=math.ceil(p.warmup_epochs * steps),
        residual_ratio=p.residual_ratio,
        beta=p.beta,
        k=p.k,
        tau_dcvl=p.tau_dcvl,
        w_dcvl=p.w_dcvl,
        # The probe is the "what a user does first" baseline: plain long-tailed sampling.
        sampler="instance" if mode == "linear_probe" else p.sampler,
        draws_per_epoch=p.draws_per_epoch,
        mode=mode,
        seed=params.base.seed,
    )
    encoder = SelectiveEncoder(
        train.features,
        inputs.store,
        inputs.bundle.model,
        inputs.bundle.eval_transform,
        inputs.device,
        precision=inputs.precision,
        batch_size=p.encode_batch_size,
        num_workers=p.augment_workers,
    )
    manifest, device = inputs.manifest, inputs.device
    trainer = Stage2Trainer(
        None,
        inputs.text,
        train.labels,
        encoder,
        config,
        device,
        class_groups=manifest.class_groups,
    )
    evaluation, eval_split, text = inputs.evaluation, inputs.eval_split, inputs.text
    trace = {"Lm": [], "M": []}
    log.info(
        "stage2 %s: %d draws/epoch in %d steps × %d epochs, eval on %s",
        mode,
        draws,
        steps,
        p.epochs,
        eval_split,
    )

    def train() -> tuple[dict, dict]:
        stats = trainer.train_epoch(progress=params.base.progress)
        pred = predict_cached(
            trainer.head, evaluation.features, text, device, p.eval_batch_size
        ).numpy()
        lm, m = trainer.momentum_snapshot()
        trace["Lm"].append(lm.astype(np.float32))
        trace["M"].append(m.astype(np.float32))
        row = {"mode": mode, **{k: stats.get(k) for k in EPOCH_KEYS}}
        return row, classification_report(
            evaluation.labels, pred, manifest.class_groups, manifest.num_classes
        )

    def restore(saved: dict) -> None:
        trainer.load_state_dict(saved["trainer"])
        trace.update({k: [t.numpy() for t in v] for k, v in saved["trace"].items()})

    with encoder:
        rows = run_epochs(
            f"stage2 {mode}",
            p.epochs,
            paths.checkpoints / f"stage2-{mode}.pt",
            fingerprint(inputs.run_digest, mode, to_plain(p), params.base.seed, inputs.precision),
            eval_split,
            train=train,
            state=lambda: {
                "trainer": trainer.state_dict(),
                "trace": {k: [torch.from_numpy(a) for a in v] for k, v in trace.items()},
            },
            restore=restore,
            describe=lambda r: (
                f"loss {r['loss']:.4f} (cls {r['loss_cls']:.4f}, dcvl {r['loss_dcvl']:.4f}) "
                f"re-encoded {100 * r['reencoded_fraction']:.1f}%"
            ),
        )
    return trainer, rows, trace


def _write_mode(out, mode, state, config, trace, train, record) -> None:
    """One mode's adapter, its config with the run `record`, and its momentum trace."""
    out.mkdir()
    save_head(out, state, config, mode=mode, **record)
    with h5py.File(out / "momentum_trace.h5", "w") as f:
        f.create_dataset("Lm", data=np.stack(trace["Lm"]), compression="gzip")
        f.create_dataset("M", data=np.stack(trace["M"]), compression="gzip")
        f.create_dataset("labels", data=np.asarray(train.labels))
        f.create_dataset(
            "keys",
            data=np.asarray([str(k) for k in train.keys], dtype=object),
            dtype=h5py.string_dtype(),
        )
        f.attrs["description"] = (
            "per-sample momentum loss Lm (eq. 8) and memorisation "
            "score M (eq. 9) after each epoch; rows are epochs"
        )
