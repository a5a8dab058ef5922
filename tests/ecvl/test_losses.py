"""Losses against hand-computed values (written out here, not recomputed by the code under test)."""

from __future__ import annotations

import math

import pytest
import torch

from ecvl.losses import (
    image_to_text_loss,
    logit_adjustment,
    stage1_loss,
    text_to_image_loss,
    two_view_contrastive_loss,
)


def _lse(values: list[float]) -> float:
    return math.log(sum(math.exp(v) for v in values))


# Three classes with orthonormal prompts; four images, class 0 twice. logit_scale = log 2, so
# every logit is 2 * cosine.
TEXT = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
IMAGES = [[0.8, 0.6, 0.0], [0.6, 0.8, 0.0], [0.0, 0.6, 0.8], [1.0, 0.0, 0.0]]
LABELS = [0, 1, 2, 0]
LOG_SCALE = math.log(2.0)

# eq. 4, by hand: logits 2 * v_i . u_c, loss_i = logsumexp(logits) - logit of the true class.
I2T_BY_HAND = [
    _lse([1.6, 1.2, 0.0]) - 1.6,
    _lse([1.2, 1.6, 0.0]) - 1.6,
    _lse([0.0, 1.2, 1.6]) - 1.6,
    _lse([2.0, 0.0, 0.0]) - 2.0,
]
# eq. 5, by hand: per present class c, logits over the 4 images s_j = 2 * u_c . v_j;
# loss_c = logsumexp(s) - mean of s over the images of class c.
T2I_PER_CLASS = [
    _lse([1.6, 1.2, 0.0, 2.0]) - (1.6 + 2.0) / 2,  # class 0: images 0 and 3
    _lse([1.2, 1.6, 1.2, 0.0]) - 1.6,  # class 1: image 1
    _lse([0.0, 0.0, 1.6, 0.0]) - 1.6,  # class 2: image 2
]
T2I_BY_HAND = sum(T2I_PER_CLASS) / 3


@pytest.fixture()
def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.nn.Parameter]:
    image = torch.tensor(IMAGES, dtype=torch.float64, requires_grad=True)
    text = torch.tensor(TEXT, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor(LABELS)
    scale = torch.nn.Parameter(torch.tensor(LOG_SCALE, dtype=torch.float64))
    return image, text, labels, scale


def test_image_to_text_matches_hand_computation(batch):
    image, text, labels, scale = batch
    per_sample = image_to_text_loss(image, text, labels, scale, reduction="none")
    assert per_sample.shape == (4,)
    assert per_sample.tolist() == pytest.approx(I2T_BY_HAND, abs=1e-6)
    mean = image_to_text_loss(image, text, labels, scale)
    assert mean.item() == pytest.approx(sum(I2T_BY_HAND) / 4, abs=1e-6)
    # A float logit_scale gives the same value as the parameter.
    assert image_to_text_loss(image, text, labels, LOG_SCALE).item() == pytest.approx(mean.item())


def test_logit_adjustment_is_tau_log_prior_and_shifts_the_logits(batch):
    image, text, labels, scale = batch
    offset = logit_adjustment([6, 3, 1], tau=1.0)
    assert offset.tolist() == pytest.approx([math.log(0.6), math.log(0.3), math.log(0.1)])
    assert logit_adjustment([6, 3, 1], tau=0.0).tolist() == [0.0, 0.0, 0.0]
    # By hand: the offsets add to each row's logits [2 v.u_0, 2 v.u_1, 2 v.u_2].
    rows = [[1.6, 1.2, 0.0], [1.2, 1.6, 0.0], [0.0, 1.2, 1.6], [2.0, 0.0, 0.0]]
    by_hand = [
        _lse([z + math.log(p) for z, p in zip(row, (0.6, 0.3, 0.1), strict=True)])
        - (row[y] + math.log((0.6, 0.3, 0.1)[y]))
        for row, y in zip(rows, LABELS, strict=True)
    ]
    adjusted = image_to_text_loss(image, text, labels, scale, reduction="none", logit_offset=offset)
    assert adjusted.tolist() == pytest.approx(by_hand, abs=1e-6)
    # A frequent class's images already have the prior's head start (lower loss, less push);
    # the rare class's image must earn a larger margin (higher loss).
    plain = image_to_text_loss(image, text, labels, scale, reduction="none")
    assert adjusted[0] < plain[0] and adjusted[2] > plain[2]
    total, parts = stage1_loss(image, text, labels, scale, logit_offset=offset)
    assert parts["i2t"].item() == pytest.approx(adjusted.mean().item(), abs=1e-6)


def test_label_smoothing_mixes_in_the_mean_loss_over_all_classes(batch):
    image, text, labels, scale = batch
    # By hand: (1 - eps) * eq. 4 + eps * mean over the K = 3 classes of logsumexp - logit_c.
    rows = [[1.6, 1.2, 0.0], [1.2, 1.6, 0.0], [0.0, 1.2, 1.6], [2.0, 0.0, 0.0]]
    eps = 0.3
    by_hand = [
        (1 - eps) * (_lse(row) - row[y]) + eps * sum(_lse(row) - z for z in row) / 3
        for row, y in zip(rows, LABELS, strict=True)
    ]
    smoothed = image_to_text_loss(image, text, labels, scale, reduction="none", label_smoothing=eps)
    assert smoothed.tolist() == pytest.approx(by_hand, abs=1e-6)
    total, parts = stage1_loss(image, text, labels, scale, label_smoothing=eps)
    assert parts["i2t"].item() == pytest.approx(sum(by_hand) / 4, abs=1e-6)
    # It only touches the image->text term.
    assert parts["t2i"].item() == pytest.approx(T2I_BY_HAND, abs=1e-6)


@pytest.mark.parametrize("counts, tau", [([3, 0, 1], 1.0), ([], 1.0), ([3, 1], -0.5)])
def test_logit_adjustment_refuses_empty_classes_and_negative_tau(counts, tau):
    with pytest.raises(ValueError):
        logit_adjustment(counts, tau)


def test_text_to_image_matches_hand_computation(batch):
    image, text, labels, scale = batch
    loss = text_to_image_loss(image, text, labels, scale)
    assert loss.item() == pytest.approx(T2I_BY_HAND, abs=1e-6)


def test_text_to_image_pulls_same_class_images_together(batch):
    # Image 3 is a second image of class 0. Plain CLIP (one text per image) would treat it as a
    # negative for image 0's prompt and push it away from u_0; eq. 5 must pull it closer.
    image, text, labels, scale = batch
    text_to_image_loss(image, text, labels, scale).backward()
    u0 = torch.tensor(TEXT[0], dtype=torch.float64)
    # d loss / d v_3 . u_0 = 2 * (softmax_3 - 1/2) / 3 with softmax_3 = e^2 / sum(e^s).
    p3 = math.exp(2.0) / sum(math.exp(s) for s in [1.6, 1.2, 0.0, 2.0])
    assert (image.grad[3] @ u0).item() == pytest.approx(2 * (p3 - 0.5) / 3, abs=1e-6)
    assert (image.grad[3] @ u0).item() < 0


def test_stage1_loss_combines_weighted_terms(batch):
    image, text, labels, scale = batch
    total, parts = stage1_loss(image, text, labels, scale, w_i2t=0.5, w_t2i=2.0)
    expected = 0.5 * sum(I2T_BY_HAND) / 4 + 2.0 * T2I_BY_HAND
    assert total.item() == pytest.approx(expected, abs=1e-6)
    assert parts["i2t"].item() == pytest.approx(sum(I2T_BY_HAND) / 4, abs=1e-6)
    assert parts["t2i"].item() == pytest.approx(T2I_BY_HAND, abs=1e-6)
    assert not parts["i2t"].requires_grad


def test_stage1_loss_without_t2i_is_eq4_alone(batch):
    image, text, labels, scale = batch
    total, parts = stage1_loss(image, text, labels, scale, w_t2i=0.0)
    assert total.item() == pytest.approx(sum(I2T_BY_HAND) / 4, abs=1e-6)
    # still reported for logging
    assert parts["t2i"].item() == pytest.approx(T2I_BY_HAND, abs=1e-6)


def test_stage1_gradients_reach_both_towers_and_scale(batch):
    image, text, labels, scale = batch
    total, _ = stage1_loss(image, text, labels, scale)
    total.backward()
    for grad in (image.grad, text.grad, scale.grad):
        assert grad is not None
        assert torch.isfinite(grad).all()
        assert grad.abs().sum() > 0


def test_one_sample_per_class_and_single_sample_are_finite():
    torch.manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
    image = torch.nn.functional.normalize(torch.randn(3, 8), dim=1).requires_grad_()
    total, parts = stage1_loss(image, text, torch.tensor([2, 0, 1]), 4.6)
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(image.grad).all()
    # One image: its class's softmax over one image is 1, so the t2i term is exactly 0.
    single = text_to_image_loss(image[:1], text, torch.tensor([2]), 4.6)
    assert single.item() == pytest.approx(0.0, abs=1e-7)


# eq. 11 by hand: views a=z1_0, b=z1_1, c=z2_0, d=z2_1 (unit vectors), temperature 0.5.
# Cosines: a.b=0, a.c=0.8, a.d=0.6, b.c=0.6, b.d=0.8, c.d=0.96; logits = cosine / 0.5.
Z1 = [[1.0, 0.0], [0.0, 1.0]]
Z2 = [[0.8, 0.6], [0.6, 0.8]]
ANCHOR_A = _lse([0.0, 1.6, 1.2]) - 1.6  # vs b, c (positive), d
ANCHOR_B = _lse([0.0, 1.2, 1.6]) - 1.6  # vs a, c, d (positive)
ANCHOR_C = _lse([1.6, 1.2, 1.92]) - 1.6  # vs a (positive), b, d
ANCHOR_D = _lse([1.2, 1.6, 1.92]) - 1.6  # vs a, b (positive), c
TWO_VIEW_BY_HAND = [(ANCHOR_A + ANCHOR_C) / 2, (ANCHOR_B + ANCHOR_D) / 2]


def test_two_view_matches_hand_computation():
    z1 = torch.tensor(Z1, dtype=torch.float64)
    z2 = torch.tensor(Z2, dtype=torch.float64)
    per_sample = two_view_contrastive_loss(z1, z2, temperature=0.5, reduction="none")
    assert per_sample.tolist() == pytest.approx(TWO_VIEW_BY_HAND, abs=1e-6)
    mean = two_view_contrastive_loss(z1, z2, temperature=0.5)
    assert mean.item() == pytest.approx(sum(TWO_VIEW_BY_HAND) / 2, abs=1e-6)
    # Inputs are normalised inside: scaling a view changes nothing.
    scaled = two_view_contrastive_loss(3 * z1, 0.5 * z2, temperature=0.5, reduction="none")
    assert scaled.tolist() == pytest.approx(TWO_VIEW_BY_HAND, abs=1e-6)


def test_two_view_identical_views_beat_shuffled_views():
    torch.manual_seed(0)
    z = torch.randn(16, 32)
    same = two_view_contrastive_loss(z, z.clone())
    shuffled = two_view_contrastive_loss(z, z[torch.randperm(16)])
    assert same.item() < shuffled.item()


def test_two_view_gradients_and_single_sample():
    torch.manual_seed(0)
    z1 = torch.randn(5, 8, requires_grad=True)
    z2 = torch.randn(5, 8, requires_grad=True)
    per_sample = two_view_contrastive_loss(z1, z2, reduction="none")
    assert per_sample.shape == (5,)
    per_sample.sum().backward()
    assert torch.isfinite(z1.grad).all() and z1.grad.abs().sum() > 0
    assert torch.isfinite(z2.grad).all() and z2.grad.abs().sum() > 0
    # One sample: each anchor's only candidate is its positive, so the loss is exactly 0.
    one = two_view_contrastive_loss(torch.randn(1, 8), torch.randn(1, 8), reduction="none")
    assert one.tolist() == pytest.approx([0.0], abs=1e-7)


def test_half_precision_features_give_float32_losses(batch):
    image, text, labels, _ = batch
    loss = image_to_text_loss(image.detach().half(), text.detach().half(), labels, LOG_SCALE)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(sum(I2T_BY_HAND) / 4, abs=1e-3)


@pytest.mark.parametrize(
    "call",
    [
        lambda: image_to_text_loss(torch.ones(2, 3), torch.ones(4, 3), torch.zeros(3).long(), 0.0),
        lambda: image_to_text_loss(torch.ones(2, 3), torch.ones(4, 2), torch.zeros(2).long(), 0.0),
        lambda: image_to_text_loss(
            torch.ones(2, 3), torch.ones(4, 3), torch.zeros(2).long(), 0.0, reduction="sum"
        ),
        lambda: two_view_contrastive_loss(torch.ones(2, 3), torch.ones(3, 3)),
        lambda: two_view_contrastive_loss(torch.ones(2, 3), torch.ones(2, 3), temperature=0.0),
    ],
)
def test_bad_arguments_raise(call):
    with pytest.raises(ValueError):
        call()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_losses_stay_float32_under_autocast(dtype):
    """Under autocast a `.float()` input is cast back to low precision by the next matmul; at
    logit scale 100 bf16 logits are quantised to steps of 0.5 and the loss moves visibly."""
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(64, 32, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(10, 32, generator=g), dim=-1)
    labels = torch.randint(0, 10, (64,), generator=g)
    scale = torch.tensor(4.6)  # exp(4.6) ~ 100
    plain = [
        image_to_text_loss(img, txt, labels, scale),
        text_to_image_loss(img, txt, labels, scale),
        two_view_contrastive_loss(img[:32], img[32:], 0.1),
    ]
    with torch.autocast("cpu", dtype=dtype):
        mixed = [
            image_to_text_loss(img, txt, labels, scale),
            text_to_image_loss(img, txt, labels, scale),
            two_view_contrastive_loss(img[:32], img[32:], 0.1),
        ]
    for a, b in zip(plain, mixed, strict=True):
        assert b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
