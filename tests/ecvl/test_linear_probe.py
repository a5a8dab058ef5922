"""The linear-probe baseline head: what it computes, its config round trip, its errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ecvl.errors import ModelError
from ecvl.models.adapter import build_adapter
from ecvl.models.linear_probe import LinearProbe


def test_logits_are_a_linear_map_of_the_rms_scaled_unit_feature() -> None:
    probe = LinearProbe(4, 3)
    with torch.no_grad():
        probe.weight.copy_(torch.arange(12, dtype=torch.float32).reshape(3, 4) / 10)
        probe.bias.copy_(torch.tensor([0.5, -1.0, 0.0]))
    f = torch.tensor([[3.0, 0.0, 4.0, 0.0]], dtype=torch.float16)  # |f| = 5
    x = torch.tensor([[0.6, 0.0, 0.8, 0.0]]) * 2.0  # unit feature * sqrt(4)
    expected = x @ probe.weight.detach().T + probe.bias.detach()
    torch.testing.assert_close(probe(f), expected)
    # a rescaled feature gives the same logits: only the direction counts, as in eq. 6
    torch.testing.assert_close(probe(f.float() * 7), expected)
    # scores ignore the text features
    assert torch.equal(probe.scores(f, torch.randn(3, 4)), probe(f))


def test_zero_init_starts_from_uniform_predictions() -> None:
    probe = LinearProbe(8, 5)
    logp = F.log_softmax(probe(torch.randn(6, 8)), dim=-1)
    torch.testing.assert_close(logp, torch.full((6, 5), -math.log(5)))


def test_rebuilt_from_config_and_weights() -> None:
    probe = LinearProbe(6, 4)
    with torch.no_grad():
        probe.weight.normal_()
    again = build_adapter(probe.config(), probe.state_dict())
    assert isinstance(again, LinearProbe)
    x = torch.randn(3, 6)
    assert torch.equal(again(x), probe(x))


def test_bad_config_and_weights_are_named() -> None:
    with pytest.raises(ModelError, match="num_classes"):
        LinearProbe.from_config({"name": "linear_probe", "dim": 4})
    with pytest.raises(ModelError, match="do not match"):
        LinearProbe.from_config(
            {"name": "linear_probe", "dim": 4, "num_classes": 3}, LinearProbe(5, 3).state_dict()
        )
    with pytest.raises(ValueError, match="num_classes"):
        LinearProbe(4, 0)
    with pytest.raises(ValueError, match="width 4"):
        LinearProbe(4, 2)(torch.zeros(1, 5))
