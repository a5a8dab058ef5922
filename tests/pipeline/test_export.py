"""`ecvl export`: embeddings and the train image store, aligned, resumable, atomic."""

import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import ecvl.data.embeddings
from ecvl.data.embeddings import open_embeddings
from ecvl.data.image_store import ImageStore
from ecvl.data.reader import iter_samples
from ecvl.data.shards import load_manifest
from ecvl.data.sources import DigitsSource
from ecvl.models.clip import create_model
from ecvl.text import class_text_features
from ecvl.views import ViewRenderer, stack_pixels
from pipeline.cli import main
from support import edited_model_copy, upstream_paths, write_params

ROOT = Path(__file__).resolve().parents[2]
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


# Under torchrun. A launcher patches the bank's block size (so it has several blocks to deal
# out) in every process, the one-process reference included.
# With KILL_AT_BANK_BLOCK=n, rank 0 is interrupted as it writes the n-th bank block.
LAUNCHER = """
import os

import ecvl.data.embeddings as embeddings

embeddings._BANK_SHARD_BYTES = 2 * 4 * 64 * 25  # 25 rows: several bank blocks
kill, calls = int(os.environ.get("KILL_AT_BANK_BLOCK", 0)), []
real = embeddings.EmbeddingWriter.write_bank


def write_bank(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == kill:
        raise KeyboardInterrupt
    return real(self, *args, **kwargs)


embeddings.EmbeddingWriter.write_bank = write_bank
from pipeline.cli import main

main()
"""


@pytest.fixture(scope="module")
def small_shards(upstream, tmp_path_factory):
    """The module's data in shards of at most 25 samples (train 7 shards, val 2, test 4), so
    that ranks own several shards, and unevenly."""
    root = tmp_path_factory.mktemp("small_shards")
    params = write_params(root, shard={"maxcount": 25})
    assert _invoke("shard", params).exit_code == 0
    return root / "data/shards"


def _launch(tmp_path, upstream, shards, ranks: int, num_workers: int, kill_at_bank_block=0):
    """`ecvl export` in fresh processes (`ranks` of them under torchrun), one torch thread each
    (what torchrun gives a rank), on `shards` with the module's stage-I model."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    paths = {"shards": str(shards), **upstream_paths(upstream, "stage1")}
    params = write_params(
        tmp_path,
        base={"seed": 0, "device": "cpu", "num_workers": num_workers, "progress": False},
        paths=paths,
        export={"batch_size": 8, "bank_views": 4},  # 25-sample shards: batches of 8, 8, 8, 1
    )
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "KILL_AT_BANK_BLOCK": str(kill_at_bank_block),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    head = [sys.executable]
    if ranks > 1:
        torchrun = Path(sys.executable).parent / "torchrun"
        head = [str(torchrun), "--standalone", "--nproc_per_node", str(ranks)]
    return subprocess.run(
        [*head, str(launcher), "export", "--params", str(params)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def _assert_same_stores(a: Path, b: Path) -> None:
    """Every file of the two embedding stores (zarr arrays' chunks and metadata, attrs
    included) byte for byte, and every dataset and attribute of the two image stores."""
    za, zb = a / "embeddings.zarr", b / "embeddings.zarr"
    files = sorted(p.relative_to(za) for p in za.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(zb) for p in zb.rglob("*") if p.is_file())
    assert any(f.parts[:2] == ("train", "bank") for f in files)
    for f in files:
        assert (za / f).read_bytes() == (zb / f).read_bytes(), f
    with h5py.File(a / "train_images.h5", "r") as ha, h5py.File(b / "train_images.h5", "r") as hb:
        assert dict(ha.attrs) == dict(hb.attrs)
        assert sorted(ha) == sorted(hb)
        for name in ha:
            assert ha[name].dtype == hb[name].dtype and ha[name].shape == hb[name].shape
            assert dict(ha[name].attrs) == dict(hb[name].attrs)
            if ha[name].dtype.kind == "O":  # the images: variable-length bytes
                assert [bytes(x) for x in ha[name][...]] == [bytes(x) for x in hb[name][...]]
            else:
                assert ha[name][...].tobytes() == hb[name][...].tobytes(), name


@pytest.fixture(scope="module")
def one_process_export(upstream, small_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("one_process")
    one = _launch(root, upstream, small_shards, ranks=1, num_workers=0)
    assert one.returncode == 0, one.stderr[-3000:]
    return root / "data"


@pytest.mark.slow
def test_under_torchrun_every_rank_encodes_and_the_stores_equal_one_process(
    tmp_path, upstream, small_shards, one_process_export
):
    """Rank 0 used to export everything alone; now both ranks encode their shards and bank
    blocks (2 data workers each here, none in the reference) and rank 0 writes them."""
    two = _launch(tmp_path / "two", upstream, small_shards, ranks=2, num_workers=2)
    assert two.returncode == 0, two.stderr[-3000:]
    shards = len(load_manifest(small_shards).shard_paths("train"))
    assert shards % 2 == 1  # rank 0 owns one more
    odd = ", ".join(map(str, range(1, shards, 2)))
    assert f"export train: rank 1 of 2 encodes shards {odd} of {shards}" in two.stderr
    assert "export bank: rank 1 of 2 encodes blocks 1, 3" in two.stderr
    assert two.stderr.count("wrote ") == 1  # only rank 0 writes
    _assert_same_stores(one_process_export, tmp_path / "two/data")


@pytest.mark.slow
def test_under_torchrun_a_killed_export_resumes_to_the_same_stores(
    tmp_path, upstream, small_shards, one_process_export
):
    killed = _launch(tmp_path, upstream, small_shards, ranks=2, num_workers=0, kill_at_bank_block=3)
    assert killed.returncode != 0 and "export: interrupted" in killed.stderr
    assert not (tmp_path / "data/embeddings.zarr").exists()
    again = _launch(tmp_path, upstream, small_shards, ranks=2, num_workers=0)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "export test: complete in an earlier run" in again.stderr
    assert "export bank: resuming at row 50" in again.stderr  # after blocks 0 and 1
    _assert_same_stores(one_process_export, tmp_path / "data")


@pytest.mark.slow
def test_under_torchrun_a_data_error_on_one_rank_stops_both_with_one_line(
    tmp_path, upstream, small_shards
):
    shards = tmp_path / "shards"
    shutil.copytree(small_shards, shards)
    manifest = load_manifest(shards)
    bad = Path(manifest.shard_paths("train")[1])  # rank 1's first shard
    _garble_first_image(bad)
    run = _launch(tmp_path / "two", upstream, shards, ranks=2, num_workers=0)
    assert run.returncode != 0
    lines = [line for line in run.stderr.splitlines() if line.startswith("error: export: ")]
    assert lines and len(set(lines)) == 1 and bad.name in lines[0], run.stderr[-3000:]
    assert "cannot decode" in lines[0]
    assert not (tmp_path / "two/data/embeddings.zarr").exists()


def _garble_first_image(shard: Path) -> None:
    """Overwrite the first image member's bytes (same length: the sample count still checks)."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar]
    garbled = False
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            if not garbled and member.name.endswith((".png", ".npy")):
                data, garbled = data[:8] + b"\0" * (len(data) - 8), True
            tar.addfile(member, io.BytesIO(data) if data is not None else None)
    assert garbled


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
    renderer = ViewRenderer.for_model(encoder.model)
    pixels = [store.decode_pixels(int(i), store.get_bytes(int(i))) for i in rows]
    boxes, flips = bank.boxes[rows, entries], bank.flips[rows, entries]
    plan = renderer.source_boxes([p.shape[:2] for p in pixels], boxes, flips)
    with torch.no_grad():
        views = renderer.render(stack_pixels(pixels), plan)
        direct = encoder.model.eval().encode_image(views).numpy()
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


def test_background_writes_keep_their_order_and_raise_in_the_caller():
    import threading

    from ecvl.errors import DataError
    from pipeline.export import _InOrderWriter

    done, threads = [], set()

    def write(i, item):
        threads.add(threading.current_thread().name)
        if item == "bad":
            raise DataError(f"item {i} is bad")
        done.append(i)

    with _InOrderWriter(write) as background:
        for i in range(20):
            background(i, "ok")
    assert done == list(range(20)) and threads == {"ecvl-export-writer"}

    done.clear()
    with pytest.raises(DataError, match="item 3 is bad"), _InOrderWriter(write) as background:
        for i in range(50):
            background(i, "bad" if i == 3 else "ok")
    assert done == [0, 1, 2]  # nothing written after the failed write
