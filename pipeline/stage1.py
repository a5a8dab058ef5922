"""Stage `stage1`: fine-tune both open_clip towers on the long-tailed train shards.

Resumable: a checkpoint is written atomically after every epoch; re-running with the same
params, data and world size continues after the last complete epoch and ends with the same
weights and metrics as a run that never stopped. Under torchrun every rank trains on its own
shards and only rank 0 evaluates and writes.
"""

from __future__ import annotations

import json
import logging
import math

import open_clip
import torch

from ecvl.data.batch_augment import batch_augment_for
from ecvl.data.reader import check_shard_count, make_loader, take, train_pipeline
from ecvl.data.shards import load_manifest
from ecvl.data.transforms import train_transform
from ecvl.distributed import (
    all_gather_objects,
    barrier,
    init_distributed,
    resolve_device,
    shutdown,
    world_info,
)
from ecvl.evaluation import evaluate_clip
from ecvl.losses import logit_adjustment
from ecvl.metrics import SUMMARY_KEYS as METRIC_KEYS
from ecvl.models.clip import create_model, save_open_clip_dir
from ecvl.precision import resolve_precision
from ecvl.stage1 import Stage1Config, Stage1Trainer
from ecvl.text import tokenize_prompts
from pipeline.epochs import run_epochs, write_results
from pipeline.io import atomic_dir, code_digest, fingerprint
from pipeline.params import Params
from pipeline.schema import to_plain

log = logging.getLogger(__name__)


def run(params: Params) -> None:
    world = world_info()
    device = resolve_device(params.base.device, world)
    init_distributed(world, device)
    try:
        _train(params, world, device)
    finally:
        shutdown(world)


def _train(params: Params, world, device: torch.device) -> None:
    p, paths = params.stage1, params.paths
    manifest = load_manifest(paths.shards)
    precision = resolve_precision(p.precision, device)
    torch.manual_seed(params.base.seed)  # the same initial weights on every rank
    bundle = create_model(p.model, p.pretrained, device=device)
    if world.rank:  # each rank its own crops and flips (rank 0 keeps the single-process stream)
        torch.manual_seed(params.base.seed + 1_000_003 * world.rank)
    tokens = tokenize_prompts(bundle.tokenizer, manifest.classes, params.prompts.train_templates)

    urls = manifest.shard_paths("train")
    workers = check_shard_count(len(urls), world.world_size, params.base.num_workers)
    steps = max(1, manifest.count("train") // (p.batch_size * world.world_size))
    config = Stage1Config(
        epochs=p.epochs,
        steps_per_epoch=steps,
        lr=p.lr,
        weight_decay=p.weight_decay,
        warmup_steps=math.ceil(p.warmup_epochs * steps),
        grad_clip=p.grad_clip,
        w_i2t=p.w_i2t,
        w_t2i=p.w_t2i,
        logit_scale_max=p.logit_scale_max,
        precision=precision,
        text_batch_size=p.text_batch_size,
        logit_offset=(
            tuple(logit_adjustment(manifest.train_counts, p.logit_adjust).tolist())
            if p.logit_adjust
            else None
        ),
        label_smoothing=p.label_smoothing,
    )
    trainer = Stage1Trainer(bundle.model, tokens, config, device, ddp=world.distributed)
    run_id = fingerprint(
        code_digest(),
        to_plain(p),
        to_plain(params.prompts),
        params.base.seed,
        world.world_size,
        device.type,  # a CPU checkpoint never resumes on a GPU, nor the reverse
        precision,  # resolved: `auto` means bf16 on one GPU and fp16 on another
        manifest.data["source_fingerprint"],
    )
    eval_split = manifest.eval_split()
    log.info(
        "stage1: %s on %s (%s), %d train images, %d steps/epoch × %d epochs, eval on %s",
        p.model,
        device,
        precision,
        manifest.count("train"),
        steps,
        p.epochs,
        eval_split,
    )
    progress = params.base.progress and world.is_main
    preprocess = open_clip.get_model_preprocess_cfg(bundle.model)
    transform = train_transform(p.augment, bundle.train_transform, preprocess)
    augment = batch_augment_for(p.augment, bundle.train_transform, preprocess)
    if augment is None:
        log.info("stage1: the %r train transform cannot be batched; it runs per image", p.augment)

    def train() -> tuple[dict, dict]:
        pipe = train_pipeline(
            urls,
            transform,
            p.batch_size,
            params.base.seed,
            trainer.epoch + 1,
            p.shuffle_buffer,
            device=device,
            augment=augment,
        )
        stats = trainer.train_epoch(take(make_loader(pipe, workers, device), steps), progress)
        report = _evaluate(bundle, manifest, eval_split, params, device, precision, world)
        return stats.__dict__, report

    def restore(saved: dict) -> None:
        saved["trainer"]["rng"] = saved["rank_rng"][world.rank]  # this rank's own generators
        trainer.load_state_dict(saved["trainer"])

    history = run_epochs(
        "stage1",
        p.epochs,
        paths.checkpoints / "stage1.pt",
        run_id,
        eval_split,
        train=train,
        state=lambda: {
            "trainer": trainer.state_dict(),
            "rank_rng": all_gather_objects(world, trainer.rng_state()),  # every rank's
        },
        restore=restore,
        describe=lambda r: (
            f"loss {r['loss']:.4f} (i2t {r['loss_i2t']:.4f}, t2i {r['loss_t2i']:.4f}) "
            f"lr {r['lr']:.2e} {r['images_per_s']:.0f} img/s"
        ),
        is_main=world.is_main,
        barrier=lambda: barrier(world),
    )
    if world.is_main:
        _write_outputs(params, bundle, manifest, history, eval_split)
    barrier(world)


def _evaluate(bundle, manifest, split, params: Params, device, precision, world) -> dict:
    report, _, _ = evaluate_clip(
        bundle,
        manifest.shard_paths(split),
        manifest.classes,
        params.prompts.eval_templates,
        manifest.class_groups,
        device=device,
        precision=precision,
        batch_size=params.stage1.eval_batch_size,
        num_workers=params.base.num_workers,
        world=world,
    )
    return report


def _write_outputs(params: Params, bundle, manifest, history, eval_split) -> None:
    paths = params.paths
    last = history[-1]
    metrics = {"split": eval_split, "epochs": len(history)}
    metrics.update({k: last[f"{eval_split}_{k}"] for k in METRIC_KEYS})
    with atomic_dir(paths.stage1) as tmp:
        save_open_clip_dir(bundle, None, tmp)
        (tmp / "ecvl.json").write_text(
            json.dumps(
                {
                    "model": bundle.name,
                    "pretrained": bundle.pretrained,
                    "embed_dim": bundle.embed_dim,
                    "classes": list(manifest.classes),
                    "train_templates": list(params.prompts.train_templates),
                    "eval_templates": list(params.prompts.eval_templates),
                    "params": {"seed": params.base.seed, "stage1": to_plain(params.stage1)},
                    "metrics": metrics,
                },
                indent=2,
            )
            + "\n"
        )
    write_results(paths, "stage1", metrics, history, ("epoch",))
