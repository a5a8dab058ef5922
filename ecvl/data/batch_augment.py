"""Stage-I crop + flip on whole uint8 batches: one call per batch, on any device.

The per-image train transforms (`ecvl.data.transforms`) crop and flip each image in PIL inside
the data worker, which caps the data path at about 1,400 img/s per core at 32 px. `BatchAugment`
splits that work in two: `draw` picks every sample's source box and flip on the CPU from torch's
generator (so a DataLoader worker's seeding keeps it seeded and resumable), and `apply`
moves the pixels of the whole batch in one batched call, in the worker on a CPU or on the GPU
after the transfer. The result stays uint8 so that `BatchNormalize` remains the one
normalisation.

How the pixels move: crop + resize + flip of an axis-aligned box is separable, so each sample's
result is `Wy @ image @ Wxᵀ` with two small per-sample resampling matrices (output side × source
side) built from the plan, and the batch is two batched matmuls. We chose this over
`affine_grid` + `grid_sample` and `torchvision.ops.roi_align` because the matrices can hold
exactly the kernel the per-image reference uses: torch's bicubic (A = -0.75) with the taps
clamped to the crop as `resized_crop` does, or PIL's antialiased filter (A = -0.5, support
widened when downscaling, normalised) when `antialias` is set, which neither alternative can
(grid_sample reads the pixels outside the crop and has no antialias; roi_align is bilinear only
and clamps instead of zero-padding one pixel outside the image). At exact pixel centres the
weights are exactly 0 and 1, so an integer pad-crop is bit-identical to torchvision's per-image
`RandomCrop(padding=...)` + `hflip`. Measured on one CPU thread for 64×3×32×32 batches it is
also as fast as bilinear grid_sample and faster than bicubic grid_sample. The dense matrices
cost O(H·W·side) per channel: nothing at CIFAR sizes or on a GPU, but for large file sources on
a CPU the per-image PIL path is cheaper.

Use:

    augment = batch_augment_for(kind, bundle.train_transform, preprocess_cfg)
    if augment is None:  # the model's recipe holds something we cannot batch: per-image path
        ...
    plan = augment.draw(heights, widths)  # in the worker: (B, 5) float32, CPU
    images = augment.apply(images, plan)  # uint8 B×C×size×size, on images.device
    images = batch_normalize(images)      # ecvl.data.batch_norm.BatchNormalize
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ecvl.data.transforms import PAD_FRACTION

AUGMENT_KINDS = ("resized_crop", "pad_crop")
INTERPOLATIONS = ("bilinear", "bicubic")
_ATTEMPTS = 10  # RandomResizedCrop.get_params tries this many boxes before its fallback


@dataclass(frozen=True)
class BatchAugment:
    """Stage-I crop + flip on whole uint8 batches: parameters drawn per sample on the CPU
    (seeded), pixels moved in one call on any device.

    `antialias=False` resamples as `torchvision.transforms.v2.functional.resized_crop` on a
    tensor with `antialias=False` (torch's bicubic, A = -0.75, taps clamped to the box);
    `antialias=True` as PIL does (what the per-image transforms do on PIL images): A = -0.5
    and, when shrinking, a kernel widened by the scale. Both agree at scale 1.
    """

    kind: str  # one of AUGMENT_KINDS
    size: int  # output side (square)
    scale: tuple[float, float] = (0.08, 1.0)  # resized_crop: area fraction range
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # resized_crop: aspect range
    pad: int = 0  # pad_crop: zero padding (in output pixels) before the random crop
    flip: bool = False  # random horizontal flip, p = 0.5
    interpolation: str = "bicubic"  # "bilinear" | "bicubic"
    antialias: bool = False  # PIL's filter (see above) instead of torch's plain interpolation

    def __post_init__(self) -> None:
        if self.kind not in AUGMENT_KINDS:
            raise ValueError(
                f"unknown batch augmentation {self.kind!r}; choose from {AUGMENT_KINDS}"
            )
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}"
            )
        if self.size < 1 or self.pad < 0:
            raise ValueError(f"need size >= 1 and pad >= 0, got {self.size} and {self.pad}")
        if not (0 < self.scale[0] <= self.scale[1] and 0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError(f"bad scale {self.scale} or ratio {self.ratio}")

    def draw(
        self, heights: Any, widths: Any, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(B, 5) float32 plan per sample: top, left, height, width of the source box in source
        pixels (for pad_crop it may reach outside the centre square that Resize + CenterCrop
        keep, the whole image when square: outside is zero), flip (0./1.).

        `heights`, `widths`: the B source sizes (sequences or 1-D tensors). Uses `generator`,
        else torch's default CPU generator (so a DataLoader worker's seeding makes it seeded
        and resumable). A batch consumes the same amount of randomness whatever its
        images, so the stream stays aligned across resumes.
        """
        h = torch.as_tensor(heights, dtype=torch.float64).reshape(-1)
        w = torch.as_tensor(widths, dtype=torch.float64).reshape(-1)
        if h.shape != w.shape or not bool((h >= 1).all() and (w >= 1).all()):
            raise ValueError("heights and widths must be equally long and at least 1")
        if self.kind == "resized_crop":
            box = _draw_resized_crop(h, w, self.scale, self.ratio, generator)
        else:
            box = _draw_pad_crop(h, w, self.size, self.pad, generator)
        flips = torch.rand(len(h), generator=generator) < 0.5 if self.flip else torch.zeros(len(h))
        return torch.cat([box, flips.to(torch.float64)[:, None]], 1).to(torch.float32)

    def apply(
        self, images: torch.Tensor | Sequence[torch.Tensor], plan: torch.Tensor
    ) -> torch.Tensor:
        """uint8 B×C×H×W (one size; any device) + plan (moved to images.device inside) ->
        uint8 B×C×size×size, rounded and clamped, in one batched call (two batched matmuls, see
        the module docstring for why). Also takes a list of C×H×W uint8 tensors of different
        sizes (file sources decoded on the GPU): grouped by size, one call per group, output
        stacked in input order."""
        if isinstance(images, torch.Tensor):
            return self._apply_batch(images, plan)
        if len(images) != len(plan):
            raise ValueError(f"{len(images)} images but {len(plan)} plan rows")
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault(tuple(image.shape), []).append(i)
        first = images[0]
        out = torch.empty(
            (len(images), first.shape[0], self.size, self.size),
            dtype=torch.uint8,
            device=first.device,
        )
        for indices in groups.values():
            rows = torch.tensor(indices, device=plan.device)
            result = self._apply_batch(torch.stack([images[i] for i in indices]), plan[rows])
            out[torch.tensor(indices, device=out.device)] = result
        return out

    def _apply_batch(self, images: torch.Tensor, plan: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"expected uint8 B×C×H×W images, got {images.dtype} {tuple(images.shape)}"
            )
        if plan.shape != (images.shape[0], 5):
            raise ValueError(f"plan must be ({images.shape[0]}, 5), got {tuple(plan.shape)}")
        batch, channels, height, width = images.shape
        size = self.size
        if height == width == size and _whole_shifts(plan, size):
            return _shift(images, plan.to(images.device), size)
        # every box at the output side (pad_crop on images of that side): both kernels are the
        # identity there, so take the cheaper one and skip PIL's 8-bit intermediate
        antialias = self.antialias and not bool((plan[:, 2:4] == size).all())
        plan = plan.to(device=images.device, dtype=torch.float32)
        wy, wx = self._weights(plan, height, width, antialias)
        with _full_fp32_matmul(images.device):
            # horizontal pass first, as PIL does: B × (C·H) × W  @  B × W × size
            rows = torch.bmm(images.to(torch.float32).view(batch, channels * height, width), wx.mT)
            if antialias:  # PIL stores the horizontal pass as 8-bit
                rows.round_().clamp_(0, 255)
            rows = rows.view(batch, channels, height, size).transpose(1, 2)
            # vertical pass: B × size × H  @  B × H × (C·size)
            out = torch.bmm(wy, rows.reshape(batch, height, channels * size))
        out = out.view(batch, size, channels, size).transpose(1, 2)
        return out.round_().clamp_(0, 255).to(torch.uint8).contiguous()

    def _weights(
        self, plan: torch.Tensor, height: int, width: int, antialias: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample resampling matrices, B × size × H and B × size × W (flip folded into the
        second), both axes in one vectorised computation. Output pixel i of an axis covers
        source [start + i·s, start + (i+1)·s) with s = length / size; pixel k spans [k, k+1)."""
        device = plan.device
        size = self.size
        start, length = plan[:, 0:2, None], plan[:, 2:4, None]  # B × 2 (y, x) × 1
        extent = torch.tensor([height, width], device=device, dtype=torch.float32)[:, None]
        scale = length / size  # float32, like ATen's area_pixel_compute_scale
        i = torch.arange(size, device=device, dtype=torch.float32).expand(len(plan), 2, size)
        i = torch.stack([i[:, 0], torch.where(plan[:, 4:5] > 0.5, size - 1 - i[:, 1], i[:, 1])], 1)
        # resized_crop crops first, so the kernel stops at the box; pad_crop resizes the whole
        # image, so it stops at the image, and zero-pads the centre square.
        if self.kind == "resized_crop":
            lo, hi = start.floor(), (start + length).ceil() - 1
        else:
            lo, hi = torch.zeros_like(start), (extent - 1).expand_as(start)
        lo, hi = (
            torch.minimum(lo.clamp(min=0), extent - 1),
            torch.minimum(hi.clamp(min=0), extent - 1),
        )
        if antialias:  # ATen's _compute_weights_aa (PIL's): kernel widened when shrinking
            stretch = scale.clamp(min=1.0)
            support = (2.0 if self.interpolation == "bicubic" else 1.0) * stretch
            centre = start + scale * (i + 0.5)
            first = torch.maximum((centre - support + 0.5).floor(), lo)
            taps = int(torch.ceil(2 * support.max()).item()) + 1  # the widest row in the batch
            tap = first[..., None] + torch.arange(taps, device=device, dtype=torch.float32)
            weights = _filter(
                self.interpolation, True, (tap - centre[..., None] + 0.5) / stretch[..., None]
            )
            weights = weights * (tap <= hi[..., None])
            total = weights.sum(-1, keepdim=True)
            weights = weights / torch.where(total == 0, 1.0, total)
            tap = torch.minimum(tap, hi[..., None])  # past the box: weight 0, any index will do
        else:  # ATen's upsample_bicubic2d / bilinear: real = s·(i + ½) − ½, taps clamped
            real = start + scale * (i + 0.5) - 0.5
            base = real.floor()
            first, taps = (-1, 4) if self.interpolation == "bicubic" else (0, 2)
            offsets = torch.arange(first, first + taps, device=device, dtype=torch.float32)
            tap = torch.clamp(base[..., None] + offsets, lo[..., None], hi[..., None])
            weights = _filter(self.interpolation, False, (real - base)[..., None] - offsets)
        if self.kind == "pad_crop":  # zero where the centre falls outside the centre square
            square = centre_square(torch.tensor([height]), torch.tensor([width]), size)
            inside = square.to(device=device, dtype=torch.float32).view(2, 2).T[None, ..., None]
            centre = start + scale * (i + 0.5)
            begin, end = inside[:, :, 0], inside[:, :, 0] + inside[:, :, 1]
            weights = weights * ((centre >= begin) & (centre < end))[..., None]
        dense = torch.zeros((*weights.shape[:-1], max(height, width)), device=device)
        dense.scatter_add_(-1, tap.long(), weights)
        return dense[:, 0, :, :height], dense[:, 1, :, :width]


def _whole_shifts(plan: torch.Tensor, size: int) -> bool:
    """Whether every box is the image itself moved by whole pixels (pad_crop at the output
    side): then resampling is a copy, and `_shift` does it without arithmetic."""
    box = plan[:, :4]
    return bool((box[:, 2:] == size).all() and (box[:, :2] == box[:, :2].round()).all())


def _shift(images: torch.Tensor, plan: torch.Tensor, size: int) -> torch.Tensor:
    """Whole-pixel boxes copied out of the zero-padded batch (two gathers), flipped where the
    plan says: exactly what the resampling matrices give for such boxes (a test checks)."""
    batch, channels = images.shape[:2]
    pad = int(plan[:, :2].abs().max().item()) if len(plan) else 0
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    steps = torch.arange(size, device=images.device)
    rows = plan[:, 0:1].long() + pad + steps  # B × size
    cols = plan[:, 1:2].long() + pad + torch.where(plan[:, 4:5] > 0.5, steps.flip(0), steps)
    out = padded.gather(2, rows[:, None, :, None].expand(batch, channels, size, size + 2 * pad))
    return out.gather(3, cols[:, None, None, :].expand(batch, channels, size, size)).contiguous()


def _filter(interpolation: str, antialias: bool, x: torch.Tensor) -> torch.Tensor:
    """The resampling kernel at offsets `x`: triangle, or cubic convolution with A = -0.5
    (PIL, torch's antialias path) or A = -0.75 (torch's plain bicubic)."""
    x = x.abs()
    if interpolation == "bilinear":
        return (1 - x).clamp(min=0)
    a = -0.5 if antialias else -0.75
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


class _full_fp32_matmul:
    """Keep TF32 off for the resampling matmuls on CUDA (it would move pixels by ~¼ level)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __enter__(self) -> None:
        if self.cuda:
            self.saved = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            torch.backends.cuda.matmul.allow_tf32 = self.saved


def _draw_resized_crop(
    h: torch.Tensor,
    w: torch.Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None,
) -> torch.Tensor:
    """`RandomResizedCrop.get_params`, all samples and all attempts at once: the first valid
    attempt per sample, else the centre-crop fallback with the aspect clamped to `ratio`."""
    n = len(h)
    area = (h * w)[:, None]
    # get_params draws float32 uniforms (torch.empty(1).uniform_) and does the rest in double
    fraction = scale[0] + (scale[1] - scale[0]) * torch.rand(n, _ATTEMPTS, generator=generator)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    log_ratio = log_lo + (log_hi - log_lo) * torch.rand(n, _ATTEMPTS, generator=generator)
    aspect = log_ratio.double().exp()
    target = area * fraction.double()
    cw = (target * aspect).sqrt().round()  # round half to even, as Python's round
    ch = (target / aspect).sqrt().round()
    valid = (cw > 0) & (cw <= w[:, None]) & (ch > 0) & (ch <= h[:, None])
    u = torch.rand(n, _ATTEMPTS, 2, generator=generator, dtype=torch.float64)
    top = (u[..., 0] * (h[:, None] - ch + 1)).floor().clamp(min=0)
    left = (u[..., 1] * (w[:, None] - cw + 1)).floor().clamp(min=0)
    first = valid.to(torch.int8).argmax(1, keepdim=True)  # first True (0 when none)
    box = torch.stack([top, left, ch, cw], -1).gather(1, first[..., None].expand(-1, -1, 4))[:, 0]

    in_ratio = w / h
    fw = torch.where(in_ratio > ratio[1], (h * ratio[1]).round(), w)
    fh = torch.where(in_ratio < ratio[0], (w / ratio[0]).round(), h)
    fh = torch.where(in_ratio > ratio[1], h, fh)
    fw = torch.where(in_ratio < ratio[0], w, fw)
    fallback = torch.stack([((h - fh) / 2).floor(), ((w - fw) / 2).floor(), fh, fw], -1)
    return torch.where(valid.any(1, keepdim=True), box, fallback)


def centre_square(h: torch.Tensor, w: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 4) float64 top, left, height, width in source pixels of what Resize(size) (shorter
    side) + CenterCrop(size) keep: the whole image when it is square."""
    h, w = h.double(), w.double()
    new_long = (size * torch.maximum(h, w) / torch.minimum(h, w)).floor()  # int(size·long/short)
    rh = torch.where(h <= w, torch.full_like(h, size), new_long)
    rw = torch.where(h <= w, new_long, torch.full_like(w, size))
    sy, sx = h / rh, w / rw  # source pixels per resized pixel
    # center_crop: int(round((resized - size) / 2.0)); the resized image is never smaller
    top, left = ((rh - size) / 2).round(), ((rw - size) / 2).round()
    return torch.stack([top * sy, left * sx, size * sy, size * sx], -1)


def _draw_pad_crop(
    h: torch.Tensor, w: torch.Tensor, size: int, pad: int, generator: torch.Generator | None
) -> torch.Tensor:
    """The source box that Resize(size) + CenterCrop(size) + zero-pad by `pad` + RandomCrop(size)
    selects, in source pixels: the centre square shifted by whole resized pixels."""
    square = centre_square(h, w, size)
    offsets = torch.randint(0, 2 * pad + 1, (len(h), 2), generator=generator).double() - pad
    return square + torch.cat([offsets * square[:, 2:] / size, torch.zeros_like(offsets)], 1)


def batch_augment_for(
    kind: str, open_clip_transform: Any, preprocess_cfg: dict
) -> BatchAugment | None:
    """The batched equivalent of `train_transform(kind, ...)`, or None when the model's recipe
    holds a step we cannot batch (colour jitter, grayscale, a timm transform, ...): the caller
    then keeps the per-image path.

    `crop_flip` -> pad_crop by `PAD_FRACTION` of the side with a flip; `open_clip` ->
    resized_crop with the scale, ratio and interpolation of the `RandomResizedCrop` opening
    open_clip's train Compose, no flip. Both antialias, as the per-image transforms do on PIL
    images.
    """
    from open_clip.transform import MaybeConvertMode, MaybeToTensor, _convert_to_rgb
    from torchvision.transforms import Compose, Normalize, RandomResizedCrop, ToTensor

    from ecvl.data.transforms import TRAIN_AUGMENTS

    if kind == "crop_flip":
        size = preprocess_cfg["size"]
        side = size if isinstance(size, int) else size[0]
        pad = max(1, round(side * PAD_FRACTION))
        return BatchAugment("pad_crop", side, pad=pad, flip=True, antialias=True)
    if kind != "open_clip":
        raise ValueError(f"unknown train augmentation {kind!r}; choose from {TRAIN_AUGMENTS}")
    if not isinstance(open_clip_transform, Compose) or not open_clip_transform.transforms:
        return None
    crop, *rest = open_clip_transform.transforms
    tail = (MaybeConvertMode, MaybeToTensor, ToTensor, Normalize)
    if type(crop) is not RandomResizedCrop or not all(
        type(t) in tail or t is _convert_to_rgb for t in rest
    ):
        return None
    height, width = crop.size
    interpolation = crop.interpolation.value
    if height != width or interpolation not in INTERPOLATIONS:
        return None
    return BatchAugment(
        "resized_crop",
        height,
        scale=tuple(float(s) for s in crop.scale),
        ratio=tuple(float(r) for r in crop.ratio),
        interpolation=interpolation,
        antialias=True,
    )


__all__ = ["AUGMENT_KINDS", "BatchAugment", "batch_augment_for", "centre_square"]
