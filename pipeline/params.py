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

from ecvl.augment import OP_NAMES
from ecvl.data.pixels import ENCODINGS
from ecvl.data.sources import SOURCES, default_prompt_templates
from ecvl.data.textfiles import decode_text, shorten
from ecvl.data.transforms import TRAIN_AUGMENTS
from ecvl.errors import DataError
from ecvl.modes import MEASURE_VIEWS, MODES, MOMENTUM_LOSSES
from pipeline.outputs import check_overlaps
from pipeline.schema import ParamsError, bounds, build, show


@dataclass(frozen=True)
class BaseParams:
    """Shared by every stage."""

    seed: int = field(default=0, metadata=bounds(ge=0, le=2**32 - 1))
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    num_workers: int = field(default=0, metadata=bounds(ge=0, le=256))
    progress: bool = True

    def check(self, where: str) -> None:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", self.device):
            raise ParamsError(
                f"{where}.device: must be auto, cpu, cuda, cuda:N or mps, got {show(self.device)}"
            )
        check_device_available(self.device, f"{where}.device")


def check_device_available(device: str, where: str) -> None:
    """A device this machine (and this torchrun launch) has, checked before any stage starts
    work, with the placement rules the stages use (`ecvl.distributed.choose_device`); `auto`
    and `cpu` always are. Without it a stage would fail only when it first moves a tensor."""
    if device in ("auto", "cpu"):
        return
    import torch  # only for an explicit accelerator: `ecvl shard` on auto/cpu never needs it

    from ecvl.distributed import choose_device, world_info
    from ecvl.errors import DeviceError

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    try:
        choose_device(device, world_info(), count, mps)
    except DeviceError as e:
        raise ParamsError(f"{where}: {e}; use auto or cpu") from None


@dataclass(frozen=True)
class PathsParams:
    """Every artifact path, written once; dvc.yaml reads them as `${paths.*}`.

    `raw` is the one input: the folder the source data lives in, a dependency of the `shard`
    stage, so that DVC re-shards when the user's own files change without editing dvc.yaml.
    `logs` holds per-epoch timings, kept out of the files DVC hashes (they differ every run).
    """

    raw: Path = Path("data/raw")
    shards: Path = Path("data/shards")
    stage1: Path = Path("models/stage1")
    checkpoints: Path = Path("checkpoints")
    embeddings: Path = Path("data/embeddings.zarr")
    image_store: Path = Path("data/train_images.h5")
    stage2: Path = Path("models/stage2")
    classifier: Path = Path("models/classifier")
    metrics: Path = Path("metrics")
    plots: Path = Path("plots")
    reports: Path = Path("reports")
    logs: Path = Path("logs")


def parse_source(value: Any, where: str) -> Any:
    """A `{name: <source>, ...options}` mapping → that source's frozen config object."""
    if not isinstance(value, dict):
        raise ParamsError(f"{where}: must be a mapping with a `name` key, got {show(value)}")
    if "name" not in value:
        raise ParamsError(f"{where}.name: missing required key (one of {', '.join(SOURCES)})")
    name = value["name"]
    if not isinstance(name, str) or name not in SOURCES:
        what = "unknown source" if isinstance(name, str) else "must be a source name, got"
        raise ParamsError(
            f"{where}.name: {what} {show(name)} (known: {', '.join(sorted(SOURCES))})"
        )
    options = {k: v for k, v in value.items() if k != "name"}
    config = build(SOURCES[name], options, where)
    if not getattr(config, "download", False):
        for f in dataclasses.fields(config):
            path = getattr(config, f.name)
            if isinstance(path, Path) and not path.exists():
                raise ParamsError(f"{where}.{f.name}: not found: {path}")
    return config


# Upper bounds: far beyond any sensible value, but finite, so that a typo (an extra zero, an
# exponent) stops at validation instead of hours later or in an allocation.
_COUNT_MAX = 10**9
_EPOCHS_MAX = 10_000
_BATCH_MAX = 2**20
_WEIGHT_MAX = 1_000.0


@dataclass(frozen=True)
class ShardParams:
    """Source data → long-tailed splits → webdataset shards (DESIGN.md §2)."""

    source: Any = field(
        default_factory=lambda: SOURCES["digits"](), metadata=bounds(parse=parse_source)
    )
    test_source: Any = field(default=None, metadata=bounds(parse=parse_source))
    test_per_class: int = field(default=40, metadata=bounds(ge=0, le=_COUNT_MAX))
    val_per_class: int = field(default=20, metadata=bounds(ge=0, le=_COUNT_MAX))
    imbalance_factor: float | None = field(default=20.0, metadata=bounds(ge=1, le=1e6))
    n_max: int | None = field(default=110, metadata=bounds(ge=1, le=_COUNT_MAX))
    membership_imbalance_factor: float | None = field(default=None, metadata=bounds(ge=1, le=1e6))
    many_above: int = field(default=100, metadata=bounds(ge=0, le=_COUNT_MAX))
    few_below: int = field(default=20, metadata=bounds(ge=0, le=_COUNT_MAX))
    maxcount: int = field(default=1000, metadata=bounds(ge=1, le=_COUNT_MAX))
    max_bad_fraction: float = field(default=0.01, metadata=bounds(ge=0, le=1))
    encoding: Literal[ENCODINGS] = "auto"

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
            raise ParamsError(f"{where}[{i}]: must contain exactly one {{}}, got {show(t)}")


@dataclass(frozen=True)
class PromptsParams:
    """Class-prompt templates, shared by every stage that encodes text."""

    train_templates: tuple[str, ...] = ("a photo of a {}.",)
    eval_templates: tuple[str, ...] | None = None  # None: the source's own (see load_params)

    def check(self, where: str) -> None:
        _check_templates(self.train_templates, f"{where}.train_templates")
        if self.eval_templates is not None:
            _check_templates(self.eval_templates, f"{where}.eval_templates")


Precision = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class Stage1Params:
    """Fine-tune both towers on the long-tailed train shards (DESIGN.md §1 Stage I)."""

    model: str = "ecvl-tiny-vit"
    pretrained: str | None = None  # open_clip tag, checkpoint file or local-dir; null = random
    epochs: int = field(default=30, metadata=bounds(ge=1, le=_EPOCHS_MAX))
    batch_size: int = field(default=64, metadata=bounds(ge=1, le=_BATCH_MAX))
    lr: float = field(default=1e-3, metadata=bounds(gt=0, le=1))
    weight_decay: float = field(default=0.1, metadata=bounds(ge=0, le=10))
    warmup_epochs: float = field(default=1.0, metadata=bounds(ge=0, le=_EPOCHS_MAX))
    grad_clip: float | None = field(default=1.0, metadata=bounds(gt=0, le=1e6))
    w_i2t: float = field(default=1.0, metadata=bounds(ge=0, le=_WEIGHT_MAX))
    w_t2i: float = field(default=1.0, metadata=bounds(ge=0, le=_WEIGHT_MAX))
    logit_scale_max: float = field(default=100.0, metadata=bounds(gt=1, le=1e4))
    precision: Precision = "auto"
    shuffle_buffer: int = field(default=1000, metadata=bounds(ge=0, le=10**7))
    eval_batch_size: int = field(default=256, metadata=bounds(ge=1, le=_BATCH_MAX))
    text_batch_size: int | None = field(default=None, metadata=bounds(ge=1, le=_BATCH_MAX))
    augment: Literal[TRAIN_AUGMENTS] = "open_clip"
    logit_adjust: float = field(default=0.0, metadata=bounds(ge=0, le=10))
    label_smoothing: float = field(default=0.0, metadata=bounds(ge=0, lt=1))

    def check(self, where: str) -> None:
        if self.w_i2t + self.w_t2i == 0:
            raise ParamsError(f"{where}.w_i2t: w_i2t and w_t2i cannot both be 0")
        _check_warmup(self.warmup_epochs, self.epochs, where)


def _check_warmup(warmup_epochs: float, epochs: int, where: str) -> None:
    if warmup_epochs > epochs:
        raise ParamsError(
            f"{where}.warmup_epochs: must be <= epochs ({epochs}), got {warmup_epochs:g}"
        )


@dataclass(frozen=True)
class ExportParams:
    """Cache embeddings and train images for stage II (DESIGN.md §1 Export)."""

    batch_size: int = field(default=512, metadata=bounds(ge=1, le=_BATCH_MAX))
    precision: Precision = "auto"
    # E base views (random resized crop + flip) encoded per train sample: the view bank that
    # every stage-II view starts from; 0 = none (then only linear_probe can train)
    bank_views: int = field(default=8, metadata=bounds(ge=0, le=256))


Stage2Mode = Literal[tuple(MODES)]


@dataclass(frozen=True)
class Stage2Params:
    """Balanced residual adapter with momentum-driven augmentation (DESIGN.md §1 Stage II).

    `modes` are the paper's Table 5 rows, nested, each trained as its own adapter (`ecvl.modes`):
    `ballad` (adapter + balanced sampling + classification loss, one bank view per draw),
    `contrast_standard` (+ two bank views and the contrastive loss), `ecvl` (+ memory-driven
    RandAugment on top: the full method), the control `ecvl_uniform` (every score set to the
    mean); plus `linear_probe`, the baseline a user tries first: a cross-entropy linear
    classifier on the clean cached features, always with the long-tailed (instance) sampler
    whatever `sampler` says.
    """

    modes: tuple[Stage2Mode, ...] = (
        "linear_probe",
        "ballad",
        "contrast_standard",
        "ecvl_uniform",
        "ecvl",
    )
    epochs: int = field(default=30, metadata=bounds(ge=1, le=_EPOCHS_MAX))
    batch_size: int = field(default=128, metadata=bounds(ge=2, le=_BATCH_MAX))
    lr: float = field(default=1e-3, metadata=bounds(gt=0, le=1))
    weight_decay: float = field(default=1e-4, metadata=bounds(ge=0, le=10))
    warmup_epochs: float = field(default=0.0, metadata=bounds(ge=0, le=_EPOCHS_MAX))
    # `lambda` in params.yaml (the paper's symbol, a Python keyword), `residual_ratio` in the
    # code: this `key` is the one place the two names meet (schema.build, schema.to_plain).
    residual_ratio: float = field(default=0.2, metadata=bounds(ge=0, le=1, key="lambda"))
    # EMA horizon 1/(1-beta) = 2.9 epochs, under a tenth of the default 30
    beta: float = field(default=0.65, metadata=bounds(ge=0, lt=1))
    # k ops drawn per view (eq. 10; BCL's default 1); more than RandAugment has only repeats ops
    k: int = field(default=1, metadata=bounds(ge=1, le=len(OP_NAMES)))
    tau_dcvl: float = field(default=0.1, metadata=bounds(gt=0, le=100))
    w_dcvl: float = field(default=1.0, metadata=bounds(ge=0, le=_WEIGHT_MAX))
    sampler: Literal["balanced", "instance"] = "balanced"
    draws_per_epoch: int | None = field(default=None, metadata=bounds(ge=1, le=_COUNT_MAX))
    # the loss the per-epoch measurement pass folds into eq. 8: contrastive (eq. 11, as BCL)
    # or total (+ classification)
    momentum_loss: Literal[MOMENTUM_LOSSES] = "contrastive"
    # the views that pass scores: base (two bank views) or augmented (the views the sample
    # would train on: its eq.-10 plan on top, re-encoded)
    measure_views: Literal[MEASURE_VIEWS] = "base"
    precision: Precision = "auto"
    encode_batch_size: int = field(default=256, metadata=bounds(ge=1, le=_BATCH_MAX))
    eval_batch_size: int = field(default=4096, metadata=bounds(ge=1, le=_BATCH_MAX))
    # where the view bank is read from: auto (memory when it fits cache_memory_gb, on the GPU
    # when training there and it fits the GPU too), always (memory), never (disk, per step)
    cache_in_memory: Literal["auto", "always", "never"] = "auto"
    cache_memory_gb: float = field(default=4.0, metadata=bounds(gt=0, le=1e6))

    def check(self, where: str) -> None:
        if not self.modes:
            raise ParamsError(f"{where}.modes: give at least one of {', '.join(MODES)}")
        if len(set(self.modes)) != len(self.modes):
            raise ParamsError(f"{where}.modes: listed twice: {list(self.modes)}")
        _check_warmup(self.warmup_epochs, self.epochs, where)


@dataclass(frozen=True)
class EvaluateParams:
    """Results tables, per-class plots and metrics (DESIGN.md §1 Evaluation)."""

    splits: tuple[Literal["test", "val"], ...] = ("test", "val")
    zero_shot: bool = True
    batch_size: int = field(default=4096, metadata=bounds(ge=1, le=_BATCH_MAX))


@dataclass(frozen=True)
class PackageParams:
    """The classifier `ecvl predict` runs: the stage-I model with one trained stage-II head, or
    with none (`stage1`: stage I's own eq.-6 prediction), whichever row does best on val."""

    mode: Literal[("stage1", *MODES)] = "ecvl"  # stage1, or one of stage2.modes


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
    package: PackageParams = field(default_factory=PackageParams)

    def check(self, where: str) -> None:
        # Before any stage runs: a stage II that needs more bank views than the export makes.
        banked = [m for m in self.stage2.modes if MODES[m].bank_views_needed]
        needed = max((MODES[m].bank_views_needed for m in banked), default=0)
        if self.export.bank_views < needed:
            raise ParamsError(
                f"{where}.export.bank_views: stage2.modes {', '.join(banked)} start their views "
                f"from the view bank, which needs >= {needed} views per sample, got "
                f"{self.export.bank_views}"
            )
        # Before any stage runs, not after stage II: a head that is never trained cannot ship.
        if self.package.mode != "stage1" and self.package.mode not in self.stage2.modes:
            raise ParamsError(
                f"{where}.package.mode: {self.package.mode!r} is not trained "
                f"(stage2.modes: {', '.join(self.stage2.modes)}); ship one of those or stage1"
            )
        check_overlaps(self, where)


PARAMS_MAX_BYTES = 1 << 20  # a params file is a few kB; a larger one is a wrong file


class _Refused(Exception):
    """A params document the strict loader refuses (a duplicate key, an alias)."""


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, stricter where a silent choice would hurt.

    A duplicate key (`seed: 7` then `seed: 0`, or a second `shard:` section pasted at the end)
    is refused instead of the last one silently winning. Aliases (`*name`) are refused before
    anything is built: a few kB of nested aliases expand to gigabytes (a "billion laughs"),
    and no ECVL param needs one.
    """

    def compose_node(self, parent, index):  # noqa: ANN001, ANN201 (PyYAML's signature)
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _Refused(
                f"line {event.start_mark.line + 1}: YAML aliases (*{event.anchor}) are not "
                "allowed in params; write the value out"
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):  # noqa: ANN001, ANN201
        if isinstance(node, yaml.MappingNode):
            lines: dict = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    first = lines.setdefault(key, key_node.start_mark.line + 1)
                except TypeError:  # an unhashable key: PyYAML's own error says so
                    continue
                if first != key_node.start_mark.line + 1:
                    raise _Refused(
                        f"duplicate key {show(key)} at lines {first} and "
                        f"{key_node.start_mark.line + 1}; keep one"
                    )
        return super().construct_mapping(node, deep=deep)


def load_params(path: Path | str) -> Params:
    """Read and validate a params file.

    Raises:
        ParamsError: missing or unparsable file, unknown key, wrong type, value out of range,
            missing input file, a duplicate key or an alias, overlapping paths. The message
            names the file and the dotted key.
    """
    path = Path(path)
    if path.is_dir():
        raise ParamsError(f"{path}: is a directory, not a params file")
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        size = path.stat().st_size
        if size > PARAMS_MAX_BYTES:
            raise ParamsError(
                f"{path}: {size:,} bytes, more than a params file can be "
                f"({PARAMS_MAX_BYTES:,}); give the YAML params file"
            )
        data = path.read_bytes()
    except OSError as e:
        raise ParamsError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        text = decode_text(data, str(path))
    except DataError as e:
        raise ParamsError(str(e)) from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader)
    except _Refused as e:
        raise ParamsError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = shorten(str(getattr(e, "problem", None) or e))
        raise ParamsError(f"{path}: not valid YAML{at}: {problem}") from None
    if data is None:  # an empty (or comments-only) file would silently run on built-in defaults
        raise ParamsError(f"{path}: the params file is empty; start from the shipped params.yaml")
    try:
        params = build(Params, data, where="params")
    except ParamsError as e:
        msg = str(e).removeprefix("params.").removeprefix("params: ")
        raise ParamsError(f"{path}: {msg}") from None
    return _with_source_templates(params)


def _with_source_templates(params: Params) -> Params:
    """`prompts.eval_templates: null` becomes the source's own templates, so a template made
    for one dataset (digits' "a photo of the number {}.") never follows a user to theirs."""
    if params.prompts.eval_templates is not None:
        return params
    templates = default_prompt_templates(params.shard.source)
    return dataclasses.replace(
        params, prompts=dataclasses.replace(params.prompts, eval_templates=templates)
    )
