"""`ecvl stage2` through the CLI on a tiny digits export."""

import json
import shutil

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import ecvl.stage2
from ecvl.data.image_store import ImageStore, ImageStoreWriter
from pipeline.cli import main
from support import upstream_paths, write_params

UP = {"stage1": {"epochs": 1, "batch_size": 32}, "export": {"batch_size": 64}}
STAGE2 = {"epochs": 2, "batch_size": 32, "encode_batch_size": 64}


def _invoke(stage, params):
    return CliRunner().invoke(main, [stage, "--params", str(params)])


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage2")
    params = write_params(root, **UP, stage2=STAGE2)
    for stage in ("shard", "stage1", "export"):
        assert _invoke(stage, params).exit_code == 0
    return root


def _params(tmp_path, upstream, paths=None, **stage2):
    inputs = upstream_paths(upstream, "shards", "stage1", "embeddings", "image_store")
    return write_params(
        tmp_path, **UP, paths={**inputs, **(paths or {})}, stage2={**STAGE2, **stage2}
    )


def test_all_modes_write_adapters_metrics_plots_and_trace(tmp_path, upstream):
    result = _invoke("stage2", _params(tmp_path, upstream))
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "metrics/stage2.json").read_text())["stage2"]
    assert metrics["split"] == "val"
    modes = ("linear_probe", "ballad", "contrast_standard", "ecvl_uniform", "ecvl")
    for mode in modes:
        assert {"all_acc", "few_acc", "macro_f1", "reencoded_fraction"} <= set(metrics[mode])
        out = tmp_path / "models/stage2" / mode
        assert set(load_file(out / "adapter.safetensors")) == {"weight", "bias"}
        assert json.loads((out / "adapter.json").read_text())["mode"] == mode
        if mode == "linear_probe":  # no measurement pass, no trace
            assert not (out / "momentum_trace.h5").exists()
            continue
        with h5py.File(out / "momentum_trace.h5") as f:
            n = len(f["labels"])
            assert f["Lm"].shape == f["M"].shape == (2, n)
            m = f["M"][1]
            assert np.all((m >= 0) & (m <= 1)) and abs(float(np.mean(m)) - 0.5) < 1e-6
            assert not np.isnan(f["Lm"][0]).any()  # every sample scored from epoch 1
    probe = json.loads((tmp_path / "models/stage2/linear_probe/adapter.json").read_text())
    assert probe["adapter"] == {
        "name": "linear_probe",
        "dim": probe["adapter"]["dim"],
        "num_classes": 10,
    }
    state = torch.load(tmp_path / "checkpoints/stage2-linear_probe.pt", weights_only=True)
    assert state["trainer"]["config"]["sampler"] == "instance"  # whatever stage2.sampler says
    assert metrics["linear_probe"]["reencoded_fraction"] == 0.0
    assert metrics["ballad"]["reencoded_fraction"] == 0.0
    assert metrics["contrast_standard"]["reencoded_fraction"] == 0.0  # bank views only
    rows = (tmp_path / "plots/stage2.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2 * len(modes) and rows[0].startswith("mode,epoch,loss,")
    ecvl_rows = [r.split(",") for r in rows[1:] if r.startswith("ecvl,")]
    header = rows[0].split(",")
    assert {"score_mean_few", "score_count_spearman"} <= set(header)
    assert "measure_seconds" not in header  # timings go to logs/
    frac = [float(r[header.index("reencoded_fraction")]) for r in ecvl_rows]
    assert frac[0] == 0.0 and 0.0 < frac[1] < 1.0  # epoch 1 has no scores: nothing re-encoded


@pytest.mark.parametrize(
    "override,message",
    [
        ({"lambda": 1.5}, "stage2.lambda: must be <= 1, got 1.5"),
        ({"beta": 1.0}, "stage2.beta: must be < 1, got 1.0"),
        ({"k": 0}, "stage2.k: must be >= 1, got 0"),
        ({"modes": ["ecvl", "balad"]}, "stage2.modes[1]: must be one of"),
    ],
)
def test_bad_stage2_params_exit_2(tmp_path, upstream, override, message):
    result = _invoke("stage2", _params(tmp_path, upstream, **override))
    assert result.exit_code == 2 and message in result.output


def test_image_store_in_another_order_is_refused(tmp_path, upstream):
    src = ImageStore(upstream / "data/train_images.h5")
    order = np.arange(len(src))[::-1]
    other = tmp_path / "other.h5"
    with ImageStoreWriter(other, len(src)) as w:
        w.write(
            0,
            [src.get_bytes(int(i)) for i in order],
            np.asarray(src.labels)[order],
            [str(src.keys[i]) for i in order],
        )
        w.mark_complete()
    result = _invoke("stage2", _params(tmp_path, upstream, paths={"image_store": str(other)}))
    assert result.exit_code == 1 and "in a different order" in result.output


def test_embeddings_from_another_model_are_refused(tmp_path, upstream):
    model = tmp_path / "model"
    shutil.copytree(upstream / "models/stage1", model)
    weights = model / "open_clip_model.safetensors"
    state = load_file(weights)
    state["logit_scale"] = state["logit_scale"] + 1
    from safetensors.torch import save_file

    save_file(state, str(weights))
    result = _invoke("stage2", _params(tmp_path, upstream, paths={"stage1": str(model)}))
    assert result.exit_code == 1 and "exported from another stage-I model" in result.output


def test_resume_after_kill_equals_straight_run(tmp_path, upstream, monkeypatch):
    straight, resumed = tmp_path / "a", tmp_path / "b"
    straight.mkdir()
    resumed.mkdir()
    assert _invoke("stage2", _params(straight, upstream, modes=["ecvl"], epochs=3)).exit_code == 0
    params = _params(resumed, upstream, modes=["ecvl"], epochs=3)
    real = ecvl.stage2.Stage2Trainer.train_epoch

    def killed_in_epoch_3(self, *args, **kwargs):
        if self.epoch == 2:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ecvl.stage2.Stage2Trainer, "train_epoch", killed_in_epoch_3)
    assert _invoke("stage2", params).exit_code == 130
    monkeypatch.setattr(ecvl.stage2.Stage2Trainer, "train_epoch", real)
    assert _invoke("stage2", params).exit_code == 0
    a = load_file(straight / "models/stage2/ecvl/adapter.safetensors")
    b = load_file(resumed / "models/stage2/ecvl/adapter.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with (
        h5py.File(straight / "models/stage2/ecvl/momentum_trace.h5") as fa,
        h5py.File(resumed / "models/stage2/ecvl/momentum_trace.h5") as fb,
    ):
        assert np.array_equal(fa["Lm"][:], fb["Lm"][:], equal_nan=True)
    assert (straight / "metrics/stage2.json").read_text() == (
        resumed / "metrics/stage2.json"
    ).read_text()


def test_encoder_precision_follows_the_export_or_is_refused(caplog):
    from pipeline.schema import ParamsError
    from pipeline.stage2 import _encoder_precision

    cpu = torch.device("cpu")
    assert _encoder_precision("auto", "fp32", cpu, "e.zarr") == "fp32"
    assert _encoder_precision("auto", None, cpu, "e.zarr") == "fp32"  # an older store
    with pytest.raises(ParamsError, match=r"stage2.precision: fp32 .* exported in bf16"):
        _encoder_precision("fp32", "bf16", cpu, "e.zarr")
    caplog.set_level("WARNING")
    assert _encoder_precision("auto", "bf16", cpu, "e.zarr") == "fp32"  # GPU export, CPU stage II
    assert "exported in bf16" in caplog.text


def test_a_bank_read_from_disk_trains_the_same_adapter(tmp_path, upstream, caplog):
    # cache_in_memory decides only where the bank's rows come from, never what they are
    caplog.set_level("INFO", logger="pipeline.stage2")
    runs = {}
    for policy in ("auto", "never"):
        out = tmp_path / policy
        out.mkdir()
        params = write_params(
            out,
            **UP,
            paths=upstream_paths(upstream, "shards", "stage1", "embeddings", "image_store"),
            stage2={**STAGE2, "modes": ["contrast_standard"], "cache_in_memory": policy},
            package={"mode": "contrast_standard"},
        )
        result = _invoke("stage2", params)
        assert result.exit_code == 0, result.output
        runs[policy] = load_file(out / "models/stage2/contrast_standard/adapter.safetensors")
    placements = [r.getMessage() for r in caplog.records if "view bank" in r.getMessage()]
    assert "view bank" in placements[0].split(" in host memory")[0]  # loaded, with the rest
    assert "(cache_in_memory: auto" in placements[0]
    assert "view bank read from" in placements[1] and "(cache_in_memory: never" in placements[1]
    for name, tensor in runs["auto"].items():
        assert torch.equal(tensor, runs["never"][name]), name
