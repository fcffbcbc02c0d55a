# Unit tests for the backbone registry, IResNet and MobileFaceNet (shapes, sizes, autocast, checkpointing).
"""Backbone tests; the whole file runs in well under a minute on 2 CPU cores."""

import pytest
import torch

from toolkit.errors import FaceCLError
from toolkit.models import create_backbone, list_backbones

SMALL_INPUT_SIZE = 32  # multiple of 16; final feature map 2x2, keeps CPU tests fast
BATCH_SIZE = 2

# Parameters (all, trainable or not) at input_size=112, embedding_size=512; insightface values.
EXPECTED_PARAMETERS_MILLIONS = {
    "iresnet18": 24.0,
    "iresnet34": 34.1,
    "iresnet50": 43.6,
    "iresnet100": 65.2,
    "iresnet200": 118.8,
    "iresnet2060": 1122.3,
    # Restated from the published layer lists in tests/unit/test_vit.py.
    "mobilefacenet_large": 6.3,
    "mobilefacenet_mbf": 2.06,
    "vit_t": 19.1,
    "vit_s": 76.0,
    "vit_b": 113.8,
    "vit_l": 255.7,
    "vit_h": 756.4,
}
MOBILEFACENET_PARAMETER_RANGE_MILLIONS = (1.0, 2.0)
# Too large to train a step of on CPU in a unit test (hundreds of millions of parameters); their block
# classes are covered by the smaller members of the family and by tests/unit/test_vit.py on meta tensors.
HEAVY_BACKBONES = {"iresnet2060", "vit_s", "vit_b", "vit_l", "vit_h"}

# One backbone per family for the more expensive equivalence tests.
REPRESENTATIVE_BACKBONES = ["iresnet18", "mobilefacenet"]


def _stem_conv(model: torch.nn.Module) -> torch.nn.Conv2d:
    """First Conv2d in registration order: the stem convolution of every backbone here."""
    return next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))


def _embedding_linear(model: torch.nn.Module) -> torch.nn.Linear:
    """Last nn.Linear: the embedding projection of every backbone here."""
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]


def _images(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH_SIZE, 3, SMALL_INPUT_SIZE, SMALL_INPUT_SIZE, generator=generator)


def test_registry_lists_all_backbones_sorted():
    names = list_backbones()
    assert names == sorted(names)
    assert set(EXPECTED_PARAMETERS_MILLIONS) | {"mobilefacenet"} <= set(names)


@pytest.mark.slow  # over 3 s: full suite (CI) only, not the inner loop
@pytest.mark.parametrize("name", [n for n in list_backbones() if n not in HEAVY_BACKBONES])
def test_forward_backward_reaches_stem(name):
    torch.manual_seed(0)
    model = create_backbone(name, input_size=SMALL_INPUT_SIZE, embedding_size=64).train()
    embeddings = model(_images())  # (B, 64)
    assert embeddings.shape == (BATCH_SIZE, 64)
    assert embeddings.dtype == torch.float32
    assert torch.isfinite(embeddings).all()
    embeddings.square().sum().backward()
    stem_grad = _stem_conv(model).weight.grad
    assert stem_grad is not None
    assert torch.isfinite(stem_grad).all()
    assert stem_grad.abs().sum() > 0


@pytest.mark.slow  # over 3 s: full suite (CI) only, not the inner loop
@pytest.mark.parametrize("name", list_backbones())
def test_parameter_count_at_112(name):
    with torch.device("meta"):  # no memory or init cost, even for iresnet200
        model = create_backbone(name, input_size=112, embedding_size=512)
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    if name in EXPECTED_PARAMETERS_MILLIONS:
        assert abs(millions - EXPECTED_PARAMETERS_MILLIONS[name]) < 0.1, f"{name}: {millions:.3f}M"
    else:
        low, high = MOBILEFACENET_PARAMETER_RANGE_MILLIONS
        assert low <= millions <= high, f"{name}: {millions:.3f}M"


def test_iresnet_embedding_bn_scale_is_frozen_at_one():
    model = create_backbone("iresnet18", input_size=SMALL_INPUT_SIZE)
    assert not model.features.weight.requires_grad
    assert torch.all(model.features.weight == 1.0)


@pytest.mark.parametrize("name", REPRESENTATIVE_BACKBONES)
def test_embedding_head_runs_in_fp32_under_bf16_autocast(name):
    torch.manual_seed(0)
    model = create_backbone(name, input_size=SMALL_INPUT_SIZE).train()
    head_linear = _embedding_linear(model)
    seen_dtypes = {}

    def record_dtypes(module, inputs, output):
        seen_dtypes["input"] = inputs[0].dtype
        seen_dtypes["output"] = output.dtype

    handle = head_linear.register_forward_hook(record_dtypes)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            embeddings = model(_images())
            # Sanity check that autocast was really active for the body of the network.
            assert torch.is_autocast_enabled("cpu")
    finally:
        handle.remove()
    assert seen_dtypes == {"input": torch.float32, "output": torch.float32}
    assert embeddings.dtype == torch.float32
    assert torch.isfinite(embeddings).all()


@pytest.mark.parametrize("name", REPRESENTATIVE_BACKBONES)
@pytest.mark.parametrize("train_mode", [True, False], ids=["train", "eval"])
def test_activation_checkpointing_matches_plain_forward_backward(name, train_mode):
    results = []
    for use_checkpointing in (False, True):
        torch.manual_seed(0)  # identical weights for both models
        model = create_backbone(name, input_size=SMALL_INPUT_SIZE, embedding_size=64,
                                activation_checkpointing=use_checkpointing)
        model.train(train_mode)
        embeddings = model(_images())
        embeddings.square().sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        results.append((embeddings.detach(), grads, buffers))
    (plain_out, plain_grads, plain_buffers), (ckpt_out, ckpt_grads, ckpt_buffers) = results

    torch.testing.assert_close(ckpt_out, plain_out, rtol=0, atol=1e-5)
    assert ckpt_grads.keys() == plain_grads.keys() and plain_grads
    for param_name, plain_grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[param_name], plain_grad, rtol=1e-5, atol=1e-5,
                                   msg=lambda m, n=param_name: f"grad {n}: {m}")
    # The backward recomputation must not update BatchNorm running statistics a second time.
    for buffer_name, plain_buffer in plain_buffers.items():
        torch.testing.assert_close(ckpt_buffers[buffer_name], plain_buffer, rtol=0, atol=1e-6,
                                   msg=lambda m, n=buffer_name: f"buffer {n}: {m}")


def test_unknown_backbone_names_closest_match():
    with pytest.raises(FaceCLError) as excinfo:
        create_backbone("iresnet05")
    message = str(excinfo.value)
    assert "\n" not in message
    assert "'iresnet05'" in message
    assert "closest match: 'iresnet50'" in message
    for name in list_backbones():
        assert name in message


def test_unknown_backbone_option_is_a_user_error():
    with pytest.raises(FaceCLError, match="width_multiplier"):
        create_backbone("iresnet18", input_size=SMALL_INPUT_SIZE, width_multiplier=2.0)


@pytest.mark.parametrize("name", REPRESENTATIVE_BACKBONES)
def test_input_size_must_be_multiple_of_16(name):
    with pytest.raises(FaceCLError, match="input_size"):
        create_backbone(name, input_size=100)
