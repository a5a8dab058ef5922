"""Stage `stage2`: train the residual adapter on the cached embeddings, once per mode.

Each mode in `stage2.modes` (the paper's Table 5 rows, `ecvl.modes`) trains its own adapter in
`<paths.stage2>/<mode>/`. Views start from the export's view bank; only views that were
actually augmented are decoded from the image store and re-encoded by the frozen stage-I image
encoder. The train caches (embeddings, bank, image store) are opened and cross-checked once
per run. Resumable per mode (checkpoint after every epoch, including the momentum EMA and
its trace).
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

from ecvl.data.embeddings import SplitData
from ecvl.data.shards import Manifest, load_manifest
from ecvl.data.train_caches import TrainCaches, open_train_caches
from ecvl.distributed import resolve_device
from ecvl.errors import DataError
from ecvl.metrics import SUMMARY_KEYS as METRIC_KEYS
from ecvl.metrics import classification_report
from ecvl.models.adapter import save_head
from ecvl.models.clip import ClipBundle
from ecvl.modes import MODES
from ecvl.precision import resolve_precision
from ecvl.reencode import SelectiveEncoder
from ecvl.stage2 import Stage2Config, Stage2Trainer, predict_cached
from ecvl.views import ViewRenderer
from pipeline.artifacts import check_embeddings, load_stage1, model_digest
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
    "score_count_spearman",
    "lr",
    "measure_seconds",
    "seconds",
)


@dataclass(frozen=True)
class _Inputs:
    """What every mode trains from, read and checked once per run."""

    bundle: ClipBundle
    caches: TrainCaches
    text: np.ndarray
    logit_scale: float
    manifest: Manifest
    evaluation: SplitData
    eval_split: str
    device: torch.device
    precision: str
    run_digest: str  # code + stage-I weights: part of every mode's resume fingerprint
    cache_device: torch.device  # where the clean cache and an in-memory bank are gathered
    pixels: np.ndarray | None  # the train images in memory, when raw pixels of one size


def run(params: Params) -> None:
    p, paths = params.stage2, params.paths
    device = resolve_device(params.base.device)
    manifest = load_manifest(paths.shards)
    budget = int(p.cache_memory_gb * 1e9)
    caches = open_train_caches(
        paths.embeddings,
        paths.image_store,
        bank_memory={"never": 0, "always": None, "auto": budget}[p.cache_in_memory],
    )
    emb, train = caches.embeddings, caches.train
    precision = _encoder_precision(p.precision, emb.precision, device, paths.embeddings)
    digest = model_digest(paths.stage1)
    _check_caches(params, caches, manifest, digest)
    bundle, _ = load_stage1(paths.stage1, device)
    held, pixels = _cache_placement(p.cache_in_memory, budget, caches, device)
    eval_split = "val" if "val" in emb.splits else "test"
    inputs = _Inputs(
        bundle=bundle,
        caches=caches,
        text=emb.text_features(),
        logit_scale=float(bundle.model.logit_scale.detach().float().item()),
        manifest=manifest,
        evaluation=emb.split(eval_split),
        eval_split=eval_split,
        device=device,
        precision=precision,
        run_digest=fingerprint(code_digest(), digest),
        cache_device=held,
        pixels=pixels,
    )

    results, history, trained = {}, [], {}
    for mode in p.modes:
        trainer, rows = _train_mode(mode, params, inputs)
        results[mode] = {k: rows[-1][f"{eval_split}_{k}"] for k in METRIC_KEYS}
        history += rows
        results[mode]["reencoded_fraction"] = float(
            np.mean([r["reencoded_fraction"] for r in rows])
        )
        head = trainer.head
        state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
        trace = trainer.trace if trainer.spec.measure else None
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


def _cache_placement(
    policy: str, budget: int, caches: TrainCaches, device: torch.device
) -> tuple[torch.device, np.ndarray | None]:
    """Where the clean cache and an in-memory bank live (on the training GPU when they fit the
    budget and half its free memory, else on the host), and the train images as one pixel
    array when the store holds raw pixels of one size and they fit what the budget leaves;
    logged in one line."""
    train, bank, store = caches.train.features, caches.bank, caches.store
    in_memory = bank is not None and isinstance(bank.features, np.ndarray)
    nbytes = train.nbytes + (bank.features.nbytes if in_memory else 0)
    pixel_bytes = store.raw_pixel_bytes
    pixels = None
    if policy != "never" and pixel_bytes is not None:
        if policy == "always" or nbytes + pixel_bytes <= budget:
            pixels = store.raw_pixels()
            nbytes += pixel_bytes
    held = torch.device("cpu")
    if device.type == "cuda" and policy != "never" and nbytes <= budget:
        free, _ = torch.cuda.mem_get_info(device)
        if nbytes <= free // 2:
            held = device
    what = "train embeddings" + (", view bank" if in_memory else "")
    what += ", train images" if pixels is not None else ""
    log.info(
        "stage2: %s (%.2f GB) in %s%s (cache_in_memory: %s, cache_memory_gb: %.1f)",
        what,
        nbytes / 1e9,
        "host memory" if held.type == "cpu" else str(held),
        f"; view bank read from {bank.path} per step" if bank is not None and not in_memory else "",
        policy,
        budget / 1e9,
    )
    return held, pixels


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


def _check_caches(params: Params, caches: TrainCaches, manifest, digest: str) -> None:
    """What the library cannot know: the stage-I model and the params the caches must match."""
    paths, emb = params.paths, caches.embeddings
    if emb.checkpoint_digest != digest:
        raise DataError(
            f"{paths.embeddings} was exported from another stage-I model than "
            f"{paths.stage1} (re-run `ecvl export`)"
        )
    check_embeddings(emb, manifest, paths.embeddings, paths.shards)
    bank, asked = caches.bank, params.export.bank_views
    if bank is not None and bank.checkpoint_digest != digest:
        raise DataError(
            f"{bank.path} was encoded by another stage-I model than {paths.stage1} "
            "(re-run `ecvl export`)"
        )
    if caches.bank_views != asked:
        have = f"{caches.bank_views} views per sample" if bank is not None else "no view bank"
        raise DataError(
            f"{paths.embeddings} holds {have}, export.bank_views is {asked} (re-run `ecvl export`)"
        )


def _train_mode(mode: str, params: Params, inputs: _Inputs):
    p, paths = params.stage2, params.paths
    caches, spec = inputs.caches, MODES[mode]
    train = caches.train
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
        # a mode's own sampler wins (the probe: plain long-tailed sampling)
        sampler=spec.sampler or p.sampler,
        draws_per_epoch=p.draws_per_epoch,
        mode=mode,
        seed=params.base.seed,
        momentum_loss=p.momentum_loss,
        measure_views=p.measure_views,
    )
    encoder = SelectiveEncoder(
        train.features,
        caches.store,
        inputs.bundle.model,
        ViewRenderer.for_model(inputs.bundle.model),
        inputs.device,
        precision=inputs.precision,
        batch_size=p.encode_batch_size,
        bank=caches.bank,
        cache_device=inputs.cache_device,
        pixels=inputs.pixels,
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
        row = {"mode": mode, **{k: stats.get(k) for k in EPOCH_KEYS}}
        return row, classification_report(
            evaluation.labels, pred, manifest.class_groups, manifest.num_classes
        )

    rows = run_epochs(
        f"stage2 {mode}",
        p.epochs,
        paths.checkpoints / f"stage2-{mode}.pt",
        fingerprint(
            inputs.run_digest,
            mode,
            to_plain(p),
            params.base.seed,
            inputs.precision,
            params.export.bank_views,
        ),
        eval_split,
        train=train,
        state=lambda: {"trainer": trainer.state_dict()},
        restore=lambda saved: trainer.load_state_dict(saved["trainer"]),
        describe=lambda r: (
            f"loss {r['loss']:.4f} (cls {r['loss_cls']:.4f}, dcvl {r['loss_dcvl']:.4f}) "
            f"re-encoded {100 * r['reencoded_fraction']:.1f}%"
        ),
    )
    return trainer, rows


def _write_mode(out, mode, state, config, trace, train, record) -> None:
    """One mode's adapter, its config with the run `record`, and (for a mode that scores its
    samples) its momentum trace."""
    out.mkdir()
    save_head(out, state, config, mode=mode, **record)
    if trace is None:
        return
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
            "per-sample momentum loss Lm (eq. 8) and memorisation score M (eq. 9) after each "
            "epoch's measurement pass over all train samples; rows are epochs"
        )
