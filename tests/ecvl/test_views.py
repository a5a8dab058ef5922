"""The view renderer against the PIL reference: base view, ops and eval transform on batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import CenterCrop, Compose, Resize

from ecvl.augment import PlannedOp, apply_base_view, apply_plan, sample_base_view
from ecvl.errors import ModelError
from ecvl.reencode import view_rng
from ecvl.views import ViewRenderer, stack_pixels

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth, photo-like pixels (a blurred upscale of noise) of size h×w."""
    small = np.random.default_rng(seed).integers(0, 256, (max(2, h // 8), max(2, w // 8), 3))
    return np.asarray(Image.fromarray(small.astype(np.uint8)).resize((w, h), Image.BICUBIC))


def _reference(pixels: np.ndarray, box, flip: bool, plan, rng, side: int) -> np.ndarray:
    """PIL: the base view at the image's size, the ops, then Resize(side) + CenterCrop(side)."""
    view = apply_plan(apply_base_view(Image.fromarray(pixels), box, flip), plan, rng)
    return np.asarray(Compose([Resize(side, Image.BICUBIC), CenterCrop(side)])(view))


def _rendered(renderer: ViewRenderer, arrays, boxes, flips, plans, rngs) -> np.ndarray:
    sizes = [a.shape[:2] for a in arrays]
    plan = renderer.source_boxes(sizes, boxes, flips)
    x = renderer.render(stack_pixels(arrays), plan, plans, rngs)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    pixels = (x * std + mean) * 255  # undo the normalisation
    return pixels.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_images_at_the_model_side_render_as_pil_within_one_level():
    side = 32
    renderer = ViewRenderer(side, MEAN, STD)
    arrays = [_photo(side, side, s) for s in range(12)]
    drawn = [sample_base_view((side, side), np.random.default_rng(s)) for s in range(12)]
    plans = [(), (PlannedOp("Rotate", 0.5, -1),), (PlannedOp("Cutout", 0.9, 1),)] * 4
    rngs = [view_rng(3, j) for j in range(12)]
    got = _rendered(renderer, arrays, [b for b, _ in drawn], [f for _, f in drawn], plans, rngs)
    for j, (box, flip) in enumerate(drawn):
        want = _reference(arrays[j], box, flip, plans[j], view_rng(3, j), side)
        diff = np.abs(got[j].astype(int) - want.astype(int))
        # PIL's kernel reaches past the crop box into the image, ours stops at the box (as a
        # crop then a resize does): the views differ along the border, hardly inside
        assert diff.mean() < 0.5 and diff[2:-2, 2:-2].max() <= 3, (j, diff.mean())


@pytest.mark.parametrize("flip", [False, True])
def test_other_sizes_fold_crop_and_eval_resize_into_one_resampling(flip):
    # a 60×45 image for a 32 px model: PIL resamples twice (crop to 60×45, then to 32), the
    # renderer once, from the same source region: the views agree closely, not exactly
    side = 32
    renderer = ViewRenderer(side, MEAN, STD)
    arrays = [_photo(45, 60, s) for s in range(5)]
    boxes = [(4, 2, 52, 41), (0, 0, 60, 45), (10, 5, 30, 40), (20, 0, 60, 30), (1, 1, 59, 44)]
    got = _rendered(renderer, arrays, boxes, [flip] * 5, None, None)
    for j, box in enumerate(boxes):
        want = _reference(arrays[j], box, flip, (), None, side)
        diff = np.abs(got[j].astype(int) - want.astype(int))
        assert diff.mean() < 1.0, (j, diff.mean())


def test_mixed_sizes_render_each_as_alone():
    renderer = ViewRenderer(16, MEAN, STD)
    arrays = [_photo(20, 30, 0), _photo(16, 16, 1), _photo(20, 30, 2)]
    boxes = [(0, 0, 30, 20), (2, 2, 14, 14), (5, 0, 25, 20)]
    together = _rendered(renderer, arrays, boxes, [False, True, False], None, None)
    for j in range(3):
        alone = _rendered(renderer, arrays[j : j + 1], boxes[j : j + 1], [j == 1], None, None)
        assert np.array_equal(together[j], alone[0])


def test_renderer_follows_the_model_and_refuses_what_it_cannot_fold():
    from ecvl.models.clip import create_model

    renderer = ViewRenderer.for_model(create_model("ecvl-tiny-vit").model)
    assert renderer.side == 32 and renderer.resize_mode == "shortest"
    with pytest.raises(ModelError, match="resize_mode"):
        ViewRenderer(32, MEAN, STD, resize_mode="longest")
