"""`encode_loader` is a generator the caller may abandon (an error while writing a batch): it
must not leave the caller's thread in inference mode while suspended."""

from __future__ import annotations

import torch
from torch import nn

from ecvl.evaluation import encode_loader


class _Tower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(12, 4)

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.proj(images.flatten(1))


def test_a_suspended_encode_loader_leaves_inference_mode_off():
    torch.manual_seed(0)
    model = _Tower()
    batches = [(torch.randn(3, 3, 2, 2), torch.arange(3), ["a", "b", "c"]) for _ in range(2)]
    loader = encode_loader(model, batches, torch.device("cpu"))
    feats, labels, keys = next(loader)  # the consumer now works, e.g. writes, while suspended
    assert not torch.is_inference_mode_enabled()
    fresh = nn.Linear(2, 2)  # a model built now has ordinary weights that can be loaded into
    fresh.load_state_dict({"weight": torch.ones(2, 2), "bias": torch.zeros(2)})
    with torch.no_grad():
        assert torch.equal(feats, model.encode_image(batches[0][0]))
    assert keys == ["a", "b", "c"] and labels.tolist() == [0, 1, 2]
