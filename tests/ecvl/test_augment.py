from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image
from scipy.stats import chisquare

from ecvl.augment import (
    OP_NAMES,
    OPS,
    PlannedOp,
    apply_base_view,
    apply_plan,
    plan_views,
    sample_base_view,
)

SIZE = 32


def _image(mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Smooth colour gradients plus noise, values kept in [40, 200] (not full range)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    base = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).astype(np.float64)
    pixels = np.clip(40 + base * 160 / base.max() + rng.normal(0, 8, base.shape), 40, 200)
    img = Image.fromarray(pixels.astype(np.uint8), "RGB")
    return img.convert(mode)


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


def _binomial_ok(hits: int, n: int, p: float, sigmas: float = 4.5) -> bool:
    return abs(hits / n - p) <= sigmas * math.sqrt(p * (1 - p) / n) + 1e-12


# --- planning (eq. 10) -----------------------------------------------------------------------


@pytest.mark.parametrize(("m", "k"), [(0.05, 2), (0.3, 2), (0.5, 2), (0.8, 2), (0.4, 1), (0.3, 3)])
def test_fraction_of_augmented_views_matches_formula(m: float, k: int) -> None:
    n = 20_000
    plans = plan_views(np.full(n, m), k=k, rng=np.random.default_rng(42))
    assert len(plans) == n
    augmented = sum(1 for p in plans if p)
    assert _binomial_ok(augmented, n, 1 - (1 - m) ** k), augmented / n
    # Each of the k ops is kept independently with probability M.
    applied = sum(len(p) for p in plans)
    assert _binomial_ok(applied, n * k, m)


def test_m_zero_never_and_m_one_always_augment() -> None:
    rng = np.random.default_rng(0)
    assert all(p == () for p in plan_views(np.zeros(5_000), k=3, rng=rng))
    assert all(len(p) == 3 for p in plan_views(np.ones(5_000), k=3, rng=rng))
    assert plan_views(np.ones(4), k=0, rng=rng) == [(), (), (), ()]
    assert plan_views([], k=2, rng=rng) == []


def test_per_view_scores_are_used() -> None:
    scores = np.tile([0.0, 1.0], 1_000)
    plans = plan_views(scores, k=2, rng=np.random.default_rng(1))
    assert all(p == () for p in plans[0::2])
    assert all(len(p) == 2 for p in plans[1::2])


def test_ops_are_drawn_uniformly_with_replacement_and_signs_balanced() -> None:
    plans = plan_views(np.ones(6_000), k=2, rng=np.random.default_rng(3))
    names = [op.op for plan in plans for op in plan]
    counts = np.array([names.count(name) for name in OP_NAMES])
    assert chisquare(counts).pvalue > 0.01
    assert any(p[0].op == p[1].op for p in plans)  # with replacement
    signed = [op.sign for plan in plans for op in plan if OPS[op.op].signed]
    assert _binomial_ok(signed.count(-1), len(signed), 0.5)
    assert all(op.sign == 1 for plan in plans for op in plan if not OPS[op.op].signed)


@pytest.mark.parametrize("m", [0.1, 0.5, 1.0])
def test_magnitudes_scale_with_m(m: float) -> None:
    plans = plan_views(np.full(4_000, m), k=2, rng=np.random.default_rng(7))
    mags = np.array([op.magnitude for plan in plans for op in plan])
    assert mags.min() >= 0.0 and mags.max() < m
    # magnitude = M * zeta, zeta ~ U(0, 1): mean M/2, sd M/sqrt(12)
    assert abs(mags.mean() - m / 2) < 4.5 * m / math.sqrt(12 * len(mags))
    for plan in plans[:500]:
        for op in plan:
            lo, hi = OPS[op.op].range
            assert lo <= OPS[op.op].value(op.magnitude, op.sign) <= hi


def test_plan_format_and_determinism() -> None:
    a = plan_views([0.9, 0.2, 0.7], k=2, rng=np.random.default_rng(5))
    b = plan_views([0.9, 0.2, 0.7], k=2, rng=5)
    assert a == b
    for plan in a:
        assert isinstance(plan, tuple)
        for op in plan:
            assert isinstance(op, PlannedOp) and isinstance(op, tuple)
            name, magnitude, sign = op
            assert name in OPS and isinstance(magnitude, float) and sign in (1, -1)


def test_plan_views_restricted_op_set() -> None:
    plans = plan_views(np.ones(200), k=2, rng=0, ops=["Rotate", "Cutout"])
    assert {op.op for plan in plans for op in plan} == {"Rotate", "Cutout"}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scores": [1.2]}, "scores"),
        ({"scores": [-0.1]}, "scores"),
        ({"scores": [float("nan")]}, "scores"),
        ({"scores": [0.5], "k": -1}, "k must"),
        ({"scores": [0.5], "ops": ["Blur"]}, "unknown op"),
    ],
)
def test_plan_views_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        plan_views(**kwargs)


# --- op registry and ranges ------------------------------------------------------------------

EXPECTED_RANGES = {
    "ShearX": (-0.6, 0.6),
    "ShearY": (-0.6, 0.6),
    "TranslateX": (-0.66, 0.66),
    "TranslateY": (-0.66, 0.66),
    "Rotate": (-60.0, 60.0),
    "AutoContrast": (0.0, 0.0),
    "Invert": (0.0, 0.0),
    "Equalize": (0.0, 0.0),
    "Solarize": (110.0, 256.0),
    "Posterize": (4.0, 8.0),
    "Contrast": (0.1, 1.9),
    "Color": (0.1, 1.9),
    "Brightness": (0.1, 1.9),
    "Sharpness": (0.1, 1.9),
    "Cutout": (0.0, 0.4),
}


def test_registry_matches_bcl_op_set_and_ranges() -> None:
    assert set(OPS) == set(EXPECTED_RANGES) and len(OP_NAMES) == 15
    for name, (lo, hi) in EXPECTED_RANGES.items():
        assert OPS[name].range == pytest.approx((lo, hi)), name


@pytest.mark.parametrize("name", OP_NAMES)
def test_values_stay_in_range_and_grow_with_magnitude(name: str) -> None:
    spec = OPS[name]
    lo, hi = spec.range
    identity = spec.value(0.0, 1)
    for sign in (1, -1):
        values = [spec.value(m, sign) for m in np.linspace(0, 1, 21)]
        assert all(lo - 1e-12 <= v <= hi + 1e-12 for v in values)
        distance = [abs(v - identity) for v in values]
        assert distance == sorted(distance)  # monotone: stronger with the magnitude
    if spec.has_magnitude:
        assert spec.value(1.0, 1) != identity
    with pytest.raises(ValueError, match="magnitude"):
        spec.value(1.5, 1)
    with pytest.raises(ValueError, match="sign"):
        spec.value(0.5, 0)


@pytest.mark.parametrize(
    ("name", "mode"),
    # Color (saturation) is the identity on grey images.
    [(n, m) for n in OP_NAMES for m in ("RGB", "L") if (n, m) != ("Color", "L")],
)
def test_each_op_changes_the_image(name: str, mode: str) -> None:
    img = _image(mode)
    signs = (1, -1) if OPS[name].signed else (1,)
    for sign in signs:
        out = apply_plan(img, (PlannedOp(name, 1.0, sign),), rng=0)
        assert out.size == img.size and out.mode == img.mode
        assert not np.array_equal(_pixels(out), _pixels(img)), (name, sign)
    assert _pixels(img).min() >= 40  # the input was not modified in place


@pytest.mark.parametrize("name", [n for n in OP_NAMES if OPS[n].has_magnitude])
def test_magnitude_zero_is_a_no_op(name: str) -> None:
    img = _image()
    for sign in (1, -1) if OPS[name].signed else (1,):
        out = apply_plan(img, (PlannedOp(name, 0.0, sign),), rng=0)
        assert np.array_equal(_pixels(out), _pixels(img)), name


def test_some_ops_do_what_they_say() -> None:
    img = _image()
    inverted = apply_plan(img, [("Invert", 0.3, 1)], rng=0)
    assert np.array_equal(_pixels(inverted), 255 - _pixels(img))
    solar = _pixels(apply_plan(img, [("Solarize", 1.0, 1)], rng=0))  # threshold 110
    src = _pixels(img)
    assert np.array_equal(solar, np.where(src >= 110, 255 - src, src))
    poster = _pixels(apply_plan(img, [("Posterize", 1.0, 1)], rng=0))  # 4 bits
    assert np.array_equal(poster, src & 0xF0)
    shift = 8  # a quarter of the side: magnitude 0.25 / 0.66 of TranslateX's range
    moved = _pixels(apply_plan(img, [("TranslateX", 0.25 / 0.66, 1)], rng=0))
    np.testing.assert_allclose(moved[:, : SIZE - shift - 1], src[:, shift : SIZE - 1], atol=1)
    assert (moved[:, SIZE - shift + 1 :] == 0).all()  # uncovered pixels are black


def test_cutout_size_follows_magnitude() -> None:
    img = _image()
    src = _pixels(img)
    side = 0.4 * SIZE  # magnitude 1 -> 40% of the side
    for seed in range(20):
        out = _pixels(apply_plan(img, [("Cutout", 1.0, 1)], rng=seed))
        changed = np.argwhere((out != src).any(axis=-1))
        assert len(changed) > 0
        rows, cols = changed[:, 0], changed[:, 1]
        assert rows.max() - rows.min() + 1 <= math.ceil(side) + 1
        assert cols.max() - cols.min() + 1 <= math.ceil(side) + 1
        assert (out[rows, cols] == (125, 123, 114)).all()


def test_apply_plan_is_deterministic_for_a_seed() -> None:
    img = _image()
    plan = (PlannedOp("Rotate", 0.4, -1), PlannedOp("Cutout", 0.8, 1), PlannedOp("Color", 0.5, 1))
    a = apply_plan(img, plan, rng=123)
    b = apply_plan(img, plan, rng=np.random.default_rng(123))
    assert a.tobytes() == b.tobytes()
    others = {apply_plan(img, plan, rng=s).tobytes() for s in range(5)}
    assert len(others) > 1  # the Cutout position depends on the seed


def test_empty_plan_returns_the_image_unchanged() -> None:
    img = _image()
    before = img.tobytes()
    out = apply_plan(img, (), rng=0)
    assert out is img and out.tobytes() == before


def test_apply_plan_validation() -> None:
    with pytest.raises(ValueError, match="unknown op"):
        apply_plan(_image(), [("Blur", 0.5, 1)], rng=0)
    with pytest.raises(ValueError, match="mode"):
        apply_plan(_image().convert("RGBA"), [("Invert", 0.5, 1)], rng=0)
    with pytest.raises(ValueError, match="rng"):
        apply_plan(_image(), [("Invert", 0.5, 1)], rng=0.5)


def test_plan_then_apply_end_to_end() -> None:
    img = _image()
    scores = np.array([0.0, 0.2, 0.9, 1.0])
    plans = plan_views(scores, k=2, rng=np.random.default_rng(9))
    for i, plan in enumerate(plans):
        out = apply_plan(img, plan, rng=np.random.default_rng([9, i]))
        assert out.size == img.size
        if not plan:
            assert out is img


# --- base views --------------------------------------------------------------------------------


def test_base_view_fallback_and_validation() -> None:
    wide = _image().resize((64, 8))
    box, flip = sample_base_view(wide.size, 0, scale=(0.9, 1.0), ratio=(1.0, 1.0))
    assert box == (28, 0, 36, 8)  # no 0.9-area square fits: the centre crop at ratio 1
    assert apply_base_view(wide, box, flip).size == (64, 8)
    with pytest.raises(ValueError, match="scale"):
        sample_base_view(wide.size, 0, scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="flip_p"):
        sample_base_view(wide.size, 0, flip_p=2.0)
