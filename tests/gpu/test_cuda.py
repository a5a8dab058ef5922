"""Every stage on CUDA at small scale, against the CPU path (skipped without a GPU).

Run them, and the RN50 throughput figures, with `python benchmarks/gpu.py` on a CUDA machine.
"""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ecvl.data.embeddings import open_embeddings
from ecvl.data.image_store import ImageStore
from ecvl.models.adapter import ResidualAdapter
from ecvl.precision import resolve_precision
from ecvl.reencode import SelectiveEncoder
from ecvl.stage2 import predict_cached
from ecvl.views import ViewRenderer
from pipeline.artifacts import load_stage1
from pipeline.cli import STAGES, main
from support import write_params

pytestmark = pytest.mark.gpu

SECTIONS = {
    "stage1": {"epochs": 3, "batch_size": 32, "eval_batch_size": 64},
    "export": {"batch_size": 64},
    "stage2": {"epochs": 2, "batch_size": 32, "encode_batch_size": 64},
    "evaluate": {"batch_size": 256},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The whole pipeline once on the CPU and once on CUDA, same params otherwise."""
    out = {}
    for device in ("cpu", "cuda"):
        root = tmp_path_factory.mktemp(device)
        params = write_params(root, base={"device": device, "num_workers": 2}, **SECTIONS)
        for stage in STAGES:
            result = CliRunner().invoke(main, [stage, "--params", str(params)])
            assert result.exit_code == 0, f"{device} {stage}: {result.output}"
        out[device] = root
    return out


def test_every_stage_runs_on_cuda_and_reports_the_same_rows(runs):
    cpu, cuda = (json.loads((runs[d] / "metrics/eval.json").read_text()) for d in ("cpu", "cuda"))
    assert cpu.keys() == cuda.keys()
    for split in cuda:
        assert cpu[split].keys() == cuda[split].keys()
        for row, metrics in cuda[split].items():
            for key, value in metrics.items():
                assert value is None or 0.0 <= value <= 1.0, (split, row, key, value)


def test_export_shapes_match_the_cpu_path_and_record_the_precision(runs):
    cpu = open_embeddings(runs["cpu"] / "data/embeddings.zarr")
    cuda = open_embeddings(runs["cuda"] / "data/embeddings.zarr")
    assert cpu.precision == "fp32"
    assert cuda.precision == resolve_precision("auto", torch.device("cuda"))
    for split in cpu.splits:
        assert cuda.split(split).features.shape == cpu.split(split).features.shape
        assert list(cuda.split(split).keys) == list(cpu.split(split).keys)
    assert cuda.text_features().shape == cpu.text_features().shape


def test_clean_views_reencoded_on_cuda_equal_their_cache_rows(runs):
    """The promise stage II rests on, within the export's precision."""
    root, device = runs["cuda"], torch.device("cuda")
    emb = open_embeddings(root / "data/embeddings.zarr")
    bundle, _ = load_stage1(root / "models/stage1", device)
    train = emb.split("train")
    store = ImageStore(root / "data/train_images.h5")
    enc = SelectiveEncoder(
        train.features,
        store,
        bundle.model,
        ViewRenderer.for_model(bundle.model),
        device,
        emb.precision,
        batch_size=64,
    )
    idx = np.arange(min(64, len(train.labels)))
    feats, n = enc.encode_views(idx, reencode_all=True)
    assert n == idx.size
    cached = torch.from_numpy(np.asarray(train.features[idx])).float()
    torch.testing.assert_close(feats.cpu(), cached, rtol=2e-2, atol=2e-2)


def test_a_head_built_on_the_cpu_predicts_on_cuda_features():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(300, 16, generator=g).half()
    text = torch.randn(5, 16, generator=g)
    head = ResidualAdapter(16, 0.5, seed=0)  # built on the CPU, as evaluate loads it
    on_cpu = predict_cached(head, feats, text, "cpu", batch_size=128)
    on_cuda = predict_cached(head, feats.cuda(), text, "cuda", batch_size=128)
    assert torch.equal(on_cpu, on_cuda)


def test_auto_precision_on_this_gpu_is_native():
    major, _ = torch.cuda.get_device_capability()
    assert resolve_precision("auto", torch.device("cuda")) == ("bf16" if major >= 8 else "fp16")


def test_losses_stay_float32_under_cuda_autocast():
    from ecvl.losses import image_to_text_loss

    g = torch.Generator(device="cuda").manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(64, 32, device="cuda", generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(10, 32, device="cuda", generator=g), dim=-1)
    labels = torch.randint(0, 10, (64,), device="cuda", generator=g)
    plain = image_to_text_loss(img, txt, labels, 4.6)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        mixed = image_to_text_loss(img, txt, labels, 4.6)
    torch.testing.assert_close(plain, mixed, rtol=1e-5, atol=1e-5)


def _batched_train_batch(urls, device, augment):
    """The first batch of a batched-augmentation train pipeline, seeded; on the CPU."""
    from torchvision.transforms import Compose, Normalize, ToTensor

    from ecvl.data.reader import make_loader, train_pipeline

    transform = Compose([ToTensor(), Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))])
    torch.manual_seed(0)  # the crops are drawn on the CPU, before any transfer
    pipe = train_pipeline(urls, transform, 8, 0, 1, 1, device=device, augment=augment)
    images, labels, keys = next(iter(make_loader(pipe, 0, device)))
    assert images.device.type == torch.device(device).type
    return images.float().cpu(), keys


@pytest.mark.parametrize("kind", ["pad_crop", "resized_crop"])
def test_batched_augmentation_on_cuda_matches_the_cpu_on_raw_and_jpeg_members(
    tmp_path, monkeypatch, kind
):
    """Raw members: pixels moved on the GPU within the stated tolerance of the CPU (1 level).
    JPEG members: decoded on the GPU (nvJPEG), within 2 levels on average of PIL's decode."""
    import torchvision.io
    from PIL import Image

    from ecvl.data.batch_augment import BatchAugment
    from ecvl.data.shards import write_split_shards
    from ecvl.data.sources import Split
    from support import make_images

    augment = BatchAugment(kind, 32, scale=(0.5, 1.0), pad=4, flip=True, antialias=True)
    level = 1 / 255 / 0.25  # one uint8 level after this normalisation
    raw = Split([f"r{i:02d}" for i in range(8)], np.arange(8) % 2, images=make_images(8, 32))
    write_split_shards(raw, "raw", ("a", "b"), tmp_path, 8, 0.0, encoding="raw", progress=False)
    paths = []
    for i, pixels in enumerate(make_images(8, 48, seed=1)):
        rows = np.linspace(0, 255, 48 * 48 * 3).reshape(48, 48, 3).astype(np.uint8)
        smooth = ((pixels.astype(np.int32) // 8 + rows) % 256).astype(np.uint8)  # JPEG-friendly
        paths.append(tmp_path / f"j{i:02d}.jpg")
        Image.fromarray(smooth).save(paths[-1], quality=95)
    jpeg = Split([p.stem for p in paths], np.arange(8) % 2, paths=paths)
    write_split_shards(jpeg, "jpeg", ("a", "b"), tmp_path, 8, 0.0, encoding="png", progress=False)

    raw_cpu, keys_cpu = _batched_train_batch([str(tmp_path / "raw-000000.tar")], "cpu", augment)
    raw_gpu, keys_gpu = _batched_train_batch([str(tmp_path / "raw-000000.tar")], "cuda", augment)
    assert keys_cpu == keys_gpu
    assert (raw_cpu - raw_gpu).abs().max() <= level * 1.01

    calls = []
    original = torchvision.io.decode_jpeg

    def spy(data, *args, **kwargs):
        calls.append(kwargs.get("device"))
        return original(data, *args, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", spy)
    jpg_cpu, _ = _batched_train_batch([str(tmp_path / "jpeg-000000.tar")], "cpu", augment)
    jpg_gpu, _ = _batched_train_batch([str(tmp_path / "jpeg-000000.tar")], "cuda", augment)
    assert calls and all(torch.device(d).type == "cuda" for d in calls)
    assert (jpg_cpu - jpg_gpu).abs().mean() <= 2 * level
