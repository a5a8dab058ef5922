"""Selective re-encoding for stage II: cached embeddings for clean views, the encoder for the rest.

DESIGN.md §1, "Re-encode only augmented views": a view to which memory-driven augmentation
applied no op is exactly the image the export encoded, so its feature is a cached row: the clean
embedding, or with a view bank (`entries`) the banked base view. Only views that were actually
augmented are decoded from the image store, given their bank entry's crop and flip, augmented,
transformed and run through the frozen image encoder, in batches. Early in training, and for
well-learned samples (low memorisation score), most views are banked and cost nothing.

Determinism: view ``j`` of a request with seed ``s`` draws its pixel randomness (Cutout's
position, the standard view's crop and flip) from `view_rng(s, j)`, whichever thread runs it,
so results do not depend on `num_workers` or timing. Encoder batches are formed in request
order, so even the floating-point batching is reproducible; a different `batch_size` regroups
the encoder's inputs and may change re-encoded features in the last bits (about 1e-7).

Parallelism: image decoding, augmentation and the eval transform ("pixel work") run in a
thread pool of `num_workers` threads (PIL and torch release the GIL for the heavy parts);
`encode_stream` keeps the pool working on the views of the next requests while earlier views are
encoded, and fills encoder batches across requests, so on a GPU the encoder runs full batches
and rarely waits for pixels. With ``num_workers=0`` the pixel work runs inline, just in time.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ecvl.augment import BaseView, ViewPlan, apply_base_view, apply_plan
from ecvl.data.embeddings import ViewBank
from ecvl.data.image_store import ImageStore
from ecvl.errors import DataError
from ecvl.precision import autocast, resolve_precision

log = logging.getLogger(__name__)

__all__ = ["SelectiveEncoder", "ViewRequest", "view_rng"]

Seed = int | Sequence[int]
ViewTransform = Callable[[Image.Image, np.random.Generator], Image.Image]
# Requests prepared ahead at most (clean-only requests cost no pixel work but hold memory).
_MAX_PENDING = 16


def view_rng(seed: Seed, position: int) -> np.random.Generator:
    """Generator for the pixel randomness of view `position` of a request seeded with `seed`.

    `seed` is an int or a sequence of ints (e.g. ``(run_seed, epoch, step)``); views get
    independent streams (numpy's `SeedSequence` spawn keys), whatever order they run in.
    """
    entropy = int(seed) if isinstance(seed, int | np.integer) else [int(s) for s in seed]
    return np.random.default_rng(np.random.SeedSequence(entropy, spawn_key=(int(position),)))


@dataclass(frozen=True)
class ViewRequest:
    """The views of one training step, for `SelectiveEncoder.encode_stream`.

    Attributes:
        indices: (B,) sample indices (rows of the cache / items of the image store); the same
            sample may appear several times (e.g. its two views).
        plans: one `ViewPlan` per view, an empty plan meaning a clean (cached) view; None
            means all views are clean, unless `view_transform` is given.
        entries: one bank entry per view (needs the encoder's `bank`): the view starts from
            that base view, and a clean one is its bank row; None: the clean cached embedding.
        seed: int or sequence of ints; view j's pixel randomness is `view_rng(seed, j)`.
        view_transform: ``f(image, rng) -> image`` applied to *every* view instead of plans
            (ablation 2, e.g. `ecvl.augment.standard_view_transform`); every view is re-encoded.
        reencode_all: re-encode clean views too (their plan is empty, so only decode and
            transform): the naive path, for benchmarks and for checking the cache.
    """

    indices: Any
    plans: Sequence[ViewPlan] | None = None
    seed: Seed = 0
    view_transform: ViewTransform | None = None
    reencode_all: bool = False
    entries: Any = None


# (position, plan, base view) of one view that needs pixels
_Work = tuple[int, ViewPlan | None, BaseView | None]


@dataclass
class _Prepared:
    """A validated request: which rows come from the cache, which need pixel work."""

    indices: np.ndarray
    entries: np.ndarray | None  # bank entry per view, or None (the clean cache)
    clean: np.ndarray  # positions served from the cache
    work: list[tuple[int, list[_Work]]]  # (sample, its views)
    n_work: int
    seed: Seed
    view_transform: ViewTransform | None


class _Inline:
    """A future computed on demand in the calling thread (``num_workers=0``)."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self._call = (fn, args)

    def result(self) -> Any:
        fn, args = self._call
        return fn(*args)

    def cancel(self) -> bool:
        return True


class SelectiveEncoder:
    """Image features of training views: cached rows for clean views, re-encoded otherwise.

    Args:
        cached_features: (N, d) projected, un-normalised image embeddings from the export
            (float16), row i = image-store item i. Kept as given (numpy is wrapped without a
            copy); rows are cast to float32 when served.
        image_store: the train images, aligned with `cached_features`.
        encoder: the frozen open_clip model (anything with ``encode_image(x, normalize=False)``).
            It is put in eval mode and only ever called under `torch.inference_mode()`, so no
            gradient reaches it; it must already be on `device`.
        transform: PIL image -> (C, H, W) tensor, the model's eval transform (the one the
            export used, so that a clean view re-encoded would match its cached row).
        device: where the encoder lives and where the features are returned.
        precision: fp32 | bf16 | fp16 | auto for the encoder (autocast; fp32 off CUDA).
        batch_size: images per encoder call.
        num_workers: threads for decoding/augmenting/transforming; 0 = inline.
        prefetch: views of upcoming requests prepared ahead of the encoder in
            `encode_stream` (default ``2 * batch_size``); with workers their pixel work runs
            ahead too, inline it runs when the encoder needs it.
        bank: the export's view bank (N×E base views), for requests with `entries`.
        cache_device: where the clean cache and an in-memory bank are held and gathered
            (default: the host). On a GPU, `device` keeps every step's rows on the GPU; a bank
            read from disk (a zarr array) stays there and is read per request.

    Raises:
        DataError: the cache, the image store and the bank differ in length or width, or the
            cache is not 2-D.
        ValueError: non-positive `batch_size`, negative `num_workers` or `prefetch`.

    Counters (cumulative until `reset_counters`): ``clean_views``, ``reencoded_views``,
    ``encoder_batches``, ``encode_seconds`` (wall time in encoder calls), ``pixel_wait_seconds``
    (time the encoding thread waited for pixel work: decoding on the critical path; with
    ``num_workers=0`` this is all of the pixel work).
    """

    def __init__(
        self,
        cached_features: np.ndarray | torch.Tensor,
        image_store: ImageStore,
        encoder: nn.Module,
        transform: Callable[[Image.Image], torch.Tensor],
        device: torch.device | str,
        precision: str = "fp32",
        batch_size: int = 256,
        num_workers: int = 0,
        prefetch: int | None = None,
        bank: ViewBank | None = None,
        cache_device: torch.device | str | None = None,
    ) -> None:
        if isinstance(cached_features, torch.Tensor):
            cache = cached_features.detach()
        else:
            cache = torch.from_numpy(np.asarray(cached_features))
        if cache.dim() != 2:
            raise DataError(f"cached features must be N×d, got shape {tuple(cache.shape)}")
        if len(image_store) != cache.shape[0]:
            raise DataError(
                f"the image store {getattr(image_store, 'path', '')} holds {len(image_store)} "
                f"images but the feature cache has {cache.shape[0]} rows; they must be the "
                "same export's train split"
            )
        if bank is not None and (bank.num_samples, bank.dim) != tuple(cache.shape):
            raise DataError(
                f"{bank.path} holds views of {bank.num_samples} samples of width {bank.dim}, "
                f"the feature cache is {cache.shape[0]}×{cache.shape[1]}: not the same export"
            )
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if int(num_workers) < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if prefetch is not None and int(prefetch) < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        held = torch.device("cpu") if cache_device is None else torch.device(cache_device)
        self.cache = cache.to(held)
        self.bank = bank
        # An in-memory bank as one tensor: a step's banked rows are one gather where it lives.
        self._bank_rows = (
            torch.from_numpy(bank.features).to(held)
            if bank is not None and isinstance(bank.features, np.ndarray)
            else None
        )
        self.image_store = image_store
        self.encoder = encoder
        self.transform = transform
        self.device = torch.device(device)
        self.precision = resolve_precision(precision, self.device)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.prefetch = 2 * self.batch_size if prefetch is None else int(prefetch)
        self._pool: ThreadPoolExecutor | None = None
        self.encoder.eval()
        self.reset_counters()

    # -- properties and counters --------------------------------------------------------------

    @property
    def num_samples(self) -> int:
        """N, the number of train samples."""
        return int(self.cache.shape[0])

    @property
    def dim(self) -> int:
        """d, the embedding width."""
        return int(self.cache.shape[1])

    @property
    def counters(self) -> dict[str, float]:
        """Snapshot of the counters (see the class docstring)."""
        return dict(self._counters)

    def reset_counters(self) -> dict[str, float]:
        """Zero the counters; returns their values before the reset (e.g. one epoch's)."""
        old = dict(getattr(self, "_counters", {}))
        self._counters: dict[str, float] = {
            "clean_views": 0,
            "reencoded_views": 0,
            "encoder_batches": 0,
            "encode_seconds": 0.0,
            "pixel_wait_seconds": 0.0,
        }
        return old

    # -- public encoding API ------------------------------------------------------------------

    def encode_views(
        self,
        indices: Any,
        plans: Sequence[ViewPlan] | None = None,
        seed: Seed = 0,
        *,
        view_transform: ViewTransform | None = None,
        reencode_all: bool = False,
        entries: Any = None,
    ) -> tuple[torch.Tensor, int]:
        """Features of B views (see `ViewRequest` for the arguments).

        Returns:
            ``(features, n_reencoded)``: (B, d) float32 on `device` (row j = view j; a clean
            view's row is its cached or banked embedding cast to float32, bit for bit) and how
            many views
            went through the encoder.

        Raises:
            ValueError: plans of the wrong length, both plans and `view_transform`, or an index
                out of range.
            DataError: an image does not decode.
        """
        request = ViewRequest(indices, plans, seed, view_transform, reencode_all, entries)
        return next(self.encode_stream([request]))

    def encode_stream(self, requests: Iterable[ViewRequest]) -> Iterator[tuple[torch.Tensor, int]]:
        """`encode_views` for a sequence of requests, one result per request, in order.

        Encoder batches span requests: views to re-encode collect across upcoming requests
        until `batch_size` of them are ready, so the encoder runs full batches even when one
        training step augments fewer views than that; a request is yielded once all of its
        views are encoded. With workers, the pixel work of upcoming requests (up to
        `prefetch` views ahead) runs while earlier views are encoded. Pass the whole epoch's
        requests as a lazy iterable when they do not depend on the results (ECVL's plans only
        depend on the previous epoch's scores). Closing the iterator early cancels pending
        work. Batches are formed in request order, so results do not depend on `num_workers`.
        """
        source = iter(requests)
        pending: deque[tuple[_Prepared, list[Any]]] = deque()
        ahead = 0  # views with pixel work in `pending`
        exhausted = False
        active: deque[list[Any]] = deque()  # [prepared, out, views still to encode]
        images: list[torch.Tensor] = []
        targets: list[tuple[list[Any], int]] = []  # (active entry, position) of each image

        def fill() -> None:
            nonlocal ahead, exhausted
            while not exhausted and (
                not pending or (ahead < self.prefetch and len(pending) < _MAX_PENDING)
            ):
                request = next(source, None)
                if request is None:
                    exhausted = True
                    return
                prepared = self._prepare(request)
                pending.append((prepared, self._submit(prepared)))
                ahead += prepared.n_work

        def encode(count: int) -> None:
            self._encode_into(targets[:count], images[:count])
            del targets[:count], images[:count]

        try:
            while True:
                fill()
                if pending:
                    prepared, futures = pending.popleft()
                    ahead -= prepared.n_work
                    fill()  # keep the workers busy while this request's views are collected
                    entry = [prepared, self._clean_rows(prepared), prepared.n_work]
                    active.append(entry)
                    for future in futures:
                        start = time.perf_counter()
                        done = future.result()
                        self._counters["pixel_wait_seconds"] += time.perf_counter() - start
                        for position, tensor in done:
                            targets.append((entry, position))
                            images.append(tensor)
                        while len(images) >= self.batch_size:
                            encode(self.batch_size)
                elif active:
                    while images:  # no request left to share a batch with
                        encode(self.batch_size)
                else:
                    return
                while active and active[0][2] == 0:
                    prepared, out, _ = active.popleft()
                    self._counters["clean_views"] += int(prepared.clean.size)
                    self._counters["reencoded_views"] += prepared.n_work
                    yield out, prepared.n_work
        finally:
            for _, futures in pending:
                for f in futures:
                    f.cancel()

    def close(self) -> None:
        """Stop the worker threads (a later call starts new ones)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> SelectiveEncoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------

    def _prepare(self, request: ViewRequest) -> _Prepared:
        idx = np.asarray(request.indices)
        if idx.ndim != 1:
            raise ValueError(f"indices must be 1-D, got shape {idx.shape}")
        if idx.size and not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"indices must be integers, got dtype {idx.dtype}")
        idx = idx.astype(np.int64, copy=False)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_samples):
            raise ValueError(
                f"sample index out of range [0, {self.num_samples}): {idx.min()}..{idx.max()}"
            )
        plans, transform = request.plans, request.view_transform
        if plans is not None and transform is not None:
            raise ValueError("pass either plans or a view_transform, not both")
        if plans is not None and len(plans) != idx.size:
            raise ValueError(f"{len(plans)} plans for {idx.size} views")
        entries = None
        if request.entries is not None:
            if self.bank is None:
                raise ValueError("a request with bank entries needs an encoder with a bank")
            if transform is not None:
                raise ValueError("pass either bank entries or a view_transform, not both")
            entries = np.asarray(request.entries).astype(np.int64, copy=False).reshape(-1)
            if entries.size != idx.size:
                raise ValueError(f"{entries.size} bank entries for {idx.size} views")
            if entries.size and (entries.min() < 0 or entries.max() >= self.bank.num_views):
                raise ValueError(f"bank entries must be in [0, {self.bank.num_views})")
        if transform is not None or request.reencode_all:
            work_pos = np.arange(idx.size)
        elif plans is None:
            work_pos = np.zeros(0, dtype=np.int64)
        else:
            work_pos = np.array([j for j, p in enumerate(plans) if p], dtype=np.int64)
        clean = np.setdiff1d(np.arange(idx.size), work_pos, assume_unique=True)
        # One decode per sample, however many of its views need pixels.
        groups: dict[int, list[_Work]] = {}
        for j in work_pos.tolist():
            plan = None if transform is not None else () if plans is None else plans[j]
            base = None if entries is None else self.bank.base_view(int(idx[j]), int(entries[j]))
            groups.setdefault(int(idx[j]), []).append((j, plan, base))
        return _Prepared(
            indices=idx,
            entries=entries,
            clean=clean,
            work=list(groups.items()),
            n_work=int(work_pos.size),
            seed=request.seed,
            view_transform=transform,
        )

    def _submit(self, prepared: _Prepared) -> list[Any]:
        if not prepared.work:
            return []
        args = (prepared.seed, prepared.view_transform)
        # One sorted HDF5 read for the whole request (row-by-row reads cost ~100x more);
        # decoding and augmentation then run per sample, in worker threads if any.
        blobs = self.image_store.get_many_bytes([sample for sample, _ in prepared.work])
        work = [
            (sample, data, views)
            for (sample, views), data in zip(prepared.work, blobs, strict=True)
        ]
        if self.num_workers == 0:
            return [_Inline(self._pixels, *item, *args) for item in work]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="ecvl-pixels")
        return [self._pool.submit(self._pixels, *item, *args) for item in work]

    def _pixels(
        self,
        sample: int,
        data: bytes,
        views: list[_Work],
        seed: Seed,
        view_transform: ViewTransform | None,
    ) -> list[tuple[int, torch.Tensor]]:
        """Decode sample once, then base view + augment + transform each of its views (any
        thread)."""
        image = self.image_store.decode(sample, data)
        out = []
        for position, plan, base in views:
            rng = view_rng(seed, position)
            if view_transform is not None:
                view = view_transform(image, rng)
            else:
                start = image if base is None else apply_base_view(image, *base)
                view = apply_plan(start, plan, rng)
            out.append((position, self.transform(view)))
        return out

    def _clean_rows(self, prepared: _Prepared) -> torch.Tensor:
        """The request's output, its clean views filled from the cache."""
        out = torch.empty(prepared.indices.size, self.dim, dtype=torch.float32, device=self.device)
        if prepared.clean.size:
            where = torch.from_numpy(prepared.clean).to(self.device)
            if prepared.entries is not None:
                idx, ent = prepared.indices[prepared.clean], prepared.entries[prepared.clean]
                if self._bank_rows is not None:
                    held = self._bank_rows.device
                    banked = self._bank_rows[
                        torch.from_numpy(idx).to(held), torch.from_numpy(ent).to(held)
                    ]
                else:
                    banked = torch.from_numpy(self.bank.rows(idx, ent))  # type: ignore[union-attr]
                out[where] = banked.to(self.device, non_blocking=True).float()
                return out
            rows = torch.from_numpy(prepared.indices[prepared.clean]).to(self.cache.device)
            out[where] = self.cache[rows].to(self.device, non_blocking=True).float()
        return out

    def _encode_into(
        self, targets: list[tuple[list[Any], int]], images: list[torch.Tensor]
    ) -> None:
        """Encode one batch and scatter its rows into the outputs of the requests they belong to.

        No device synchronisation: on a GPU `encode_seconds` is the host time to queue the
        encoder's work, and the encoder overlaps with the next batch's pixel work."""
        start = time.perf_counter()
        batch = torch.stack(images).to(self.device, non_blocking=True)
        if self.encoder.training:
            self.encoder.eval()
        with torch.inference_mode(), autocast(self.device, self.precision):
            feats = self.encoder.encode_image(batch, normalize=False)
        # `out` is an ordinary tensor: copying inference-mode results into it makes rows the
        # adapter can use in autograd.
        feats = feats.float()
        rows: dict[int, tuple[list[Any], list[int], list[int]]] = {}
        for i, (entry, position) in enumerate(targets):
            rows.setdefault(id(entry), (entry, [], []))[1].append(i)
            rows[id(entry)][2].append(position)
        for entry, src, dst in rows.values():
            out = entry[1]
            out[torch.tensor(dst, device=self.device)] = feats[
                torch.tensor(src, device=self.device)
            ]
            entry[2] -= len(src)
        self._counters["encode_seconds"] += time.perf_counter() - start
        self._counters["encoder_batches"] += 1
