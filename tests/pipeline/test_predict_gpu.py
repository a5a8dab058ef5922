"""`ecvl predict` on CUDA gives the CPU's answers (skipped without a CUDA device)."""

from __future__ import annotations

import csv

import pytest
import torch
from click.testing import CliRunner

from pipeline.cli import main
from support import tiny_classifier, write_pngs


def _predict(model, images, out, *args):
    result = CliRunner().invoke(
        main,
        ["predict", "--model", str(model), str(images), "--out", str(out), "--top-k", "3", *args],
    )
    assert result.exit_code == 0, result.output
    with open(out) as f:
        rows = list(csv.DictReader(f))
    return (
        [r["path"] for r in rows],
        [r["class_1"] for r in rows],
        torch.tensor([[float(r[f"prob_{i}"]) for i in (1, 2, 3)] for r in rows]),
    )


@pytest.mark.gpu
def test_predict_on_cuda_matches_cpu(tmp_path, monkeypatch):
    model = tiny_classifier(tmp_path / "model", num_classes=5)
    images = tmp_path / "images"
    write_pngs(images, 40, size=48)
    paths, cpu_top1, cpu_probs = _predict(model, images, tmp_path / "cpu.csv", "--device", "cpu")
    # fp32 on the GPU, TF32 off: the same arithmetic up to summation order
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    fp32 = _predict(model, images, tmp_path / "fp32.csv", "--device", "cuda", "--precision", "fp32")
    assert fp32[0] == paths and fp32[1] == cpu_top1
    torch.testing.assert_close(fp32[2], cpu_probs, rtol=0, atol=1e-4)
    # the default on CUDA: autocast, pinned memory, workers; low precision moves the numbers a
    # little, so the top class must agree wherever the CPU's top two are not near-tied
    paths_auto, top1, probs = _predict(model, images, tmp_path / "auto.csv", "--device", "cuda")
    assert paths_auto == paths
    torch.testing.assert_close(probs, cpu_probs, rtol=0, atol=0.03)
    clear = (cpu_probs[:, 0] - cpu_probs[:, 1]) > 0.05
    assert clear.sum() >= len(paths) // 2
    assert [t for t, c in zip(top1, clear, strict=True) if c] == [
        t for t, c in zip(cpu_top1, clear, strict=True) if c
    ]
