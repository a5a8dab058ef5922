"""The stage-II modes as data: what each one trains and where its views come from.

The trainer (`ecvl.stage2`) reads a mode's `ModeSpec` instead of testing mode names; params
validation reads it too (which modes need the export's view bank). No torch here, so that
validating params stays light.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

__all__ = ["MEASURE_VIEWS", "MODES", "MOMENTUM_LOSSES", "ModeSpec"]

MOMENTUM_LOSSES = ("contrastive", "total")
# Which views the measurement pass scores: the bank's base views, or the views the sample
# would train on (base view + its eq.-10 RandAugment plan, re-encoded as training does).
MEASURE_VIEWS = ("base", "augmented")


@dataclasses.dataclass(frozen=True)
class ModeSpec:
    """What one stage-II mode trains and how its views are made.

    Attributes:
        name: the mode's name in params.
        head: "adapter" (eq. 7, predicts with the class prompts) or "linear_probe".
        views: views per draw: 1 (classification loss) or 2 (+ eq. 11).
        source: where a view starts: "cache" (the clean embedding) or "bank" (a base view).
        augment: "none", "memory" (eq. 10 from each sample's score) or "uniform" (eq. 10 with
            every score set to the mean score).
        sampler: a sampler this mode always uses, or None for the config's.
        measure: whether the per-epoch measurement pass scores every sample (eqs. 8-9).
    """

    name: str
    head: Literal["adapter", "linear_probe"]
    views: int
    source: Literal["cache", "bank"]
    augment: Literal["none", "memory", "uniform"] = "none"
    sampler: str | None = None
    measure: bool = True

    @property
    def contrastive(self) -> bool:
        """Whether the loss has the two-view contrastive term."""
        return self.views == 2

    @property
    def bank_views_needed(self) -> int:
        """The fewest bank views per sample the mode can run with (two different ones for a
        two-view draw and for the measurement pass)."""
        return 2 if self.source == "bank" else 0


MODES: dict[str, ModeSpec] = {
    spec.name: spec
    for spec in (
        ModeSpec("linear_probe", "linear_probe", 1, "cache", sampler="instance", measure=False),
        ModeSpec("ballad", "adapter", 1, "bank"),
        ModeSpec("contrast_standard", "adapter", 2, "bank"),
        ModeSpec("ecvl_uniform", "adapter", 2, "bank", augment="uniform"),
        ModeSpec("ecvl", "adapter", 2, "bank", augment="memory"),
    )
}
