"""Reading upstream artifacts with errors that say which stage to re-run."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ecvl.errors import ModelError
from ecvl.models.clip import ClipBundle, create_model


def load_stage1(model_dir: Path, device: torch.device) -> tuple[ClipBundle, dict]:
    """The stage-I model and its `ecvl.json`, with clear errors when either is missing."""
    info_path = model_dir / "ecvl.json"
    if not info_path.is_file():
        raise ModelError(f"stage-I model not found: {info_path} (run `ecvl stage1` first)")
    info = json.loads(info_path.read_text())
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
