"""The trained classifier as one directory and one `nn.Module`: what a user runs on new images.

`ecvl package` writes the directory; `load_classifier` reads it back with plain open_clip and
safetensors (nothing is unpickled)::

    classifier.json            format, shipped stage-II mode, classes, feature dtype, provenance
    backbone/                  the stage-I open_clip model, `local-dir` format (as models/stage1)
    adapter.json               the stage-II head's config, as `ecvl stage2` wrote it
    adapter.safetensors        its weights
    text_features.safetensors  `text_features`: K×d class text embeddings (eval templates)
    preprocess.json            open_clip's preprocess config (size, mean, std, interpolation, ...)
    card.md                    the model card: data, Many/Medium/Few, evaluation

The module computes what `ecvl evaluate` reports for that head: the backbone's image embedding,
rounded to the dtype the export cached it in (float16) because the head was trained and
evaluated on that cache, then the head and eq. 6 (`ecvl.models.heads.class_logits`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import safetensors.torch
import torch
import torch.nn.functional as F
from open_clip.transform import PreprocessCfg, image_transform_v2
from torch import nn

from ecvl.data.textfiles import read_json
from ecvl.errors import EcvlError, ModelError
from ecvl.models.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter
from ecvl.models.clip import LOCAL_DIR_CONFIG
from ecvl.models.heads import class_logits

log = logging.getLogger(__name__)

__all__ = [
    "CARD",
    "CONFIG",
    "FORMAT",
    "Classifier",
    "load_classifier",
    "write_classifier",
]

FORMAT = "ecvl-classifier/1"
CONFIG = "classifier.json"
BACKBONE = "backbone"
TEXT_FEATURES = "text_features.safetensors"
PREPROCESS = "preprocess.json"
CARD = "card.md"
_FEATURE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class Classifier(nn.Module):
    """Images → class logits: backbone → feature rounding → stage-II head → eq. 6.

    Args:
        model: the stage-I open_clip model (its `encode_image` is the backbone).
        head: the stage-II head (`ecvl.models.adapter.load_adapter`).
        text_features: (K, d) class text embeddings (normalised here, as evaluation does).
        logit_scale: `1/tau`, the exponentiated CLIP `logit_scale` of the model.
        classes: the K class names, in logit order.
        preprocess: PIL image → normalised tensor, open_clip's eval transform.
        feature_dtype: the dtype the head's training cache held the embeddings in.

    Attributes:
        classes: tuple of the K class names.
        preprocess: the transform to apply to a PIL image before batching.
    """

    def __init__(
        self,
        model: nn.Module,
        head: nn.Module,
        text_features: torch.Tensor,
        logit_scale: float,
        classes: Sequence[str],
        preprocess: Callable[[Any], torch.Tensor],
        feature_dtype: torch.dtype = torch.float16,
    ) -> None:
        super().__init__()
        self.model = model
        self.head = head
        self.register_buffer("text_features", F.normalize(text_features.float(), dim=-1))
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))
        self.classes = tuple(classes)
        self.preprocess = preprocess
        self.feature_dtype = feature_dtype

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) preprocessed images → (B, d) un-normalised embeddings (the export's)."""
        return self.model.encode_image(images, normalize=False)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """(B, d) embeddings → (B, K) float32 logits. The head runs in float32 even under
        autocast, as in evaluation: only the backbone is worth lower precision."""
        with torch.autocast(features.device.type, enabled=False):
            f = features.to(self.feature_dtype).float()
            return class_logits(self.head, f, self.text_features, self.logit_scale).float()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classify(self.encode(images))


def write_classifier(
    directory: str | os.PathLike[str],
    *,
    backbone_dir: str | os.PathLike[str],
    head_dir: str | os.PathLike[str],
    text_features: np.ndarray | torch.Tensor,
    classes: Sequence[str],
    feature_dtype: str,
    info: Mapping[str, Any],
    card: str,
) -> None:
    """Fill `directory` (existing, empty: the caller makes the write atomic) with a classifier.

    Args:
        directory: where to write.
        backbone_dir: the stage-I model in open_clip `local-dir` format; copied as it is.
        head_dir: the stage-II head (`adapter.json` + `adapter.safetensors`); copied as it is.
        text_features: (K, d) class text embeddings.
        classes: the K class names.
        feature_dtype: dtype name of the embedding cache the head was trained on.
        info: JSON-able provenance recorded in `classifier.json` (mode, model, templates, ...).
        card: the model card's markdown.

    Raises:
        ModelError: a source file is missing, or the parts disagree in size.
    """
    out, backbone_dir, head_dir = Path(directory), Path(backbone_dir), Path(head_dir)
    config_path = backbone_dir / LOCAL_DIR_CONFIG
    if not config_path.is_file():
        raise ModelError(f"{backbone_dir} is not an open_clip local dir (no {LOCAL_DIR_CONFIG})")
    preprocess = json.loads(config_path.read_text(encoding="utf-8")).get("preprocess_cfg")
    if not preprocess:
        raise ModelError(f"{config_path} has no preprocess_cfg")
    if feature_dtype not in _FEATURE_DTYPES:
        raise ModelError(f"feature dtype {feature_dtype!r} is not one of {list(_FEATURE_DTYPES)}")
    text = torch.as_tensor(np.asarray(text_features), dtype=torch.float32)
    if text.dim() != 2 or text.shape[0] != len(classes):
        raise ModelError(f"text features of shape {tuple(text.shape)} for {len(classes)} classes")
    head = load_adapter(head_dir)  # fails now, not at the user's first prediction
    if getattr(head, "dim", text.shape[1]) != text.shape[1]:
        raise ModelError(f"{head_dir}: head of width {head.dim}, text features {text.shape[1]}")

    shutil.copytree(backbone_dir, out / BACKBONE)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        shutil.copy2(head_dir / name, out / name)
    safetensors.torch.save_file({"text_features": text.contiguous()}, str(out / TEXT_FEATURES))
    (out / PREPROCESS).write_text(json.dumps(preprocess, indent=2) + "\n", encoding="utf-8")
    config = {
        "format": FORMAT,
        "classes": list(classes),
        "feature_dtype": feature_dtype,
        "backbone": BACKBONE,
        **info,
    }
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out / CARD).write_text(card, encoding="utf-8")


def _read_config(path: Path) -> dict[str, Any]:
    config_path = path / CONFIG
    if not config_path.is_file():
        raise ModelError(
            f"{path} is not a packaged classifier (no {CONFIG}; `ecvl package` writes one)"
        )
    try:
        config = read_json(config_path)
    except (OSError, EcvlError) as e:
        raise ModelError(f"{config_path}: not readable JSON ({e})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else None
        raise ModelError(f"{config_path}: format {found!r}, expected {FORMAT!r}")
    return config


def _check_parts(
    path: Path,
    backbone: Path,
    backbone_cfg: Any,
    preprocess_cfg: Any,
    head: nn.Module,
    text: torch.Tensor,
    num_classes: int,
) -> None:
    """The parts of a classifier directory against each other, before the backbone is built: a
    backbone copied in from another model, or a `preprocess.json` edited by hand, would
    otherwise fail in the first forward pass with a tensor-size error, or not fail at all.

    Raises:
        ModelError: naming both files and the field that disagree.
    """
    redo = "(the parts come from different models; re-run `ecvl package`)"
    backbone_file = backbone / LOCAL_DIR_CONFIG
    model_cfg = backbone_cfg.get("model_cfg") if isinstance(backbone_cfg, dict) else None
    if not isinstance(model_cfg, dict) or not isinstance(preprocess_cfg, dict):
        raise ModelError(
            f"{path}: incomplete or broken classifier ({backbone_file} or {PREPROCESS})"
        )
    width = getattr(head, "dim", None)
    adapter_file = path / ADAPTER_CONFIG
    if width is not None and width != text.shape[1]:
        raise ModelError(
            f"{adapter_file}: dim {width}, but {path / TEXT_FEATURES}: width {text.shape[1]} {redo}"
        )
    embed_dim = model_cfg.get("embed_dim")
    if width is not None and embed_dim is not None and width != embed_dim:
        raise ModelError(
            f"{adapter_file}: dim {width}, but {backbone_file}: model_cfg.embed_dim {embed_dim} "
            f"{redo}"
        )
    head_classes = getattr(head, "num_classes", None)
    if head_classes is not None and head_classes != num_classes:
        raise ModelError(
            f"{adapter_file}: num_classes {head_classes}, but {path / CONFIG}: {num_classes} "
            f"classes {redo}"
        )
    packaged = backbone_cfg.get("preprocess_cfg") or {}
    for key in sorted(set(preprocess_cfg) | set(packaged)):
        if _plain(preprocess_cfg.get(key)) != _plain(packaged.get(key)):
            raise ModelError(
                f"{path / PREPROCESS}: {key} {preprocess_cfg.get(key)!r}, but {backbone_file}: "
                f"preprocess_cfg.{key} {packaged.get(key)!r} (edited by hand? re-run `ecvl "
                "package`)"
            )
    image_size = (model_cfg.get("vision_cfg") or {}).get("image_size")
    size = preprocess_cfg.get("size")
    if image_size is not None and size is not None and _side(size) != _side(image_size):
        raise ModelError(
            f"{path / PREPROCESS}: size {size!r}, but {backbone_file}: "
            f"model_cfg.vision_cfg.image_size {image_size!r} {redo}"
        )


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple | list) else value


def _side(size: Any) -> tuple:
    return tuple(size) if isinstance(size, list | tuple) else (size, size)


def load_classifier(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> Classifier:
    """Load a packaged classifier (`ecvl package`) as a module in eval mode on `device`.

    The backbone is read by plain open_clip (`local-dir:`, `weights_only=True`), every tensor
    file is safetensors.

    Args:
        path: the directory `ecvl package` wrote (e.g. `models/classifier`).
        device: where to put the module.

    Returns:
        A `Classifier`: `classifier(images)` gives (B, K) logits for a batch of
        `classifier.preprocess(pil_image)` tensors; `classifier.classes` names the columns.

    Raises:
        ModelError: `path` is not a packaged classifier, or a part of it is missing or broken.
    """
    path = Path(path)
    config = _read_config(path)
    try:
        classes = [str(c) for c in config["classes"]]
        feature_dtype = _FEATURE_DTYPES[config["feature_dtype"]]
        backbone = path / config["backbone"]
        preprocess_cfg = read_json(path / PREPROCESS)
        backbone_cfg = read_json(backbone / LOCAL_DIR_CONFIG)
        text = safetensors.torch.load_file(str(path / TEXT_FEATURES))["text_features"]
    except Exception as e:  # a missing key or file, broken JSON, safetensors' own error type
        raise ModelError(
            f"{path}: incomplete or broken classifier ({type(e).__name__}: {e})"
        ) from None
    if text.dim() != 2 or text.shape[0] != len(classes):
        raise ModelError(
            f"{path / TEXT_FEATURES}: shape {tuple(text.shape)}, but {path / CONFIG} names "
            f"{len(classes)} classes (re-run `ecvl package`)"
        )
    head = load_adapter(path)
    _check_parts(path, backbone, backbone_cfg, preprocess_cfg, head, text, len(classes))
    try:
        model = open_clip.create_model(f"local-dir:{backbone}", device="cpu", weights_only=True)
        cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in preprocess_cfg.items()}
        preprocess = image_transform_v2(PreprocessCfg(**cfg), is_train=False)
    except Exception as e:  # open_clip raises assorted types for a bad dir or config
        raise ModelError(f"{path}: cannot load the backbone ({type(e).__name__}: {e})") from None
    logit_scale = float(model.logit_scale.detach().float().exp())
    classifier = Classifier(model, head, text, logit_scale, classes, preprocess, feature_dtype)
    classifier.requires_grad_(False)
    log.info(
        "loaded classifier %s (%s, head %s, %d classes)",
        path,
        config.get("model"),
        config.get("mode"),
        len(classes),
    )
    return classifier.to(device).eval()
