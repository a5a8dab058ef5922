"""Stage II's costs, one JSON:

    python benchmarks/stage2.py --out benchmarks/results/stage2.json
    python benchmarks/stage2.py --quick --out /tmp/stage2_quick.json   # a smoke run, minutes

Every arm runs side by side with the arm it is compared to, in one process (alternating pairs,
median of per-pair ratios), on real images: the embedded digits stored as `ecvl shard` stores
them (raw 32 px pixels), through each CPU preset's model.

1. `export`: building the view bank (E base views per train sample, rendered on batches and
   encoded) plus the clean embedding, per train sample, against E + 1 bare forwards on
   tensors already in memory.
2. `ecvl`: one epoch's views (plans from the scores a trainer produced after two epochs, the
   params' k) served selectively (op-free views are bank rows, only the rest is rendered and
   re-encoded) and naively (every view rendered and re-encoded), at 1 and 2 torch threads.
   Goals: selective ÷ naive ≤ f + 0.05, f the fraction re-encoded; the pixel work (gather,
   crop, RandAugment, normalise) per re-encoded view ≤ 25 % of the encoder's time per view.
   The train images are held in memory as stage II holds raw pixels of one size (JPEG members
   are read and decoded per request instead).
3. `measurement`: the per-epoch pass over all N samples (each anchor against both views of
   `batch_size` balanced draws) as a fraction of an `ecvl` epoch, on base views and on the
   views training would see.
4. `scale`: synthetic caches of ImageNet-LT's shape (N = 115,846, K = 1,000, d = 1,024, E = 8:
   a 1.9 GB bank) in a child process each: a `contrast_standard` epoch (training and the
   measurement pass) with the bank in memory (`cache_in_memory: auto`) against the same steps
   on tensors already in memory (the compute bound), and with the bank read from disk per
   step (`never`). Goals: in memory ≤ 1.5× the bound, peak RSS < 6 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from common import NoImages, preset_models

from ecvl.augment import plan_views
from ecvl.bank import encode_bank_block
from ecvl.data.embeddings import EmbeddingWriter, ViewBank, open_embeddings
from ecvl.data.image_store import ImageStore, ImageStoreWriter
from ecvl.data.pixels import encode_npy
from ecvl.data.sources import DigitsSource
from ecvl.losses import two_view_contrastive_loss
from ecvl.models.clip import create_model
from ecvl.reencode import SelectiveEncoder, ViewRequest
from ecvl.samplers import ClassBalancedSampler
from ecvl.stage2 import Stage2Config, Stage2Trainer, _bank_entries
from ecvl.views import ViewRenderer, stack_pixels

E = 8
ROOT = Path(__file__).resolve().parent.parent
PIXEL_GOAL = 0.25  # pixel work per re-encoded view ÷ encoder time per view
RATIO_SLACK = 0.05  # selective ÷ naive ≤ f + this
SCALE_GOAL = 1.5  # a contrast_standard epoch ÷ the same steps on tensors in memory


def stage2_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())["stage2"]


def config(mode: str, epochs: int = 2, **over) -> Stage2Config:
    """params.yaml's stage-II values."""
    p = stage2_params()
    base = {
        "epochs": epochs,
        "batch_size": p["batch_size"],
        "logit_scale": float(np.log(100)),
        "lr": p["lr"],
        "weight_decay": p["weight_decay"],
        "warmup_steps": 0,
        "residual_ratio": p["lambda"],
        "beta": p["beta"],
        "k": p["k"],
        "tau_dcvl": p["tau_dcvl"],
        "w_dcvl": p["w_dcvl"],
        "sampler": "balanced",
        "draws_per_epoch": None,
        "mode": mode,
        "seed": 0,
        "measure_views": p["measure_views"],
    }
    return Stage2Config(**{**base, **over})


def build_world(root: Path, bundle, n: int, batch_size: int) -> dict:
    """Digits as raw 32 px members in an image store, their clean embeddings and an E-view
    bank, timing the export's work against bare forwards."""
    split = DigitsSource().load().splits["train"]
    idx = np.arange(min(n, len(split)))
    with ImageStoreWriter(root / "images.h5", len(idx)) as w:
        w.write(0, [encode_npy(split.images[i]) for i in idx], split.labels[idx],
                [split.keys[i] for i in idx])  # fmt: skip
        w.mark_complete()
    store = ImageStore(root / "images.h5")
    model, device = bundle.model, torch.device("cpu")
    renderer = ViewRenderer.for_model(model)
    pixels = [store.decode_pixels(int(i), store.get_bytes(int(i))) for i in idx]
    whole = renderer.source_boxes(
        [p.shape[:2] for p in pixels], [(0, 0, p.shape[1], p.shape[0]) for p in pixels],
        np.zeros(len(pixels), bool),
    )  # fmt: skip
    start = time.perf_counter()
    with torch.inference_mode():
        x = renderer.render(stack_pixels(pixels), whole)
        cache = torch.cat([model.encode_image(b) for b in x.split(batch_size)])
    clean_s = time.perf_counter() - start
    start = time.perf_counter()
    feats, boxes, flips = encode_bank_block(
        model, store, range(len(idx)), E, 0, renderer, device, "fp32", batch_size
    )
    bank_s = time.perf_counter() - start
    start = time.perf_counter()
    with torch.inference_mode():
        for _ in range(E + 1):
            for b in x.split(batch_size):
                model.encode_image(b)
    bare_s = time.perf_counter() - start
    count = len(idx)
    export = {
        "bank_views": E,
        "train_samples": count,
        "export_seconds_per_sample": (clean_s + bank_s) / count,
        "bare_forwards_seconds_per_sample": bare_s / count,  # E + 1 forwards of each image
        "export_over_bare_forwards": (clean_s + bank_s) / bare_s,
    }
    return {
        "store": store,
        "renderer": renderer,
        "cache": cache.numpy().astype(np.float16),
        "bank": ViewBank(feats.astype(np.float16), boxes, flips),
        "labels": split.labels[idx],
        "export": export,
    }


def _encoder(world, bundle) -> SelectiveEncoder:
    """The encoder as stage II builds it for these images: raw pixels of one size that fit the
    memory budget are held in memory and gathered per request (`pipeline/stage2.py`)."""
    return SelectiveEncoder(
        world["cache"],
        world["store"],
        bundle.model,
        world["renderer"],
        "cpu",
        batch_size=stage2_params()["encode_batch_size"],
        bank=world["bank"],
        pixels=world["store"].raw_pixels(),
    )


def selective_vs_naive(world, bundle, pairs: int) -> dict:
    """One ecvl epoch's views, selective against naive, at 1 and 2 torch threads; the
    measurement pass against an ecvl epoch."""
    labels, device = world["labels"], torch.device("cpu")
    encoder = _encoder(world, bundle)
    text = torch.nn.functional.normalize(torch.randn(int(labels.max()) + 1, encoder.dim), dim=-1)
    trainer = Stage2Trainer(None, text, labels, encoder, config("ecvl", epochs=3), device)
    first = trainer.train_epoch(progress=False)
    trainer.train_epoch(progress=False)
    third = trainer.train_epoch(progress=False)  # augmented: plans from the scores so far
    _, scores = trainer.momentum_snapshot()
    augmented = Stage2Trainer(
        None, text, labels, encoder, config("ecvl", epochs=3, measure_views="augmented"), device
    )
    aug_epochs = [augmented.train_epoch(progress=False) for _ in range(3)]
    standard = Stage2Trainer(None, text, labels, encoder, config("contrast_standard", 1), device)
    cs = standard.train_epoch(progress=False)

    cfg = config("ecvl")
    draws = ClassBalancedSampler(labels, seed=0, epoch=1).indices()
    rng = np.random.default_rng(0)
    steps = []
    for a in range(0, len(draws), cfg.batch_size):
        b = draws[a : a + cfg.batch_size]
        two = np.concatenate([b, b])
        steps.append((two, plan_views(scores[two], cfg.k, rng), _bank_entries(rng, b.size, 2, E)))
    views = sum(s[0].size for s in steps)

    def epoch(naive: bool) -> dict:
        encoder.reset_counters()
        start = time.perf_counter()
        requests = (
            ViewRequest(t, pl, seed=(0, i), entries=e, reencode_all=naive)
            for i, (t, pl, e) in enumerate(steps)
        )
        reencoded = sum(n for _, n in encoder.encode_stream(requests))
        total = time.perf_counter() - start
        c = encoder.counters
        return {
            "seconds": total,
            "reencoded": reencoded,
            "encode_seconds": c["encode_seconds"],
            "pixel_seconds": c["pixel_seconds"],
            "other_seconds": total - c["encode_seconds"] - c["pixel_seconds"],
        }

    out = {}
    threads = torch.get_num_threads()
    for n_threads in (1, 2):
        torch.set_num_threads(n_threads)
        epoch(False)  # warm-up
        sel, nai = [], []
        for _ in range(pairs):
            sel.append(epoch(False))
            nai.append(epoch(True))
        f = sel[0]["reencoded"] / views
        ratio = statistics.median(
            s["seconds"] / n["seconds"] for s, n in zip(sel, nai, strict=True)
        )
        pixel_share = statistics.median(s["pixel_seconds"] / s["encode_seconds"] for s in sel)

        def med(rows, key):
            return statistics.median(r[key] for r in rows)

        out[f"threads_{n_threads}"] = {
            "reencoded_fraction": f,
            "median_time_ratio": ratio,
            "goal_time_ratio_at_most": f + RATIO_SLACK,
            "meets_time_goal": ratio <= f + RATIO_SLACK,
            "pixel_over_encoder_per_view": pixel_share,
            "meets_pixel_goal": pixel_share <= PIXEL_GOAL,
            "pixel_us_per_reencoded_view": 1e6 * med(sel, "pixel_seconds") / sel[0]["reencoded"],
            "encoder_us_per_reencoded_view": 1e6 * med(sel, "encode_seconds") / sel[0]["reencoded"],
            "selective": {k: med(sel, k) for k in sel[0] if k != "reencoded"},
            "naive": {k: med(nai, k) for k in nai[0] if k != "reencoded"},
        }
    torch.set_num_threads(threads)
    return {
        "ecvl": {
            "k": cfg.k,
            "views_per_epoch": views,
            "score_mean": float(np.mean(scores)),
            "score_std": float(np.std(scores)),
            **out,
        },
        "contrast_standard": {
            "reencoded_views": cs["reencoded_views"],
            "views": cs["views"],
            "meets_zero_goal": cs["reencoded_views"] == 0,
            "seconds": cs["seconds"],
        },
        "measurement": {
            "ecvl_epoch_seconds": third["seconds"],
            "base_views_seconds": third["measure_seconds"],
            "base_views_fraction_of_ecvl_epoch": third["measure_seconds"] / third["seconds"],
            "augmented_views_seconds": aug_epochs[2]["measure_seconds"],
            "augmented_views_fraction_of_ecvl_epoch": aug_epochs[2]["measure_seconds"]
            / aug_epochs[2]["seconds"],
            "first_epoch_reencoded_views": first["reencoded_views"],
        },
    }


def write_scale_store(path: Path, n: int, k: int, d: int) -> float:
    """Synthetic caches of ImageNet-LT's profile (1,280 down to 5 per class, scaled to n)."""
    rng = np.random.default_rng(0)
    profile = 1280 * (5 / 1280) ** (np.arange(k) / (k - 1))
    counts = np.maximum(1, np.floor(profile * n / profile.sum())).astype(int)
    counts[0] += n - counts.sum()
    labels = rng.permutation(np.repeat(np.arange(k), counts))
    attrs = {"model_name": "synthetic", "checkpoint_digest": "0", "templates": ["{}"]}
    attrs["classes"] = [f"c{i}" for i in range(k)]
    start = time.perf_counter()
    w = EmbeddingWriter(path, {"train": n}, d, attrs, bank_views=E)
    for a in range(0, n, 8192):
        m = min(8192, n - a)
        feats = rng.standard_normal((m, d), dtype=np.float32)
        w.write("train", a, feats, labels[a : a + m], [f"s{i}" for i in range(a, a + m)])
    w.mark_complete("train")
    step = w.bank_shard_rows
    for a in range(0, n, step):
        m = min(step, n - a)
        feats = rng.standard_normal((m, E, d), dtype=np.float32)
        w.write_bank(a, feats, np.zeros((m, E, 4), np.int32), np.zeros((m, E), bool))
    w.mark_bank_complete()
    text = rng.standard_normal((k, d)).astype(np.float32)
    w.write_text_features(text / np.linalg.norm(text, axis=1, keepdims=True))
    return time.perf_counter() - start


def compute_bound(trainer: Stage2Trainer) -> float:
    """Seconds for one epoch of the trainer's arithmetic on tensors already in memory: the
    same steps (adapter forward and backward, both losses, AdamW) and the same measurement
    pass (adapter forward over anchors and negatives, eq. 11 against the negatives), with no
    reads, gathers or copies."""
    cfg, n = trainer.config, trainer.encoder.num_samples
    b, d = cfg.batch_size, trainer.encoder.dim
    g = torch.Generator().manual_seed(1)
    views = torch.randn(2 * b, d, generator=g)
    measure = torch.randn(4 * b, d, generator=g)
    idx = torch.from_numpy(np.arange(b))
    start = time.perf_counter()
    for _ in range(trainer.steps_per_epoch):
        total, _, _ = trainer._losses(views, idx)
        trainer.optimizer.zero_grad(set_to_none=True)
        total.mean().backward()
        trainer.optimizer.step()
    with torch.no_grad():
        for _ in range(-(-n // b)):
            adapted = trainer.head(measure)
            two_view_contrastive_loss(
                adapted[:b], adapted[b : 2 * b], cfg.tau_dcvl, reduction="none", ids=idx,
                negatives=adapted[2 * b :], negative_ids=torch.cat([idx, idx]) + b,
            )  # fmt: skip
    return time.perf_counter() - start


def scale_child(path: Path, policy: str) -> dict:
    """One contrast_standard epoch on the store at `path`, the bank in memory or on disk, and
    (in memory) the compute bound right after it, in this process."""
    emb = open_embeddings(path)
    bank = emb.bank(max_memory=None if policy == "auto" else 0)
    train = emb.split("train")
    n = len(train.labels)
    encoder = SelectiveEncoder(
        train.features, NoImages(n), torch.nn.Identity(), None, "cpu", bank=bank
    )
    trainer = Stage2Trainer(
        None, emb.text_features(), train.labels, encoder, config("contrast_standard", 1), "cpu"
    )
    stats = trainer.train_epoch(progress=False)
    out = {
        "policy": policy,
        "bank_in_memory": isinstance(bank.features, np.ndarray),
        "epoch_seconds": stats["seconds"],
        "measure_seconds": stats["measure_seconds"],
        "seconds_per_draw": stats["seconds"] / stats["draws"],
        "reencoded_views": stats["reencoded_views"],
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
    }
    if policy == "auto":
        out["compute_bound_seconds"] = compute_bound(trainer)
    return out


def scale(root: Path, n: int, k: int, d: int) -> dict:
    path = root / "scale.zarr"
    write_s = write_scale_store(path, n, k, d)
    runs = {}
    for policy in ("auto", "never"):
        child = subprocess.run(
            [sys.executable, __file__, "--scale-child", str(path), policy],
            check=True,
            capture_output=True,
            text=True,
        )
        runs[policy] = json.loads(child.stdout.strip().splitlines()[-1])
    auto = runs["auto"]
    ratio = auto["epoch_seconds"] / auto["compute_bound_seconds"]
    return {
        "train_samples": n,
        "classes": k,
        "dim": d,
        "bank_views": E,
        "bank_bytes": n * E * d * 2,
        "write_seconds": write_s,
        "in_memory": auto,
        "from_disk": runs["never"],
        "in_memory_over_compute_bound": ratio,
        "from_disk_over_compute_bound": runs["never"]["epoch_seconds"]
        / auto["compute_bound_seconds"],
        "meets_time_goal": ratio <= SCALE_GOAL,
        "meets_memory_goal": max(r["peak_rss_gb"] for r in runs.values()) < 6.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=1797)
    ap.add_argument(
        "--pairs",
        type=int,
        default=7,
        help="A B pairs per thread count (the median of their ratios counts)",
    )
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    ap.add_argument("--scale-child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--scale-n", type=int, default=115_846)
    ap.add_argument("--scale-k", type=int, default=1000)
    ap.add_argument("--scale-d", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/stage2.json"))
    args = ap.parse_args()
    if args.scale_child:  # a child process: its peak RSS is this epoch's alone
        print(json.dumps(scale_child(Path(args.scale_child[0]), args.scale_child[1])))
        return
    if args.quick:
        args.images, args.pairs = 300, 1
        args.scale_n, args.scale_k, args.scale_d = 3000, 50, 64

    result = {
        "benchmark": "stage2",
        "quick": args.quick,
        "stage2_params": {k: stage2_params()[k] for k in ("batch_size", "k", "measure_views")},
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "models": {},
    }
    models = [m for m, info in preset_models().items() if not info["pretrained"]]  # CPU presets
    for name in models:
        torch.manual_seed(0)
        bundle = create_model(name, device="cpu")
        bundle.model.eval()
        with tempfile.TemporaryDirectory() as tmp:
            world = build_world(Path(tmp), bundle, args.images, 512)
            result["models"][name] = {
                "export": world["export"],
                **selective_vs_naive(world, bundle, args.pairs),
            }
        print(name, json.dumps(result["models"][name]["ecvl"]["threads_1"]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        result["scale"] = scale(Path(tmp), args.scale_n, args.scale_k, args.scale_d)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
