"""The pixels of stage-II views, on whole batches on the encoder's device.

A view is a base view (its bank entry's crop box, resized back to the stored image's own size,
and flip: `ecvl.augment.apply_base_view`), then the memory-driven ops of its plan (eq. 10),
then the model's eval transform (resize the shorter side, centre crop, normalise). The export
renders the bank's base views and stage II re-renders the views it must re-encode, both here,
so that a banked view rebuilt with no op is the row the bank holds.

Per image in PIL this costs about as much as the encoder on a CPU and starves it on a GPU. Here
the crop, flip and eval resize of every view are folded into one source box each and
resampled in one batched call (`ecvl.data.batch_augment.BatchAugment`: PIL's antialiased
kernel as two batched matmuls), the ops run batched too (`ecvl.batch_randaugment`), and only
decoding stays per image (raw pixel members need none; JPEG members decode on the GPU when
there is one). Where the stored image already has the model's side (raw 32 px CIFAR or digits
members), the eval resize is the identity and the crop is PIL's within one uint8 level; for
other sizes the one resampling replaces PIL's two (crop to the image's size, then the eval
resize), and the ops act on the model-sized view instead of the image-sized one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ecvl.augment import ViewPlan
from ecvl.batch_randaugment import apply_plans
from ecvl.data.batch_augment import BatchAugment, centre_square
from ecvl.data.batch_norm import BatchNormalize
from ecvl.errors import DataError, ModelError

__all__ = ["ViewRenderer"]

RESIZE_MODES = ("shortest", "squash")


@dataclass(frozen=True)
class ViewRenderer:
    """Base view + ops + eval transform for batches of views of stored images.

    Attributes:
        side: the model's input side (square inputs).
        mean, std: the eval transform's normalisation.
        interpolation: "bicubic" or "bilinear" (the eval resize's, with PIL's antialiasing).
        resize_mode: "shortest" (resize the shorter side, centre crop: open_clip's default) or
            "squash" (resize to the square).
    """

    side: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ModelError(
                f"views are rendered for resize_mode {' or '.join(RESIZE_MODES)}, "
                f"the model's eval transform uses {self.resize_mode!r}"
            )

    @classmethod
    def for_model(cls, model: torch.nn.Module) -> ViewRenderer:
        """The renderer matching an open_clip model's preprocess config.

        Raises:
            ModelError: a non-square input, or an eval resize this renderer cannot fold into
                one resampling.
        """
        import open_clip

        cfg = open_clip.get_model_preprocess_cfg(model)
        size = cfg["size"]
        side = size if isinstance(size, int) else size[0]
        if not isinstance(size, int) and len(set(size)) != 1:
            raise ModelError(f"views are rendered for square inputs, the model takes {size}")
        interpolation = cfg.get("interpolation", "bicubic")
        if interpolation not in ("bicubic", "bilinear"):
            raise ModelError(f"unsupported eval interpolation {interpolation!r}")
        return cls(
            int(side),
            tuple(float(m) for m in cfg["mean"]),
            tuple(float(s) for s in cfg["std"]),
            interpolation,
            cfg.get("resize_mode", "shortest"),
        )

    @property
    def _resample(self) -> BatchAugment:
        return BatchAugment(
            "resized_crop", self.side, interpolation=self.interpolation, antialias=True
        )

    def source_boxes(self, sizes: Any, boxes: Any, flips: Any) -> torch.Tensor:
        """(B, 5) float32 plan rows for `BatchAugment.apply`: top, left, height, width of the
        region of the stored image that ends up in the model's input, and the flip.

        Args:
            sizes: (B, 2) heights and widths of the stored images.
            boxes: (B, 4) crop boxes ``(x0, y0, x1, y1)`` in stored pixels (the bank's).
            flips: (B,) mirrored after the crop.
        """
        hw = torch.as_tensor(np.asarray(sizes), dtype=torch.float64).reshape(-1, 2)
        box = torch.as_tensor(np.asarray(boxes), dtype=torch.float64).reshape(-1, 4)
        flip = torch.as_tensor(np.asarray(flips, dtype=bool)).reshape(-1)
        h, w = hw[:, 0], hw[:, 1]
        x0, y0 = box[:, 0], box[:, 1]
        sy, sx = (box[:, 3] - y0) / h, (box[:, 2] - x0) / w  # crop pixels per canvas pixel
        if self.resize_mode == "squash":
            top, left, kh, kw = torch.zeros_like(h), torch.zeros_like(w), h, w
        else:  # the canvas (the crop at the image's size) loses the eval transform's margins
            top, left, kh, kw = centre_square(h, w, self.side).unbind(1)
        # the canvas is mirrored before the centre crop: the kept columns, unmirrored
        left = torch.where(flip, w - left - kw, left)
        plan = torch.stack([y0 + top * sy, x0 + left * sx, kh * sy, kw * sx, flip.double()], 1)
        return plan.to(torch.float32)

    def pixels(
        self,
        images: torch.Tensor | Sequence[torch.Tensor],
        plan: torch.Tensor,
        view_plans: Sequence[ViewPlan] | None = None,
        rngs: Sequence[np.random.Generator | None] | None = None,
    ) -> torch.Tensor:
        """uint8 B×3×side×side views, on the images' device, before the normalisation.

        Args:
            images: uint8 B×3×H×W, or B uint8 3×H×W tensors of any sizes (one per view).
            plan: (B, 5) rows from `source_boxes`.
            view_plans: each view's ops (eq. 10), or None for base views only.
            rngs: one generator per view for the ops' own randomness (Cutout's position), as
                `ecvl.augment.apply_plan` draws it.
        """
        out = self._resample.apply(images, plan)
        return out if view_plans is None else apply_plans(out, view_plans, rngs)

    def render(
        self,
        images: torch.Tensor | Sequence[torch.Tensor],
        plan: torch.Tensor,
        view_plans: Sequence[ViewPlan] | None = None,
        rngs: Sequence[np.random.Generator | None] | None = None,
    ) -> torch.Tensor:
        """`pixels`, normalised: the model's float32 B×3×side×side inputs."""
        return BatchNormalize(self.mean, self.std)(self.pixels(images, plan, view_plans, rngs))


def stack_pixels(arrays: Sequence[np.ndarray]) -> torch.Tensor | list[torch.Tensor]:
    """H×W×3 uint8 arrays as one B×3×H×W tensor when they share a size, else a list of 3×H×W
    tensors (for `ViewRenderer.render`)."""
    if not arrays:
        raise DataError("no images to render")
    if len({a.shape for a in arrays}) == 1:
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    # np.array copies: the decoded pixels may be read-only views of the stored bytes
    return [torch.from_numpy(np.array(a)).permute(2, 0, 1).contiguous() for a in arrays]
