from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from ecvl.errors import ModelError
from ecvl.models.adapter import ADAPTERS, ResidualAdapter, build_adapter

DIM = 16


def _features(n: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", [n for n, cls in ADAPTERS.items() if not hasattr(cls, "scores")])
@pytest.mark.parametrize("shape", [(DIM,), (4, DIM), (2, 3, DIM)])
def test_shapes_and_finite(name: str, shape: tuple[int, ...]) -> None:
    adapter = build_adapter({"name": name, "dim": DIM})
    f = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    out = adapter(f)
    assert out.shape == f.shape
    assert torch.isfinite(out).all()
    v = adapter(f, normalize=True)
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(shape[:-1]))
    torch.testing.assert_close(v, F.normalize(out, dim=-1))


def test_matches_equation_7() -> None:
    adapter = ResidualAdapter(DIM, residual_ratio=0.3, seed=3)
    f = _features()
    w, b = adapter.weight.detach(), adapter.bias.detach()
    expected = 0.3 * torch.relu(f @ w.T + b) + 0.7 * f
    torch.testing.assert_close(adapter(f), expected)


def test_gradient_reaches_only_adapter_parameters() -> None:
    encoder = torch.nn.Linear(8, DIM)  # stands in for the frozen image encoder
    encoder.requires_grad_(False)
    adapter = ResidualAdapter(DIM, seed=0)
    text = F.normalize(_features(3, seed=2), dim=-1).requires_grad_(False)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(5))
    logits = adapter(encoder(x), normalize=True) @ text.T / 0.07
    F.cross_entropy(logits, torch.tensor([0, 1, 2, 0])).backward()
    assert adapter.weight.grad is not None and adapter.weight.grad.abs().sum() > 0
    assert adapter.bias.grad is not None and adapter.bias.grad.abs().sum() > 0
    assert all(p.grad is None for p in encoder.parameters())
    assert text.grad is None


def test_lambda_zero_is_exact_identity() -> None:
    adapter = ResidualAdapter(DIM, residual_ratio=0.0, seed=7)
    f = _features(32) * 100
    assert torch.equal(adapter(f), f)
    half = f.half()  # the export caches float16 embeddings
    assert torch.equal(adapter(half), half.float())


def test_identity_init() -> None:
    adapter = ResidualAdapter(DIM, residual_ratio=0.2, init="identity")
    f = _features()
    torch.testing.assert_close(adapter(f), 0.2 * torch.relu(f) + 0.8 * f)


@pytest.mark.parametrize("lam", [-0.1, 1.5, float("nan")])
def test_lambda_out_of_range(lam: float) -> None:
    with pytest.raises(ValueError, match="residual_ratio"):
        ResidualAdapter(DIM, residual_ratio=lam)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="dim"):
        ResidualAdapter(0)
    with pytest.raises(ValueError, match="init"):
        ResidualAdapter(DIM, init="zeros")
    with pytest.raises(ValueError, match="width"):
        ResidualAdapter(DIM)(torch.zeros(2, DIM + 1))


def test_seeded_init_is_deterministic_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b = ResidualAdapter(DIM, seed=4), ResidualAdapter(DIM, seed=4)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert not torch.equal(a.weight, ResidualAdapter(DIM, seed=5).weight)
    bound = 1 / DIM**0.5
    assert a.weight.abs().max() <= bound and a.bias.abs().max() <= bound


def test_rebuild_from_config_and_saved_weights() -> None:
    adapter = ResidualAdapter(DIM, residual_ratio=0.4, seed=1)
    with torch.no_grad():
        adapter.weight.add_(0.5)  # "trained" weights differ from any fresh init
    buf = io.BytesIO()
    torch.save({"config": adapter.config(), "state_dict": adapter.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    rebuilt = ResidualAdapter.from_config(saved["config"], saved["state_dict"])
    f = _features()
    assert torch.equal(rebuilt(f), adapter(f))
    assert rebuilt.config() == adapter.config()
    assert torch.equal(build_adapter(saved["config"], saved["state_dict"])(f), adapter(f))


def test_no_bias_round_trip() -> None:
    adapter = ResidualAdapter(DIM, bias=False, seed=2)
    rebuilt = ResidualAdapter.from_config(adapter.config(), adapter.state_dict())
    assert rebuilt.bias is None
    assert torch.equal(rebuilt(_features()), adapter(_features()))


def test_from_config_errors() -> None:
    good = ResidualAdapter(DIM).config()
    with pytest.raises(ModelError, match="unknown adapter config"):
        ResidualAdapter.from_config({**good, "hidden": 3})
    with pytest.raises(ModelError, match="residual_ratio"):
        ResidualAdapter.from_config({**good, "residual_ratio": 2.0})
    with pytest.raises(ModelError, match="weights do not match"):
        ResidualAdapter.from_config(good, ResidualAdapter(DIM + 1).state_dict())
    with pytest.raises(ModelError, match="'dim'"):
        ResidualAdapter.from_config({"name": "residual"})
    with pytest.raises(KeyError, match="known: linear_probe, residual"):
        build_adapter({**good, "name": "mlp"})
