"""open_clip wrapper: shipped configs, weight sources, errors and the plain-open_clip export."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU
from PIL import Image

from ecvl.errors import ModelError
from ecvl.models.clip import (
    CONFIG_DIR,
    LOCAL_DIR_CONFIG,
    LOCAL_DIR_WEIGHTS,
    ClipBundle,
    create_model,
    register_model_configs,
    save_open_clip_dir,
)

TINY = "ecvl-tiny-vit"
SMALL = "ecvl-small-vit"
TINY_RN = "ecvl-tiny-rn"


@pytest.fixture(scope="module")
def tiny() -> ClipBundle:
    torch.manual_seed(0)
    bundle = create_model(TINY)
    bundle.model.eval()
    return bundle


@pytest.fixture(scope="module")
def inputs(tiny: ClipBundle) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 32, 32, generator=generator)
    tokens = tiny.tokenizer(["a photo of a cat.", "a photo of a dog.", "a photo of a tree."])
    return images, tokens


def _features(model: torch.nn.Module, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    images, tokens = inputs
    model.eval()
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


def _assert_same_model(a: torch.nn.Module, b: torch.nn.Module, inputs) -> None:
    image_a, text_a = _features(a, inputs)
    image_b, text_b = _features(b, inputs)
    assert torch.equal(image_a, image_b)
    assert torch.equal(text_a, text_b)


def test_register_model_configs_is_idempotent():
    names = register_model_configs()
    register_model_configs()
    assert names == [SMALL, TINY_RN, TINY]
    assert set(names) <= set(open_clip.list_models())
    assert open_clip.factory._MODEL_CONFIG_PATHS.count(CONFIG_DIR) == 1


def test_tiny_model_shapes(tiny, inputs):
    assert (tiny.name, tiny.pretrained) == (TINY, None)
    assert (tiny.embed_dim, tiny.image_size, tiny.context_length) == (64, 32, 32)
    images, tokens = inputs
    assert tokens.shape == (3, 32)
    image_features, text_features = _features(tiny.model, inputs)
    assert image_features.shape == (3, 64)
    assert text_features.shape == (3, 64)
    with torch.no_grad():
        image_out, text_out, scale = tiny.model(images, tokens)
    assert torch.allclose(image_out.norm(dim=1), torch.ones(3), atol=1e-5)
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-4)


def test_small_model_shapes():
    bundle = create_model(SMALL)
    assert (bundle.embed_dim, bundle.image_size, bundle.context_length) == (128, 32, 32)
    with torch.no_grad():
        out = bundle.model.encode_image(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 128)


def test_transforms_turn_pil_images_into_32px_tensors(tiny):
    image = Image.new("RGB", (50, 40), (200, 30, 90))
    for transform in (tiny.train_transform, tiny.eval_transform):
        out = transform(image)
        assert out.shape == (3, 32, 32)
        assert out.dtype == torch.float32
    gray = Image.new("L", (8, 8), 128)  # digits-like grayscale input is converted to RGB
    assert tiny.eval_transform(gray).shape == (3, 32, 32)


def test_unknown_model_name_lists_close_names():
    with pytest.raises(ModelError, match="ecvl-tiny-vt") as info:
        create_model("ecvl-tiny-vt")
    assert "'ecvl-tiny-vit'" in str(info.value)
    with pytest.raises(ModelError, match="'RN50'"):
        create_model("RN5O")


def test_rn50_and_its_openai_tag_are_known_without_download():
    assert "RN50" in open_clip.list_models()
    assert "openai" in open_clip.list_pretrained_tags_by_model("RN50")
    assert open_clip.is_pretrained_cfg("RN50", "openai")


def test_missing_pretrained_lists_known_tags(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(ModelError, match="nope.pt") as info:
        create_model(TINY, pretrained=missing)
    assert "known tags" in str(info.value)
    # An unknown tag for RN50 fails before any model is built or downloaded.
    with pytest.raises(ModelError, match="'laion'") as info:
        create_model("RN50", pretrained="laion")
    assert "'openai'" in str(info.value)


def test_text_file_is_not_a_checkpoint(tmp_path):
    bad = tmp_path / "notes.pt"
    bad.write_text("these are not weights\n")
    with pytest.raises(ModelError, match="not a loadable checkpoint") as info:
        create_model(TINY, pretrained=bad)
    assert str(bad) in str(info.value)
    assert "\n" not in str(info.value)


def test_checkpoint_of_another_config_is_refused(tmp_path):
    path = tmp_path / "small.pt"
    torch.save(create_model(SMALL).model.state_dict(), path)
    with pytest.raises(ModelError, match="shape mismatches") as info:
        create_model(TINY, pretrained=path)
    assert str(path) in str(info.value)
    assert "visual.class_embedding: checkpoint (192,) vs model (128,)" in str(info.value)


def test_checkpoint_with_missing_keys_is_refused(tiny, tmp_path):
    state = dict(tiny.model.state_dict())
    del state["visual.proj"]
    path = tmp_path / "partial.pt"
    torch.save(state, path)
    with pytest.raises(ModelError, match=r"1 missing keys \(visual.proj\)"):
        create_model(TINY, pretrained=path)


def test_state_dict_file_loads(tiny, inputs, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(tiny.model.state_dict(), path)
    loaded = create_model(TINY, pretrained=path)
    assert loaded.pretrained == str(path)
    _assert_same_model(tiny.model, loaded.model, inputs)


def test_training_checkpoint_with_ddp_prefix_loads(tiny, inputs, tmp_path):
    # open_clip's training checkpoint layout: {"epoch", "state_dict" (DDP "module." keys), ...}
    state = {f"module.{k}": v for k, v in tiny.model.state_dict().items()}
    path = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "name": "run", "state_dict": state}, path)
    _assert_same_model(tiny.model, create_model(TINY, pretrained=str(path)).model, inputs)


def test_local_dir_round_trip_with_plain_open_clip(tiny, inputs, tmp_path):
    out = save_open_clip_dir(tiny, None, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == [LOCAL_DIR_CONFIG, LOCAL_DIR_WEIGHTS]
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temp dirs left behind
    config = json.loads((out / LOCAL_DIR_CONFIG).read_text())
    assert config["model_cfg"] == open_clip.get_model_config(TINY)
    assert config["preprocess_cfg"]["mean"] == list(open_clip.OPENAI_DATASET_MEAN)

    # Plain open_clip, no ecvl code involved.
    plain = open_clip.create_model("local-dir:" + str(out))
    _assert_same_model(tiny.model, plain, inputs)
    plain_tokenizer = open_clip.get_tokenizer("local-dir:" + str(out))
    assert torch.equal(plain_tokenizer(["a photo of a cat."]), inputs[1][:1])

    # ecvl, with the dir as `pretrained`.
    again = create_model(TINY, pretrained=out)
    _assert_same_model(tiny.model, again.model, inputs)
    image = Image.new("RGB", (32, 32), (10, 200, 30))
    assert torch.equal(again.eval_transform(image), tiny.eval_transform(image))


def test_save_replaces_an_existing_dir(tiny, inputs, tmp_path):
    out = tmp_path / "export"
    save_open_clip_dir(create_model(TINY).model, TINY, out)
    (out / "stale.txt").write_text("old")
    save_open_clip_dir(tiny.model, TINY, out)
    assert not (out / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["export"]
    _assert_same_model(tiny.model, open_clip.create_model("local-dir:" + str(out)), inputs)


def test_quick_gelu_survives_the_export(inputs, tmp_path):
    # QuickGELU is invisible in the weights: the exported config must carry it, or plain
    # open_clip would rebuild the model with GELU and compute something else.
    model = open_clip.create_model(TINY, force_quick_gelu=True)
    assert any(isinstance(m, QuickGELU) for m in model.modules())
    out = save_open_clip_dir(model, TINY, tmp_path / "qg")
    assert json.loads((out / LOCAL_DIR_CONFIG).read_text())["model_cfg"]["quick_gelu"] is True
    _assert_same_model(model, open_clip.create_model("local-dir:" + str(out)), inputs)
    _assert_same_model(model, create_model(TINY, pretrained=out).model, inputs)


def test_tag_with_quick_gelu_is_built_with_it(tiny, inputs, tmp_path, monkeypatch):
    # The tag path without a network: a fake tag whose "download" is a local file. Like
    # RN50 + openai, the tag says quick_gelu while the config does not.
    path = tmp_path / "fake.pt"
    torch.save(tiny.model.state_dict(), path)
    monkeypatch.setitem(
        open_clip.pretrained._PRETRAINED, TINY, {"fake": {"url": "", "quick_gelu": True}}
    )
    monkeypatch.setattr(open_clip.factory, "download_pretrained", lambda cfg, cache_dir=None: path)
    bundle = create_model(TINY, pretrained="fake")
    assert any(isinstance(m, QuickGELU) for m in bundle.model.modules())
    assert torch.equal(bundle.model.visual.proj, tiny.model.visual.proj)

    def offline(cfg, cache_dir=None):
        raise RuntimeError("no network")

    monkeypatch.setattr(open_clip.factory, "download_pretrained", offline)
    with pytest.raises(ModelError, match="could not load open_clip weights ecvl-tiny-vit/fake"):
        create_model(TINY, pretrained="fake")


def test_dir_of_another_config_or_without_config_is_refused(tiny, tmp_path):
    out = save_open_clip_dir(tiny, TINY, tmp_path / "tiny")
    with pytest.raises(ModelError, match="differs from 'ecvl-small-vit' in embed_dim"):
        create_model(SMALL, pretrained=out)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="no open_clip_config.json"):
        create_model(TINY, pretrained=empty)
    (out / LOCAL_DIR_WEIGHTS).unlink()
    with pytest.raises(ModelError, match="no weights file"):
        create_model(TINY, pretrained=out)


def test_save_checks_the_model_name(tiny, tmp_path):
    with pytest.raises(ModelError, match="needs model_name"):
        save_open_clip_dir(tiny.model, None, tmp_path / "a")
    with pytest.raises(ModelError, match="differs from the bundle"):
        save_open_clip_dir(tiny, SMALL, tmp_path / "b")
    with pytest.raises(ModelError, match="close names"):
        save_open_clip_dir(tiny.model, "ecvl-tiny", tmp_path / "c")
    assert list(tmp_path.iterdir()) == []
