"""open_clip models: creation with clear errors, shipped tiny configs, and a plain-open_clip export.

Everything that builds a model goes through `create_model`, so that a bad model name, tag or
checkpoint fails with one `ModelError` line instead of an open_clip traceback, and
`save_open_clip_dir` writes a fine-tuned model in open_clip's own `local-dir:` format so that
it can be used without ECVL.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import open_clip
import safetensors.torch
import torch
from open_clip.factory import load_state_dict
from open_clip.transformer import QuickGELU
from torch import nn

from ecvl.errors import ModelError

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"

# File names open_clip's `local-dir:` schema reads (open_clip 3.x `factory.create_model`).
LOCAL_DIR_CONFIG = "open_clip_config.json"
LOCAL_DIR_WEIGHTS = "open_clip_model.safetensors"
# open_clip's preference order when a local dir holds several weight files.
_LOCAL_DIR_WEIGHT_NAMES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.pth",
    "model.pth",
)
_MAX_LISTED = 3


@dataclasses.dataclass
class ClipBundle:
    """An open_clip model with everything needed to feed it.

    Attributes:
        model: the open_clip model (`CLIP` or `CustomTextCLIP`), in train mode as open_clip
            returns it.
        train_transform: PIL image -> tensor, with open_clip's training augmentation.
        eval_transform: PIL image -> tensor, deterministic (resize, centre crop, normalise).
        tokenizer: list of strings -> `LongTensor` of shape (n, context_length).
        name: open_clip model (config) name.
        pretrained: the weights source as given (`None` for random init).
        embed_dim: dimension of the joint embedding space.
        image_size: input side length (an int for square inputs, else (height, width)).
        context_length: number of text tokens the text tower reads.
    """

    model: nn.Module
    train_transform: Callable[[Any], torch.Tensor]
    eval_transform: Callable[[Any], torch.Tensor]
    tokenizer: Callable[..., torch.Tensor]
    name: str
    pretrained: str | None
    embed_dim: int
    image_size: int | tuple[int, int]
    context_length: int


def register_model_configs() -> list[str]:
    """Make the configs shipped in `ecvl/models/configs` known to open_clip.

    Safe to call any number of times: the directory is added to open_clip's search path once.

    Returns:
        The names of the shipped configs.
    """
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
    if not set(names) <= set(open_clip.list_models()):
        open_clip.add_model_config(CONFIG_DIR)
        logger.debug("registered ecvl model configs %s", names)
    return names


def create_model(
    name: str,
    pretrained: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
) -> ClipBundle:
    """Create an open_clip model with its transforms and tokenizer.

    Args:
        name: an open_clip model name, including the shipped `ecvl-*` configs.
        pretrained: `None` for random init; an open_clip pretrained tag for `name` (e.g.
            `openai` for `RN50`, downloaded by open_clip); a checkpoint file (a state dict or an
            open_clip training checkpoint with a `state_dict` key, `.pt`/`.bin`/`.safetensors`,
            loaded with `weights_only=True`); or a directory written by `save_open_clip_dir`.
        device: where to put the model, in fp32 (mixed precision is autocast, per stage).

    Returns:
        A `ClipBundle`.

    Raises:
        ModelError: unknown model name, a `pretrained` value that is neither a
            known tag nor an existing path, a checkpoint that cannot be read or does not fit
            the model, or weights for a tag that could not be fetched.
    """
    register_model_configs()
    _check_model_name(name)
    model_cfg = open_clip.get_model_config(name)
    source = None if pretrained is None else os.fspath(pretrained)

    kwargs: dict[str, Any] = {"device": device}
    weights: str | None = None  # what open_clip loads: a tag or a file
    if source is None:
        kind = "random"
    elif open_clip.is_pretrained_cfg(name, source):
        kind, weights = "tag", source
        tag_cfg = open_clip.get_pretrained_cfg(name, source)
        if tag_cfg.get("quick_gelu", False) and not model_cfg.get("quick_gelu", False):
            # open_clip only warns here, and the model would then not compute what the weights
            # were trained for (e.g. RN50 + openai): build it with QuickGELU instead.
            logger.info("%s/%s was trained with QuickGELU: building the model so", name, source)
            kwargs["force_quick_gelu"] = True
    elif Path(source).is_dir():
        kind = "dir"
        weights_path, dir_cfg, preprocess_cfg = _read_local_dir(Path(source), name, model_cfg)
        weights = str(weights_path)
        kwargs["quick_gelu"] = bool(dir_cfg.get("quick_gelu", False))
        kwargs.update(_preprocess_kwargs(preprocess_cfg))
    elif Path(source).is_file():
        kind, weights = "file", source
    else:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ModelError(
            f"pretrained {source!r} for model {name!r} is neither a known open_clip tag nor an "
            f"existing file or directory; known tags for {name}: {tags or 'none'}"
        )

    try:
        model, train_transform, eval_transform = open_clip.create_model_and_transforms(
            name, pretrained=weights, weights_only=True, **kwargs
        )
    except Exception as exc:  # downloads, torch.load, safetensors, load_state_dict: many types
        if kind == "random":
            raise
        if kind == "tag":
            raise ModelError(f"could not load open_clip weights {name}/{source}: {exc}") from exc
        reason = _explain_load_failure(name, weights, exc)
        raise ModelError(f"cannot load checkpoint {weights!r} into {name!r}: {reason}") from exc
    logger.info("created %s (pretrained=%s) on %s", name, source, device)

    tokenizer = open_clip.get_tokenizer(name)
    image_size = model.visual.image_size
    if isinstance(image_size, tuple | list):
        image_size = image_size[0] if image_size[0] == image_size[1] else tuple(image_size)
    return ClipBundle(
        model=model,
        train_transform=train_transform,
        eval_transform=eval_transform,
        tokenizer=tokenizer,
        name=name,
        pretrained=source,
        embed_dim=int(model_cfg["embed_dim"]),
        image_size=image_size,
        context_length=int(model.context_length),
    )


def save_open_clip_dir(
    bundle_or_model: ClipBundle | nn.Module,
    model_name: str | None,
    out_dir: str | os.PathLike[str],
) -> Path:
    """Write a model in open_clip's `local-dir:` format.

    Plain open_clip loads the result without ECVL code:
    `open_clip.create_model_and_transforms("local-dir:" + out_dir)`; ECVL loads it with
    `create_model(model_name, pretrained=out_dir)`. The directory holds
    `open_clip_config.json` (`model_cfg` + `preprocess_cfg`) and the weights as
    `open_clip_model.safetensors`.

    The directory is written under a temporary name next to `out_dir` and renamed into place,
    so an interrupted call never leaves a partial `out_dir`; an existing `out_dir` is replaced.

    Args:
        bundle_or_model: a `ClipBundle` or an open_clip model.
        model_name: the open_clip config name the model was built from; may be `None` for a
            bundle (then `bundle.name`).
        out_dir: the directory to write.

    Returns:
        `out_dir` as a `Path`.

    Raises:
        ModelError: no or an unknown model name, or a name that differs from the bundle's.
    """
    if isinstance(bundle_or_model, ClipBundle):
        model = bundle_or_model.model
        if model_name is not None and model_name != bundle_or_model.name:
            raise ModelError(
                f"model_name {model_name!r} differs from the bundle's {bundle_or_model.name!r}"
            )
        model_name = bundle_or_model.name
        tokenizer = bundle_or_model.tokenizer
    else:
        model, tokenizer = bundle_or_model, None
        if model_name is None:
            raise ModelError("save_open_clip_dir needs model_name when given a bare model")
    register_model_configs()
    _check_model_name(model_name)

    model_cfg = open_clip.get_model_config(model_name)
    # QuickGELU leaves no trace in the weights: read it off the modules so a model built with
    # `force_quick_gelu` (e.g. RN50 + openai) is rebuilt the same way.
    if any(isinstance(m, QuickGELU) for m in model.modules()):
        model_cfg["quick_gelu"] = True
    preprocess_cfg = {
        key: list(value) if isinstance(value, tuple) else value
        for key, value in open_clip.get_model_preprocess_cfg(model).items()
    }
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the output is an ordinary directory
        (tmp / LOCAL_DIR_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        safetensors.torch.save_file(_plain_state_dict(model), str(tmp / LOCAL_DIR_WEIGHTS))
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            # HF tokenizers are read from the local dir itself by `get_tokenizer("local-dir:")`.
            tokenizer.save_pretrained(str(tmp))
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved %s in open_clip local-dir format to %s", model_name, out)
    return out


def _check_model_name(name: str) -> None:
    known = open_clip.list_models()
    if name in known:
        return
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    hint = f"close names: {close}" if close else f"e.g. {known[:5]} ({len(known)} known)"
    raise ModelError(f"unknown open_clip model {name!r}; {hint}")


def _read_local_dir(
    path: Path, name: str, model_cfg: dict[str, Any]
) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """Config and weights file of an open_clip local dir, checked against `name`'s config."""
    config_path = path / LOCAL_DIR_CONFIG
    if not config_path.is_file():
        raise ModelError(
            f"pretrained directory {str(path)!r} has no {LOCAL_DIR_CONFIG}; it is not an "
            "open_clip local dir (write one with save_open_clip_dir)"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read {str(config_path)!r}: {exc}") from exc
    if not isinstance(config, dict) or not isinstance(config.get("model_cfg"), dict):
        raise ModelError(f"{str(config_path)!r} has no 'model_cfg' object")
    dir_cfg = config["model_cfg"]
    differs = _config_differences(
        {k: v for k, v in dir_cfg.items() if k != "quick_gelu"},
        {k: v for k, v in model_cfg.items() if k != "quick_gelu"},
    )
    if differs:
        raise ModelError(
            f"pretrained directory {str(path)!r} holds a model whose config differs from "
            f"{name!r} in {_shorten(differs)}"
        )
    candidates = [path / n for n in _LOCAL_DIR_WEIGHT_NAMES if (path / n).is_file()]
    if not candidates:
        raise ModelError(
            f"pretrained directory {str(path)!r} has no weights file "
            f"(expected one of {list(_LOCAL_DIR_WEIGHT_NAMES[:3])})"
        )
    preprocess_cfg = config.get("preprocess_cfg") or {}
    return candidates[0], dir_cfg, preprocess_cfg


def _config_differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys where two JSON-like configs differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b)):
            sub = f"{prefix}{key}"
            if key not in a or key not in b:
                out.append(sub)
            else:
                out.extend(_config_differences(a[key], b[key], sub + "."))
        return out
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return [] if list(a) == list(b) else [prefix.rstrip(".")]
    return [] if a == b else [prefix.rstrip(".")]


def _preprocess_kwargs(preprocess_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """`create_model_and_transforms` overrides from a local dir's `preprocess_cfg`."""
    out: dict[str, Any] = {}
    for key, arg in (
        ("mean", "image_mean"),
        ("std", "image_std"),
        ("interpolation", "image_interpolation"),
        ("resize_mode", "image_resize_mode"),
    ):
        if preprocess_cfg.get(key) is not None:
            value = preprocess_cfg[key]
            out[arg] = tuple(value) if isinstance(value, list) else value
    return out


def _explain_load_failure(name: str, path: str, exc: Exception) -> str:
    """Why a checkpoint did not load: unreadable, not a state dict, or which keys/shapes differ."""
    try:
        state_dict = load_state_dict(path, device="cpu", weights_only=True)
    except Exception as load_exc:
        return f"not a loadable checkpoint ({_first_line(load_exc)})"
    if not isinstance(state_dict, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state_dict.values()
    ):
        return "the file does not hold a state dict of tensors"
    try:
        # Shapes only: a model on the meta device costs no memory and no init time.
        with torch.device("meta"):
            reference = open_clip.create_model(name, device="meta", pretrained_text=False)
    except Exception:  # cannot build the reference: fall back to open_clip's own message
        return _first_line(exc)
    own = reference.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys ({_shorten(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({_shorten(unexpected)})")
    if mismatched:
        parts.append(f"{len(mismatched)} shape mismatches ({_shorten(mismatched)})")
    return "; ".join(parts) if parts else _first_line(exc)


def _plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors that safetensors accepts (it refuses shared storage)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in model.state_dict().items():
        tensor = value.detach().to("cpu").contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out


def _shorten(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... (+{len(items) - _MAX_LISTED})" if len(items) > _MAX_LISTED else "")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
