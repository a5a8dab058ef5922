"""Selective re-encoding for stage II: cached embeddings for clean views, the encoder for the rest.

DESIGN.md §1, "Re-encode only augmented views": a view to which memory-driven augmentation
applied no op is exactly the image the export encoded, so its feature is a cached row: the clean
embedding, or with a view bank (`entries`) the banked base view. Only views that were actually
augmented are read from the image store and rendered (their bank entry's crop and flip, their
ops, the eval transform: `ecvl.views.ViewRenderer`, on the whole batch on the encoder's device)
and run through the frozen image encoder. Early in training, and for well-learned samples (low
memorisation score), most views are banked and cost nothing.

Determinism: view ``j`` of a request with seed ``s`` draws its pixel randomness (Cutout's
position) from `view_rng(s, j)`, so results depend on nothing but the request. Encoder batches
are formed in request order, so even the floating-point batching is reproducible; a different
`batch_size` regroups the encoder's inputs and may change re-encoded features in the last bits
(about 1e-7).

Encoder batches span requests: a request's rendered views wait until `batch_size` of them are
ready, so the encoder runs full batches even when one training step augments fewer views than
that. On a GPU the rendering and the encoder are queued without a host synchronisation, so
the host reads and decodes the next request's images while the device works.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ecvl.augment import ViewPlan
from ecvl.data.embeddings import ViewBank
from ecvl.data.image_store import ImageStore
from ecvl.errors import DataError
from ecvl.precision import autocast, resolve_precision
from ecvl.views import ViewRenderer, stack_pixels

log = logging.getLogger(__name__)

__all__ = ["SelectiveEncoder", "ViewRequest", "view_rng"]

Seed = int | Sequence[int]


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
            means all views are clean.
        entries: one bank entry per view (needs the encoder's `bank`): the view starts from
            that base view, and a clean one is its bank row; None: the whole stored image, and
            a clean view is the clean cached embedding.
        seed: int or sequence of ints; view j's pixel randomness is `view_rng(seed, j)`.
        reencode_all: re-encode clean views too (their plan is empty, so only the base view and
            the eval transform): the naive path, for benchmarks and for checking the cache.
    """

    indices: Any
    plans: Sequence[ViewPlan] | None = None
    seed: Seed = 0
    reencode_all: bool = False
    entries: Any = None


@dataclass
class _Prepared:
    """A validated request: which rows come from the cache, which are rendered."""

    indices: np.ndarray
    entries: np.ndarray | None  # bank entry per view, or None (the clean cache)
    clean: np.ndarray  # positions served from the cache
    work: np.ndarray  # positions rendered and re-encoded
    plans: Sequence[ViewPlan] | None
    seed: Seed

    @property
    def n_work(self) -> int:
        return int(self.work.size)


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
        renderer: turns stored images into the model's inputs (the export's base views and
            eval transform, plus the ops), so that a clean view re-encoded matches its row.
        device: where the encoder lives, where views are rendered and features returned.
        precision: fp32 | bf16 | fp16 | auto for the encoder (autocast; fp32 off CUDA).
        batch_size: images per encoder call.
        bank: the export's view bank (N×E base views), for requests with `entries`.
        cache_device: where the clean cache and an in-memory bank are held and gathered
            (default: the host). On a GPU, `device` keeps every step's rows on the GPU; a bank
            read from disk (a zarr array) stays there and is read per request.
        pixels: the train images as one uint8 N×H×W×3 array (`ImageStore.raw_pixels`), held
            on `cache_device`: a request's images are then one gather instead of a read and a
            decode per image. None: read from the image store per request.

    Raises:
        DataError: the cache, the image store and the bank differ in length or width, or the
            cache is not 2-D.
        ValueError: non-positive `batch_size`.

    Counters (cumulative until `reset_counters`): ``clean_views``, ``reencoded_views``,
    ``encoder_batches``, ``encode_seconds`` (time in encoder calls), ``pixel_seconds`` (time
    reading, decoding and rendering the views to re-encode). On a GPU both are the host's time
    to queue the work.
    """

    def __init__(
        self,
        cached_features: np.ndarray | torch.Tensor,
        image_store: ImageStore,
        encoder: nn.Module,
        renderer: ViewRenderer | None,
        device: torch.device | str,
        precision: str = "fp32",
        batch_size: int = 256,
        bank: ViewBank | None = None,
        cache_device: torch.device | str | None = None,
        pixels: np.ndarray | None = None,
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
        held = torch.device("cpu") if cache_device is None else torch.device(cache_device)
        self.cache = cache.to(held)
        self.bank = bank
        # An in-memory bank as one tensor: a step's banked rows are one gather where it lives.
        self._bank_rows = (
            torch.from_numpy(bank.features).to(held)
            if bank is not None and isinstance(bank.features, np.ndarray)
            else None
        )
        if pixels is not None and len(pixels) != cache.shape[0]:
            raise DataError(f"{len(pixels)} images in memory for {cache.shape[0]} cached rows")
        # N×3×H×W, so that a request's views are one index_select
        self._pixels = (
            None if pixels is None else torch.from_numpy(pixels).permute(0, 3, 1, 2).to(held)
        )
        self.image_store = image_store
        self.encoder = encoder
        self.renderer = renderer
        self.device = torch.device(device)
        self.precision = resolve_precision(precision, self.device)
        self.batch_size = int(batch_size)
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
            "pixel_seconds": 0.0,
        }
        return old

    # -- public encoding API ------------------------------------------------------------------

    def encode_views(
        self,
        indices: Any,
        plans: Sequence[ViewPlan] | None = None,
        seed: Seed = 0,
        *,
        reencode_all: bool = False,
        entries: Any = None,
    ) -> tuple[torch.Tensor, int]:
        """Features of B views (see `ViewRequest` for the arguments).

        Returns:
            ``(features, n_reencoded)``: (B, d) float32 on `device` (row j = view j; a clean
            view's row is its cached or banked embedding cast to float32, bit for bit) and how
            many views went through the encoder.

        Raises:
            ValueError: plans of the wrong length, or an index out of range.
            DataError: an image does not decode.
        """
        request = ViewRequest(indices, plans, seed, reencode_all, entries)
        return next(self.encode_stream([request]))

    def encode_stream(self, requests: Iterable[ViewRequest]) -> Iterator[tuple[torch.Tensor, int]]:
        """`encode_views` for a sequence of requests, one result per request, in order.

        Encoder batches span requests: rendered views collect across upcoming requests until
        `batch_size` of them are ready, so the encoder runs full batches even when one training
        step augments fewer views than that; a request is yielded once all of its views are
        encoded. Pass the whole epoch's requests as a lazy iterable when they do not depend on
        the results (ECVL's plans only depend on the previous epoch's scores).
        """
        active: deque[list[Any]] = deque()  # [prepared, out, views still to encode]
        chunks: deque[tuple[list[Any], np.ndarray, torch.Tensor]] = deque()  # rendered views
        ready = 0  # rendered views waiting in `chunks`

        def encode(count: int) -> None:
            nonlocal ready
            parts, taken = [], 0
            while taken < count:
                entry, positions, pixels = chunks.popleft()
                take = min(count - taken, positions.size)
                parts.append((entry, positions[:take], pixels[:take]))
                if take < positions.size:
                    chunks.appendleft((entry, positions[take:], pixels[take:]))
                taken += take
            ready -= taken
            self._encode_into(parts)

        for request in requests:
            prepared = self._prepare(request)
            entry = [prepared, self._clean_rows(prepared), prepared.n_work]
            active.append(entry)
            if prepared.n_work:
                chunks.append((entry, prepared.work, self._render(prepared)))
                ready += prepared.n_work
                while ready >= self.batch_size:
                    encode(self.batch_size)
            while active and active[0][2] == 0:
                yield self._finish(active.popleft())
        while ready:
            encode(min(ready, self.batch_size))
        while active:
            yield self._finish(active.popleft())

    # -- internals ----------------------------------------------------------------------------

    def _finish(self, entry: list[Any]) -> tuple[torch.Tensor, int]:
        prepared, out, _ = entry
        self._counters["clean_views"] += int(prepared.clean.size)
        self._counters["reencoded_views"] += prepared.n_work
        return out, prepared.n_work

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
        plans = request.plans
        if plans is not None and len(plans) != idx.size:
            raise ValueError(f"{len(plans)} plans for {idx.size} views")
        entries = None
        if request.entries is not None:
            if self.bank is None:
                raise ValueError("a request with bank entries needs an encoder with a bank")
            entries = np.asarray(request.entries).astype(np.int64, copy=False).reshape(-1)
            if entries.size != idx.size:
                raise ValueError(f"{entries.size} bank entries for {idx.size} views")
            if entries.size and (entries.min() < 0 or entries.max() >= self.bank.num_views):
                raise ValueError(f"bank entries must be in [0, {self.bank.num_views})")
        if request.reencode_all:
            work = np.arange(idx.size)
        elif plans is None:
            work = np.zeros(0, dtype=np.int64)
        else:
            work = np.array([j for j, p in enumerate(plans) if p], dtype=np.int64)
        if work.size and self.renderer is None:
            raise ValueError("views to re-encode need an encoder with a renderer")
        clean = np.setdiff1d(np.arange(idx.size), work, assume_unique=True)
        return _Prepared(idx, entries, clean, work, plans, request.seed)

    def _render(self, prepared: _Prepared) -> torch.Tensor:
        """The request's views to re-encode, rendered: float (n_work, 3, S, S) on `device`, from
        the images in memory (one gather) or read from the store (`_read`)."""
        start = time.perf_counter()
        work, idx = prepared.work, prepared.indices
        if self._pixels is not None:
            rows = torch.from_numpy(idx[work]).to(self._pixels.device)
            images = self._pixels.index_select(0, rows).to(self.device, non_blocking=True)
            sizes = np.tile(np.array(self._pixels.shape[2:]), (work.size, 1))
        else:
            images, sizes = self._read(idx[work])
        if prepared.entries is None:  # the whole image, unmirrored
            boxes = np.concatenate([np.zeros_like(sizes), sizes[:, ::-1]], axis=1)
            flips = np.zeros(work.size, dtype=bool)
        else:
            boxes = self.bank.boxes[idx[work], prepared.entries[work]]  # type: ignore[union-attr]
            flips = self.bank.flips[idx[work], prepared.entries[work]]  # type: ignore[union-attr]
        plan = self.renderer.source_boxes(sizes, boxes, flips)  # type: ignore[union-attr]
        view_plans = None
        rngs = None
        if prepared.plans is not None:
            view_plans = [prepared.plans[j] for j in work.tolist()]
            rngs = [
                view_rng(prepared.seed, j) if any(op[0] == "Cutout" for op in p) else None
                for j, p in zip(work.tolist(), view_plans, strict=True)
            ]
        pixels = self.renderer.render(images, plan, view_plans, rngs)  # type: ignore[union-attr]
        self._counters["pixel_seconds"] += time.perf_counter() - start
        return pixels

    def _read(self, samples: np.ndarray) -> tuple[Any, np.ndarray]:
        """The images of `samples` (one per view) read from the store, each distinct sample read
        and decoded once: uint8 B×3×H×W on `device` (a list when sizes differ), and (B, 2)
        heights and widths."""
        unique, which = np.unique(samples, return_inverse=True)
        blobs = self.image_store.get_many_bytes(unique.tolist())
        decoded = [
            self.image_store.decode_pixels(int(i), data)
            for i, data in zip(unique.tolist(), blobs, strict=True)
        ]
        arrays = [decoded[k] for k in which.tolist()]
        sizes = np.array([a.shape[:2] for a in arrays], dtype=np.int64).reshape(-1, 2)
        images = stack_pixels(arrays)
        if isinstance(images, torch.Tensor):
            return images.to(self.device, non_blocking=True), sizes
        return [t.to(self.device, non_blocking=True) for t in images], sizes

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

    def _encode_into(self, parts: list[tuple[list[Any], np.ndarray, torch.Tensor]]) -> None:
        """Encode one batch and scatter its rows into the outputs of the requests they belong to.

        No device synchronisation: on a GPU `encode_seconds` is the host time to queue the
        encoder's work, and the encoder overlaps with the next request's reading."""
        start = time.perf_counter()
        batch = torch.cat([pixels for _, _, pixels in parts]) if len(parts) > 1 else parts[0][2]
        if self.encoder.training:
            self.encoder.eval()
        with torch.inference_mode(), autocast(self.device, self.precision):
            feats = self.encoder.encode_image(batch, normalize=False)
        # `out` is an ordinary tensor: copying inference-mode results into it makes rows the
        # adapter can use in autograd.
        feats = feats.float()
        row = 0
        for entry, positions, _ in parts:
            n = positions.size
            entry[1][torch.from_numpy(positions).to(self.device)] = feats[row : row + n]
            entry[2] -= n
            row += n
        self._counters["encode_seconds"] += time.perf_counter() - start
        self._counters["encoder_batches"] += 1
