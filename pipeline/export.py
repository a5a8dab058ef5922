"""Stage `export`: cache what stage II reads, with the stage-I model frozen.

- `embeddings.zarr`: per split the projected, un-normalised image embeddings (float16), labels
  and keys, plus the class text embeddings (eval templates averaged, normalised).
- `train_images.h5`: the train images' encoded bytes in the same order as the train
  embeddings, so index i is the same sample in both. Both are filled from one pass over the
  shards, so they cannot disagree.

Resumable and atomic: both are written under `.<name>.partial` next to their final path and
renamed at the end. A killed export re-run with the same model, shards and params continues
where it stopped and ends with the same arrays; anything else starts over.

Under torchrun only rank 0 exports (the other ranks return at once): the stores are written
in one order by one process, so they are identical to a one-process export.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from ecvl.data.embeddings import EmbeddingWriter
from ecvl.data.image_store import ImageStoreWriter
from ecvl.data.reader import check_shard_count, eval_pipeline, make_loader
from ecvl.data.shards import Manifest, load_manifest
from ecvl.distributed import resolve_device, world_info
from ecvl.engine import autocast, resolve_precision
from ecvl.errors import DataError, ModelError
from ecvl.models.clip import ClipBundle
from ecvl.text import class_text_features
from pipeline.artifacts import load_stage1, model_digest
from pipeline.io import code_digest, fingerprint, replace
from pipeline.params import Params
from pipeline.schema import to_plain

log = logging.getLogger(__name__)


def _partial(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial")


def _prepare_partials(outputs: list[Path], run_id: str) -> None:
    """Keep partial outputs of an interrupted run with the same `run_id`; drop others."""
    marker = _partial(outputs[0]).with_suffix(".run")
    if not (marker.is_file() and marker.read_text() == run_id):
        for out in outputs:
            part = _partial(out)
            if part.is_dir():
                shutil.rmtree(part)
            elif part.exists():
                part.unlink()
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(run_id)


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
    digest = model_digest(paths.stage1)
    templates = list(params.prompts.eval_templates)
    workers = {
        s: check_shard_count(len(manifest.shard_paths(s)), 1, params.base.num_workers)
        for s in manifest.splits
    }
    run_id = fingerprint(
        code_digest(),
        to_plain(p),
        templates,
        digest,
        manifest.data["source_fingerprint"],
        workers,
        str(device),
        precision,
    )
    outputs = [paths.embeddings, paths.image_store]
    _prepare_partials(outputs, run_id)

    splits = {s: manifest.count(s) for s in manifest.splits}
    attrs = {
        "model_name": bundle.name,
        "checkpoint_digest": digest,
        "templates": templates,
        "classes": list(manifest.classes),
        "model_dir": str(paths.stage1),
        # Stage II re-encodes views with the same encoder: it must use the same precision, or
        # a clean view re-encoded would not equal its cached row.
        "precision": precision,
    }
    emb = EmbeddingWriter(_partial(paths.embeddings), splits, bundle.embed_dim, attrs)
    with ImageStoreWriter(_partial(paths.image_store), splits["train"]) as images:
        for split in manifest.splits:
            _export_split(
                split,
                manifest,
                bundle,
                emb,
                images if split == "train" else None,
                device,
                precision,
                p.batch_size,
                workers[split],
                params.base.progress,
            )
        if not emb.text_complete:
            with torch.no_grad():
                text = class_text_features(
                    bundle.model.eval(),
                    bundle.tokenizer,
                    manifest.classes,
                    templates,
                    device=device,
                )
            emb.write_text_features(text.float().cpu())
        images.mark_complete()

    for out in outputs:
        replace(_partial(out), out)
    _partial(outputs[0]).with_suffix(".run").unlink(missing_ok=True)
    log.info(
        "wrote %s (%s) and %s (%d train images)",
        paths.embeddings,
        ", ".join(f"{s} {n}" for s, n in splits.items()),
        paths.image_store,
        splits["train"],
    )


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
    done = min(emb.progress[split], images.progress if images is not None else n)
    if emb.is_complete(split) and (images is None or images.progress >= n):
        return
    if done:
        log.info("export %s: resuming at row %d of %d", split, done, n)
    pipe = eval_pipeline(
        manifest.shard_paths(split),
        bundle.eval_transform,
        batch_size,
        with_bytes=images is not None,
        device=device,
    )
    loader = make_loader(pipe, workers, device)
    model = bundle.model.eval()
    start = 0
    bar = tqdm(total=n, initial=0, desc=f"export {split}", unit="img", disable=not progress)
    with torch.inference_mode():
        for batch in loader:
            x, labels, keys = batch[0], batch[1], list(batch[2])
            stop = start + len(keys)
            if stop > done:  # rows before `done` are already on disk
                with autocast(device, precision):
                    feats = model.encode_image(x.to(device, non_blocking=True), normalize=False)
                if feats.shape[1] != emb.embed_dim:
                    raise ModelError(
                        f"the model gives {feats.shape[1]}-d embeddings, expected {emb.embed_dim}"
                    )
                emb.write(
                    split,
                    start,
                    feats.float().cpu().numpy().astype("float16"),
                    labels.numpy(),
                    keys,
                )
                if images is not None:
                    images.write(start, list(batch[3]), labels.numpy(), keys)
            bar.update(len(keys))
            start = stop
    bar.close()
    if start != n:
        raise DataError(f"export {split}: read {start} samples, the manifest lists {n}")
    emb.mark_complete(split)
