"""The packaged classifier: written by `write_classifier`, read back by `ecvl.load_classifier`."""

from __future__ import annotations

import json
import shutil

import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

import ecvl
from ecvl.classifier import CONFIG, Classifier
from ecvl.errors import ModelError
from ecvl.models.adapter import load_adapter
from support import make_images, tiny_classifier


@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    return tiny_classifier(tmp_path_factory.mktemp("classifier"))


def _batch(classifier, n=6):
    return torch.stack([classifier.preprocess(Image.fromarray(p)) for p in make_images(n, 40)])


def test_logits_are_eq6_on_the_float16_rounded_embedding(packaged):
    classifier = ecvl.load_classifier(packaged)
    assert isinstance(classifier, Classifier) and not classifier.training
    assert classifier.classes == ("class_0", "class_1", "class_2", "class_3")
    x = _batch(classifier)
    plain = open_clip.create_model(f"local-dir:{packaged / 'backbone'}", weights_only=True).eval()
    head = load_adapter(packaged)
    with torch.no_grad():
        f = plain.encode_image(x).half().float()
        text = F.normalize(load_file(packaged / "text_features.safetensors")["text_features"])
        want = plain.logit_scale.exp() * (F.normalize(head(f), dim=-1) @ text.T)
        got = classifier(x)
    assert got.shape == (6, 4) and got.dtype == torch.float32
    assert torch.equal(got, want)


def test_preprocess_comes_from_the_packaged_config(packaged):
    classifier = ecvl.load_classifier(packaged)
    cfg = json.loads((packaged / "preprocess.json").read_text())
    assert cfg["size"] == [32, 32]
    image = Image.fromarray(make_images(1, 50)[0])
    _, _, reference = open_clip.create_model_and_transforms(f"local-dir:{packaged / 'backbone'}")
    assert torch.equal(classifier.preprocess(image), reference(image))


def test_the_head_runs_in_float32_under_autocast(packaged):
    classifier = ecvl.load_classifier(packaged)
    x = _batch(classifier, 3)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        f = classifier.encode(x)
        logits = classifier.classify(f)
    assert logits.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(logits, classifier.classify(f.float()))


def test_not_a_classifier_is_one_clear_error(tmp_path, packaged):
    with pytest.raises(ModelError, match="is not a packaged classifier"):
        ecvl.load_classifier(packaged / "backbone")
    broken = tmp_path / "broken"
    shutil.copytree(packaged, broken)
    config = json.loads((broken / CONFIG).read_text())
    (broken / CONFIG).write_text(json.dumps({**config, "format": "other/9"}))
    with pytest.raises(ModelError, match="format 'other/9'"):
        ecvl.load_classifier(broken)
    (broken / CONFIG).write_text(json.dumps(config))
    (broken / "text_features.safetensors").unlink()
    with pytest.raises(ModelError, match="incomplete or broken classifier"):
        ecvl.load_classifier(broken)


def test_import_ecvl_stays_light():
    import subprocess
    import sys

    code = "import sys, ecvl; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _copy(packaged, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(packaged, copy)
    return copy


def test_a_backbone_of_another_model_is_refused_naming_both_files(tmp_path, packaged):
    from ecvl.models.clip import create_model, save_open_clip_dir

    broken = _copy(packaged, tmp_path)
    shutil.rmtree(broken / "backbone")
    save_open_clip_dir(create_model("ecvl-tiny-rn"), None, broken / "backbone")
    with pytest.raises(
        ModelError,
        match=r"copy/adapter.json: dim 64, but .*copy/backbone/open_clip_config.json: "
        r"model_cfg.embed_dim 128 \(the parts come from different models",
    ):
        ecvl.load_classifier(broken)


def test_an_edited_preprocess_config_is_refused_naming_the_field(tmp_path, packaged):
    broken = _copy(packaged, tmp_path)
    cfg = json.loads((broken / "preprocess.json").read_text())
    (broken / "preprocess.json").write_text(json.dumps({**cfg, "size": [65, 65]}))
    with pytest.raises(
        ModelError,
        match=r"copy/preprocess.json: size \[65, 65\], but .*open_clip_config.json: "
        r"preprocess_cfg.size \[32, 32\]",
    ):
        ecvl.load_classifier(broken)


def test_text_features_of_another_width_are_refused(tmp_path, packaged):
    from safetensors.torch import save_file

    broken = _copy(packaged, tmp_path)
    save_file({"text_features": torch.zeros(4, 32)}, broken / "text_features.safetensors")
    with pytest.raises(ModelError, match=r"adapter.json: dim 64, but .*: width 32"):
        ecvl.load_classifier(broken)


def test_json_files_with_a_bom_load(tmp_path, packaged):
    copy = _copy(packaged, tmp_path)
    for name in ("classifier.json", "preprocess.json", "adapter.json"):
        (copy / name).write_bytes(b"\xef\xbb\xbf" + (copy / name).read_bytes())
    assert ecvl.load_classifier(copy).classes == ecvl.load_classifier(packaged).classes
