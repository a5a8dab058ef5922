"""Stage `export`: cache what stage II reads, with the stage-I model frozen.

- `embeddings.zarr`: per split the projected, un-normalised image embeddings (float16), labels
  and keys, plus the class text embeddings (eval templates averaged, normalised).
- `train_images.h5`: the train images' encoded bytes in the same order as the train
  embeddings, so index i is the same sample in both. Both are filled from one pass over the
  shards, so they cannot disagree.
- the view bank (`export.bank_views` E > 0): E base views of every train sample (random
  resized crop + flip, seeded by `base.seed`), read back from the image store just written,
  encoded by the same frozen encoder and stored in `embeddings.zarr` as `train/bank` with the
  crop box and flip of each (`ecvl.bank`).

Resumable per split and atomic: both are written into one partial directory,
`.<embeddings name>.partial` next to the embeddings, and renamed at the end. Its completion
mark (`complete.json`: the run's fingerprint and the splits finished) is rewritten after each
split; a killed export re-run with the same model, shards and params continues at the first
incomplete split (the bank: at its first unwritten block) and ends with the same bytes;
anything else starts over.

Under torchrun only rank 0 exports (the other ranks return at once): the stores are written
in one order by one process, so they are identical to a one-process export.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from ecvl.bank import encode_bank_block
from ecvl.data.embeddings import EmbeddingWriter
from ecvl.data.image_store import ImageStore, ImageStoreWriter
from ecvl.data.reader import check_shard_count, eval_pipeline, make_loader
from ecvl.data.shards import Manifest, load_manifest
from ecvl.distributed import resolve_device, world_info
from ecvl.errors import DataError, ModelError
from ecvl.evaluation import encode_loader
from ecvl.models.clip import ClipBundle
from ecvl.precision import resolve_precision
from ecvl.text import class_text_features
from pipeline.artifacts import load_stage1, model_digest
from pipeline.io import code_digest, fingerprint, replace, write_json
from pipeline.params import Params
from pipeline.schema import to_plain

log = logging.getLogger(__name__)

IMAGES = "train_images.h5"
MARK = "complete.json"  # {"run": fingerprint, "splits": [finished splits, in order]}
BANK = "train/bank"  # the view bank's entry in the mark once complete


def run(params: Params) -> None:
    p, paths = params.export, params.paths
    world = world_info()
    if not world.is_main:
        log.info("export: rank %d has nothing to do (rank 0 writes the caches)", world.rank)
        return
    device = resolve_device(params.base.device, world)
    precision = resolve_precision(p.precision, device)
    manifest = load_manifest(paths.shards)
    bundle, info = load_stage1(paths.stage1, device)
    if list(info["classes"]) != list(manifest.classes):
        raise DataError(
            f"{paths.stage1}: the model was trained on other classes than {paths.shards} holds "
            "(re-run `ecvl stage1`)"
        )
    templates = list(params.prompts.eval_templates)
    workers = {
        s: check_shard_count(len(manifest.shard_paths(s)), 1, params.base.num_workers)
        for s in manifest.splits
    }
    splits = {s: manifest.count(s) for s in manifest.splits}
    attrs = {
        "model_name": bundle.name,
        "checkpoint_digest": model_digest(paths.stage1),
        "templates": templates,
        "classes": list(manifest.classes),
        "model_dir": str(paths.stage1),
        # Stage II re-encodes views with the same encoder: it must use the same precision, or
        # a clean view re-encoded would not equal its cached row.
        "precision": precision,
    }
    run_id = fingerprint(
        code_digest(),
        to_plain(p),
        attrs,
        manifest.data["source_fingerprint"],
        workers,
        str(device),
        params.base.seed,  # the bank's crops and flips
    )
    part = paths.embeddings.with_name(f".{paths.embeddings.name}.partial")
    done = _finished_splits(part, run_id)
    emb = EmbeddingWriter(
        part / "embeddings.zarr",
        splits,
        bundle.embed_dim,
        attrs,
        resume=bool(done),
        bank_views=p.bank_views,
        bank_seed=params.base.seed,
    )
    for split in manifest.splits:
        if split in done:
            log.info("export %s: complete in an earlier run", split)
            continue
        images = ImageStoreWriter(part / IMAGES, splits["train"]) if split == "train" else None
        with images or contextlib.nullcontext():
            _export_split(
                split,
                manifest,
                bundle,
                emb,
                images,
                device,
                precision,
                p.batch_size,
                workers[split],
                params.base.progress,
            )
        done.append(split)
        write_json(part / MARK, {"run": run_id, "splits": done})
    if p.bank_views and BANK not in done:
        _export_bank(
            emb,
            ImageStore(part / IMAGES),
            bundle,
            params.base.seed,
            device,
            precision,
            p.batch_size,
            params.base.num_workers,
            params.base.progress,
        )
        done.append(BANK)
        write_json(part / MARK, {"run": run_id, "splits": done})
    with torch.no_grad():
        text = class_text_features(
            bundle.model.eval(), bundle.tokenizer, manifest.classes, templates, device=device
        )
    emb.write_text_features(text.float().cpu())

    replace(part / "embeddings.zarr", paths.embeddings)
    replace(part / IMAGES, paths.image_store)
    shutil.rmtree(part)
    log.info(
        "wrote %s (%s) and %s (%d train images)",
        paths.embeddings,
        ", ".join(f"{s} {n}" for s, n in splits.items()),
        paths.image_store,
        splits["train"],
    )


def _finished_splits(part: Path, run_id: str) -> list[str]:
    """The splits an interrupted export of the same run finished into `part`; a partial
    directory of another run (or without a readable mark) is removed."""
    try:
        mark = json.loads((part / MARK).read_text())
        if mark["run"] == run_id:
            log.info("export: resuming %s (splits done: %s)", part, ", ".join(mark["splits"]))
            return list(mark["splits"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir(parents=True)
    return []


def _export_split(
    split: str,
    manifest: Manifest,
    bundle: ClipBundle,
    emb: EmbeddingWriter,
    images: ImageStoreWriter | None,
    device,
    precision: str,
    batch_size: int,
    workers: int,
    progress: bool,
) -> None:
    n = manifest.count(split)
    pipe = eval_pipeline(
        manifest.shard_paths(split),
        bundle.eval_transform,
        batch_size,
        with_bytes=images is not None,
        device=device,
    )
    batches = make_loader(pipe, workers, device)
    start = 0
    with tqdm(total=n, desc=f"export {split}", unit="img", disable=not progress) as bar:
        for feats, labels, keys, *encoded in encode_loader(
            bundle.model, batches, device, precision
        ):
            if feats.shape[1] != emb.embed_dim:
                raise ModelError(
                    f"the model gives {feats.shape[1]}-d embeddings, expected {emb.embed_dim}"
                )
            emb.write(split, start, feats.numpy().astype("float16"), labels.numpy(), keys)
            if images is not None:
                images.write(start, list(encoded[0]), labels.numpy(), keys)
            start += len(keys)
            bar.update(len(keys))
    if start != n:
        raise DataError(f"export {split}: read {start} samples, the manifest lists {n}")
    if images is not None:
        images.mark_complete()
    emb.mark_complete(split)


def _export_bank(
    emb: EmbeddingWriter,
    store: ImageStore,
    bundle: ClipBundle,
    seed: int,
    device,
    precision: str,
    batch_size: int,
    workers: int,
    progress: bool,
) -> None:
    """The view bank, one shard of rows at a time from where an interrupted run stopped."""
    n, step, views = len(store), emb.bank_shard_rows, emb.bank_views
    start = emb.bank_rows_written
    if start:
        log.info("export bank: resuming at row %d of %d", start, n)
    model = bundle.model.eval()
    try:
        with tqdm(
            total=n * views,
            initial=start * views,
            desc=f"export bank ({views} views)",
            unit="view",
            disable=not progress,
        ) as bar:
            for a in range(start, n, step):
                rows = range(a, min(n, a + step))
                feats, boxes, flips = encode_bank_block(
                    model,
                    store,
                    rows,
                    views,
                    seed,
                    bundle.eval_transform,
                    device,
                    precision,
                    batch_size,
                    workers,
                )
                if feats.shape[2] != emb.embed_dim:
                    raise ModelError(
                        f"the model gives {feats.shape[2]}-d embeddings, expected {emb.embed_dim}"
                    )
                emb.write_bank(a, feats, boxes, flips)
                bar.update(len(rows) * views)
    finally:
        store.close()
    emb.mark_bank_complete()
