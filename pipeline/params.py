"""`params.yaml`, validated once at the edge into frozen, typed objects.

One section per stage (the section name is the stage name) plus the shared `base` and
`paths`. Each stage reads only its own section and the shared ones; the library receives
plain arguments built from these objects, never the params file.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ecvl.data.sources import SOURCES
from pipeline.schema import ParamsError, bounds, build


@dataclass(frozen=True)
class BaseParams:
    """Shared by every stage."""

    seed: int = field(default=0, metadata=bounds(ge=0))
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_workers: int = field(default=2, metadata=bounds(ge=0))
    progress: bool = True

    def check(self, where: str) -> None:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", self.device):
            raise ParamsError(
                f"{where}.device: must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}"
            )


@dataclass(frozen=True)
class PathsParams:
    """Every artifact path, written once; dvc.yaml reads them as `${paths.*}`."""

    shards: Path = Path("data/shards")
    stage1: Path = Path("models/stage1")
    checkpoints: Path = Path("checkpoints")
    embeddings: Path = Path("data/embeddings.zarr")
    image_store: Path = Path("data/train_images.h5")
    stage2: Path = Path("models/stage2")
    metrics: Path = Path("metrics")
    plots: Path = Path("plots")
    reports: Path = Path("reports")


def parse_source(value: Any, where: str) -> Any:
    """A `{name: <source>, ...options}` mapping → that source's frozen config object."""
    if not isinstance(value, dict):
        raise ParamsError(f"{where}: must be a mapping with a `name` key, got {value!r}")
    if "name" not in value:
        raise ParamsError(f"{where}.name: missing required key (one of {', '.join(SOURCES)})")
    name = value["name"]
    if name not in SOURCES:
        raise ParamsError(
            f"{where}.name: unknown source {name!r} (known: {', '.join(sorted(SOURCES))})"
        )
    options = {k: v for k, v in value.items() if k != "name"}
    config = build(SOURCES[name], options, where)
    if not getattr(config, "download", False):
        for f in dataclasses.fields(config):
            path = getattr(config, f.name)
            if isinstance(path, Path) and not path.exists():
                raise ParamsError(f"{where}.{f.name}: not found: {path}")
    return config


@dataclass(frozen=True)
class ShardParams:
    """Source data → long-tailed splits → webdataset shards (DESIGN.md §2)."""

    source: Any = field(
        default_factory=lambda: SOURCES["digits"](), metadata=bounds(parse=parse_source)
    )
    test_source: Any = field(default=None, metadata=bounds(parse=parse_source))
    test_per_class: int = field(default=0, metadata=bounds(ge=0))
    val_per_class: int = field(default=0, metadata=bounds(ge=0))
    imbalance_factor: float | None = field(default=None, metadata=bounds(ge=1))
    n_max: int | None = field(default=None, metadata=bounds(ge=1))
    membership_imbalance_factor: float | None = field(default=None, metadata=bounds(ge=1))
    many_above: int = field(default=100, metadata=bounds(ge=0))
    few_below: int = field(default=20, metadata=bounds(ge=0))
    maxcount: int = field(default=1000, metadata=bounds(ge=1))
    max_bad_fraction: float = field(default=0.0, metadata=bounds(ge=0, le=1))

    def check(self, where: str) -> None:
        if self.few_below > self.many_above + 1:
            raise ParamsError(
                f"{where}.few_below: must be <= many_above + 1 ({self.many_above + 1}), "
                f"got {self.few_below}"
            )


def _check_templates(templates: tuple[str, ...], where: str) -> None:
    if not templates:
        raise ParamsError(f"{where}: give at least one template")
    for i, t in enumerate(templates):
        if t.count("{}") != 1:
            raise ParamsError(f"{where}[{i}]: must contain exactly one {{}}, got {t!r}")


@dataclass(frozen=True)
class PromptsParams:
    """Class-prompt templates, shared by every stage that encodes text."""

    train_templates: tuple[str, ...] = ("a photo of a {}.",)
    eval_templates: tuple[str, ...] = ("a photo of a {}.",)

    def check(self, where: str) -> None:
        _check_templates(self.train_templates, f"{where}.train_templates")
        _check_templates(self.eval_templates, f"{where}.eval_templates")


Precision = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class Stage1Params:
    """Fine-tune both towers on the long-tailed train shards (DESIGN.md §1 Stage I)."""

    model: str = "ecvl-tiny-vit"
    pretrained: str | None = None  # open_clip tag, checkpoint file or local-dir; null = random
    epochs: int = field(default=30, metadata=bounds(ge=1))
    batch_size: int = field(default=64, metadata=bounds(ge=1))
    lr: float = field(default=1e-3, metadata=bounds(gt=0))
    weight_decay: float = field(default=0.1, metadata=bounds(ge=0))
    warmup_epochs: float = field(default=1.0, metadata=bounds(ge=0))
    grad_clip: float | None = field(default=1.0, metadata=bounds(gt=0))
    w_i2t: float = field(default=1.0, metadata=bounds(ge=0))
    w_t2i: float = field(default=1.0, metadata=bounds(ge=0))
    logit_scale_max: float = field(default=100.0, metadata=bounds(gt=1))
    precision: Precision = "auto"
    shuffle_buffer: int = field(default=1000, metadata=bounds(ge=0))
    eval_batch_size: int = field(default=256, metadata=bounds(ge=1))
    text_batch_size: int | None = field(default=None, metadata=bounds(ge=1))

    def check(self, where: str) -> None:
        if self.w_i2t + self.w_t2i == 0:
            raise ParamsError(f"{where}.w_i2t: w_i2t and w_t2i cannot both be 0")


@dataclass(frozen=True)
class ExportParams:
    """Cache embeddings and train images for stage II (DESIGN.md §1 Export)."""

    batch_size: int = field(default=512, metadata=bounds(ge=1))
    precision: Precision = "auto"


Stage2Mode = Literal["linear_probe", "ballad", "contrast_standard", "ecvl"]


@dataclass(frozen=True)
class Stage2Params:
    """Balanced residual adapter with momentum-driven augmentation (DESIGN.md §1 Stage II).

    `modes` are the paper's Table 5 rows, each trained as its own adapter: `ballad` (adapter +
    balanced sampling + classification loss), `contrast_standard` (+ two-view contrastive loss,
    views from a fixed standard augmentation), `ecvl` (the full method); plus `linear_probe`,
    the baseline a user tries first: a cross-entropy linear classifier on the cached features,
    always with the long-tailed (instance) sampler whatever `sampler` says.
    """

    modes: tuple[Stage2Mode, ...] = ("linear_probe", "ballad", "contrast_standard", "ecvl")
    epochs: int = field(default=30, metadata=bounds(ge=1))
    batch_size: int = field(default=128, metadata=bounds(ge=2))
    lr: float = field(default=1e-3, metadata=bounds(gt=0))
    weight_decay: float = field(default=1e-4, metadata=bounds(ge=0))
    warmup_epochs: float = field(default=0.0, metadata=bounds(ge=0))
    residual_ratio: float = field(default=0.2, metadata=bounds(ge=0, le=1, key="lambda"))
    beta: float = field(default=0.97, metadata=bounds(ge=0, lt=1))
    k: int = field(default=2, metadata=bounds(ge=1))
    tau_dcvl: float = field(default=0.1, metadata=bounds(gt=0))
    w_dcvl: float = field(default=1.0, metadata=bounds(ge=0))
    sampler: Literal["balanced", "instance"] = "balanced"
    draws_per_epoch: int | None = field(default=None, metadata=bounds(ge=1))
    precision: Precision = "auto"
    encode_batch_size: int = field(default=256, metadata=bounds(ge=1))
    augment_workers: int = field(default=0, metadata=bounds(ge=0))
    eval_batch_size: int = field(default=4096, metadata=bounds(ge=1))

    def check(self, where: str) -> None:
        if not self.modes:
            raise ParamsError(
                f"{where}.modes: give at least one of linear_probe, ballad, contrast_standard, ecvl"
            )
        if len(set(self.modes)) != len(self.modes):
            raise ParamsError(f"{where}.modes: listed twice: {list(self.modes)}")


@dataclass(frozen=True)
class EvaluateParams:
    """Results tables, per-class plots and metrics (DESIGN.md §1 Evaluation)."""

    splits: tuple[Literal["test", "val"], ...] = ("test", "val")
    zero_shot: bool = True
    batch_size: int = field(default=4096, metadata=bounds(ge=1))


@dataclass(frozen=True)
class Params:
    """The whole params file."""

    base: BaseParams = field(default_factory=BaseParams)
    paths: PathsParams = field(default_factory=PathsParams)
    prompts: PromptsParams = field(default_factory=PromptsParams)
    shard: ShardParams = field(default_factory=ShardParams)
    stage1: Stage1Params = field(default_factory=Stage1Params)
    export: ExportParams = field(default_factory=ExportParams)
    stage2: Stage2Params = field(default_factory=Stage2Params)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)


def load_params(path: Path | str) -> Params:
    """Read and validate a params file.

    Raises:
        ParamsError: missing or unparsable file, unknown key, wrong type, value out of range,
            missing input file. The message names the file and the dotted key.
    """
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ParamsError(f"{path}: not valid YAML{at}: {getattr(e, 'problem', e)}") from None
    try:
        return build(Params, data, where="params")
    except ParamsError as e:
        msg = str(e).removeprefix("params.")
        raise ParamsError(f"{path}: {msg}") from None
