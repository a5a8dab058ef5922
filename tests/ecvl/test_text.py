"""Prompt building and class text embeddings (CLIP's template-averaging recipe)."""

from __future__ import annotations

import pytest
import torch

from ecvl.errors import DataError
from ecvl.models.clip import ClipBundle, create_model
from ecvl.text import build_prompts, class_text_features, encode_class_prompts, tokenize_prompts

CLASSES = ["aquarium_fish", "maple_tree", "cat"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of the {}.", "{}"]


@pytest.fixture(scope="module")
def tiny() -> ClipBundle:
    torch.manual_seed(0)
    bundle = create_model("ecvl-tiny-vit")
    bundle.model.eval()
    return bundle


def test_build_prompts_shows_underscores_as_spaces():
    prompts = build_prompts(CLASSES, TEMPLATES)
    assert prompts == [
        ["a photo of a aquarium fish.", "a blurry photo of the aquarium fish.", "aquarium fish"],
        ["a photo of a maple tree.", "a blurry photo of the maple tree.", "maple tree"],
        ["a photo of a cat.", "a blurry photo of the cat.", "cat"],
    ]


@pytest.mark.parametrize(
    ("classnames", "templates", "match"),
    [
        ([], TEMPLATES, "no class names"),
        (CLASSES, [], "no prompt templates"),
        (CLASSES, ["a photo"], "exactly one"),
        (CLASSES, ["a {} of a {}"], "exactly one"),
        (["cat", "_"], TEMPLATES, "empty class name"),
        (CLASSES, ["a {0} {}"], "cannot fill"),
    ],
)
def test_build_prompts_rejects_bad_input(classnames, templates, match):
    with pytest.raises(DataError, match=match):
        build_prompts(classnames, templates)


def test_tokenize_prompts_shape(tiny):
    tokens = tokenize_prompts(tiny.tokenizer, CLASSES, TEMPLATES)
    assert tokens.shape == (3, 3, tiny.context_length)
    assert tokens.dtype == torch.long
    assert torch.equal(tokens[1, 2], tiny.tokenizer(["maple tree"])[0])


def _manual_class_features(bundle: ClipBundle) -> torch.Tensor:
    """One prompt at a time: normalise each, average over templates, normalise again."""
    rows = []
    with torch.no_grad():
        for name in CLASSES:
            per_template = []
            for template in TEMPLATES:
                tokens = bundle.tokenizer([template.format(name.replace("_", " "))])
                feature = bundle.model.encode_text(tokens)[0]
                per_template.append(feature / feature.norm())
            mean = torch.stack(per_template).mean(dim=0)
            rows.append(mean / mean.norm())
    return torch.stack(rows)


@pytest.mark.parametrize("batch_size", [1, 4, 256])
def test_class_text_features_match_manual_average(tiny, batch_size):
    expected = _manual_class_features(tiny)
    with torch.no_grad():
        got = class_text_features(
            tiny.model, tiny.tokenizer, CLASSES, TEMPLATES, device="cpu", batch_size=batch_size
        )
    assert got.shape == (3, tiny.embed_dim)
    assert not got.requires_grad
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(3))
    # Averaging over templates is not the same as using the first template alone.
    with torch.no_grad():
        first_only = class_text_features(tiny.model, tiny.tokenizer, CLASSES, TEMPLATES[:1])
    assert not torch.allclose(got, first_only, atol=1e-3)


def test_encode_class_prompts_is_differentiable(tiny):
    tokens = tokenize_prompts(tiny.tokenizer, CLASSES, TEMPLATES)
    tiny.model.zero_grad()
    features = encode_class_prompts(tiny.model, tokens)
    assert features.requires_grad
    torch.testing.assert_close(features.detach(), _manual_class_features(tiny), atol=1e-5, rtol=0)
    features[:, 0].sum().backward()
    grad = tiny.model.token_embedding.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert tiny.model.visual.proj.grad is None  # the image tower is not involved
    tiny.model.zero_grad()
    # A (K, L) tensor is one template per class.
    with torch.no_grad():
        single = encode_class_prompts(tiny.model, tokens[:, 0])
        prompts = [f"a photo of a {name}." for name in ("aquarium fish", "maple tree", "cat")]
        direct = tiny.model.encode_text(tiny.tokenizer(prompts))
    assert single.shape == (3, tiny.embed_dim)
    expected = direct / direct.norm(dim=1, keepdim=True)
    torch.testing.assert_close(single, expected, atol=1e-5, rtol=0)
