# Unit tests of the ViT family, mobilefacenet_large / _mbf, iresnet2060 and the outside-the-model wrappers.
"""Shapes, published parameter counts, token masking, drop path, SDPA attention against a hand-written
reference, seeded determinism, activation checkpointing / channels_last / torch.compile against eager."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from toolkit.errors import FaceCLError
from toolkit.models import apply_activation_checkpointing, create_backbone, prepare_backbone
from toolkit.models.vit import DropPath, SelfAttention, VisionTransformer

SMALL = dict(input_size=32, patch_size=8)  # 4 x 4 = 16 tokens
BATCH = 4

# Published hyper-parameters (arcface_torch backbones/__init__.py and vit.py): name -> (embed dim, depth).
# Everything else is common: patch 9 at 112 (12 x 12 = 144 tokens), MLP ratio 4, qkv without bias.
PUBLISHED_VIT = {"vit_t": (256, 12), "vit_s": (512, 12), "vit_b": (512, 24), "vit_l": (768, 24),
                 "vit_h": (1024, 48)}


def _tiny_vit(**overrides) -> VisionTransformer:
    options = dict(embed_dim=32, depth=2, embedding_size=16, mask_ratio=0.0, drop_path=0.0, **SMALL)
    options.update(overrides)
    return VisionTransformer(**options)


def _images(seed: int = 0, size: int = 32, batch: int = BATCH) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------
# Parameter counts of the published architectures, restated independently
# ----------------------------------------------------------------------------------------


def published_vit_parameters(embed: int, depth: int, embedding: int = 512, tokens: int = 144, patch: int = 9) -> int:
    """Count of arcface_torch's VisionTransformer, from its layer list (not from our module)."""
    layer_norm = 2 * embed
    block = (2 * layer_norm                        # norm1, norm2
             + embed * 3 * embed                   # qkv, bias=False
             + embed * embed + embed               # proj
             + embed * 4 * embed + 4 * embed       # mlp fc1
             + 4 * embed * embed + embed)          # mlp fc2
    patch_embed = 3 * patch * patch * embed + embed
    feature = tokens * embed * embed + 2 * embed + embed * embedding + 2 * embedding  # Linear, BN, Linear, BN
    return patch_embed + tokens * embed + embed + depth * block + layer_norm + feature  # + pos_embed, mask_token


def published_mbf_large_parameters(embedding: int = 512, scale: int = 4, blocks=(2, 8, 12, 4)) -> int:
    """Count of arcface_torch's get_mbf_large from its ConvBlock/LinearBlock/DepthWise/GDC definitions."""
    def conv(cin, cout, k, groups=1):
        return cin // groups * cout * k * k

    def conv_block(cin, cout, k, groups=1):  # conv + BN + PReLU
        return conv(cin, cout, k, groups) + 2 * cout + cout

    def linear_block(cin, cout, k, groups=1):  # conv + BN
        return conv(cin, cout, k, groups) + 2 * cout

    def depthwise(cin, cout, groups):  # 1x1 to `groups`, dw 3x3, 1x1 linear to cout
        return conv_block(cin, groups, 1) + conv_block(groups, groups, 3, groups) + linear_block(groups, cout, 1)

    s = scale
    total = conv_block(3, 64 * s, 3)
    total += blocks[0] * depthwise(64 * s, 64 * s, 128)     # blocks[0] > 1: a Residual of DepthWise(groups=128)
    total += depthwise(64 * s, 64 * s, 128) + blocks[1] * depthwise(64 * s, 64 * s, 128)
    total += depthwise(64 * s, 128 * s, 256) + blocks[2] * depthwise(128 * s, 128 * s, 256)
    total += depthwise(128 * s, 128 * s, 512) + blocks[3] * depthwise(128 * s, 128 * s, 256)
    total += conv_block(128 * s, 512, 1)
    total += linear_block(512, 512, 7, groups=512) + 512 * embedding + 2 * embedding  # GDC
    return total


def published_iresnet_parameters(layers, embedding: int = 512) -> int:
    """Count of arcface_torch's IResNet(IBasicBlock, layers) at 112x112 (fc over 512 x 7 x 7)."""
    total = 3 * 64 * 9 + 2 * 64 + 64  # conv1, bn1, prelu
    inplanes = 64
    for planes, num_blocks in zip((64, 128, 256, 512), layers):
        for index in range(num_blocks):
            cin = inplanes if index == 0 else planes
            total += 2 * cin + cin * planes * 9 + 2 * planes + planes + planes * planes * 9 + 2 * planes
            if index == 0:  # stride 2: conv1x1 + BN shortcut
                total += cin * planes + 2 * planes
        inplanes = planes
    return total + 2 * 512 + 512 * 49 * embedding + embedding + 2 * embedding  # bn2, fc, features


def test_vit_parameter_counts_match_the_published_architectures(capsys):
    for name, (embed, depth) in PUBLISHED_VIT.items():
        with torch.device("meta"):
            model = create_backbone(name, embedding_size=512)
        count = _num_params(model)
        with capsys.disabled():
            print(f"\n{name}: {count:,} parameters ({count / 1e6:.2f}M) at 112x112 / 512-d")
        assert count == published_vit_parameters(embed, depth), name


@pytest.mark.slow  # over 3 s: full suite (CI) only, not the inner loop
def test_mobilefacenet_large_and_iresnet2060_counts_match_the_published_architectures(capsys):
    with torch.device("meta"):
        mbf = create_backbone("mobilefacenet_large")
        r2060 = create_backbone("iresnet2060")
    with capsys.disabled():
        print(f"\nmobilefacenet_large: {_num_params(mbf):,}; iresnet2060: {_num_params(r2060):,}")
    assert _num_params(mbf) == published_mbf_large_parameters()
    assert _num_params(r2060) == published_iresnet_parameters((3, 128, 1024 - 128, 3))
    # The restatement is a real check: it also reproduces a count the repository already pinned.
    with torch.device("meta"):
        assert _num_params(create_backbone("iresnet50")) == published_iresnet_parameters((3, 4, 14, 3))


def test_mobilefacenet_mbf_count_matches_the_published_layer_list():
    # arcface_torch get_mbf = MobileFaceNet(blocks=(1, 4, 6, 2), scale=2) at 112x112, 512-d, by hand from
    # mobilefacenet.py. ConvBlock(cin, cout, k, groups): conv cout * cin/groups * k * k, BN 2 * cout, PReLU cout.
    # LinearBlock: conv + BN. DepthWise(cin, cout, groups=g): ConvBlock 1x1 cin -> g (cin g + 3 g), ConvBlock
    # depthwise 3x3 g (9 g + 3 g), LinearBlock 1x1 g -> cout (g cout + 2 cout): g (cin + cout + 15) + 2 cout.
    stem = 128 * 3 * 9 + 2 * 128 + 128                   # layers.0: ConvBlock(3, 128, 3x3, s2)          3,840
    grouped = 128 * 2 * 9 + 2 * 128 + 128                # layers.1: ConvBlock(128, 128, 3x3, groups 64)  2,688
    dw_128_128_g128 = 128 * (128 + 128 + 15) + 2 * 128   # DepthWise(128, 128, groups=128)               34,944
    dw_128_256_g256 = 256 * (128 + 256 + 15) + 2 * 256   # DepthWise(128, 256, groups=256)              102,656
    dw_256_256_g256 = 256 * (256 + 256 + 15) + 2 * 256   # DepthWise(256, 256, groups=256)              135,424
    dw_256_256_g512 = 512 * (256 + 256 + 15) + 2 * 256   # DepthWise(256, 256, groups=512)              270,336
    trunk = (stem + grouped
             + dw_128_128_g128 + 4 * dw_128_128_g128     # layers.2 (s2), layers.3: Residual of 4
             + dw_128_256_g256 + 6 * dw_256_256_g256     # layers.4 (s2), layers.5: Residual of 6
             + dw_256_256_g512 + 2 * dw_256_256_g256)    # layers.6 (s2), layers.7: Residual of 2
    conv_sep = 256 * 512 + 2 * 512 + 512                 # ConvBlock(256, 512, 1x1)                     132,608
    gdc = 512 * 7 * 7 + 2 * 512 + 512 * 512 + 2 * 512    # LinearBlock dw 7x7, Linear(512, 512), BN1d   289,280
    assert trunk == 1_637_632
    assert trunk + conv_sep + gdc == 2_059_520
    with torch.device("meta"):
        model = create_backbone("mobilefacenet_mbf", embedding_size=512)
    assert _num_params(model) == 2_059_520
    assert len(model.fsdp_units()) == 1 + 4 + 1 + 6 + 1 + 2  # the DepthWise blocks
    with torch.device("meta"):  # and ours differs from it: the paper layout, not a narrower mbf
        assert _num_params(create_backbone("mobilefacenet", embedding_size=512)) < 1_300_000


# ----------------------------------------------------------------------------------------
# Shapes and the embedding head
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PUBLISHED_VIT))
def test_vit_shapes_at_112_on_meta(name):
    with torch.device("meta"):
        model = create_backbone(name, embedding_size=512, mask_ratio=0.05).train()
        out = model(torch.empty(2, 3, 112, 112))
    assert model.num_tokens == 144 and len(model.fsdp_units()) == PUBLISHED_VIT[name][1]
    assert out.shape == (2, 512) and out.dtype == torch.float32


@pytest.mark.parametrize("name", ["vit_t", "mobilefacenet_large", "mobilefacenet_mbf"])
def test_forward_shapes_and_fp32_head_under_bf16_autocast(name):
    torch.manual_seed(0)
    options = dict(SMALL) if name.startswith("vit") else {"input_size": 32}
    model = create_backbone(name, embedding_size=64, **options).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(_images())
    assert out.shape == (BATCH, 64) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_reduced_image_size_sets_the_token_grid():
    assert _tiny_vit(input_size=32, patch_size=8).num_tokens == 16
    assert _tiny_vit(input_size=112, patch_size=9).num_tokens == 144  # 112 = 12 * 9 + 4 uncovered pixels


@pytest.mark.parametrize("bad", [dict(mask_ratio=1.0), dict(mask_ratio=-0.1), dict(drop_path=1.5),
                                 dict(patch_size=0), dict(patch_size=64)])
def test_bad_vit_options_name_the_value(bad):
    (key, value), = bad.items()
    with pytest.raises(FaceCLError, match=key):
        create_backbone("vit_t", **{**SMALL, **bad})


def test_vit_options_are_rejected_by_convolutional_backbones():
    with pytest.raises(FaceCLError, match="drop_path"):
        create_backbone("iresnet18", input_size=32, drop_path=0.1)


# ----------------------------------------------------------------------------------------
# Attention, masking, drop path, determinism
# ----------------------------------------------------------------------------------------


def test_attention_uses_sdpa_and_matches_a_hand_written_softmax():
    torch.manual_seed(0)
    attention = SelfAttention(dim=32, num_heads=8)
    x_BTD = torch.randn(3, 10, 32)
    calls = []
    original = F.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    F.scaled_dot_product_attention = counting_sdpa
    try:
        out = attention(x_BTD)
    finally:
        F.scaled_dot_product_attention = original
    assert calls == [torch.Size([3, 8, 10, 4])]  # (B, heads, T, head dim)
    # Reference: per-head softmax(q k^T / sqrt(d)) v written out.
    q, k, v = (x_BTD @ attention.qkv.weight.T).chunk(3, dim=-1)  # each (B, T, D)
    heads = [torch.softmax(q[..., h * 4:(h + 1) * 4] @ k[..., h * 4:(h + 1) * 4].transpose(1, 2) / 2.0, dim=-1)
             @ v[..., h * 4:(h + 1) * 4] for h in range(8)]
    expected = torch.cat(heads, dim=-1) @ attention.proj.weight.T + attention.proj.bias
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def _block_input_tokens(model, images) -> int:
    seen = []
    handle = model.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    try:
        model(images)
    finally:
        handle.remove()
    return seen[0]


def test_masking_drops_tokens_in_training_only():
    model = _tiny_vit(mask_ratio=0.25)
    assert _block_input_tokens(model.train(), _images()) == 12  # int(16 * 0.75)
    assert _block_input_tokens(model.eval(), _images()) == 16


def _patch_perturbed(images, token: int, patch: int = 8, grid: int = 4):
    row, col = divmod(token, grid)
    out = images.clone()
    out[:, :, row * patch:(row + 1) * patch, col * patch:(col + 1) * patch] += 3.0
    return out


def test_masked_tokens_do_not_reach_the_output_in_training():
    torch.manual_seed(0)
    model = _tiny_vit(mask_ratio=0.5).train()
    images = _images(batch=1)
    torch.manual_seed(123)
    kept = model.sample_kept_tokens(2, images.device)[0].tolist()  # what the forward below draws for sample 0
    masked = sorted(set(range(16)) - set(kept))
    assert len(kept) == 8 and len(masked) == 8

    def run(x):
        torch.manual_seed(123)
        return model(x.expand(2, -1, -1, -1).contiguous())  # batch of 2: BN1d needs > 1 sample

    base = run(images)[0]
    torch.testing.assert_close(run(_patch_perturbed(images, masked[0]))[0], base, rtol=0, atol=0)
    assert not torch.allclose(run(_patch_perturbed(images, kept[0]))[0], base)


def test_no_masking_at_evaluation():
    torch.manual_seed(0)
    model = _tiny_vit(mask_ratio=0.5).eval()
    images = _images()
    base = model(images)
    torch.testing.assert_close(model(images), base, rtol=0, atol=0)  # nothing random
    for token in range(16):  # every patch matters
        assert not torch.allclose(model(_patch_perturbed(images, token)), base), token


def test_drop_path_drops_whole_samples_and_keeps_the_mean():
    drop = DropPath(0.3).train()
    x = torch.ones(20000, 2, 3)
    torch.manual_seed(0)
    y = drop(x)
    per_sample = y[:, 0, 0]
    values = per_sample.unique().tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / 0.7)
    assert torch.all(y == per_sample[:, None, None])  # one draw per sample
    assert abs(per_sample.eq(0).float().mean().item() - 0.3) < 0.02
    assert torch.equal(drop.eval()(x), x)


def test_drop_path_rates_rise_linearly_over_the_blocks():
    model = _tiny_vit(depth=5, drop_path=0.2)
    assert [block.drop_path.drop_prob for block in model.blocks] == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])


def test_same_seed_same_model_and_training_outputs():
    def run(seed):
        torch.manual_seed(seed)
        model = create_backbone("vit_t", embedding_size=32, mask_ratio=0.25, drop_path=0.1, **SMALL).train()
        return model.state_dict(), model(_images())

    (state_a, out_a), (state_b, out_b), (_, out_c) = run(7), run(7), run(8)
    assert all(torch.equal(state_a[key], state_b[key]) for key in state_a)
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)
    assert not torch.allclose(out_a, out_c)


# ----------------------------------------------------------------------------------------
# Wrappers applied from outside: activation checkpointing, channels_last, compile
# ----------------------------------------------------------------------------------------


def _assert_grads_close(actual: dict, expected: dict, rtol: float) -> None:
    """Per tensor: max |difference| within rtol x the tensor's largest gradient (sums in another order),
    with a floor of 1e-3 x the largest gradient of the model for gradients that are zero up to rounding
    (biases in front of a BatchNorm)."""
    assert actual.keys() == expected.keys() and expected
    floor = 1e-3 * max(want.abs().max().item() for want in expected.values())
    for key, want in expected.items():
        scale = want.abs().max().item()
        worst = (actual[key] - want).abs().max().item()
        assert worst <= rtol * scale + floor, f"grad {key}: max diff {worst:.3g} vs largest grad {scale:.3g}"


def _train_step_results(model, images, seed=0):
    torch.manual_seed(seed)  # masking and drop path draw the same numbers in both runs
    out = model(images)
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads, {n: b.clone() for n, b in model.named_buffers()}


@pytest.mark.parametrize("name", ["vit_t", "mobilefacenet_large"])
def test_activation_checkpointing_from_outside_matches_plain(name):
    options = dict(SMALL, mask_ratio=0.25, drop_path=0.2) if name == "vit_t" else {"input_size": 32}
    torch.manual_seed(0)
    plain = create_backbone(name, embedding_size=32, **options).train()
    checkpointed = copy.deepcopy(plain)
    keys_before = list(checkpointed.state_dict())
    apply_activation_checkpointing(checkpointed)
    assert list(checkpointed.state_dict()) == keys_before  # no wrapper module, no renamed keys
    assert all(type(unit).__name__.startswith("Checkpointed") for unit in checkpointed.fsdp_units())

    # Count calls of the model's own block forward on one checkpointed unit: forward + recomputation.
    unit = checkpointed.fsdp_units()[0]
    block_class = type(unit).__mro__[2]  # Checkpointed<Block> -> checkpointing mixin -> <Block>
    original_forward = block_class.forward
    unit_calls = []

    def counting_forward(self, *args, **kwargs):
        if self is unit:
            unit_calls.append(1)
        return original_forward(self, *args, **kwargs)

    block_class.forward = counting_forward
    try:
        images = _images()
        plain_out, plain_grads, plain_buffers = _train_step_results(plain, images)
        ckpt_out, ckpt_grads, ckpt_buffers = _train_step_results(checkpointed, images)
    finally:
        block_class.forward = original_forward
    assert len(unit_calls) == 2
    torch.testing.assert_close(ckpt_out, plain_out, rtol=0, atol=1e-6)
    _assert_grads_close(ckpt_grads, plain_grads, rtol=1e-5)
    for key in plain_buffers:  # running statistics updated once, not twice
        torch.testing.assert_close(ckpt_buffers[key], plain_buffers[key], rtol=0, atol=0, msg=key)


def test_checkpointed_model_deep_copies_into_an_independent_model():
    torch.manual_seed(0)
    model = apply_activation_checkpointing(_tiny_vit().train())
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for param in clone.parameters():
            param.add_(0.1)
    images = _images()
    assert not torch.allclose(clone(images), model(images))  # the copy runs its own weights


def test_create_backbone_flag_applies_checkpointing():
    model = create_backbone("vit_t", activation_checkpointing=True, **SMALL)
    assert all(type(unit).__name__ == "CheckpointedTransformerBlock" for unit in model.fsdp_units())


@pytest.mark.parametrize("name", ["iresnet18", "mobilefacenet_large", "vit_t"])
def test_channels_last_matches_eager(name):
    options = dict(SMALL) if name == "vit_t" else {"input_size": 32}
    torch.manual_seed(0)
    eager = create_backbone(name, embedding_size=32, **options).train()
    nhwc = prepare_backbone(copy.deepcopy(eager), channels_last=True)
    conv = next(m for m in nhwc.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    images = _images()
    eager_out, eager_grads, _ = _train_step_results(eager, images)
    nhwc_out, nhwc_grads, _ = _train_step_results(nhwc, images)
    # NHWC convolutions sum in another order; through 18-30 train-mode BN layers on a batch of 4 that
    # moves outputs (unit scale) by up to ~3e-5 and the first conv's gradient by ~3e-4 of its size. A
    # layout mistake would move them by O(1).
    torch.testing.assert_close(nhwc_out, eager_out, rtol=1e-4, atol=1e-4)
    _assert_grads_close(nhwc_grads, eager_grads, rtol=2e-3)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_t", "iresnet18"])
def test_compile_matches_eager_with_checkpointing(name):
    """Per-block torch.compile (inductor), then activation checkpointing around it: equal to eager."""
    options = dict(SMALL, mask_ratio=0.25) if name == "vit_t" else {"input_size": 32}
    torch.manual_seed(0)
    eager = create_backbone(name, embedding_size=32, **options).train()
    compiled = prepare_backbone(copy.deepcopy(eager), compile=True)
    apply_activation_checkpointing(compiled)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    images = _images()
    for step in range(2):  # second step: compiled code reused
        eager_out, eager_grads, _ = _train_step_results(eager, images, seed=step)
        comp_out, comp_grads, _ = _train_step_results(compiled, images, seed=step)
        torch.testing.assert_close(comp_out, eager_out, rtol=1e-4, atol=1e-5)
        # Inductor fuses and reorders the reductions: through iresnet18's train-mode BN layers the first
        # conv's gradient moves by ~3.4e-4 of its size (as with channels_last, see above).
        _assert_grads_close(comp_grads, eager_grads, rtol=2e-3)
        eager.zero_grad()
        compiled.zero_grad()
    eager.eval()
    compiled.eval()
    torch.testing.assert_close(compiled(images), eager(images), rtol=1e-4, atol=1e-5)


def test_compile_after_checkpointing_is_refused():
    model = apply_activation_checkpointing(_tiny_vit())
    with pytest.raises(ValueError, match="before apply_activation_checkpointing"):
        prepare_backbone(model, compile=True)


def test_vit_mask_keeps_at_least_one_token():
    model = _tiny_vit(input_size=16, patch_size=16, mask_ratio=0.9)
    assert model.num_tokens == 1 and model.num_kept_tokens() == 1
    assert math.isfinite(model.train()(_images(size=16)).sum().item())


# ----------------------------------------------------------------------------------------
# Activation memory estimate against memory measured on CPU
# ----------------------------------------------------------------------------------------


def _bytes_kept_by_forward(model, images) -> int:
    """Memory a training forward leaves allocated (the autograd graph's saved tensors), by the profiler."""
    warm = model(images)  # first-call allocations (thread pools, caches) happen outside the measurement
    del warm
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        out = model(images)
    allocated = sum(event.self_cpu_memory_usage for event in prof.key_averages())
    return allocated - out.numel() * out.element_size()


@pytest.mark.parametrize("name", ["iresnet18", "vit_t", "mobilefacenet_large"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_activation_estimate_matches_memory_measured_on_cpu(name, checkpointing):
    from toolkit.models.memory import activation_footprint

    options = dict(SMALL, mask_ratio=0.25) if name == "vit_t" else {"input_size": 32}
    torch.manual_seed(0)
    model = create_backbone(name, embedding_size=32, activation_checkpointing=checkpointing, **options).train()
    footprint = activation_footprint(model, 32)  # traced on fake tensors: no real memory
    batch = 8
    measured = _bytes_kept_by_forward(model, _images(batch=batch))
    if checkpointing:
        # After forward a checkpointed model holds the block inputs only; one block's saves come back
        # during backward (that part is not visible here, so it is checked against the plain run below).
        expected = (footprint.outside_units + footprint.unit_inputs) * batch
    else:
        expected = footprint.bytes_per_sample(checkpointing=False) * batch
    assert abs(measured - expected) <= 0.03 * expected, (measured, expected)
    assert footprint.largest_unit * footprint.num_units >= footprint.units_total > footprint.largest_unit
    assert footprint.bytes_per_sample(checkpointing=True) < footprint.bytes_per_sample(checkpointing=False)


@pytest.mark.slow  # over 3 s: full suite (CI) only, not the inner loop
def test_plan_prints_activations_for_the_vit_l_recipe():
    """launch/plan.py on the WebFace42M vit_l recipe at 64 ranks: per-rank activations in both regimes."""
    import subprocess
    import sys
    from pathlib import Path

    from toolkit.models.memory import activation_footprint

    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "launch/plan.py", "--recipe", "recipes/webface42m_vit_l.yaml",
                           "--world-size", "64", "--num-classes", "2059906"], cwd=repo, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    with torch.device("meta"):
        model = create_backbone("vit_l", mask_ratio=0.05)
    checkpointed = activation_footprint(model, 112, torch.bfloat16).bytes_per_sample(True) * 48
    row = next(line for line in lines if line.strip().startswith("backbone activations (48 samples, bf16, checkpointed)"))
    assert row.endswith(f"{checkpointed / 2**20:.1f} MiB"), row
    assert sum(line.strip().startswith("total GPU per rank") for line in lines) == 1
