"""Memory-driven RandAugment (ECVL eq. 10) and the base views it is applied on top of.

Two steps, so that a caller knows which views need pixels before it decodes any image:

1. `plan_views(scores, k, rng)`: for each view (score `M` in [0, 1]) choose `k` ops uniformly
   with replacement; op j is kept iff `u_j < M`, `u_j ~ U(0, 1)`, with magnitude fraction
   `M * zeta_j`, `zeta_j ~ U(0, 1)`, and a random sign. The result is a `ViewPlan`: a tuple of
   `PlannedOp(op, magnitude, sign)` (plain tuples `(str, float, int)`) for the ops actually
   applied, in order. An empty plan is a clean view: read its cached embedding.
2. `apply_plan(image, plan, rng)`: run the plan on a PIL image (RGB or L). Only Cutout's
   position uses `rng`. An empty plan returns the input image object itself.

Op set and ranges follow BCL's reference code (Zhou et al. 2022, "Contrastive learning with
boosted memorization", `data/randaug.py`), with one deliberate change: a magnitude fraction
`m` maps onto each op's range so that `m = 0` is the identity (where the op has one) and the
op gets monotonically stronger with `m`, as eq. 10 intends ("high M = stronger augmentation").
BCL maps its ranges min -> max literally, which makes Solarize (threshold 0 -> 110), Posterize
(4 -> 8 bits) and the enhance ops (factor 0.1 -> 1.9) *weakest* near the top of the range.
Here (value at m = 0 -> value at m = 1):

    ShearX/Y       0 -> ±0.6 (shear factor)          Rotate      0 -> ±60 degrees
    TranslateX/Y   0 -> ±0.66 of the width/height    Cutout      0 -> 0.4 of the shorter side
    Contrast, Color, Brightness, Sharpness   1.0 -> 1 ± 0.9 (BCL's 0.1 .. 1.9, sign drawn)
    Solarize       threshold 256 -> 110 (BCL's strongest threshold; 256 inverts nothing)
    Posterize      8 -> 4 bits (rounded; BCL's 4 .. 8)
    AutoContrast, Invert, Equalize           no magnitude

Geometric ops fill uncovered pixels with black (as BCL); Cutout fills a square with BCL's
grey (125, 123, 114). All randomness comes from the `numpy.random.Generator` passed in.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

log = logging.getLogger(__name__)

_RESAMPLE = Image.Resampling.BILINEAR
CUTOUT_RGB = (125, 123, 114)
CUTOUT_L = 121  # luma of the RGB grey above


class PlannedOp(NamedTuple):
    """One op of a view plan: registry name, magnitude fraction in [0, 1], sign (+1 or -1)."""

    op: str
    magnitude: float
    sign: int


ViewPlan = tuple[PlannedOp, ...]
OpFn = Callable[[Image.Image, float, np.random.Generator], Image.Image]


# --- ops: f(image, value, rng) -> image, `value` already mapped onto the op's range -----------


def _affine(img: Image.Image, data: tuple[float, ...]) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, data, resample=_RESAMPLE, fillcolor=0)


def shear_x(img: Image.Image, v: float, rng: np.random.Generator) -> Image.Image:
    return img.copy() if v == 0 else _affine(img, (1, v, 0, 0, 1, 0))


def shear_y(img: Image.Image, v: float, rng: np.random.Generator) -> Image.Image:
    return img.copy() if v == 0 else _affine(img, (1, 0, 0, v, 1, 0))


def translate_x(img: Image.Image, v: float, rng: np.random.Generator) -> Image.Image:
    return img.copy() if v == 0 else _affine(img, (1, 0, v * img.size[0], 0, 1, 0))


def translate_y(img: Image.Image, v: float, rng: np.random.Generator) -> Image.Image:
    return img.copy() if v == 0 else _affine(img, (1, 0, 0, 0, 1, v * img.size[1]))


def rotate(img: Image.Image, v: float, rng: np.random.Generator) -> Image.Image:
    return img.copy() if v == 0 else img.rotate(v, resample=_RESAMPLE, fillcolor=0)


def auto_contrast(img: Image.Image, v: float, rng: np.random.Generator) -> Image.Image:
    return ImageOps.autocontrast(img)


def invert(img: Image.Image, v: float, rng: np.random.Generator) -> Image.Image:
    return ImageOps.invert(img)


def equalize(img: Image.Image, v: float, rng: np.random.Generator) -> Image.Image:
    return ImageOps.equalize(img)


def solarize(img: Image.Image, v: float, rng: np.random.Generator) -> Image.Image:
    # Pixels >= threshold are inverted; a threshold above 255 leaves the image as it is.
    return ImageOps.solarize(img, threshold=v)


def posterize(img: Image.Image, v: float, rng: np.random.Generator) -> Image.Image:
    return ImageOps.posterize(img, int(v))


def contrast(img: Image.Image, v: float, rng: np.random.Generator) -> Image.Image:
    return ImageEnhance.Contrast(img).enhance(v)


def color(img: Image.Image, v: float, rng: np.random.Generator) -> Image.Image:
    return ImageEnhance.Color(img).enhance(v)


def brightness(img: Image.Image, v: float, rng: np.random.Generator) -> Image.Image:
    return ImageEnhance.Brightness(img).enhance(v)


def sharpness(img: Image.Image, v: float, rng: np.random.Generator) -> Image.Image:
    return ImageEnhance.Sharpness(img).enhance(v)


def cutout_box(
    size: tuple[int, int], v: float, rng: np.random.Generator
) -> tuple[int, int, int, int] | None:
    """Cutout's square for an image of `size` = (w, h): side `v * min(w, h)`, centre uniform
    over the image, clipped at the border; ``(x0, y0, x1, y1)``, far edges exclusive.

    None, without drawing, when the side is 0. Kept apart from the pixels so that the batched
    ops (`ecvl.batch_randaugment`) draw the same positions from the same streams."""
    w, h = size
    side = v * min(w, h)
    if side <= 0:
        return None
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    x0, y0 = int(max(0.0, cx - side / 2)), int(max(0.0, cy - side / 2))
    x1, y1 = int(min(w, math.ceil(cx + side / 2))), int(min(h, math.ceil(cy + side / 2)))
    return x0, y0, x1, y1


def cutout(img: Image.Image, v: float, rng: np.random.Generator) -> Image.Image:
    """Grey square of side `v * min(w, h)`, centred uniformly at random, clipped at the border."""
    box = cutout_box(img.size, v, rng)
    out = img.copy()
    if box is not None and box[2] > box[0] and box[3] > box[1]:
        fill = CUTOUT_L if img.mode == "L" else CUTOUT_RGB
        # PIL rectangles include their far corner.
        ImageDraw.Draw(out).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=fill)
    return out


@dataclass(frozen=True)
class OpSpec:
    """A registered op: its function and how a magnitude fraction maps onto its range.

    `value(m, sign) = start + sign * m * (end - start)`; `start` is the op's identity value
    where it has one. `signed` ops use the drawn sign; the others always use +1.
    """

    fn: OpFn
    start: float = 0.0
    end: float = 0.0
    signed: bool = False
    has_magnitude: bool = True
    integer: bool = False

    def value(self, magnitude: float, sign: int = 1) -> float:
        """The op's argument for magnitude fraction `magnitude` in [0, 1] and `sign` (+1/-1)."""
        if not (0.0 <= magnitude <= 1.0):
            raise ValueError(f"magnitude must be in [0, 1], got {magnitude}")
        if sign not in (1, -1):
            raise ValueError(f"sign must be +1 or -1, got {sign}")
        if not self.has_magnitude:
            return 0.0
        v = self.start + (sign if self.signed else 1) * magnitude * (self.end - self.start)
        return float(round(v)) if self.integer else v

    @property
    def range(self) -> tuple[float, float]:
        """Smallest and largest value `value()` can return."""
        if not self.has_magnitude:
            return (0.0, 0.0)
        lo, hi = sorted((self.start, self.end))
        if self.signed:
            lo, hi = min(lo, 2 * self.start - self.end), max(hi, 2 * self.start - self.end)
        return (lo, hi)


OPS: dict[str, OpSpec] = {
    "ShearX": OpSpec(shear_x, 0.0, 0.6, signed=True),
    "ShearY": OpSpec(shear_y, 0.0, 0.6, signed=True),
    "TranslateX": OpSpec(translate_x, 0.0, 0.66, signed=True),
    "TranslateY": OpSpec(translate_y, 0.0, 0.66, signed=True),
    "Rotate": OpSpec(rotate, 0.0, 60.0, signed=True),
    "AutoContrast": OpSpec(auto_contrast, has_magnitude=False),
    "Invert": OpSpec(invert, has_magnitude=False),
    "Equalize": OpSpec(equalize, has_magnitude=False),
    "Solarize": OpSpec(solarize, 256.0, 110.0),
    "Posterize": OpSpec(posterize, 8.0, 4.0, integer=True),
    "Contrast": OpSpec(contrast, 1.0, 1.9, signed=True),
    "Color": OpSpec(color, 1.0, 1.9, signed=True),
    "Brightness": OpSpec(brightness, 1.0, 1.9, signed=True),
    "Sharpness": OpSpec(sharpness, 1.0, 1.9, signed=True),
    "Cutout": OpSpec(cutout, 0.0, 0.4),
}
# Fixed order: plan_views draws op indices into this tuple.
OP_NAMES: tuple[str, ...] = tuple(OPS)


def _rng(rng: np.random.Generator | int) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, bool) or not isinstance(rng, int | np.integer):
        raise ValueError(f"rng must be a numpy Generator or an int seed, got {type(rng).__name__}")
    return np.random.default_rng(int(rng))


def plan_views(
    scores: Sequence[float] | np.ndarray,
    k: int = 2,
    rng: np.random.Generator | int = 0,
    ops: Sequence[str] = OP_NAMES,
) -> list[ViewPlan]:
    """Decide, per view, which ops eq. 10 applies and how strongly, without touching pixels.

    Args:
        scores: memorisation score `M` in [0, 1] of each view's sample (one entry per view;
            two views of a sample are two entries).
        k: ops drawn per view, uniformly with replacement (paper default 2).
        rng: generator (advanced by the call) or an int seed.
        ops: the op names to draw from (default: all of `OPS`, in registry order).

    Returns:
        One `ViewPlan` per view: the applied `PlannedOp(op, magnitude, sign)`s in order,
        with magnitude `M * zeta` in [0, M); an empty tuple for a clean view.

    Raises:
        ValueError: a score outside [0, 1] or not finite, a negative `k`, an unknown op.
    """
    m = np.asarray(scores, dtype=np.float64).reshape(-1)
    if m.size and not (np.isfinite(m).all() and m.min() >= 0.0 and m.max() <= 1.0):
        raise ValueError("scores must be finite and in [0, 1]")
    if isinstance(k, bool) or int(k) != k or k < 0:
        raise ValueError(f"k must be a non-negative int, got {k!r}")
    names = tuple(ops)
    unknown = [o for o in names if o not in OPS]
    if unknown or not names:
        raise ValueError(f"unknown op(s) {unknown} (known: {', '.join(OP_NAMES)})")
    gen = _rng(rng)
    n, k = m.size, int(k)
    choice = gen.integers(len(names), size=(n, k))
    u = gen.random((n, k))
    zeta = gen.random((n, k))
    signs = np.where(gen.random((n, k)) < 0.5, -1, 1)
    applied = u < m[:, None]
    magnitude = m[:, None] * zeta
    plans: list[ViewPlan] = []
    for i in range(n):
        plan = []
        for j in np.flatnonzero(applied[i]):
            name = names[choice[i, j]]
            sign = int(signs[i, j]) if OPS[name].signed else 1
            plan.append(PlannedOp(name, float(magnitude[i, j]), sign))
        plans.append(tuple(plan))
    return plans


def apply_plan(
    image: Image.Image,
    plan: Sequence[PlannedOp | tuple[str, float, int]],
    rng: np.random.Generator | int,
) -> Image.Image:
    """Apply a view plan to a PIL image (mode RGB or L).

    Args:
        image: the decoded train image; not modified.
        plan: a `ViewPlan` from `plan_views` (or equal plain tuples).
        rng: generator or int seed for the ops' own randomness (Cutout's position); the same
            seed gives the same pixels.

    Returns:
        The augmented image, of the input's size and mode; for an empty plan, `image` itself.

    Raises:
        ValueError: an unsupported image mode or a malformed plan entry.
    """
    if not plan:
        return image
    if image.mode not in ("RGB", "L"):
        raise ValueError(f"images must be RGB or L, got mode {image.mode!r}")
    gen = _rng(rng)
    out = image
    for entry in plan:
        name, magnitude, sign = entry
        spec = OPS.get(name)
        if spec is None:
            raise ValueError(f"unknown op {name!r} (known: {', '.join(OP_NAMES)})")
        out = spec.fn(out, spec.value(float(magnitude), int(sign)), gen)
    return out


BaseView = tuple[tuple[int, int, int, int], bool]
"""A base view: the crop box ``(x0, y0, x1, y1)`` in pixels and whether it is mirrored."""


def sample_base_view(
    size: tuple[int, int],
    rng: np.random.Generator | int,
    *,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_p: float = 0.5,
) -> BaseView:
    """Draw the standard augmentation's parameters for an image of `size` = (w, h).

    The crop covers a fraction `scale` of the area with aspect ratio in `ratio` (log-uniform),
    as torchvision's `RandomResizedCrop` samples it (10 tries, then a centre crop); MoCo v2's
    scale (0.2, 1) is the default. The flip is drawn last. Kept apart from `apply_base_view`
    so that the view bank can store what made each view and rebuild it exactly.

    Raises:
        ValueError: invalid `scale`, `ratio` or `flip_p`.
    """
    if not (0 < scale[0] <= scale[1] <= 1):
        raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {scale}")
    if not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {ratio}")
    if not (0.0 <= flip_p <= 1.0):
        raise ValueError(f"flip_p must be in [0, 1], got {flip_p}")
    gen = _rng(rng)
    w, h = size
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    box = None
    for _ in range(10):
        target = area * gen.uniform(scale[0], scale[1])
        aspect = math.exp(gen.uniform(*log_ratio))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            x0 = int(gen.integers(0, w - cw + 1))
            y0 = int(gen.integers(0, h - ch + 1))
            box = (x0, y0, x0 + cw, y0 + ch)
            break
    if box is None:  # centre crop at the nearest allowed aspect ratio
        in_ratio = w / h
        if in_ratio < ratio[0]:
            cw, ch = w, int(round(w / ratio[0]))
        elif in_ratio > ratio[1]:
            cw, ch = int(round(h * ratio[1])), h
        else:
            cw, ch = w, h
        x0, y0 = (w - cw) // 2, (h - ch) // 2
        box = (x0, y0, x0 + cw, y0 + ch)
    return box, bool(gen.random() < flip_p)


def apply_base_view(image: Image.Image, box: Sequence[int], flip: bool) -> Image.Image:
    """Crop `box`, resize back to the image's own size (bicubic), mirror if `flip`: a new image
    of the input's size and mode. Deterministic, so a banked view is rebuilt bit for bit."""
    x0, y0, x1, y1 = (int(v) for v in box)
    out = image.resize(image.size, Image.Resampling.BICUBIC, box=(x0, y0, x1, y1))
    return ImageOps.mirror(out) if flip else out


__all__ = [
    "OPS",
    "OP_NAMES",
    "OpSpec",
    "PlannedOp",
    "ViewPlan",
    "BaseView",
    "apply_base_view",
    "apply_plan",
    "plan_views",
    "sample_base_view",
]
