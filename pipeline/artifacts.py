"""Reading upstream artifacts with errors that say which stage to re-run."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ecvl.data.textfiles import read_json
from ecvl.errors import DataError, ModelError
from ecvl.models.clip import ClipBundle, create_model


def read_stage1_info(model_dir: Path) -> dict:
    """The stage-I model's `ecvl.json`, checked for the fields later stages read.

    Raises:
        ModelError: missing, not ECVL's record, or a field missing or of the wrong type.
    """
    info_path = model_dir / "ecvl.json"
    if not info_path.is_file():
        raise ModelError(f"stage-I model not found: {info_path} (run `ecvl stage1` first)")
    info = read_json(info_path)
    if not isinstance(info, dict):
        raise ModelError(f"{info_path}: not the record `ecvl stage1` writes (re-run `ecvl stage1`)")
    for key, kind in (("model", str), ("embed_dim", int)):
        if not isinstance(info.get(key), kind) or isinstance(info.get(key), bool):
            raise ModelError(
                f"{info_path}: {key}: missing or not a {kind.__name__} (re-run `ecvl stage1`)"
            )
    return info


def load_stage1(model_dir: Path, device: torch.device) -> tuple[ClipBundle, dict]:
    """The stage-I model and its `ecvl.json`, with clear errors when either is missing."""
    info = read_stage1_info(model_dir)
    bundle = create_model(info["model"], pretrained=model_dir, device=device)
    if bundle.embed_dim != info["embed_dim"]:
        raise ModelError(
            f"{model_dir}: embedding dim {bundle.embed_dim} of the model config differs from "
            f"the {info['embed_dim']} recorded at training"
        )
    return bundle, info


def model_digest(model_dir: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(model_dir.glob("*.safetensors")):
        h.update(path.read_bytes())
    return h.hexdigest()


def check_embeddings(emb: Any, manifest: Any, emb_path: Path, shards_path: Path) -> None:
    """The embedding store against the shards it was exported from: the class list, and every
    split's number of rows.

    Raises:
        DataError: naming both artifacts and the field (re-run `ecvl export`).
    """
    if list(emb.classes) != list(manifest.classes):
        raise DataError(
            f"{emb_path} and {shards_path}/meta.json have different classes (re-run `ecvl export`)"
        )
    for split in emb.splits:
        if split in manifest.splits and len(emb.split(split, lazy=True)) != manifest.count(split):
            raise DataError(
                f"{emb_path}: {split} holds {len(emb.split(split, lazy=True))} rows, "
                f"{shards_path}/meta.json: splits.{split}.count is {manifest.count(split)} "
                "(re-run `ecvl export`)"
            )


def check_heads(
    heads: Mapping[str, Any], embed_dim: int, num_classes: int, stage2_dir: Path, emb_path: Path
) -> None:
    """Every stage-II head against the embeddings it is applied to: its width, and for a head
    with its own classes (the linear probe) their number.

    Raises:
        ModelError: naming the head's `adapter.json`, the store and the field.
    """
    for mode, head in heads.items():
        config = stage2_dir / mode / "adapter.json"
        dim = getattr(head, "dim", embed_dim)
        if dim != embed_dim:
            raise ModelError(
                f"{config}: dim {dim}, but {emb_path} holds embeddings of width {embed_dim} "
                "(re-run `ecvl stage2`)"
            )
        classes = getattr(head, "num_classes", num_classes)
        if classes != num_classes:
            raise ModelError(
                f"{config}: num_classes {classes}, but {emb_path} has {num_classes} classes "
                "(re-run `ecvl stage2`)"
            )
