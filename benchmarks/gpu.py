"""GPU check: the `gpu` tests, then RN50 @224 throughput of each stage's hot loop on one CUDA
device, side by side with its bare model, JSON out.

    python benchmarks/gpu.py --out benchmarks/results/gpu.json   # on a CUDA machine
    python benchmarks/gpu.py --smoke --out /tmp/gpu-smoke.json   # the script itself, on a CPU

Figures (random init, the preset's batch sizes; alternating arms, medians):
- stage I: training steps fed from shards (decode and crop in `--workers` data workers, uint8
  batches normalised on the GPU) ÷ the same steps on tensors already on the GPU;
- export: the encoding loop fed from shards ÷ the bare forward on tensors on the GPU;
- stage II: re-encoded views/s (every view read, decoded, cropped, RandAugmented and normalised
  on the GPU, then encoded) ÷ the bare forward at the same batch size (goal ≥ 0.7); the time to
  read one epoch's bank rows at ImageNet-LT's shape with the bank on the GPU;
- the text tower at K = 1,000 classes (ImageNet-LT): peak GPU memory of one training step with
  all prompts at once and with `text_batch_size` 250 (activation checkpointing).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
from common import NoImages, digits_train_shards, stage1_config

from ecvl.augment import plan_views, sample_base_view
from ecvl.data.batch_augment import batch_augment_for
from ecvl.data.embeddings import ViewBank
from ecvl.data.image_store import ImageStore, ImageStoreWriter
from ecvl.data.reader import eval_pipeline, iter_samples, make_loader, take, train_pipeline
from ecvl.data.shards import load_manifest
from ecvl.evaluation import encode_loader
from ecvl.models.clip import create_model
from ecvl.precision import autocast, resolve_precision
from ecvl.reencode import SelectiveEncoder, ViewRequest
from ecvl.stage1 import Stage1Trainer
from ecvl.text import tokenize_prompts
from ecvl.views import ViewRenderer

ROOT = Path(__file__).resolve().parents[1]


def run_gpu_tests() -> dict:
    start = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rs"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    lines = [line for line in run.stdout.splitlines() if line.strip()]
    return {
        "returncode": run.returncode,
        "summary": lines[-1] if lines else "",
        "seconds": round(time.perf_counter() - start, 1),
        "tail": lines[-25:],
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _pairs(a, b, pairs: int, device) -> dict:
    """Alternate arms A B A B; each returns images/s."""
    ra, rb = [], []
    for _ in range(pairs):
        for fn, out in ((a, ra), (b, rb)):
            _sync(device)
            out.append(fn())
            _sync(device)
    ratios = [x / y for x, y in zip(ra, rb, strict=True)]
    return {
        "stage_images_per_s": round(statistics.median(ra), 1),
        "bare_images_per_s": round(statistics.median(rb), 1),
        "ratio": round(statistics.median(ratios), 3),
        "ratios": [round(r, 3) for r in ratios],
    }


def stage1_figures(bundle, manifest, device, precision, args) -> dict:
    tokens = tokenize_prompts(bundle.tokenizer, manifest.classes, ["a photo of a {}."])
    epochs = 2 * args.pairs + 2
    trainer = Stage1Trainer(
        bundle.model,
        tokens,
        stage1_config(epochs=epochs, steps_per_epoch=args.steps, lr=1e-5, precision=precision),
        device,
    )
    size = bundle.train_transform.transforms[0].size
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 3, *size, generator=g).to(device)
    labels = torch.randint(0, len(manifest.classes), (args.batch_size,), generator=g).to(device)
    keys = [str(i) for i in range(args.batch_size)]
    urls = manifest.shard_paths("train")

    def bare() -> float:
        return trainer.train_epoch([(images, labels, keys)] * args.steps, False).images_per_s

    preprocess = open_clip.get_model_preprocess_cfg(bundle.model)
    augment = batch_augment_for("open_clip", bundle.train_transform, preprocess)  # the preset's

    def stage() -> float:
        pipe = train_pipeline(
            urls,
            bundle.train_transform,
            args.batch_size,
            0,
            trainer.epoch + 1,
            1000,
            device,
            augment,  # crops drawn in the workers, pixels moved on the GPU
        )
        batches = take(make_loader(pipe, args.workers, device), args.steps)
        return trainer.train_epoch(batches, False).images_per_s

    bare()  # warm-up: cuDNN autotuning, allocator
    return {
        "batch_size": args.batch_size,
        "steps": args.steps,
        **_pairs(stage, bare, args.pairs, device),
    }


def export_figures(bundle, manifest, device, precision, args) -> dict:
    urls = manifest.shard_paths("train")
    n = manifest.count("train")
    size = bundle.train_transform.transforms[0].size
    x = torch.randn(args.export_batch_size, 3, *size).to(device)
    reps = max(1, n // args.export_batch_size)

    def bare() -> float:
        start = time.perf_counter()
        for _ in encode_loader(bundle.model, [(x, torch.zeros(1), [])] * reps, device, precision):
            pass
        return reps * args.export_batch_size / (time.perf_counter() - start)

    def stage() -> float:
        pipe = eval_pipeline(urls, bundle.eval_transform, args.export_batch_size, True, device)
        start = time.perf_counter()
        batches = ((x, y, k) for x, y, k, _ in make_loader(pipe, args.workers, device))
        seen = sum(
            f.shape[0] for f, _, _ in encode_loader(bundle.model, batches, device, precision)
        )
        return seen / (time.perf_counter() - start)

    bare()
    return {"batch_size": args.export_batch_size, **_pairs(stage, bare, args.pairs, device)}


def stage2_figures(bundle, manifest, device, precision, args, tmp: Path) -> dict:
    """Re-encoded views/s (read, decode, crop, RandAugment and normalise on the device, then
    the encoder) ÷ the bare forward at the same batch size on tensors already there; and the
    time to read one epoch's bank rows at ImageNet-LT's shape with the bank on the device."""
    samples = list(iter_samples(manifest.shard_paths("train")))
    path = tmp / "store.h5"
    with ImageStoreWriter(path, len(samples)) as w:
        w.write(
            0,
            [bytes(s["encoded"]) for s in samples],
            [s["label"] for s in samples],
            [s["key"] for s in samples],
        )
        w.mark_complete()
    store = ImageStore(path)
    n, dim = len(samples), bundle.embed_dim
    sizes = [store.decode_pixels(i, store.get_bytes(i)).shape[1::-1] for i in range(n)]
    drawn = [
        sample_base_view(size, np.random.default_rng([i, e]))
        for i, size in enumerate(sizes)
        for e in range(8)
    ]
    bank = ViewBank(
        np.zeros((n, 8, dim), np.float16),
        np.array([b for b, _ in drawn]).reshape(n, 8, 4),
        np.array([f for _, f in drawn]).reshape(n, 8),
    )
    renderer = ViewRenderer.for_model(bundle.model)
    enc = SelectiveEncoder(
        np.zeros((n, dim), np.float16), store, bundle.model, renderer, device, precision,
        args.encode_batch_size, bank=bank, cache_device=device,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    steps = []
    for i in range(args.steps):
        d = rng.integers(0, n, args.batch_size)
        views = np.concatenate([d, d])
        plans = plan_views(np.full(views.size, 0.5), args.k, rng)
        steps.append(ViewRequest(views, plans, (0, i), True, rng.integers(0, 8, views.size)))
    x = torch.randn(args.encode_batch_size, 3, renderer.side, renderer.side, device=device)
    reps = max(1, 2 * args.batch_size * args.steps // args.encode_batch_size)

    def stage() -> float:
        start = time.perf_counter()
        seen = sum(k for _, k in enc.encode_stream(steps))
        _sync(device)
        return seen / (time.perf_counter() - start)

    def bare() -> float:
        start = time.perf_counter()
        with torch.inference_mode(), autocast(device, precision):
            for _ in range(reps):
                bundle.model.encode_image(x, normalize=False)
        _sync(device)
        return reps * args.encode_batch_size / (time.perf_counter() - start)

    stage()  # warm-up
    bare()
    out = {
        "views_per_step": 2 * args.batch_size,
        "encode_batch_size": args.encode_batch_size,
        "k": args.k,
        **_pairs(stage, bare, args.pairs, device),
    }
    out["goal_ratio_at_least"] = 0.7
    out["bank_read"] = bank_read_figures(device, args)
    return out


def bank_read_figures(device, args) -> dict:
    """One epoch's bank rows (two views per draw) gathered from a bank of ImageNet-LT's shape
    held where stage II holds it on this device (`cache_in_memory: auto`)."""
    n, e, d = args.bank_samples, 8, 1024
    bank = ViewBank(
        np.zeros((n, e, d), np.float16), np.zeros((n, e, 4), np.int32), np.zeros((n, e), bool)
    )
    enc = SelectiveEncoder(
        np.zeros((n, d), np.float16), NoImages(n), torch.nn.Identity(), None, device,
        bank=bank, cache_device=device,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    b = args.batch_size
    requests = [
        ViewRequest(np.tile(rng.integers(0, n, b), 2), entries=rng.integers(0, e, 2 * b))
        for _ in range(-(-n // b))
    ]
    _sync(device)
    start = time.perf_counter()
    for _ in enc.encode_stream(requests):
        pass
    _sync(device)
    return {"samples": n, "dim": d, "views": e, "epoch_read_seconds": time.perf_counter() - start}


def text_memory_figures(bundle, device, precision, args) -> dict:
    if device.type != "cuda":
        return {"skipped": "needs CUDA (peak memory)"}
    classes = [f"class {i}" for i in range(args.text_classes)]
    tokens = tokenize_prompts(bundle.tokenizer, classes, ["a photo of a {}."])
    size = bundle.train_transform.transforms[0].size
    images = torch.randn(32, 3, *size, device=device)
    labels = torch.randint(0, len(classes), (32,), device=device)
    out = {"classes": len(classes)}
    for chunk in (None, 250):
        trainer = Stage1Trainer(
            bundle.model,
            tokens,
            stage1_config(
                epochs=1, steps_per_epoch=1, lr=1e-6, precision=precision, text_batch_size=chunk
            ),
            device,
        )
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        trainer.train_epoch([(images, labels, [""] * 32)], False)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        out[f"peak_gib_text_batch_{chunk or 'all'}"] = round(peak / 2**30, 2)
        del trainer
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="RN50")
    ap.add_argument("--batch-size", type=int, default=128, help="stage I / II draws per step")
    ap.add_argument("--export-batch-size", type=int, default=512)
    ap.add_argument("--encode-batch-size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--text-classes", type=int, default=1000)
    ap.add_argument("--k", type=int, default=1, help="RandAugment ops per stage-II view")
    ap.add_argument("--bank-samples", type=int, default=115_846, help="ImageNet-LT's N")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU, few steps")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu.json"))
    args = ap.parse_args()
    if args.smoke:
        args.model, args.steps, args.pairs, args.workers = "ecvl-tiny-vit", 2, 1, 1
        args.batch_size, args.export_batch_size, args.encode_batch_size = 16, 64, 32
        args.bank_samples = 2000
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    result: dict = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor(),
        "torch": torch.__version__,
        "model": args.model,
    }
    if not args.skip_tests:
        result["gpu_tests"] = run_gpu_tests()
        print(result["gpu_tests"]["summary"], flush=True)
    precision = resolve_precision("auto", device)
    result["precision"] = precision
    torch.manual_seed(0)
    bundle = create_model(args.model, device=device)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = load_manifest(digits_train_shards(Path(tmp) / "shards", maxcount=64))
        for name, fn in (
            ("stage1", lambda: stage1_figures(bundle, manifest, device, precision, args)),
            ("export", lambda: export_figures(bundle, manifest, device, precision, args)),
            (
                "stage2",
                lambda: stage2_figures(bundle, manifest, device, precision, args, Path(tmp)),
            ),
            ("text_tower", lambda: text_memory_figures(bundle, device, precision, args)),
        ):
            start = time.perf_counter()
            try:
                result[name] = fn()
            except Exception as e:  # keep the other figures; report what broke
                result[name] = {"error": f"{type(e).__name__}: {e}"}
            result[name]["seconds"] = round(time.perf_counter() - start, 1)
            print(name, json.dumps(result[name]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
