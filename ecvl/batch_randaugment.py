"""Memory-driven RandAugment on uint8 image batches, on any torch device.

`apply_plans(images, plans, rngs)` does for a whole batch what `ecvl.augment.apply_plan` does
for one PIL image, so that stage II can augment its re-encoded views where the encoder runs
instead of per image in PIL threads that the GIL serialises. Every image keeps its own plan
(its own ops, magnitudes and signs, from `plan_views`). At each op position the batch is
reordered so that the images whose op there is the same are adjacent, and each op runs once
on its slice with per-sample values (factors, thresholds, bit masks, affine matrices, boxes):
a batch costs at most (ops per plan) x (op kinds) small batched calls. Values come from
`OPS[name].value`, the mapping the PIL path uses, and Cutout's square from
`ecvl.augment.cutout_box` on the same per-view generators, so the two paths share one
definition of every range and draw the same positions from the same seeded streams.

The PIL path is the reference, and the kernels reproduce its arithmetic rather than an idea
of each op, so that they give its bytes: `Image.blend` (behind Contrast, Color, Brightness,
Sharpness) computes ``in1 + alpha * (in2 - in1)`` in float32 and truncates; Contrast blends
with the grey ``int(mean(L) + 0.5)``, Color with L, Brightness with black, Sharpness with
PIL's SMOOTH filter (border pixels kept); L is ``(19595 R + 38470 G + 7471 B + 0x8000) >> 16``;
AutoContrast is PIL's per-channel LUT in float64; Solarize inverts levels >= the threshold;
Posterize masks low bits; the geometric ops sample as PIL's affine transform does (see
`_warp`).

Library or by hand, decided per op by running the candidates against PIL on digits, noise
and gradients (RGB and L, 32 and 64 px, magnitudes 0.1-1, both signs; mean / max absolute
difference in levels, float outputs rounded back to uint8). This module's kernels give 0 / 0
on all of them; AutoContrast also over every (lo, hi), Solarize at thresholds next to every
level, the SMOOTH filter for every weighted sum.

- torchvision's tensor `equalize` and `invert` take whole batches, per sample and channel,
  and are exact: used. Its `autocontrast` divides in float32 and maps the top level to 254
  (0.018 / 1 here, wrong in 80% of all (lo, hi) ranges); `posterize`, `solarize` and
  `adjust_*` take one scalar per call, and its blends round differently (contrast 0.17 / 1,
  saturation 0.16 / 1): not used.
- kornia's functional ops take per-sample tensors, but on floats in [0, 1] with other
  formulas: `adjust_brightness` adds (34 / 230), `adjust_saturation` goes through HSV
  (21 / 188), `adjust_contrast_with_mean_subtraction` 0.42 / 1, `sharpness` 0.36 / 1,
  `solarize` compares in float32 (a threshold just above a level inverts that level),
  `warp_affine` (grid_sample) rounds and blends the border into the fill (0.8-1.3 / 110-128
  for the geometric ops; torchvision's `affine`/`rotate` likewise). Its `posterize` and
  `equalize` are exact but would only replace a bit mask and torchvision's `equalize`, so
  kornia is not a dependency.

The kernels use element-wise IEEE arithmetic (no fused multiply-adds, no TF32 matmuls or
convolutions), integer ops, gathers and reductions, so CUDA gives the CPU's bytes (a GPU test
checks); divisions are tensor by tensor, as torch turns a division by a scalar into a
multiplication by its reciprocal on CUDA, an ulp off PIL's quotient.

Cost and memory: the ops run at whatever size the batch has, so to match the PIL path apply
them where it does, after the base view and before the encoder's resize. A kernel call works
on at most `_DEVICE_SLICE_VALUES` values (`_SLICE_VALUES` on a CPU, where that keeps the
temporaries in cache), so memory beyond a few copies of the uint8 batch is bounded whatever
the batch size: a warp's float64 temporaries, the largest, peak at 72 bytes per value
(measured), 1.2 GB per call on a GPU and 9 MB on a CPU. On one CPU thread (256 RGB 32 px
views, one op each, CPU time) the pointwise ops cost 2-25 us per view against PIL's
11-200 us; the geometric ops, float64 to be exact, 50-120 us against PIL's 28-41 us; a whole
eq. 10 plan about half of PIL's time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from ecvl.augment import CUTOUT_L, CUTOUT_RGB, OP_NAMES, OPS, PlannedOp, ViewPlan, cutout_box

__all__ = ["apply_plans"]

# A kernel: (group of images, one parameter per image) -> the group augmented, uint8.
Kernel = Callable[[torch.Tensor, list], torch.Tensor]


def apply_plans(
    images: torch.Tensor,
    plans: Sequence[ViewPlan | Sequence[PlannedOp | tuple[str, float, int]]],
    rngs: Sequence[np.random.Generator | None] | None = None,
) -> torch.Tensor:
    """Apply one view plan per image to a uint8 batch, on the batch's device.

    Args:
        images: uint8 (B, C, H, W), C = 3 (RGB) or 1 (L), any device; not modified.
        plans: B `ViewPlan`s from `plan_views` (or equal plain tuples); image i gets plan i's
            ops in order; an empty plan leaves the image as it is.
        rngs: B generators (or None) for Cutout's position, consumed exactly as
            `apply_plan(image_i, plans[i], rngs[i])` consumes them; an entry, or the whole
            argument, may be None where the plan holds no Cutout. `rngs[i]` is read once,
            and only for a plan that holds Cutout, so a sequence that builds its generators
            on access skips the cost of building them for the other views.

    Returns:
        A new uint8 (B, C, H, W) tensor on `images.device`: row i equals
        `apply_plan(image_i, plans[i], rngs[i])` of the PIL path (exactly, see the module
        docstring), rows with empty plans are copies.

    Raises:
        ValueError: a batch that is not uint8 (B, 1|3, H, W), a plan or rng count other than
            B, an unknown op or magnitude outside [0, 1], Cutout without a generator.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"expected uint8 B×C×H×W images with C in (1, 3), got {images.dtype} "
            f"{tuple(images.shape)}"
        )
    n, _, h, w = images.shape
    if len(plans) != n:
        raise ValueError(f"{n} images but {len(plans)} plans")
    if rngs is not None and len(rngs) != n:
        raise ValueError(f"{n} images but {len(rngs)} rngs")
    budget = _SLICE_VALUES if images.device.type == "cpu" else _DEVICE_SLICE_VALUES
    per_call = max(1, budget // max(1, images[0:1].numel()))
    out, order = images, list(range(n))  # row r of `out` holds image order[r]
    for step in _schedule(plans, rngs, (w, h)):
        # Reorder the batch so that each group is a run of rows: one gather per op position
        # instead of a gather and a scatter per group, and every kernel reads a plain slice.
        grouped = [i for rows, _ in step.values() for i in rows]
        taken = set(grouped)
        new_order = grouped + [i for i in order if i not in taken]
        out = _reorder(out, order, new_order)
        pieces, first = [], 0
        for name, (rows, params) in step.items():
            for start in range(0, len(rows), per_call):
                count = min(per_call, len(rows) - start)
                part = out.narrow(0, first + start, count)
                pieces.append(_KERNELS[name](part, params[start : start + count]))
            first += len(rows)
        pieces.append(out.narrow(0, first, n - first))  # images whose plans have ended
        out, order = torch.cat(pieces), new_order
    out = _reorder(out, order, list(range(n)))
    return out if out is not images else images.clone()


# Values (images x channels x pixels) one kernel call works on at most. On a CPU the float64
# temporaries of a slice this size stay in cache: the geometric ops of a 256 x 32 px batch run
# 2-3x faster in slices of 42 images than whole (and slower again in slices of 10). On a GPU
# the bound only caps the memory of a call.
_SLICE_VALUES = 1 << 17
_DEVICE_SLICE_VALUES = 1 << 24


def _reorder(images: torch.Tensor, order: list[int], new_order: list[int]) -> torch.Tensor:
    """Rows of `images` (holding images `order`) rearranged to hold images `new_order`."""
    if order == new_order:
        return images
    row = {image: r for r, image in enumerate(order)}
    index = torch.tensor([row[image] for image in new_order], device=images.device)
    return images.index_select(0, index)


def _schedule(
    plans: Sequence[Sequence[tuple[str, float, int]]],
    rngs: Sequence[np.random.Generator | None] | None,
    size: tuple[int, int],
) -> list[dict[str, tuple[list[int], list]]]:
    """Per op position, kernel name -> (images, their parameters), all decided on the CPU
    before any pixel moves: the op's value; for a geometric op its affine matrix (the
    geometric ops share one kernel); for Cutout its box, drawn from the image's generator in
    plan order as the PIL path draws it."""
    w, h = size
    steps: list[dict[str, tuple[list[int], list]]] = []
    for i, plan in enumerate(plans):
        rng = None
        for position, (name, magnitude, sign) in enumerate(plan):
            spec = OPS.get(name)
            if spec is None:
                raise ValueError(f"unknown op {name!r} (known: {', '.join(OP_NAMES)})")
            value = spec.value(float(magnitude), int(sign))
            kernel, param = name, value
            if name in _MATRICES:
                param = _MATRICES[name](value, w, h)
                # ops that move pixels within rows only (or columns only) form their own
                # group, which `_warp` serves with two taps instead of four
                kernel = "warp x" if param[3:] == (0.0, 1.0, 0.0) else "warp"
                kernel = "warp y" if param[:3] == (1.0, 0.0, 0.0) else kernel
            elif name == "Cutout":
                if rng is None:  # read once per plan: every Cutout of a plan draws from it
                    rng = None if rngs is None else rngs[i]
                if rng is None:
                    raise ValueError(f"plan {i} holds Cutout but has no rng")
                param = cutout_box(size, value, rng)
            if len(steps) == position:
                steps.append({})
            rows, params = steps[position].setdefault(kernel, ([], []))
            rows.append(i)
            params.append(param)
    return steps


def _per_sample(values: Sequence[float], like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One value per image as an (n, 1, 1, 1) tensor on the group's device."""
    return torch.tensor(values, dtype=dtype, device=like.device).view(-1, 1, 1, 1)


# --- pointwise ops ----------------------------------------------------------------------------


def _blend(degenerate: torch.Tensor, images: torch.Tensor, factors: list) -> torch.Tensor:
    """`Image.blend(degenerate, image, factor)`: float32 ``d + f * (x - d)``, clipped and
    truncated. PIL takes the factor as a C float, so float32 reproduces it to the bit (float64
    does not)."""
    f = _per_sample(factors, images, torch.float32)
    d = degenerate.to(torch.float32)
    out = d + f * (images.to(torch.float32) - d)
    return out.clamp_(0, 255).to(torch.uint8)  # the cast truncates, as PIL's


def _luma(images: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> L in integers, (n, 1, H, W) int32; L images as they are."""
    if images.shape[1] == 1:
        return images.to(torch.int32)
    r, g, b = images.to(torch.int32).unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16)[:, None]


def _contrast(images: torch.Tensor, factors: list) -> torch.Tensor:
    # ImageStat's mean is an exact integer sum over a count, rounded by int(mean + 0.5).
    luma = _luma(images)
    total = luma.sum((1, 2, 3), dtype=torch.int64).double()
    mean = total / torch.full_like(total, luma[0].numel())  # tensor / tensor: see _auto_contrast
    grey = (mean + 0.5).floor().view(-1, 1, 1, 1)
    return _blend(grey, images, factors)


def _color(images: torch.Tensor, factors: list) -> torch.Tensor:
    if images.shape[1] == 1:  # PIL blends an L image with itself: unchanged
        return images
    return _blend(_luma(images), images, factors)


def _brightness(images: torch.Tensor, factors: list) -> torch.Tensor:
    return _blend(torch.zeros((), device=images.device), images, factors)


def _smooth(images: torch.Tensor) -> torch.Tensor:
    """PIL's SMOOTH filter, in integers: PIL truncates ``0.5 + sum(weight * level)`` with the
    weights [[1,1,1],[1,5,1],[1,1,1]] / 13 in float32. With N the integer sum, the exact value
    N / 13 + 1/2 is never within 1/26 of an integer, far beyond float32's error (under 1e-4
    here), so PIL's result is exactly (2N + 13) // 26, whatever order it sums in. (A
    convolution would do too on a CPU, but cuDNN may run it in TF32, whose rounded weights
    miss by up to 0.1 level.) The one-pixel border is copied, as PIL does."""
    x = images.to(torch.int16)  # N <= 13 * 255: int16 holds 2N + 13
    rows = x[..., :-2, :] + x[..., 1:-1, :] + x[..., 2:, :]
    box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]  # the 3 x 3 sum
    total = box + 4 * x[..., 1:-1, 1:-1]
    out = images.clone()
    out[..., 1:-1, 1:-1] = torch.div(2 * total + 13, 26, rounding_mode="floor").to(torch.uint8)
    return out


def _sharpness(images: torch.Tensor, factors: list) -> torch.Tensor:
    return _blend(_smooth(images), images, factors)


def _auto_contrast(images: torch.Tensor, params: list) -> torch.Tensor:
    """PIL's per-channel LUT: ``int(i * scale + offset)`` in float64, clipped; identity for a
    flat channel. (torchvision's float32 division maps the top level to 254.)"""
    n, c, h, w = images.shape
    flat = images.reshape(n * c, h * w)
    lo, hi = flat.amin(1).double()[:, None], flat.amax(1).double()[:, None]
    levels = torch.arange(256, dtype=torch.float64, device=images.device)
    flat_channel = hi <= lo
    # tensor / tensor: torch computes `255.0 / t` (and, on CUDA, `t / 255.0`) through a
    # reciprocal, which misses PIL's correctly rounded quotient by an ulp and a level
    scale = torch.full_like(lo, 255.0) / torch.where(flat_channel, 1.0, hi - lo)
    offset = -lo * scale
    lut = (levels * scale + offset).trunc_().clamp_(0, 255)
    lut = torch.where(flat_channel, levels, lut).to(torch.uint8)
    return lut.gather(1, flat.long()).view(n, c, h, w)


def _invert(images: torch.Tensor, params: list) -> torch.Tensor:
    return TF.invert(images)


def _equalize(images: torch.Tensor, params: list) -> torch.Tensor:
    return TF.equalize(images)


def _solarize(images: torch.Tensor, thresholds: list) -> torch.Tensor:
    # An integer level is >= a threshold iff it is >= the threshold's ceiling; comparing with
    # the ceiling keeps fractional thresholds exact whatever float the device compares in.
    ceiling = _per_sample([math.ceil(t) for t in thresholds], images, torch.int16)
    return torch.where(images >= ceiling, 255 - images, images)


def _posterize(images: torch.Tensor, bits: list) -> torch.Tensor:
    masks = [~(2 ** (8 - int(b)) - 1) & 0xFF for b in bits]  # ImageOps.posterize's mask
    return images & _per_sample(masks, images, torch.uint8)


def _cutout(images: torch.Tensor, boxes: list) -> torch.Tensor:
    """Grey boxes ``(x0, y0, x1, y1)`` (far edges exclusive), one per image; None fills
    nothing."""
    n, c, h, w = images.shape
    box = torch.tensor(
        [b if b is not None else (0, 0, 0, 0) for b in boxes], device=images.device
    ).view(n, 4, 1, 1)
    ys = torch.arange(h, device=images.device).view(1, h, 1)
    xs = torch.arange(w, device=images.device).view(1, 1, w)
    inside = (ys >= box[:, 1]) & (ys < box[:, 3]) & (xs >= box[:, 0]) & (xs < box[:, 2])
    fill = torch.tensor(CUTOUT_RGB if c == 3 else (CUTOUT_L,), dtype=torch.uint8)
    return torch.where(inside[:, None], fill.to(images.device).view(1, c, 1, 1), images)


# --- geometric ops ---------------------------------------------------------------------------


def _warp(images: torch.Tensor, matrices: list[tuple[float, ...]]) -> torch.Tensor:
    """PIL's bilinear affine transform, per image, to the bit: output pixel centre
    (x + 0.5, y + 0.5) maps to ``(a x + b y + c, d x + e y + f)`` in the input; a point outside
    the input is black; one inside is ``top + (bottom - top) * dy`` with
    ``top = p00 + (p01 - p00) * dx`` (likewise bottom) over the four nearest pixel centres,
    indices clamped to the image (the border repeats within half a pixel of the edge), in
    float64 and truncated, exactly PIL's arithmetic. (`grid_sample` is faster but sums
    weighted neighbours instead of nesting the interpolations, which lands a level off where
    PIL's own rounding falls just under a level: 0.02 levels on average for a shear.)

    When no matrix moves y (ShearX, TranslateX: y maps to itself, so dy is exactly 0 and PIL's
    result is `top`), or none moves x (dx is 0: the result interpolates p00 and p10), only the
    two taps needed are read: the same bytes at half the work."""
    n, c, h, w = images.shape
    device = images.device
    moves_x = any(mat[:3] != (1.0, 0.0, 0.0) for mat in matrices)
    moves_y = any(mat[3:] != (0.0, 1.0, 0.0) for mat in matrices)
    m = torch.tensor(matrices, dtype=torch.float64, device=device).view(n, 6, 1, 1)
    x = torch.arange(w, dtype=torch.float64, device=device).view(1, 1, w) + 0.5
    y = torch.arange(h, dtype=torch.float64, device=device).view(1, h, 1) + 0.5
    # One replicated pixel around each image, flattened: the taps of a point whose floor is
    # (x0, y0), x0 in [-1, w - 1], sit at `first`, first + 1, first + stride, first + stride + 1.
    stride = w + 2
    rows = torch.arange(-1, h + 1, device=device).clamp(0, h - 1)
    cols = torch.arange(-1, w + 1, device=device).clamp(0, w - 1)
    flat = images.index_select(2, rows).index_select(3, cols).view(n, c, (h + 2) * stride)
    inside = torch.ones((n, h, w), dtype=torch.bool, device=device)

    def axis(
        coord: torch.Tensor, size: int, plain: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(fractional offset, padded index of the floor) along one axis, PIL's arithmetic."""
        if coord is plain:
            return None, plain + 0.5  # the floor of (plain - 0.5) is the pixel itself
        inside.logical_and_((coord >= 0) & (coord < size))
        shifted = coord - 0.5
        floor = shifted.floor()
        return shifted - floor, floor.clamp_(-1, size - 1) + 1

    # PIL's ``a x + b y + c`` and ``d x + e y + f``, left to right. A cross term (b y, d x) whose
    # coefficient is 0 in every matrix only adds a zero: leaving it out gives the same values
    # and keeps a translation's coordinate one row (or column) per image.
    xin, yin = x, y
    if moves_x:
        xin = m[:, 0] * x + m[:, 1] * y if any(mat[1] for mat in matrices) else m[:, 0] * x
        xin = xin + m[:, 2]
    if moves_y:
        yin = m[:, 3] * x + m[:, 4] * y if any(mat[3] for mat in matrices) else m[:, 4] * y
        yin = yin + m[:, 5]
    dx, col = axis(xin, w, x)
    dy, row = axis(yin, h, y)
    first = (row * stride + col).long().expand(n, h, w).reshape(n, 1, h * w).expand(n, c, h * w)

    def tap(offset: int) -> torch.Tensor:
        return flat[..., offset:].gather(2, first).view(n, c, h, w).to(torch.float64)

    def lerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return a + (b - a) * t[:, None]  # PIL's BILINEAR macro, in this order

    if dx is None:
        out = lerp(tap(0), tap(stride), dy)
    else:
        out = lerp(tap(0), tap(1), dx)
        if dy is not None:
            out = lerp(out, lerp(tap(stride), tap(stride + 1), dx), dy)
    out = out.to(torch.uint8)  # in [0, 255]: the cast truncates
    return torch.where(inside[:, None], out, 0)


def _rotation(degrees: float, w: int, h: int) -> tuple[float, ...]:
    """The matrix `Image.rotate(degrees)` hands to its affine transform (centre (w/2, h/2), no
    expand), computed as PIL computes it so the coefficients agree to the last bit."""
    angle = -math.radians(degrees % 360.0)
    a, b = round(math.cos(angle), 15), round(math.sin(angle), 15)
    d, e = round(-math.sin(angle), 15), round(math.cos(angle), 15)
    cx, cy = w / 2, h / 2
    return (a, b, a * -cx + b * -cy + 0.0 + cx, d, e, d * -cx + e * -cy + 0.0 + cy)


# The geometric ops' affine data as ecvl.augment hands it to PIL (input coordinates of output
# pixel centres), from the op's value and the image's width and height.
_MATRICES: dict[str, Callable[[float, int, int], tuple[float, ...]]] = {
    "ShearX": lambda v, w, h: (1.0, v, 0.0, 0.0, 1.0, 0.0),
    "ShearY": lambda v, w, h: (1.0, 0.0, 0.0, v, 1.0, 0.0),
    "TranslateX": lambda v, w, h: (1.0, 0.0, v * w, 0.0, 1.0, 0.0),
    "TranslateY": lambda v, w, h: (1.0, 0.0, 0.0, 0.0, 1.0, v * h),
    "Rotate": _rotation,
}


_KERNELS: dict[str, Kernel] = {
    "warp": _warp,  # the ops of _MATRICES, grouped by the axes they move
    "warp x": _warp,
    "warp y": _warp,
    "AutoContrast": _auto_contrast,
    "Invert": _invert,
    "Equalize": _equalize,
    "Solarize": _solarize,
    "Posterize": _posterize,
    "Contrast": _contrast,
    "Color": _color,
    "Brightness": _brightness,
    "Sharpness": _sharpness,
    "Cutout": _cutout,
}
assert set(_KERNELS) - {"warp", "warp x", "warp y"} == set(OPS) - set(_MATRICES)
