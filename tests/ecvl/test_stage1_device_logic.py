"""Stage-I trainer and precision behaviour that matters on GPUs, checked on the CPU."""

import pytest
import torch
from torch import nn

from ecvl.errors import TrainingError
from ecvl.models.clip import create_model
from ecvl.precision import precision_for
from ecvl.stage1 import Stage1Config, Stage1Trainer, _ClipForward, freeze_unused
from ecvl.text import tokenize_prompts


@pytest.mark.parametrize(
    ("capability", "expected"),
    [((6, 0), "fp16"), ((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")],
)
def test_auto_precision_from_compute_capability(capability, expected):
    # P100 6.0, V100 7.0, T4 7.5 emulate bf16 (slowly): fp16 + grad scaler there
    assert precision_for("cuda", capability) == expected


def test_auto_precision_off_cuda():
    assert precision_for("cpu") == precision_for("mps") == "fp32"


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    bundle = create_model("ecvl-tiny-vit")
    tokens = tokenize_prompts(bundle.tokenizer, ["cat", "dog", "sea_lion"], ["a photo of a {}."])
    return bundle, tokens


def test_parameters_the_loss_never_reaches_are_frozen(tiny):
    bundle, tokens = tiny
    model = bundle.model
    model.logit_bias = nn.Parameter(torch.zeros(1))  # as SigLIP models have
    try:
        frozen = freeze_unused(_ClipForward(model), tokens, torch.device("cpu"))
        assert frozen == ["logit_bias"]
        assert not model.logit_bias.requires_grad
        assert all(p.grad is None for p in model.parameters())
        assert all(p.requires_grad for n, p in model.named_parameters() if n != "logit_bias")
    finally:
        del model.logit_bias


def test_chunked_text_tower_gives_the_same_loss_and_gradients(tiny):
    bundle, tokens = tiny
    model = bundle.model
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    grads, losses = [], []
    for chunk in (None, 1):
        model.zero_grad(set_to_none=True)
        img, text, scale = _ClipForward(model, chunk)(images, tokens)
        loss = (img @ text.T * scale.exp()).logsumexp(dim=1).mean()
        loss.backward()
        losses.append(loss.detach())
        grads.append(model.token_embedding.weight.grad.clone())
    model.zero_grad(set_to_none=True)
    # one batched call vs three: the same math, summed in another order
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)
    assert grads[0].abs().max() > 1e-3  # the text tower does get gradients


def test_non_finite_loss_names_its_step(tiny):
    losses = [torch.tensor([1.0, 1.0, 1.0])] * 3 + [torch.tensor([float("nan"), 0.0, 0.0])]
    with pytest.raises(TrainingError, match="epoch 2, step 4"):
        Stage1Trainer._check_finite(losses, epoch=2, first=0)
    Stage1Trainer._check_finite(losses, epoch=2, first=4)  # an empty window is fine


def test_checkpoint_holds_no_rng_of_other_gpus_and_resumes_without_scaler(tiny):
    bundle, tokens = tiny
    config = Stage1Config(
        epochs=1,
        steps_per_epoch=1,
        lr=1e-3,
        weight_decay=0.1,
        warmup_steps=0,
        grad_clip=1.0,
        w_i2t=1.0,
        w_t2i=1.0,
        logit_scale_max=100.0,
        precision="fp32",
        text_batch_size=None,
        logit_offset=None,
        label_smoothing=0.0,
    )
    trainer = Stage1Trainer(bundle.model, tokens, config, torch.device("cpu"))
    state = trainer.state_dict()
    assert set(state["rng"]) == {"torch"}
    assert state["scaler"] == {}
    trainer.load_state_dict(state)  # an empty scaler state is not fed to GradScaler
