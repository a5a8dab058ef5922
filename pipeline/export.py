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

Under torchrun every rank encodes its part: shard k of a split on rank k % world size, the
bank's unwritten blocks dealt to the ranks in turn; rank 0 alone writes both stores (HDF5 takes
one writer), receiving the other ranks' results one shard or block at a time, in sample order
(`ecvl.distributed.collect_in_order`). The stores are identical to a one-process export's
whatever the world size, because what goes through the encoder together never depends on it:
an encoder batch holds rows of one shard (rows b·B .. b·B + B - 1 of it; batches never span
two shards, also in one process), a bank batch rows of one block (`ecvl.bank`). So neither the
world size nor the number of data workers is part of the run's fingerprint, and a killed run
resumes under any world size. Assumed alike on every rank: the device type and model, and on
CPUs the number of torch threads (a CPU kernel may sum in another order with other threads;
torchrun sets OMP_NUM_THREADS=1 unless it is set). Every rank reads the shards and, for the
bank, the partial image store at the same paths (one node, or a shared filesystem).
"""

from __future__ import annotations

import json
import logging
import queue
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from tqdm import tqdm

from ecvl.bank import encode_bank_block
from ecvl.data.embeddings import EmbeddingWriter
from ecvl.data.image_store import ImageStore, ImageStoreWriter
from ecvl.data.reader import check_shard_count, eval_pipeline, make_loader
from ecvl.data.shards import Manifest, load_manifest
from ecvl.distributed import (
    WorldInfo,
    collect_in_order,
    init_distributed,
    on_main,
    resolve_device,
    shutdown,
    world_info,
)
from ecvl.errors import DataError, ModelError
from ecvl.evaluation import encode_loader
from ecvl.models.clip import ClipBundle
from ecvl.precision import resolve_precision
from ecvl.text import class_text_features
from ecvl.views import ViewRenderer
from pipeline.artifacts import load_stage1, model_digest
from pipeline.io import code_digest, fingerprint, replace, write_json
from pipeline.params import Params
from pipeline.schema import to_plain

log = logging.getLogger(__name__)

IMAGES = "train_images.h5"
MARK = "complete.json"  # {"run": fingerprint, "splits": [finished splits, in order]}
BANK = "train/bank"  # the view bank's entry in the mark once complete


def run(params: Params) -> None:
    world = world_info()
    device = resolve_device(params.base.device, world)
    init_distributed(world, device)
    try:
        _export(params, world, device)
    finally:
        shutdown(world)


def _export(params: Params, world: WorldInfo, device: torch.device) -> None:
    p, paths = params.export, params.paths
    precision = resolve_precision(p.precision, device)
    manifest = load_manifest(paths.shards)
    bundle, info = load_stage1(paths.stage1, device)
    if list(info["classes"]) != list(manifest.classes):
        raise DataError(
            f"{paths.stage1}: the model was trained on other classes than {paths.shards} holds "
            "(re-run `ecvl stage1`)"
        )
    templates = list(params.prompts.eval_templates)
    splits = {s: manifest.count(s) for s in manifest.splits}
    part = paths.embeddings.with_name(f".{paths.embeddings.name}.partial")
    progress = params.base.progress and world.is_main
    encode = _Encoder(bundle, device, precision, p.batch_size, params.base.num_workers)
    emb: EmbeddingWriter | None = None
    run_id = ""

    def start() -> list[str]:  # the partial directory is rank 0's alone
        nonlocal emb, run_id
        attrs = {
            "model_name": bundle.name,
            "checkpoint_digest": model_digest(paths.stage1),
            "templates": templates,
            "classes": list(manifest.classes),
            "model_dir": str(paths.stage1),
            # Stage II re-encodes views with the same encoder: it must use the same precision,
            # or a clean view re-encoded would not equal its cached row.
            "precision": precision,
        }
        run_id = fingerprint(
            code_digest(),
            to_plain(p),
            attrs,
            manifest.data["source_fingerprint"],
            device.type,  # not the world size nor the workers: the bytes do not depend on them
            params.base.seed,  # the bank's crops and flips
        )
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
        return done

    done = on_main(world, start)
    for split in manifest.splits:
        if split in done:
            if world.is_main:
                log.info("export %s: complete in an earlier run", split)
            continue
        images = part / IMAGES if split == "train" else None
        _export_split(split, manifest, encode, emb, images, world, progress)
        done.append(split)
        if world.is_main:
            write_json(part / MARK, {"run": run_id, "splits": done})
    if p.bank_views and BANK not in done:
        _export_bank(emb, part / IMAGES, encode, params.base.seed, world, progress)
        done.append(BANK)
        if world.is_main:
            write_json(part / MARK, {"run": run_id, "splits": done})

    def finish() -> None:
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

    on_main(world, finish)  # no rank reports success before the stores are in place


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


class _Encoder:
    """The frozen encoder and how this rank runs it (device, precision, batch size, workers)."""

    def __init__(
        self,
        bundle: ClipBundle,
        device: torch.device,
        precision: str,
        batch_size: int,
        num_workers: int,
    ) -> None:
        self.bundle, self.model = bundle, bundle.model.eval()
        self.device, self.precision = device, precision
        self.batch_size, self.num_workers = batch_size, num_workers

    def check_dim(self, dim: int) -> None:
        if dim != self.bundle.embed_dim:
            raise ModelError(
                f"the model gives {dim}-d embeddings, expected {self.bundle.embed_dim}"
            )


class _ShardBatches(IterableDataset):
    """Batches that never span two shards, each tagged with its shard's position in `urls`.

    Data worker w of W reads shards w, w + W, ... each through its own one-shard
    `eval_pipeline` (not split by worker), so a batch is rows b·B .. b·B + B - 1 of one shard
    whatever the worker count or the rank, and the encoder sees the same batches in every run.
    """

    def __init__(self, urls: list[str], encode: _Encoder, with_bytes: bool) -> None:
        self.urls, self.with_bytes = list(urls), with_bytes
        self.transform = encode.bundle.eval_transform
        self.batch_size, self.device = encode.batch_size, encode.device
        # what make_loader reads: the work the pipelines leave to the device
        self.device_finish = self._pipeline(self.urls[0]).device_finish  # built, never read

    def _pipeline(self, url: str):
        return eval_pipeline(
            [url],
            self.transform,
            self.batch_size,
            with_bytes=self.with_bytes,
            device=self.device,
            split_by_worker=False,
        )

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for k in range(worker, len(self.urls), workers):
            for batch in self._pipeline(self.urls[k]):
                yield (*batch, k)


def _encode_shards(
    urls: list[str], counts: list[int], encode: _Encoder, with_bytes: bool
) -> Iterator[tuple]:
    """Per shard of `urls`, in order: (features n×d float16, labels, keys, encoded bytes or
    None). Holds the shards its data workers are reading, no more.

    Raises:
        DataError: a shard holds another number of samples than the manifest lists.
        ModelError: the embeddings are not d-dimensional.
    """
    if not urls:
        return
    workers = check_shard_count(len(urls), 1, encode.num_workers)
    loader = make_loader(_ShardBatches(urls, encode, with_bytes), workers, encode.device)
    parts: dict[int, list[tuple]] = {k: [] for k in range(len(urls))}
    got, ready = [0] * len(urls), 0

    def joined(k: int) -> tuple:
        blocks = parts.pop(k)
        feats = [b[0] for b in blocks] or [np.zeros((0, encode.bundle.embed_dim), np.float16)]
        return (
            np.concatenate(feats),
            np.concatenate([b[1] for b in blocks] or [np.zeros(0, np.int64)]),
            [key for b in blocks for key in b[2]],
            [data for b in blocks for data in b[3]] if with_bytes else None,
        )

    batches = encode_loader(encode.model, loader, encode.device, encode.precision)
    for feats, labels, keys, *rest in batches:
        k = rest[-1]
        encode.check_dim(feats.shape[1])
        got[k] += len(keys)
        if got[k] > counts[k]:
            raise DataError(f"{urls[k]}: more samples than the {counts[k]} the manifest lists")
        parts[k].append((feats.numpy().astype(np.float16), labels.numpy(), keys, *rest[:-1]))
        while ready < len(urls) and got[ready] == counts[ready]:
            yield joined(ready)
            ready += 1
    for k in range(ready, len(urls)):
        if got[k] != counts[k]:
            raise DataError(f"{urls[k]}: read {got[k]} samples, the manifest lists {counts[k]}")
        yield joined(k)


class _InOrderWriter:
    """`write(i, item)` calls run in one background thread, in call order, while the caller
    encodes the next shard: on a CPU the zarr and HDF5 writes would otherwise stall the encoder
    (about a fifth of a tiny model's export time). At most `depth` items wait, so memory stays
    a few shards. A write's error is raised in the caller at its next call, or on leaving the
    `with` block, which waits for every write; leaving on an error drops the writes not started.
    """

    def __init__(self, write: Callable[[int, Any], None], depth: int = 2) -> None:
        self._write = write
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ecvl-export-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._write(*job)
                except BaseException as e:  # handed to the caller's thread
                    self._error = e

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def __call__(self, i: int, item: Any) -> None:
        self._raise()
        self._queue.put((i, item))

    def __enter__(self) -> _InOrderWriter:
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is not None:
            self._error = self._error or value  # skip the queued writes
        self._queue.put(None)
        self._thread.join()
        if kind is None:
            self._raise()


def _export_split(
    split: str,
    manifest: Manifest,
    encode: _Encoder,
    emb: EmbeddingWriter | None,
    images: Path | None,
    world: WorldInfo,
    progress: bool,
) -> None:
    """One split's embeddings (and for train the image store at `images`): this rank encodes
    shards rank, rank + world size, ...; rank 0 writes every shard, in order."""
    urls, counts = manifest.shard_paths(split), manifest.shard_counts(split)
    if sum(counts) != manifest.count(split):
        raise DataError(
            f"{manifest.root}: the {split} shards list {sum(counts)} samples, the split "
            f"{manifest.count(split)}"
        )
    mine = list(range(world.rank, len(urls), world.world_size))
    if world.distributed:
        log.info(
            "export %s: rank %d of %d encodes shards %s of %d",
            split,
            world.rank,
            world.world_size,
            ", ".join(map(str, mine)) or "none",
            len(urls),
        )
    results = _encode_shards(
        [urls[k] for k in mine], [counts[k] for k in mine], encode, images is not None
    )
    if not world.is_main:
        collect_in_order(world, len(urls), results, None)
        return
    starts = np.cumsum([0, *counts]).tolist()
    writer = ImageStoreWriter(images, manifest.count(split)) if images is not None else None
    try:
        with tqdm(
            total=manifest.count(split), desc=f"export {split}", unit="img", disable=not progress
        ) as bar:

            def write(k: int, shard: tuple) -> None:
                feats, labels, keys, encoded = shard
                emb.write(split, starts[k], feats, labels, keys)
                if writer is not None:
                    writer.write(starts[k], encoded, labels, keys)
                bar.update(len(keys))

            with _InOrderWriter(write) as background:
                collect_in_order(world, len(urls), results, background)
        if writer is not None:
            writer.mark_complete()
    finally:
        if writer is not None:
            writer.close()
    emb.mark_complete(split)


def _export_bank(
    emb: EmbeddingWriter | None,
    images: Path,
    encode: _Encoder,
    seed: int,
    world: WorldInfo,
    progress: bool,
) -> None:
    """The view bank, one block (zarr shard) of rows at a time from where an interrupted run
    stopped; the blocks still to write are dealt to the ranks in turn."""
    # rank 0 reaches this after closing the image store: the others read it from here on
    start, step, views = on_main(
        world, lambda: (emb.bank_rows_written, emb.bank_shard_rows, emb.bank_views)
    )
    store = ImageStore(images)
    renderer = ViewRenderer.for_model(encode.model)
    n = len(store)
    blocks = list(range(start, n, step))
    if start and world.is_main:
        log.info("export bank: resuming at row %d of %d", start, n)
    if world.distributed:
        log.info(
            "export bank: rank %d of %d encodes blocks %s of %d (%d rows each)",
            world.rank,
            world.world_size,
            ", ".join(str(b // step) for b in blocks[world.rank :: world.world_size]) or "none",
            -(-n // step),
            step,
        )

    def mine() -> Iterator[tuple]:
        for a in blocks[world.rank :: world.world_size]:
            feats, boxes, flips = encode_bank_block(
                encode.model,
                store,
                range(a, min(n, a + step)),
                views,
                seed,
                renderer,
                encode.device,
                encode.precision,
                encode.batch_size,
            )
            encode.check_dim(feats.shape[2])
            yield feats.astype(np.float16), boxes, flips

    try:
        with tqdm(
            total=n * views,
            initial=start * views,
            desc=f"export bank ({views} views)",
            unit="view",
            disable=not progress,
        ) as bar:

            def write(i: int, block: tuple) -> None:
                emb.write_bank(blocks[i], *block)
                bar.update(len(block[0]) * views)

            with _InOrderWriter(write) as background:
                collect_in_order(world, len(blocks), mine(), background if world.is_main else None)
    finally:
        store.close()
    if world.is_main:
        emb.mark_bank_complete()
