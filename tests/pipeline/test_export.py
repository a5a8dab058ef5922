"""`ecvl export`: embeddings and the train image store, aligned, resumable, atomic."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import ecvl.data.embeddings
from ecvl.augment import apply_base_view
from ecvl.data.embeddings import open_embeddings
from ecvl.data.image_store import ImageStore
from ecvl.data.reader import iter_samples
from ecvl.data.shards import load_manifest
from ecvl.data.sources import DigitsSource
from ecvl.models.clip import create_model
from ecvl.text import class_text_features
from pipeline.cli import main
from support import edited_model_copy, upstream_paths, write_params

STAGE1 = {"epochs": 1, "batch_size": 32, "eval_batch_size": 128}
EXPORT = {"batch_size": 40}


def _invoke(stage, params):
    return CliRunner().invoke(main, [stage, "--params", str(params)])


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """Shards and a 1-epoch stage-I model, shared by the module's tests."""
    root = tmp_path_factory.mktemp("export")
    params = write_params(root, stage1=STAGE1, export=EXPORT)
    assert _invoke("shard", params).exit_code == 0
    assert _invoke("stage1", params).exit_code == 0
    return root


def _params(tmp_path, upstream, model=None):
    paths = upstream_paths(upstream, "shards", "stage1")
    if model is not None:
        paths["stage1"] = str(model)
    return write_params(tmp_path, paths=paths, stage1=STAGE1, export=EXPORT)


@pytest.fixture(scope="module")
def exported(upstream, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exported")
    result = _invoke("export", _params(tmp, upstream))
    assert result.exit_code == 0, result.output
    return tmp


def test_features_equal_direct_encoding(exported, upstream):
    emb = open_embeddings(exported / "data/embeddings.zarr")
    bundle = create_model("ecvl-tiny-vit", pretrained=upstream / "models/stage1")
    model = bundle.model.eval()
    manifest = load_manifest(upstream / "data/shards")
    for split in ("train", "val", "test"):
        data = emb.split(split)
        samples = list(iter_samples(manifest.shard_paths(split)))
        assert list(data.keys) == [s["key"] for s in samples]
        assert data.labels.tolist() == [s["label"] for s in samples]
        x = torch.stack([bundle.eval_transform(s["image"]) for s in samples[:64]])
        with torch.no_grad():
            direct = model.encode_image(x).numpy()
        assert data.features.dtype == np.float16
        np.testing.assert_allclose(
            data.features[:64].astype(np.float32), direct, rtol=2e-3, atol=2e-3
        )
    with torch.no_grad():
        templates = DigitsSource.prompt_templates  # `prompts.eval_templates: null`: the source's
        text = class_text_features(model, bundle.tokenizer, manifest.classes, templates)
    np.testing.assert_allclose(emb.text_features(), text.numpy(), atol=1e-6)
    assert emb.attrs["templates"] == list(templates)
    assert emb.model_name == "ecvl-tiny-vit" and len(emb.checkpoint_digest) == 64


def test_image_store_is_index_aligned(exported, upstream):
    emb = open_embeddings(exported / "data/embeddings.zarr").split("train")
    store = ImageStore(exported / "data/train_images.h5")
    bundle = create_model("ecvl-tiny-vit", pretrained=upstream / "models/stage1")
    assert len(store) == len(emb.keys)
    for i in np.random.default_rng(0).choice(len(store), size=8, replace=False):
        assert store.keys[i] == emb.keys[i] and store.labels[i] == emb.labels[i]
        with torch.no_grad():
            again = (
                bundle.model.eval()
                .encode_image(bundle.eval_transform(store.get_image(int(i)))[None])[0]
                .numpy()
            )
        np.testing.assert_allclose(emb.features[i].astype(np.float32), again, rtol=2e-3, atol=2e-3)


def test_kill_and_rerun_equals_straight_run(exported, upstream, tmp_path, monkeypatch, caplog):
    params = _params(tmp_path, upstream)
    real = ecvl.data.embeddings.EmbeddingWriter.write
    calls, killing = [], [True]

    def killed_in_val(self, split, *args, **kwargs):  # rank 0 writes a shard per call
        calls.append(split)
        if killing[0] and split == "val":
            raise KeyboardInterrupt
        return real(self, split, *args, **kwargs)

    monkeypatch.setattr(ecvl.data.embeddings.EmbeddingWriter, "write", killed_in_val)
    assert _invoke("export", params).exit_code == 130
    assert not (tmp_path / "data/embeddings.zarr").exists()
    assert not (tmp_path / "data/train_images.h5").exists()
    calls.clear()
    killing[0] = False
    caplog.set_level("INFO")
    result = _invoke("export", params)
    assert result.exit_code == 0 and "export train: complete in an earlier run" in caplog.text
    assert "train" not in calls and calls[0] == "val"  # continued at the first incomplete split

    a = open_embeddings(exported / "data/embeddings.zarr")
    b = open_embeddings(tmp_path / "data/embeddings.zarr")
    for split in ("train", "val", "test"):
        sa, sb = a.split(split), b.split(split)
        assert np.array_equal(sa.features, sb.features)
        assert np.array_equal(sa.labels, sb.labels) and list(sa.keys) == list(sb.keys)
    assert np.array_equal(a.text_features(), b.text_features())
    ia = ImageStore(exported / "data/train_images.h5")
    ib = ImageStore(tmp_path / "data/train_images.h5")
    assert ia.content_sha256 == ib.content_sha256 and ia.keys.tolist() == ib.keys.tolist()
    assert not list((tmp_path / "data").glob(".*partial*"))


def test_missing_stage1_model(tmp_path, upstream):
    result = _invoke("export", _params(tmp_path, upstream, model=tmp_path / "nope"))
    assert result.exit_code == 1 and "stage-I model not found" in result.output


def test_model_for_other_classes(tmp_path, upstream):
    model = edited_model_copy(
        upstream, tmp_path, lambda info: info["classes"].__setitem__(0, "cat")
    )
    result = _invoke("export", _params(tmp_path, upstream, model=model))
    assert result.exit_code == 1 and "trained on other classes" in result.output


def test_model_with_other_embedding_dim(tmp_path, upstream):
    model = edited_model_copy(upstream, tmp_path, lambda info: info.update(embed_dim=128))
    result = _invoke("export", _params(tmp_path, upstream, model=model))
    assert result.exit_code == 1 and "embedding dim 64" in result.output


def _torchrun_env(monkeypatch, rank: int, world: int = 2) -> None:
    for key, value in {
        "RANK": rank,
        "WORLD_SIZE": world,
        "LOCAL_RANK": rank,
        "LOCAL_WORLD_SIZE": world,
    }.items():
        monkeypatch.setenv(key, str(value))


def test_under_torchrun_only_rank_zero_writes_the_same_stores(
    tmp_path, upstream, exported, monkeypatch
):
    """Every rank used to encode everything into the same `.partial` stores."""
    _torchrun_env(monkeypatch, rank=1)
    result = _invoke("export", _params(tmp_path, upstream))
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "data").exists()  # rank 1: nothing written, nothing half-written

    _torchrun_env(monkeypatch, rank=0)
    result = _invoke("export", _params(tmp_path, upstream))
    assert result.exit_code == 0, result.output
    mine, single = (
        open_embeddings(tmp_path / "data/embeddings.zarr"),
        open_embeddings(exported / "data/embeddings.zarr"),
    )
    for split in single.splits:
        np.testing.assert_array_equal(mine.split(split).features, single.split(split).features)
        assert list(mine.split(split).keys) == list(single.split(split).keys)
    assert list(ImageStore(tmp_path / "data/train_images.h5").keys) == list(
        ImageStore(exported / "data/train_images.h5").keys
    )


def test_the_export_records_its_resolved_precision(exported):
    assert open_embeddings(exported / "data/embeddings.zarr").precision == "fp32"


def test_the_bank_holds_base_views_rebuilt_exactly_from_the_image_store(exported):
    emb = open_embeddings(exported / "data/embeddings.zarr")
    bank, n = emb.bank(), len(emb.split("train"))
    assert emb.bank_views == 8 and (bank.num_samples, bank.num_views) == (n, 8)
    assert bank.checkpoint_digest == emb.checkpoint_digest
    store = ImageStore(exported / "data/train_images.h5")
    encoder = create_model("ecvl-tiny-vit", pretrained=emb.attrs["model_dir"])  # stage I's
    rows, entries = np.array([0, 5, n - 1]), np.array([7, 0, 3])
    views = []
    for i, e in zip(rows, entries, strict=True):
        box, flip = bank.base_view(int(i), int(e))
        views.append(encoder.eval_transform(apply_base_view(store.get_image(int(i)), box, flip)))
    with torch.no_grad():
        direct = encoder.model.eval().encode_image(torch.stack(views)).numpy()
    np.testing.assert_allclose(
        bank.rows(rows, entries).astype(np.float32), direct, rtol=2e-3, atol=2e-3
    )


def test_kill_in_the_bank_and_rerun_equals_straight_run(
    exported, upstream, tmp_path, monkeypatch, caplog
):
    params = _params(tmp_path, upstream)
    monkeypatch.setattr(ecvl.data.embeddings, "_BANK_SHARD_BYTES", 2 * 8 * 64 * 30)  # 30 rows
    real = ecvl.data.embeddings.EmbeddingWriter.write_bank
    blocks = []

    def killed_on_third_block(self, start, *args, **kwargs):
        blocks.append(start)
        if len(blocks) == 3:
            raise KeyboardInterrupt
        return real(self, start, *args, **kwargs)

    monkeypatch.setattr(ecvl.data.embeddings.EmbeddingWriter, "write_bank", killed_on_third_block)
    assert _invoke("export", params).exit_code == 130
    monkeypatch.setattr(ecvl.data.embeddings.EmbeddingWriter, "write_bank", real)
    caplog.set_level("INFO")
    assert _invoke("export", params).exit_code == 0
    assert "export bank: resuming at row 60" in caplog.text
    a = open_embeddings(exported / "data/embeddings.zarr").bank()
    b = open_embeddings(tmp_path / "data/embeddings.zarr").bank()
    assert np.array_equal(a.features[...], b.features[...])
    assert np.array_equal(a.boxes, b.boxes) and np.array_equal(a.flips, b.flips)
