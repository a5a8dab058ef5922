"""ECVL losses as plain functions on tensors.

Stage I: `image_to_text_loss` (eq. 4) + `text_to_image_loss` (eq. 5, multi-positive), combined
by `stage1_loss`. Stage II: `image_to_text_loss` on adapted features + `two_view_contrastive_loss`
(eq. 11). Losses are computed in float32 whatever the feature dtype, with autocast switched off
inside: under autocast a `.float()` input is cast back to bf16/fp16 by the next matmul, and
logits at scale ~100 would then be quantised to steps of 0.5.

`logit_scale` is CLIP's log-parametrised inverse temperature: `1/tau = exp(logit_scale)`; pass
`model.logit_scale` (a parameter, so that it trains) or a plain float.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from typing import Literal, TypeVar

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

Reduction = Literal["mean", "none"]
_F = TypeVar("_F", bound=Callable[..., torch.Tensor])


def _float32(fn: _F) -> _F:
    """Run `fn` with autocast off on every device type, so its matmuls stay float32."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@_float32
def image_to_text_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    labels: torch.Tensor,
    logit_scale: torch.Tensor | float,
    reduction: Reduction = "mean",
    logit_offset: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Eq. 4: cross-entropy of `exp(logit_scale) * v_i . u_c` over all K classes.

    Args:
        image_features: (B, d) L2-normalised image embeddings `v_i` (not normalised here).
        text_features: (K, d) L2-normalised class embeddings `u_c`.
        labels: (B,) class indices in [0, K).
        logit_scale: log inverse temperature.
        reduction: "mean" over the batch, or "none" for the (B,) per-sample losses.
        logit_offset: (K,) added to the logits (training-time logit adjustment, see
            `logit_adjustment`); None adds nothing.
        label_smoothing: mass spread uniformly over the K classes (Szegedy et al. 2016), a
            regulariser for a small model that memorises its few images; 0 = eq. 4.

    Returns:
        A scalar, or (B,) with `reduction="none"`.
    """
    _check_pairs(image_features, text_features, labels)
    logits = _scale(logit_scale) * (image_features.float() @ text_features.float().T)
    if logit_offset is not None:
        logits = logits + logit_offset.float()
    return F.cross_entropy(
        logits, labels, reduction=_check_reduction(reduction), label_smoothing=label_smoothing
    )


def logit_adjustment(class_counts: Sequence[int], tau: float) -> torch.Tensor:
    """`tau * log(prior)` per class, the offset of the logit-adjusted loss (Menon et al. 2021,
    "Long-tail learning via logit adjustment"): added to the logits in training only, it
    makes a frequent class earn its margin, so the plain logits at test time are no longer
    biased towards it. `tau = 0` gives zeros (the plain loss).

    Raises:
        ValueError: a class without train samples (its prior would be 0), or `tau < 0`.
    """
    counts = torch.as_tensor(list(class_counts), dtype=torch.float64)
    if tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    if counts.numel() == 0 or bool((counts <= 0).any()):
        raise ValueError("every class needs at least one train sample for its prior")
    return (tau * torch.log(counts / counts.sum())).float()


@_float32
def text_to_image_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    labels: torch.Tensor,
    logit_scale: torch.Tensor | float,
) -> torch.Tensor:
    """Eq. 5: text->image InfoNCE where every image of the class is a positive.

    For each class c present in the batch, with `s_j = exp(logit_scale) * u_c . v_j` over the
    batch's B images and `P_c = {j : y_j = c}`:

        loss_c = -1/|P_c| * sum_{j in P_c} log( exp(s_j) / sum_{k=1..B} exp(s_k) )

    and the result is the mean of `loss_c` over the present classes. Unlike CLIP's loss (one
    positive per text), images of the same class are never pushed apart.

    Args:
        image_features: (B, d) L2-normalised image embeddings.
        text_features: (K, d) L2-normalised class embeddings (only present classes are used).
        labels: (B,) class indices in [0, K).
        logit_scale: log inverse temperature.

    Returns:
        A scalar.
    """
    _check_pairs(image_features, text_features, labels)
    classes, position = torch.unique(labels, return_inverse=True)
    logits = _scale(logit_scale) * (text_features[classes].float() @ image_features.float().T)
    log_prob = F.log_softmax(logits, dim=1)  # (C, B): over the batch's images
    positives = position.unsqueeze(0) == torch.arange(len(classes), device=labels.device)[:, None]
    positives = positives.to(log_prob.dtype)
    per_class = -(log_prob * positives).sum(dim=1) / positives.sum(dim=1)
    return per_class.mean()


def stage1_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    labels: torch.Tensor,
    logit_scale: torch.Tensor | float,
    w_i2t: float = 1.0,
    w_t2i: float = 1.0,
    logit_offset: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Stage-I loss `w_i2t * L_i2t + w_t2i * L_t2i` (`w_t2i = 0` gives eq. 4 alone).

    Args:
        image_features: (B, d) L2-normalised image embeddings.
        text_features: (K, d) L2-normalised class embeddings.
        labels: (B,) class indices.
        logit_scale: log inverse temperature.
        w_i2t: weight of the image->text term.
        w_t2i: weight of the text->image term; with 0 it is reported but gets no gradient.
        logit_offset: (K,) logit adjustment of the image->text term (None: none).
        label_smoothing: label smoothing of the image->text term (0: none).

    Returns:
        The total loss and its detached parts `{"i2t": ..., "t2i": ...}` (for logging).
    """
    i2t = image_to_text_loss(
        image_features,
        text_features,
        labels,
        logit_scale,
        logit_offset=logit_offset,
        label_smoothing=label_smoothing,
    )
    # With w_t2i = 0 the term is still reported, but kept out of the graph.
    with torch.set_grad_enabled(torch.is_grad_enabled() and w_t2i != 0):
        t2i = text_to_image_loss(image_features, text_features, labels, logit_scale)
    total = w_i2t * i2t + (w_t2i * t2i if w_t2i != 0 else 0.0)
    return total, {"i2t": i2t.detach(), "t2i": t2i.detach()}


@_float32
def two_view_contrastive_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float = 0.1,
    reduction: Reduction = "mean",
    ids: torch.Tensor | None = None,
    negatives: torch.Tensor | None = None,
    negative_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. 11: NT-Xent (SimCLR) InfoNCE between two views of each of B samples.

    The views are L2-normalised here. Over the 2B views, the anchor z1_i has the positive z2_i
    and the 2B - 2 other views as negatives (itself excluded), and likewise for z2_i:

        l(a, p) = -log( exp(a . p / t) / sum_{k != a} exp(a . z_k / t) )

    The per-sample loss is the mean of its two anchors' losses, `(l(z1_i, z2_i) +
    l(z2_i, z1_i)) / 2`; "mean" averages it over the B samples. With `ids`, views of a sample
    drawn more than once in the batch (same id) are left out of each other's negatives: a
    sample is never its own negative.

    With `negatives`, the anchors are scored against those views instead of each other: the
    denominator of `l(z1_i, z2_i)` holds the positive and every row of `negatives` whose
    `negative_ids` entry differs from `ids[i]`. Stage II's measurement pass uses this so that
    every sample meets negatives drawn as a training batch draws them, whatever the other
    anchors of its batch are.

    Args:
        z1: (B, d) first views.
        z2: (B, d) second views, row i the same sample as in `z1`.
        temperature: softmax temperature `tau_dcvl` (> 0).
        reduction: "mean", or "none" for the (B,) per-sample losses (for the momentum EMA).
        ids: optional (B,) sample index of each row; required with `negatives`.
        negatives: optional (M, d) negative views shared by every anchor.
        negative_ids: (M,) sample index of each negative view (with `negatives`).

    Returns:
        A scalar, or (B,) with `reduction="none"`.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"expected two (B, d) views, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    reduction = _check_reduction(reduction)
    b = z1.shape[0]
    if ids is not None and ids.shape != (b,):
        raise ValueError(f"ids must have shape ({b},), got {tuple(ids.shape)}")
    if negatives is not None:
        per_sample = _against_negatives(z1, z2, temperature, ids, negatives, negative_ids)
        return per_sample.mean() if reduction == "mean" else per_sample
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    sim = (z @ z.T) / temperature
    index = torch.arange(b, device=z.device)
    targets = torch.cat([index + b, index])
    self_mask = torch.eye(2 * b, dtype=torch.bool, device=z.device)
    if ids is not None:
        both = ids.to(z.device).repeat(2)
        same = both[:, None] == both[None, :]
        same[torch.arange(2 * b, device=z.device), targets] = False  # keep the positive
        self_mask = self_mask | same
    sim = sim.masked_fill(self_mask, float("-inf"))
    per_anchor = F.cross_entropy(sim, targets, reduction="none")
    per_sample = 0.5 * (per_anchor[:b] + per_anchor[b:])
    return per_sample.mean() if reduction == "mean" else per_sample


def _against_negatives(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float,
    ids: torch.Tensor | None,
    negatives: torch.Tensor,
    negative_ids: torch.Tensor | None,
) -> torch.Tensor:
    """Per-sample eq. 11 with a shared set of negative views (see the caller)."""
    b, d = z1.shape
    if ids is None or negative_ids is None:
        raise ValueError("negatives need ids and negative_ids (a sample is never its own negative)")
    if negatives.dim() != 2 or negatives.shape[1] != d:
        raise ValueError(f"negatives must be (M, {d}), got {tuple(negatives.shape)}")
    if negative_ids.shape != (negatives.shape[0],):
        raise ValueError(
            f"negative_ids must have shape ({negatives.shape[0]},), got {tuple(negative_ids.shape)}"
        )
    a1, a2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    neg = F.normalize(negatives.float().to(a1.device), dim=1)
    own = ids.to(a1.device)[:, None] == negative_ids.to(a1.device)[None, :]
    positive = (a1 * a2).sum(dim=1, keepdim=True) / temperature
    losses = []
    for anchor in (a1, a2):
        logits = torch.cat(
            [positive, (anchor @ neg.T / temperature).masked_fill(own, -torch.inf)], 1
        )
        losses.append(torch.logsumexp(logits, dim=1) - positive[:, 0])
    return 0.5 * (losses[0] + losses[1])


def _scale(logit_scale: torch.Tensor | float) -> torch.Tensor | float:
    if isinstance(logit_scale, torch.Tensor):
        return logit_scale.float().exp().reshape(())
    return math.exp(float(logit_scale))


def _check_reduction(reduction: str) -> Reduction:
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    return reduction  # type: ignore[return-value]


def _check_pairs(image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor) -> None:
    if image.dim() != 2 or text.dim() != 2 or image.shape[1] != text.shape[1]:
        raise ValueError(
            f"expected image (B, d) and text (K, d) features, got {tuple(image.shape)} "
            f"and {tuple(text.shape)}"
        )
    if labels.shape != (image.shape[0],):
        raise ValueError(f"expected labels of shape ({image.shape[0]},), got {tuple(labels.shape)}")
