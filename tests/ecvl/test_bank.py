"""The view bank: built at export, stored in the embedding store, served to stage II.

Every view of a two-view mode starts from a bank entry: an op-free view is its bank row (no
image-store read), a view that draws ops is rebuilt from the image store with that entry's crop
and flip, and a rebuilt view with an empty plan equals its bank row.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from ecvl.augment import PlannedOp, apply_plan
from ecvl.bank import encode_bank_block
from ecvl.data.embeddings import EmbeddingWriter, ViewBank, bank_shard_rows, open_embeddings
from ecvl.errors import DataError
from ecvl.losses import two_view_contrastive_loss
from ecvl.metrics import spearman
from ecvl.reencode import SelectiveEncoder, view_rng
from ecvl.views import stack_pixels
from support import CountingEncoder, cached_world

N, E = 10, 4

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    pixels = np.random.default_rng(3).integers(0, 256, size=(N, 32, 32, 3), dtype=np.uint8)
    return cached_world(tmp_path_factory.mktemp("bank"), pixels, np.arange(N) % 2, bank_views=E)


class NoReads:
    """An image store that fails the test if stage II reads it."""

    def __init__(self, store) -> None:
        self.store, self.labels, self.reads = store, store.labels, 0

    def __len__(self) -> int:
        return len(self.store)

    def get_many_bytes(self, indices):
        self.reads += len(indices)
        return self.store.get_many_bytes(indices)

    def decode_pixels(self, i, data):
        return self.store.decode_pixels(i, data)


def encoder(world, store=None, **kw):
    counting = CountingEncoder(world["model"])
    enc = SelectiveEncoder(
        world["cache"],
        store or world["store"],
        counting,
        world["renderer"],
        "cpu",
        bank=world["bank"],
        **kw,
    )
    return enc, counting


def test_an_op_free_view_is_its_bank_row_and_never_reads_the_store(world):
    store = NoReads(world["store"])
    enc, counting = encoder(world, store)
    idx, entries = np.array([0, 3, 3, 9]), np.array([1, 0, 2, 3])
    feats, n = enc.encode_views(idx, [()] * 4, entries=entries)
    assert n == 0 and store.reads == 0 and counting.images_seen == 0
    expected = torch.from_numpy(world["bank"].features[idx, entries]).float()
    assert torch.equal(feats, expected)  # bit for bit, not the clean cached embedding
    assert not torch.equal(feats[0], torch.from_numpy(world["cache"][0]).float())


def test_a_rebuilt_view_with_an_empty_plan_equals_its_bank_row(world):
    enc, counting = encoder(world, batch_size=5)
    idx = np.repeat(np.arange(N), E)
    entries = np.tile(np.arange(E), N)
    feats, n = enc.encode_views(idx, [()] * idx.size, entries=entries, reencode_all=True)
    assert n == idx.size == counting.images_seen
    bank = torch.from_numpy(world["bank"].features[idx, entries]).float()
    torch.testing.assert_close(feats, bank, atol=2e-2, rtol=2e-3)  # float16 storage


def test_a_view_with_ops_starts_from_its_entrys_crop_and_flip(world):
    enc, _ = encoder(world)
    plan = (PlannedOp("Rotate", 0.5, 1), PlannedOp("Cutout", 0.8, 1))
    feats, n = enc.encode_views(np.array([4]), [plan], seed=7, entries=np.array([2]))
    assert n == 1
    # the rendered base view of entry 2 (the bank's), then the ops as PIL applies them
    renderer, store = world["renderer"], world["store"]
    box, flip = world["bank"].base_view(4, 2)
    pixels = store.decode_pixels(4, store.get_bytes(4))
    base = renderer.pixels(stack_pixels([pixels]), renderer.source_boxes([(32, 32)], [box], [flip]))
    view = apply_plan(Image.fromarray(base[0].permute(1, 2, 0).numpy()), plan, view_rng(7, 0))
    with torch.inference_mode():
        direct = world["model"].encode_image(world["transform"](view)[None], normalize=False)
    torch.testing.assert_close(feats, direct, atol=1e-5, rtol=1e-5)


def test_bank_blocks_do_not_depend_on_block_boundaries(world):
    def block(rows, batch_size=8):
        return encode_bank_block(
            world["model"],
            world["store"],
            rows,
            E,
            0,
            world["renderer"],
            torch.device("cpu"),
            "fp32",
            batch_size=batch_size,
        )

    whole = block(range(N))
    parts = [block(range(0, 3)), block(range(3, N))]
    for k in (1, 2):  # boxes and flips are exactly the same; features up to batching
        assert np.array_equal(whole[k], np.concatenate([p[k] for p in parts]))
    np.testing.assert_allclose(whole[0], np.concatenate([p[0] for p in parts]), atol=1e-5)
    np.testing.assert_allclose(block(range(N), batch_size=3)[0], whole[0], atol=1e-5)
    assert len({tuple(b) for b in whole[1].reshape(-1, 4)}) > N  # the views differ


def test_bank_round_trips_through_the_store_and_plain_zarr(tmp_path, world):
    feats, boxes, flips = encode_bank_block(
        world["model"],
        world["store"],
        range(N),
        E,
        5,
        world["renderer"],
        torch.device("cpu"),
        "fp32",
        16,
    )
    d = feats.shape[2]
    attrs = {"model_name": "m", "checkpoint_digest": "sha256:x", "templates": ["{}"]}
    attrs["classes"] = ["a", "b"]
    path = tmp_path / "e.zarr"
    w = EmbeddingWriter(path, {"train": N}, d, attrs, bank_views=E, bank_seed=5)
    w.write("train", 0, world["cache"], np.arange(N) % 2, [f"k{i}" for i in range(N)])
    w.mark_complete("train")
    w.write_text_features(np.eye(2, d, dtype=np.float32))
    step = w.bank_shard_rows
    assert step == min(N, bank_shard_rows(E, d))
    with pytest.raises(ValueError, match="does not continue"):
        w.write_bank(3, feats[3:5], boxes[3:5], flips[3:5])
    w.write_bank(0, feats[:6], boxes[:6], flips[:6])
    with pytest.raises(DataError, match="train/bank is incomplete"):
        open_embeddings(path)
    resumed = EmbeddingWriter(path, {"train": N}, d, attrs, bank_views=E, bank_seed=5)
    assert resumed.bank_rows_written == 6
    resumed.write_bank(6, feats[6:], boxes[6:], flips[6:])
    resumed.mark_bank_complete()

    store = open_embeddings(path)
    bank = store.bank()
    assert isinstance(bank.features, np.ndarray)  # small: read into memory
    lazy = store.bank(max_memory=0)  # large: read per batch, never whole
    assert isinstance(lazy.features, zarr.Array)
    idx, ent = np.array([9, 2, 2, 0]), np.array([3, 1, 0, 3])
    assert np.array_equal(lazy.rows(idx, ent), bank.rows(idx, ent))
    assert (bank.num_samples, bank.num_views, bank.dim) == (N, E, d)
    assert bank.seed == 5 and bank.checkpoint_digest == "sha256:x"
    idx, ent = np.array([7, 1, 7]), np.array([0, 3, 2])
    assert np.array_equal(bank.rows(idx, ent), feats.astype(np.float16)[idx, ent])
    plain = zarr.open_group(path, mode="r")["train"]  # no ECVL code needed
    assert np.array_equal(plain["bank"][...], feats.astype(np.float16))
    assert np.array_equal(plain["bank_boxes"][...], boxes)
    assert np.array_equal(plain["bank_flips"][...], flips)
    without = _no_bank(tmp_path, attrs, d)
    with pytest.raises(DataError, match="no view bank"):
        without.bank()


def _no_bank(tmp_path, attrs, d):
    path = tmp_path / "plain.zarr"
    w = EmbeddingWriter(path, {"train": 2}, d, attrs)
    w.write("train", 0, np.zeros((2, d)), [0, 1], ["a", "b"])
    w.mark_complete("train")
    w.write_text_features(np.eye(2, d, dtype=np.float32))
    store = open_embeddings(path)
    assert store.bank_views == 0
    return store


def test_bank_arrays_must_agree():
    with pytest.raises(DataError, match="do not describe the same"):
        ViewBank(np.zeros((3, 2, 4)), np.zeros((3, 3, 4)), np.zeros((3, 2), bool))


def test_a_sample_drawn_twice_is_not_its_own_negative():
    gen = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(3, 8, generator=gen), torch.randn(3, 8, generator=gen)
    z1[2], z2[2] = z1[0], z2[0]  # sample 0 drawn twice
    ids = torch.tensor([0, 1, 0])
    masked = two_view_contrastive_loss(z1, z2, 0.5, reduction="none", ids=ids)
    plain = two_view_contrastive_loss(z1, z2, 0.5, reduction="none")
    assert torch.all(masked[[0, 2]] < plain[[0, 2]])  # its duplicate no longer pushes it away
    # with the duplicate's views out of the negatives, sample 0 sees what it sees without it
    alone = two_view_contrastive_loss(z1[:2], z2[:2], 0.5, reduction="none")
    torch.testing.assert_close(masked[0], alone[0])
    torch.testing.assert_close(masked[1], plain[1])  # others keep all negatives
    two = two_view_contrastive_loss(z1[[0, 2]], z2[[0, 2]], 0.5, reduction="none", ids=ids[[0, 2]])
    assert torch.all(two == 0)  # only its positive left


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2], [5, 6, 7]) == pytest.approx(np.sqrt(3) / 2)  # average ranks
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3])) and np.isnan(spearman([1], [2]))


class _NoPixels:
    labels = None

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


def test_a_bank_over_the_memory_budget_is_never_held_whole(tmp_path):
    import math
    import tracemalloc

    from ecvl.stage2 import Stage2Config, Stage2Trainer

    n, e, d, k = 3000, 8, 256, 10
    rng = np.random.default_rng(0)
    attrs = {"model_name": "m", "checkpoint_digest": "sha256:x", "templates": ["{}"]}
    attrs["classes"] = [f"c{i}" for i in range(k)]
    path = tmp_path / "big.zarr"
    w = EmbeddingWriter(path, {"train": n}, d, attrs, bank_views=e)
    labels = np.arange(n) % k
    w.write("train", 0, rng.standard_normal((n, d)), labels, [f"s{i}" for i in range(n)])
    w.mark_complete("train")
    w.write_text_features(np.eye(k, d, dtype=np.float32))
    for a in range(0, n, w.bank_shard_rows):
        m = min(w.bank_shard_rows, n - a)
        w.write_bank(a, rng.standard_normal((m, e, d)), np.zeros((m, e, 4)), np.zeros((m, e)))
    w.mark_bank_complete()
    store = open_embeddings(path)
    train, bank_bytes = store.split("train"), n * e * d * 2
    cfg = Stage2Config(
        epochs=1, batch_size=64, logit_scale=math.log(10), lr=1e-3, weight_decay=0.0,
        warmup_steps=0, residual_ratio=0.2, beta=0.9, k=1, tau_dcvl=0.1, w_dcvl=1.0,
        sampler="balanced", draws_per_epoch=None, mode="contrast_standard", seed=0,
    )  # fmt: skip

    def epoch_peak(max_memory):
        tracemalloc.start()
        bank = store.bank(max_memory=max_memory)
        enc = SelectiveEncoder(
            train.features, _NoPixels(n), torch.nn.Identity(), None, "cpu", bank=bank
        )
        Stage2Trainer(None, store.text_features(), train.labels, enc, cfg, "cpu").train_epoch(
            progress=False
        )
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak

    assert epoch_peak(max_memory=None) >= bank_bytes  # in memory: the whole bank, once
    assert epoch_peak(max_memory=bank_bytes - 1) < bank_bytes / 4  # over budget: per step


def test_bank_files_are_read_directly_only_when_their_index_says_so(tmp_path):
    import google_crc32c  # zarr's checksum of the shard index

    n, e, d = 40, 2, 8
    attrs = {"model_name": "m", "checkpoint_digest": "x", "templates": ["{}"], "classes": ["a"]}
    w = EmbeddingWriter(tmp_path / "e.zarr", {"train": n}, d, attrs, bank_views=e)
    w.write("train", 0, np.zeros((n, d)), np.zeros(n, int), [f"k{i}" for i in range(n)])
    w.mark_complete("train")
    w.write_text_features(np.eye(1, d, dtype=np.float32))
    feats = np.arange(n * e * d, dtype=np.float32).reshape(n, e, d) / (n * e * d)
    w.write_bank(0, feats, np.zeros((n, e, 4)), np.zeros((n, e)))
    w.mark_bank_complete()
    store = open_embeddings(tmp_path / "e.zarr")
    idx, ent = np.array([5, 0, 39, 6, 5]), np.array([1, 0, 1, 0, 0])
    direct = store.bank(max_memory=0)
    assert direct._files is not None
    assert np.array_equal(direct.rows(idx, ent), feats.astype(np.float16)[idx, ent])
    # swap the shard index entries of samples 0 and 1: zarr follows the index, so must we
    shard = tmp_path / "e.zarr/train/bank/c/0/0/0"
    blob = bytearray(shard.read_bytes())
    start = len(blob) - 4 - 16 * direct._files.shard_rows
    blob[start : start + 16], blob[start + 16 : start + 32] = (
        blob[start + 16 : start + 32],
        blob[start : start + 16],
    )
    blob[-4:] = np.array([google_crc32c.value(bytes(blob[start:-4]))], dtype="<u4").tobytes()
    shard.write_bytes(bytes(blob))
    swapped = store.bank(max_memory=0)
    assert swapped._files is None  # the layout is not the export's: zarr reads it
    expected = feats.astype(np.float16)[[1, 0]]
    assert np.array_equal(swapped.rows(np.array([0, 1]), np.array([0, 0])), expected[:, 0])
