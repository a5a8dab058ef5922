"""Batched RandAugment gives the PIL path's pixels, op by op and plan by plan, and eq. 10's plans
have eq. 10's statistics."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter, ImageOps
from sklearn.datasets import load_digits

from ecvl.augment import OP_NAMES, OPS, PlannedOp, apply_plan, plan_views
from ecvl.batch_randaugment import apply_plans

GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
# Resampling ops: mean absolute difference allowed, in levels (measured: 0, they are exact on
# x86-64; the margin is for a PIL built with fused multiply-adds, where a truncation may fall
# the other way now and then). grid_sample-style warps are at 0.5-1.3.
GEOMETRIC_MEAN_TOLERANCE = 0.01

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@functools.cache
def _arrays(size: int, mode: str) -> tuple[np.ndarray, ...]:
    """Real-looking test images: five digits upscaled (bicubic) on random colours with noise,
    seeded noise, a gradient, a flat image and a two-level one (the degenerate cases of
    AutoContrast, Equalize and Contrast)."""
    rng = np.random.default_rng(size)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    out = []
    for digit in load_digits().images[:5]:
        small = Image.fromarray((digit * (255 / 16)).astype(np.uint8))
        grey = np.asarray(small.resize((size, size), Image.Resampling.BICUBIC)) / 255.0
        if mode == "RGB":
            fg, bg = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
            pixels = bg + grey[..., None] * (fg - bg) + rng.normal(0, 6, shape)
        else:
            pixels = 20 + 200 * grey + rng.normal(0, 6, shape)
        out.append(np.clip(pixels, 0, 255).astype(np.uint8))
    out.append(rng.integers(0, 256, shape, dtype=np.uint8))
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    gradient = np.stack([255 * x, 30 + 200 * y, 90 * (x + y)], -1) if mode == "RGB" else 180 * x
    out.append(gradient.astype(np.uint8))
    out.append(np.full(shape, 77, np.uint8))
    out.append(np.where(rng.random(shape) < 0.3, 40, 200).astype(np.uint8))
    return tuple(out)


def _images(size: int, mode: str, count: int | None = None) -> list[np.ndarray]:
    return list(_arrays(size, mode)[:count])


def _batch(arrays: list[np.ndarray]) -> torch.Tensor:
    t = torch.from_numpy(np.stack(arrays))
    return (t.permute(0, 3, 1, 2) if t.dim() == 4 else t[:, None]).contiguous()


def _rngs(n: int, seed: int = 0) -> list[np.random.Generator]:
    return [np.random.default_rng([seed, i]) for i in range(n)]


def _pil(arrays: list[np.ndarray], plans: list, seed: int = 0) -> torch.Tensor:
    """The reference: `apply_plan` per image, generators seeded as `_rngs` seeds them."""
    rngs = _rngs(len(arrays), seed)
    return _batch(
        [
            np.asarray(apply_plan(Image.fromarray(a), plan, rng))
            for a, plan, rng in zip(arrays, plans, rngs, strict=True)
        ]
    )


def _settings(name: str) -> list[tuple[float, int]]:
    spec = OPS[name]
    if not spec.has_magnitude:
        return [(0.5, 1)]
    return [(m, s) for m in (0.05, 0.3, 0.65, 1.0) for s in ((1, -1) if spec.signed else (1,))]


# --- each op against PIL -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("name", OP_NAMES)
def test_each_op_matches_pil(name: str, mode: str) -> None:
    """Nine 32 px images and four 64 px ones, every magnitude setting: pointwise ops (and
    Cutout) bit for bit, resampling ops within GEOMETRIC_MEAN_TOLERANCE."""
    for size, count in ((32, None), (64, 4)):
        arrays = _images(size, mode, count)
        for magnitude, sign in _settings(name):
            plans = [(PlannedOp(name, magnitude, sign),)] * len(arrays)
            got = apply_plans(_batch(arrays), plans, _rngs(len(arrays)))
            want = _pil(arrays, plans)
            assert got.dtype == torch.uint8 and got.shape == want.shape
            if name in GEOMETRIC:
                diff = (got.int() - want.int()).abs().double().mean().item()
                assert diff <= GEOMETRIC_MEAN_TOLERANCE, (size, magnitude, sign, diff)
            else:
                assert torch.equal(got, want), (size, magnitude, sign)


def test_auto_contrast_matches_pil_over_ranges_and_levels() -> None:
    """PIL's LUT in float64 with correctly rounded division, for every level of 1,755 (lo, hi)
    ranges: all with lo = 0 and 1,500 drawn at random (torchvision's float32 division maps
    the top level to 254 in four ranges of five). All 32,640 ranges pass too; that takes 10 s."""
    lo, hi = np.triu_indices(256, k=1)
    keep = np.flatnonzero(lo == 0)
    keep = np.union1d(keep, np.random.default_rng(0).choice(len(lo), 1_500, replace=False))
    lo, hi = lo[keep], hi[keep]
    rows = np.clip(np.arange(256), lo[:, None], hi[:, None]).astype(np.uint8)  # one per range
    want = np.stack([np.asarray(ImageOps.autocontrast(Image.fromarray(r[None])))[0] for r in rows])
    plans = [(PlannedOp("AutoContrast", 0.0, 1),)] * len(rows)
    got = apply_plans(torch.from_numpy(rows)[:, None, None, :], plans)
    assert np.array_equal(got[:, 0, 0].numpy(), want)


def test_smooth_filter_matches_pil_for_every_weighted_sum() -> None:
    """Sharpness's degenerate image, PIL's SMOOTH filter, computed in integers, against PIL's
    float32 filter for every weighted sum N = 5 * centre + neighbours (0 .. 3315): one 3 x 3
    tile per N, side by side (no centre sees another tile)."""
    from ecvl.batch_randaugment import _smooth

    tiles = []
    for n in range(13 * 255 + 1):
        centre = min(255, n // 5)
        ring = [min(255, max(0, n - 5 * centre - 255 * j)) for j in range(8)]
        tiles.append(np.array([ring[:3], [ring[3], centre, ring[4]], ring[5:]], np.uint8))
    image = np.concatenate(tiles, axis=1)
    want = np.asarray(Image.fromarray(image).filter(ImageFilter.SMOOTH))
    got = _smooth(_batch([image]))[0, 0].numpy()
    assert np.array_equal(got[1, 1::3], want[1, 1::3])
    assert np.array_equal(got, want)  # tile edges: the image border is copied, the rest mixes


def test_solarize_thresholds_near_every_level_match_pil() -> None:
    """Thresholds just below, at and just above every level (a float32 comparison inverts a
    level PIL keeps when the threshold is a hair above it)."""
    spec = OPS["Solarize"]
    span = spec.start - spec.end
    magnitudes = sorted(
        {
            min(1.0, max(0.0, (spec.start - level) / span + eps))
            for level in range(110, 257)
            for eps in (-1e-13, 0.0, 1e-13, 1e-9)
        }
    )
    levels = [np.arange(256, dtype=np.uint8)[None, :]] * len(magnitudes)
    plans = [(PlannedOp("Solarize", m, 1),) for m in magnitudes]
    assert torch.equal(apply_plans(_batch(levels), plans), _pil(levels, plans))


# --- plans on batches ----------------------------------------------------------------------------


def _mixed_plans(n: int, seed: int) -> list:
    """Eq. 10 plans with k = 2 at high scores: most images get two ops, all ops appear."""
    return plan_views(np.linspace(0.5, 1.0, n), k=2, rng=np.random.default_rng(seed))


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_mixed_batch_equals_each_sample_alone_and_pil(mode: str) -> None:
    """Different ops, magnitudes and signs per sample in one batch: each row is what the image
    gets alone, and what the PIL path gives (geometric ops within tolerance)."""
    arrays = _images(32, mode) * 6  # 54 images
    plans = _mixed_plans(len(arrays), seed=1)
    assert {op.op for plan in plans for op in plan} == set(OP_NAMES)
    got = apply_plans(_batch(arrays), plans, _rngs(len(arrays)))
    rngs = _rngs(len(arrays))
    for i, (array, plan) in enumerate(zip(arrays, plans, strict=True)):
        alone = apply_plans(_batch([array]), [plan], [rngs[i]])
        assert torch.equal(got[i : i + 1], alone), plan
    want = _pil(arrays, plans)
    exact = [i for i, plan in enumerate(plans) if not any(op.op in GEOMETRIC for op in plan)]
    assert torch.equal(got[exact], want[exact])
    assert (got.int() - want.int()).abs().double().mean().item() <= GEOMETRIC_MEAN_TOLERANCE


def test_empty_plans_leave_images_bit_identical_and_the_input_untouched() -> None:
    images = _batch(_images(32, "RGB"))
    before = images.clone()
    out = apply_plans(images, [()] * len(images))
    assert torch.equal(out, images) and out.data_ptr() != images.data_ptr()
    plans = [()] * len(images)
    plans[3] = (PlannedOp("Invert", 0.0, 1),)
    out = apply_plans(images, plans)
    assert torch.equal(images, before)  # not modified in place
    assert torch.equal(out[:3], images[:3]) and torch.equal(out[4:], images[4:])
    assert torch.equal(out[3], 255 - images[3])
    assert apply_plans(images[:0], []).shape == (0, 3, 32, 32)


@pytest.mark.parametrize(
    "plan",
    [
        (PlannedOp("TranslateX", 0.4, 1), PlannedOp("Equalize", 0.0, 1)),
        (PlannedOp("Equalize", 0.0, 1), PlannedOp("TranslateX", 0.4, 1)),
        (PlannedOp("Solarize", 0.8, 1), PlannedOp("Brightness", 0.9, -1)),
        (PlannedOp("Brightness", 0.9, -1), PlannedOp("Solarize", 0.8, 1)),
        (PlannedOp("Cutout", 0.9, 1), PlannedOp("Rotate", 0.7, 1), PlannedOp("Cutout", 0.5, 1)),
    ],
)
def test_multi_op_plans_apply_in_order(plan: tuple) -> None:
    arrays = _images(32, "RGB", 5)
    got = apply_plans(_batch(arrays), [plan] * 5, _rngs(5))
    want = _pil(arrays, [plan] * 5)
    if any(op.op in GEOMETRIC for op in plan):
        assert (got.int() - want.int()).abs().double().mean().item() <= GEOMETRIC_MEAN_TOLERANCE
    else:
        assert torch.equal(got, want)
    reverse = apply_plans(_batch(arrays), [plan[::-1]] * 5, _rngs(5))
    assert not torch.equal(got, reverse)  # order matters, and is the plan's


def test_cutout_draws_the_same_positions_from_the_same_streams() -> None:
    """Same seeded generators: same squares as `apply_plan`, and the generators end in the same
    state (Cutout draws only when its side is positive, as the PIL path does)."""
    arrays = _images(32, "RGB")
    plans = [
        (PlannedOp("Cutout", m, 1), PlannedOp("Invert", 0.0, 1), PlannedOp("Cutout", m / 2, 1))
        for m in np.linspace(0.0, 1.0, len(arrays))
    ]
    ours, theirs = _rngs(len(arrays), seed=9), _rngs(len(arrays), seed=9)
    got = apply_plans(_batch(arrays), plans, ours)
    want = _batch(
        [
            np.asarray(apply_plan(Image.fromarray(a), plan, rng))
            for a, plan, rng in zip(arrays, plans, theirs, strict=True)
        ]
    )
    assert torch.equal(got, want)
    assert [r.random() for r in ours] == [r.random() for r in theirs]
    # another stream, other squares
    assert not torch.equal(got, apply_plans(_batch(arrays), plans, _rngs(len(arrays), seed=10)))


def test_generators_are_read_once_and_only_for_plans_with_cutout() -> None:
    """A sequence that builds generators on access (as `view_rng` would) is read once per plan
    holding Cutout, however many Cutouts it holds, and never for the others."""

    class Lazy(Sequence):
        def __init__(self, n: int) -> None:
            self.n, self.reads = n, []

        def __len__(self) -> int:
            return self.n

        def __getitem__(self, i):
            self.reads.append(i)
            return np.random.default_rng([0, i])

    arrays = _images(32, "RGB")
    cut, inv = PlannedOp("Cutout", 0.6, 1), PlannedOp("Invert", 0.0, 1)
    plans = [(cut, inv, cut), (inv,), (), (inv, cut), (inv, inv), (cut,), (), (inv,), (cut, cut)]
    lazy = Lazy(len(arrays))
    got = apply_plans(_batch(arrays), plans, lazy)
    assert lazy.reads == [0, 3, 5, 8]
    assert torch.equal(got, _pil(arrays, plans))


@pytest.mark.parametrize(
    ("images", "plans", "rngs", "match"),
    [
        (torch.zeros(2, 3, 8, 8), [(), ()], None, "uint8"),
        (torch.zeros(2, 4, 8, 8, dtype=torch.uint8), [(), ()], None, "C in"),
        (torch.zeros(3, 8, 8, dtype=torch.uint8), [(), ()], None, "uint8"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), [()], None, "2 images but 1 plans"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), [(), ()], [None], "1 rngs"),
        (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), [(("Blur", 0.5, 1),)], None, "unknown op"),
        (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), [(("Rotate", 1.5, 1),)], None, "magnitude"),
        (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), [(("Cutout", 0.5, 1),)], [None], "no rng"),
    ],
)
def test_invalid_input_is_refused(images, plans, rngs, match) -> None:
    with pytest.raises(ValueError, match=match):
        apply_plans(images, plans, rngs)


# --- eq. 10's plan statistics --------------------------------------------------------------------


def _within(hits: float, n: int, p: float, sigmas: float = 5.0) -> bool:
    """`hits` of `n` trials against probability `p`, within `sigmas` binomial standard errors."""
    return abs(hits / n - p) <= sigmas * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize(("m", "k"), [(0.3, 2), (0.75, 2), (0.5, 3)])
def test_plan_views_follows_eq_10(m: float, k: int) -> None:
    """Each of k draws is kept with probability M (ops per view ~ Binomial(k, M)), the op is
    uniform over the 15 (each fires on a draw with probability M / 15), its magnitude is
    uniform on [0, M) and its sign fair. Fixed seed, 5 standard errors: a wrong law fails
    (e.g. M² instead of M moves the counts by >30 SE), a right one does not flake."""
    n = 20_000
    plans = plan_views(np.full(n, m), k=k, rng=np.random.default_rng(2024))
    sizes = np.bincount([len(plan) for plan in plans], minlength=k + 1)
    for count in range(k + 1):
        p = math.comb(k, count) * m**count * (1 - m) ** (k - count)
        assert _within(sizes[count], n, p), (count, sizes[count] / n, p)
    fired = {name: 0 for name in OP_NAMES}
    for plan in plans:
        for op in plan:
            fired[op.op] += 1
    for name, hits in fired.items():
        assert _within(hits, n * k, m / len(OP_NAMES)), (name, hits / (n * k))
    ops = [op for plan in plans for op in plan]
    magnitudes = np.array([op.magnitude for op in ops])
    assert magnitudes.min() >= 0.0 and magnitudes.max() < m
    quarters = np.bincount((magnitudes / m * 4).astype(int), minlength=4)
    for hits in quarters:
        assert _within(hits, len(ops), 0.25)
    signs = [op.sign for op in ops if OPS[op.op].signed]
    assert _within(signs.count(-1), len(signs), 0.5)


# --- CUDA ----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_cuda_result_equals_cpu(mode: str) -> None:
    """The same kernels on CUDA give the same bytes as on the CPU, for every op in mixed plans
    (IEEE element-wise arithmetic, no scalar divisions, TF32 irrelevant: no matmuls)."""
    arrays = _images(32, mode) * 30  # 270 images
    plans = _mixed_plans(len(arrays), seed=2)
    cpu = apply_plans(_batch(arrays), plans, _rngs(len(arrays)))
    cuda = apply_plans(_batch(arrays).cuda(), plans, _rngs(len(arrays)))
    assert cuda.device.type == "cuda"
    assert torch.equal(cuda.cpu(), cpu)
    for name in OP_NAMES:
        for magnitude, sign in _settings(name):
            plans = [(PlannedOp(name, magnitude, sign),)] * len(arrays)
            cpu = apply_plans(_batch(arrays), plans, _rngs(len(arrays)))
            cuda = apply_plans(_batch(arrays).cuda(), plans, _rngs(len(arrays)))
            assert torch.equal(cuda.cpu(), cpu), (name, magnitude, sign)
