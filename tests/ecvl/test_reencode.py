"""Selective re-encoding: clean views come from the cache, only augmented ones reach the encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ecvl.augment import PlannedOp, apply_plan, plan_views
from ecvl.errors import DataError
from ecvl.models.adapter import ResidualAdapter
from ecvl.reencode import SelectiveEncoder, ViewRequest, view_rng
from support import CountingEncoder, cached_world

N = 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A random-init tiny ViT, N random 32×32 PNGs in an image store, and their cache."""
    pixels = np.random.default_rng(0).integers(0, 256, size=(N, 32, 32, 3), dtype=np.uint8)
    return cached_world(tmp_path_factory.mktemp("reencode"), pixels, np.arange(N) % 3)


def make_encoder(world, **kw) -> tuple[SelectiveEncoder, CountingEncoder]:
    counting = CountingEncoder(world["model"])
    enc = SelectiveEncoder(
        world["cache"], world["store"], counting, world["renderer"], "cpu", bank=world["bank"], **kw
    )
    return enc, counting


def direct(world, image: Image.Image) -> torch.Tensor:
    with torch.inference_mode():
        return world["model"].encode_image(world["transform"](image)[None], normalize=False)[0]


def test_clean_views_are_cached_rows_bit_for_bit(world):
    enc, counting = make_encoder(world)
    idx = np.array([3, 0, 3, 15, 7])
    feats, n = enc.encode_views(idx, [()] * 5, seed=1)
    assert n == 0 and counting.images_seen == 0
    assert feats.dtype == torch.float32 and feats.shape == (5, world["cache"].shape[1])
    for j, i in enumerate(idx):
        assert torch.equal(feats[j], torch.from_numpy(world["cache"][i]).float())
    # plans=None is the same: every view clean
    feats2, n2 = enc.encode_views(idx)
    assert n2 == 0 and torch.equal(feats, feats2)
    assert enc.counters["clean_views"] == 10 and enc.counters["reencoded_views"] == 0


def test_augmented_views_match_direct_encoding_and_only_they_are_encoded(world):
    # the stored images have the model's side: rendered views are the PIL reference's bytes
    enc, counting = make_encoder(world, batch_size=3)
    idx = np.array([0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5])  # two views of six samples
    plans = plan_views(np.linspace(0.0, 1.0, idx.size), k=2, rng=5)
    aug = [j for j, p in enumerate(plans) if p]
    assert 0 < len(aug) < idx.size  # the test needs both kinds
    seed = (7, 1, 0)
    feats, n = enc.encode_views(idx, plans, seed=seed)
    assert n == len(aug) == counting.images_seen
    assert len(counting.batches) == -(-len(aug) // 3)  # batched, batch_size 3
    received = torch.cat(counting.batches)
    for j in range(idx.size):
        image = world["store"].get_image(int(idx[j]))
        if plans[j]:
            expected = direct(world, apply_plan(image, plans[j], view_rng(seed, j)))
            torch.testing.assert_close(feats[j], expected, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(feats[j], torch.from_numpy(world["cache"][idx[j]]).float())
            clean_pixels = world["transform"](image)
            assert not any(torch.equal(clean_pixels, r) for r in received)
    counters = enc.counters
    assert (counters["clean_views"], counters["reencoded_views"]) == (idx.size - n, n)


def test_results_do_not_depend_on_batching(world):
    idx = np.array([5, 6, 7, 8, 5, 6, 7, 8])
    plans = plan_views(np.full(idx.size, 0.9), k=2, rng=3)
    out = []
    for batch_size in (256, 2):
        enc, _ = make_encoder(world, batch_size=batch_size)
        out.append(enc.encode_views(idx, plans, seed=11)[0])
    torch.testing.assert_close(out[0], out[1], rtol=1e-5, atol=1e-5)


def test_zero_scores_reencode_nothing(world):
    enc, counting = make_encoder(world)
    idx = np.arange(N)
    plans = plan_views(np.zeros(N), k=2, rng=0)
    feats, n = enc.encode_views(idx, plans, seed=0)
    assert n == 0 and counting.images_seen == 0
    assert torch.equal(feats, torch.from_numpy(world["cache"]).float())


def test_banked_views_rebuilt_from_the_store_are_the_bank_rows(world):
    enc, counting = make_encoder(world)
    bank = world["bank"]
    idx, entries = np.array([2, 9, 2, 9]), np.array([0, 1, 3, 1])
    plans = [(), (PlannedOp("Solarize", 0.7, 1),), (), ()]
    feats, n = enc.encode_views(idx, plans, seed=4, entries=entries, reencode_all=True)
    assert n == idx.size == counting.images_seen
    for j in (0, 2, 3):  # no op: the bank row (float16), rendered by the same renderer
        row = torch.from_numpy(bank.rows(idx[j : j + 1], entries[j : j + 1])[0]).float()
        torch.testing.assert_close(feats[j], row, rtol=2e-3, atol=2e-3)
    # the op applies on top of the base view: not the bank row, not the plain image's view
    row = torch.from_numpy(bank.rows(idx[1:2], entries[1:2])[0]).float()
    assert not torch.allclose(feats[1], row, atol=1e-2)


def test_stream_equals_one_call_per_request(world):
    rng = np.random.default_rng(0)
    requests = []
    for step in range(4):
        idx = rng.integers(0, N, size=6)
        requests.append(ViewRequest(idx, plan_views(np.full(6, 0.7), 2, rng), seed=(0, step)))
    requests.append(ViewRequest(np.array([1, 2]), seed=9, entries=[0, 3], reencode_all=True))
    enc, counting = make_encoder(world, batch_size=4)
    streamed = list(enc.encode_stream(iter(requests)))
    single, _ = make_encoder(world, batch_size=4)
    for (feats, n), req in zip(streamed, requests, strict=True):
        f1, n1 = single.encode_views(
            req.indices, req.plans, req.seed, entries=req.entries, reencode_all=req.reencode_all
        )
        assert n == n1
        torch.testing.assert_close(feats, f1, rtol=1e-5, atol=1e-5)
    total = sum(n for _, n in streamed)
    assert counting.images_seen == total == enc.counters["reencoded_views"]
    assert enc.reset_counters()["reencoded_views"] == total
    assert enc.counters["reencoded_views"] == 0


def test_features_train_an_adapter_but_never_the_encoder(world):
    enc, _ = make_encoder(world)
    idx = np.array([0, 1, 0, 1])
    plans = [(), (PlannedOp("Invert", 0.0, 1),), (), (PlannedOp("Rotate", 0.5, 1),)]
    feats, n = enc.encode_views(idx, plans, seed=0)
    assert n == 2
    adapter = ResidualAdapter(feats.shape[1], 0.5, seed=0)
    adapter(feats).square().sum().backward()
    assert adapter.weight.grad is not None and torch.isfinite(adapter.weight.grad).all()
    assert all(p.grad is None for p in world["model"].parameters())


def test_bad_requests_raise(world):
    enc, _ = make_encoder(world)
    with pytest.raises(ValueError, match="2 plans for 3 views"):
        enc.encode_views(np.array([0, 1, 2]), [(), ()])
    with pytest.raises(ValueError, match="bank entries must be in"):
        enc.encode_views(np.array([0]), [()], entries=[9])
    with pytest.raises(ValueError, match="out of range"):
        enc.encode_views(np.array([N]))
    with pytest.raises(DataError, match="same export"):
        SelectiveEncoder(
            world["cache"][:-1], world["store"], world["model"], world["renderer"], "cpu"
        )


def test_reencode_all_encodes_clean_views_to_their_cached_rows(world):
    """The naive path: clean views go through the encoder too and land on the cache (float16)."""
    enc, counting = make_encoder(world)
    idx = np.arange(N)
    plans = plan_views(np.zeros(N), k=2, rng=0)  # all clean
    feats, n = enc.encode_views(idx, plans, seed=0, reencode_all=True)
    assert n == N == counting.images_seen
    cached = torch.from_numpy(world["cache"]).float()
    torch.testing.assert_close(feats, cached, rtol=2e-3, atol=2e-3)


def test_images_held_in_memory_render_the_same_views(world):
    store = world["store"]
    pixels = np.stack([store.decode_pixels(i, store.get_bytes(i)) for i in range(N)])
    idx = np.array([3, 1, 3, 7, 0, 12])
    plans = plan_views(np.full(idx.size, 0.8), k=2, rng=2)
    entries = np.array([0, 1, 2, 3, 0, 1])
    read, _ = make_encoder(world)
    held, _ = make_encoder(world, pixels=pixels)
    a, n = read.encode_views(idx, plans, seed=5, entries=entries, reencode_all=True)
    b, m = held.encode_views(idx, plans, seed=5, entries=entries, reencode_all=True)
    assert n == m == idx.size and torch.equal(a, b)
