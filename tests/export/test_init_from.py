# init-from: arcface_torch backbones (their module naming, re-stated here) and per-rank softmax files map onto ours.

import pytest
import torch
from torch import nn

from toolkit.errors import CheckpointError
from toolkit.export.consolidate import save_consolidated
from toolkit.export.init_from import load_init_state, map_arcface_backbone, merge_arcface_softmax
from toolkit.models import create_backbone


# ----- a minimal re-statement of arcface_torch's published module naming and shapes (not their code) -----
def bn_stats_(module: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
            if isinstance(m, nn.PReLU):
                m.weight.copy_(torch.rand(m.weight.shape, generator=generator) * 0.5)
    return module.eval()


class TheirBasicBlock(nn.Module):          # arcface_torch iresnet.IBasicBlock attribute names
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn2, self.prelu = nn.BatchNorm2d(cout), nn.PReLU(cout)
        self.conv2, self.bn3 = nn.Conv2d(cout, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class TheirIResNet(nn.Module):             # conv1, bn1, prelu, layer1..4, bn2, dropout, fc, features
    def __init__(self, blocks, num_features=512):
        super().__init__()
        self.conv1, self.bn1, self.prelu = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64)
        cin, layers = 64, []
        for width, count in zip((64, 128, 256, 512), blocks):
            layers.append(nn.Sequential(TheirBasicBlock(cin, width, 2),
                                        *[TheirBasicBlock(width, width, 1) for _ in range(count - 1)]))
            cin = width
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.bn2, self.dropout = nn.BatchNorm2d(512), nn.Dropout(0.0)
        self.fc, self.features = nn.Linear(512 * 7 * 7, num_features), nn.BatchNorm1d(num_features)

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.features(self.fc(torch.flatten(self.dropout(self.bn2(x)), 1)))


def conv_block(cin, cout, k, s, p, groups=1, act=True):   # ConvBlock / LinearBlock: .layers = conv, bn(, prelu)
    block = nn.Module()
    parts = [nn.Conv2d(cin, cout, k, s, p, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    block.layers = nn.Sequential(*parts, *([nn.PReLU(cout)] if act else []))
    block.forward = block.layers.forward
    return block


class TheirDepthWise(nn.Module):           # .layers = ConvBlock 1x1 -> groups, ConvBlock dw, LinearBlock 1x1
    def __init__(self, cin, cout, residual, stride, groups):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(conv_block(cin, groups, 1, 1, 0), conv_block(groups, groups, 3, stride, 1, groups),
                                    conv_block(groups, cout, 1, 1, 0, act=False))

    def forward(self, x):
        return self.layers(x) + x if self.residual else self.layers(x)


def their_residual(c, count, groups):      # Residual: .layers = DepthWise x count
    block = nn.Module()
    block.layers = nn.Sequential(*[TheirDepthWise(c, c, True, 1, groups) for _ in range(count)])
    block.forward = block.layers.forward
    return block


class TheirMobileFaceNet(nn.Module):       # MobileFaceNet(blocks, scale): layers, conv_sep, features (GDC)
    def __init__(self, blocks=(2, 8, 12, 4), scale=4, num_features=512, gdc_kernel=7):
        super().__init__()
        c1, c2 = 64 * scale, 128 * scale
        first = (conv_block(c1, c1, 3, 1, 1, groups=64) if blocks[0] == 1   # mbf: one grouped conv, 64 groups
                 else their_residual(c1, blocks[0], 128))
        self.layers = nn.ModuleList([
            conv_block(3, c1, 3, 2, 1), first, TheirDepthWise(c1, c1, False, 2, 128),
            their_residual(c1, blocks[1], 128), TheirDepthWise(c1, c2, False, 2, 256),
            their_residual(c2, blocks[2], 256),
            TheirDepthWise(c2, c2, False, 2, 512), their_residual(c2, blocks[3], 256)])
        self.conv_sep = conv_block(c2, 512, 1, 1, 0)
        self.features = nn.Module()
        self.features.layers = nn.Sequential(conv_block(512, 512, gdc_kernel, 1, 0, groups=512, act=False),
                                             nn.Flatten(), nn.Linear(512, num_features, bias=False),
                                             nn.BatchNorm1d(num_features))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.features.layers(self.conv_sep(x))


def TheirMbfLarge():                       # get_mbf_large: blocks (2, 8, 12, 4), scale 4
    return TheirMobileFaceNet((2, 8, 12, 4), 4)


def TheirMbf():                            # get_mbf: blocks (1, 4, 6, 2), scale 2
    return TheirMobileFaceNet((1, 4, 6, 2), 2)


class TheirViTBlock(nn.Module):            # vit.Block: norm1, norm2, attn (qkv without bias, proj), mlp (fc1, fc2)
    def __init__(self, dim, heads=8):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn, self.mlp = nn.Module(), nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim)
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):                  # pre-norm; softmax(q k^T / sqrt(d_head)) v; MLP with ReLU6
        batch, tokens, dim = x.shape
        qkv = self.attn.qkv(self.norm1(x)).reshape(batch, tokens, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-2, -1) * (dim // self.heads) ** -0.5).softmax(dim=-1)
        x = x + self.attn.proj((weights @ v).transpose(1, 2).reshape(batch, tokens, dim))
        return x + self.mlp.fc2(torch.nn.functional.relu6(self.mlp.fc1(self.norm2(x))))


class TheirViT(nn.Module):                 # vit.VisionTransformer, norm_layer "ln", patch 9, no class token
    def __init__(self, dim, depth, num_features=512, image=112, patch=9, mask_ratio=0.1):
        super().__init__()
        self.tokens, self.dim, self.mask_ratio = (image // patch) ** 2, dim, mask_ratio
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, patch)
        self.pos_embed = nn.Parameter(torch.randn(1, self.tokens, dim) * 0.02)
        self.blocks = nn.ModuleList([TheirViTBlock(dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.feature = nn.Sequential(nn.Linear(self.tokens * dim, dim, bias=False), nn.BatchNorm1d(dim, eps=2e-5),
                                     nn.Linear(dim, num_features, bias=False), nn.BatchNorm1d(num_features, eps=2e-5))
        self.mask_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)

    def forward(self, images):
        batch = images.shape[0]
        x = self.patch_embed.proj(images).flatten(2).transpose(1, 2) + self.pos_embed
        masking = self.training and self.mask_ratio > 0
        if masking:   # published: random_masking(x) is called without the ratio, so its default 0.1 applies
            keep = int(self.tokens * (1 - 0.1))
            shuffle = torch.argsort(torch.rand(batch, self.tokens), dim=1)
            restore = torch.argsort(shuffle, dim=1)
            x = torch.gather(x, 1, shuffle[:, :keep, None].repeat(1, 1, self.dim))
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        if masking:   # the mask token fills the dropped places after the final norm
            x = torch.cat([x, self.mask_token.repeat(batch, self.tokens - keep, 1)], dim=1)
            x = torch.gather(x, 1, restore[:, :, None].repeat(1, 1, self.dim))
        return self.feature(x.reshape(batch, self.tokens * self.dim))


THEIR_VIT_SIZES = {"vit_t": (256, 12), "vit_s": (512, 12), "vit_b": (512, 24), "vit_l": (768, 24), "vit_h": (1024, 48)}


def vit_stats_(module: nn.Module, seed: int) -> nn.Module:
    """Norm weights and biases off their init values, so that a swapped pair of tensors shows in the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=generator))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=generator))
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.copy_(0.02 * torch.randn(m.bias.shape, generator=generator))
    return bn_stats_(module, seed)


@pytest.mark.parametrize("ours, theirs, wrap", [
    ("iresnet18", lambda: TheirIResNet((2, 2, 2, 2)), "module."),
    ("mobilefacenet_large", TheirMbfLarge, ""),
    ("mobilefacenet_mbf", TheirMbf, "module."),
])
def test_arcface_backbone_gives_the_same_outputs(ours, theirs, wrap, tmp_path):
    torch.manual_seed(0)
    their_model = bn_stats_(theirs(), seed=1)
    path = tmp_path / "backbone.pth"
    torch.save({wrap + k: v for k, v in their_model.state_dict().items()}, path)
    state, centers = load_init_state(path, backbone=ours, embedding_size=512, image_size=112)
    assert centers is None
    model = create_backbone(ours)
    model.load_state_dict(state, strict=True)
    model.eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        assert torch.allclose(model(x), their_model(x), atol=1e-5, rtol=1e-5)


def test_train_v2_checkpoint_file_and_wrong_architecture(tmp_path):
    their_model = TheirIResNet((2, 2, 2, 2))
    path = tmp_path / "checkpoint_gpu_0.pt"
    torch.save({"state_dict_backbone": their_model.state_dict(), "epoch": 3}, path)
    state, _ = load_init_state(path, backbone="iresnet18")
    assert torch.equal(state["fc.weight"], their_model.state_dict()["fc.weight"])
    with pytest.raises(CheckpointError, match="tensor layer1.2.bn1.weight is missing"):
        load_init_state(path, backbone="iresnet34")
    with pytest.raises(CheckpointError, match="no arcface_torch counterpart"):
        load_init_state(path, backbone="mobilefacenet")


@pytest.mark.parametrize("ours", sorted(THEIR_VIT_SIZES))
def test_their_vit_state_dict_maps_at_every_size(ours):
    dim, depth = THEIR_VIT_SIZES[ours]
    with torch.device("meta"):  # names and shapes only: vit_h's 756M parameters cost nothing
        their = TheirViT(dim, depth).state_dict()
    state = map_arcface_backbone(their, ours)
    assert len(their) == 4 + 11 * depth + 2 + 12  # pos/mask/patch w+b; 11 per block; norm; Linear, BN(5), Linear, BN(5)
    assert {id(v) for v in state.values()} == {id(v) for v in their.values()}  # each of theirs used once
    assert state["patch_embed.weight"] is their["patch_embed.proj.weight"]
    assert state["blocks.0.norm2.bias"] is their["blocks.0.norm2.bias"]
    assert state["feature.3.running_var"] is their["feature.3.running_var"]


@pytest.mark.slow  # a few seconds: 12 blocks of 256, four forward passes
def test_their_vit_gives_the_same_outputs_in_eval_and_with_masking(tmp_path, capsys):
    # vit_t at 36x36 (4 x 4 tokens): every tensor of the 112x112 model but the token-count-sized ones, quickly.
    torch.manual_seed(0)
    their_model = vit_stats_(TheirViT(256, 12, num_features=64, image=36, mask_ratio=0.05), seed=2)
    torch.save(their_model.state_dict(), tmp_path / "model.pt")
    state, _ = load_init_state(tmp_path / "model.pt", backbone="vit_t", embedding_size=64, image_size=36)
    with torch.device("meta"):  # no init: the weights come from the file
        model = create_backbone("vit_t", embedding_size=64, input_size=36, mask_ratio=0.1)
    model.load_state_dict(state, strict=True, assign=True)
    x = torch.randn(4, 3, 36, 36)
    with torch.no_grad():
        ours_eval, theirs_eval = model.eval()(x), their_model.eval()(x)
        torch.manual_seed(5)
        ours_train = model.train()(x)
        torch.manual_seed(5)  # the same noise keeps the same 14 of 16 tokens; attention ignores their order
        theirs_train = their_model.train()(x)
    with capsys.disabled():
        print(f"\nvit_t (restated arcface_torch ViT, 36x36): max |ours - theirs| eval "
              f"{(ours_eval - theirs_eval).abs().max():.2e}, training with masking "
              f"{(ours_train - theirs_train).abs().max():.2e}")
    torch.testing.assert_close(ours_eval, theirs_eval, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_train, theirs_train, atol=1e-4, rtol=1e-4)


def _their_vit_state(size, **changes):
    with torch.device("meta"):
        their = dict(TheirViT(*THEIR_VIT_SIZES[size]).state_dict())
    for key, value in changes.items():
        if value is None:
            del their[key]
        else:
            their[key] = value
    return their


@pytest.mark.parametrize("size, changes, backbone, message", [
    ("vit_s", dict(), "vit_b", r"tensor blocks\.12\.norm1\.weight is missing \(FaceCL vit_b has shape \(512,\)\)"),
    ("vit_t", {"blocks.3.attn.qkv.weight": None}, "vit_t", r"tensor blocks\.3\.attn\.qkv\.weight is missing"),
    ("vit_t", {"patch_embed.proj.bias": None}, "vit_t",
     r"patch_embed\.proj\.bias is missing \(FaceCL vit_t patch_embed\.bias"),
    ("vit_t", {"blocks.0.mlp.fc1.bias": torch.empty(999, device="meta")}, "vit_t",
     r"tensor blocks\.0\.mlp\.fc1\.bias has shape \(999,\), FaceCL vit_t has \(1024,\)"),
    ("vit_t", {"head.weight": torch.empty(10, 512, device="meta")}, "vit_t",
     r"tensor head\.weight \(10, 512\) has no counterpart in FaceCL vit_t: not an arcface_torch vit_t / vit_t_dp005"),
    ("vit_t", {"blocks.0.norm1.weight": None, "blocks.0.norm1.bn.weight": torch.empty(144, device="meta")}, "vit_t",
     r"blocks\.0\.norm1\.bn\.weight \(144,\) has no counterpart"),  # their norm_layer="bn" variant
])
def test_a_wrong_missing_or_extra_tensor_is_a_one_line_error_naming_it(size, changes, backbone, message):
    with pytest.raises(CheckpointError, match=message) as error:
        map_arcface_backbone(_their_vit_state(size, **changes), backbone, where="model.pt")
    assert "\n" not in str(error.value) and str(error.value).startswith("model.pt: tensor ")


def test_errors_name_the_file_the_size_and_the_embedding(tmp_path):
    with torch.device("meta"):
        vit_b = TheirViT(512, 24).state_dict()
        mbf = TheirMbf().state_dict()
    with pytest.raises(CheckpointError, match=r"blocks\.12\.norm1\.weight \(512,\) has no counterpart in FaceCL vit_s "
                                              r"\(and 131 more\): not an arcface_torch vit_s / vit_s_dp005_mask_0"):
        map_arcface_backbone(vit_b, "vit_s")
    with pytest.raises(CheckpointError, match=r"feature\.2\.weight has shape \(512, 512\), FaceCL vit_b has "
                                              r"\(128, 512\): not an arcface_torch vit_b / vit_b_dp005_mask_005 with "
                                              r"embedding size 128 at 112x112"):
        map_arcface_backbone(vit_b, "vit_b", embedding_size=128)
    with pytest.raises(CheckpointError, match=r"pos_embed has shape \(1, 144, 512\), FaceCL vit_b has \(1, 16, 512\)"):
        map_arcface_backbone(vit_b, "vit_b", image_size=36)
    with pytest.raises(CheckpointError, match=r"pos_embed has shape \(1, 144, 512\), FaceCL vit_b has \(1, 196, 512\): "
                                              r".* at 112x112, patch 8$"):
        map_arcface_backbone(vit_b, "vit_b", patch_size=8)  # a recipe's model.patch_size: theirs is always 9
    with pytest.raises(CheckpointError, match=r"tensor layers\.1\.layers\.0\.weight \(128, 2, 3, 3\) has no "
                                              r"counterpart in FaceCL mobilefacenet_large"):
        map_arcface_backbone(mbf, "mobilefacenet_large")
    small = TheirViT(256, 12, image=18).state_dict()  # 2 x 2 tokens: a real file, cheaply
    del small["mask_token"]
    torch.save(small, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match=rf"^{tmp_path / 'model.pt'}: tensor mask_token is missing"):
        load_init_state(tmp_path / "model.pt", backbone="vit_t", image_size=18)


def test_a_vit_run_of_train_v2_gives_its_backbone_and_centers(tmp_path):
    # train_v2 with save_all_states, per rank: the backbone, Partial FC's `weight` (its rows of the classes),
    # AdamW's state (a ViT run) and the scheduler's; the centers are the same as an iresnet run's.
    torch.manual_seed(0)
    their_model = TheirViT(256, 12, num_features=32, image=18)
    full = torch.randn(10, 32)
    start = 0
    for rank, count in enumerate(split(10, 3)):
        weight = torch.nn.Parameter(full[start:start + count].clone())
        start += count
        optimizer = torch.optim.AdamW([{"params": their_model.parameters()}, {"params": [weight]}], lr=1e-3,
                                      weight_decay=0.1)
        weight.square().sum().backward()  # only the centers have gradients: AdamW keeps state for them
        optimizer.step()
        weight.data.copy_(full[start - count:start])
        scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=100)
        torch.save({"epoch": 1, "global_step": 7, "state_dict_backbone": their_model.state_dict(),
                    "state_dict_softmax_fc": {"weight": weight.detach()}, "state_optimizer": optimizer.state_dict(),
                    "state_lr_scheduler": {**scheduler.state_dict(), "warmup_iters": 10}},
                   tmp_path / f"checkpoint_gpu_{rank}.pt")
    state, centers = load_init_state(tmp_path / "checkpoint_gpu_0.pt", backbone="vit_t", embedding_size=32,
                                     image_size=18, softmax=tmp_path)
    assert torch.equal(centers, full)
    assert torch.equal(state["patch_embed.weight"], their_model.patch_embed.proj.weight)


def split(num_classes, world):
    return [num_classes // world + int(r < num_classes % world) for r in range(world)]


@pytest.mark.parametrize("world, naming", [(1, "rank_{}_softmax_weight.pt"), (3, "rank_{}_softmax_weight.pt"),
                                           (4, "softmax_fc_gpu_{}.pt"), (3, "checkpoint_gpu_{}.pt")])
def test_softmax_files_of_any_rank_count_merge_in_class_order(world, naming, tmp_path):
    full = torch.randn(10, 8)
    start = 0
    for rank, count in enumerate(split(10, world)):
        rows = full[start:start + count].clone()
        start += count
        value = {"state_dict_softmax_fc": {"weight": rows}} if naming.startswith("checkpoint") else rows
        torch.save(value, tmp_path / naming.format(rank))
        if naming.startswith("rank_"):
            torch.save(torch.zeros_like(rows), tmp_path / f"rank_{rank}_softmax_weight_mom.pt")  # skipped
    assert torch.equal(merge_arcface_softmax(tmp_path), full)


def test_softmax_missing_rank_and_foreign_split_are_refused(tmp_path):
    for rank in (0, 2):
        torch.save(torch.randn(3, 8), tmp_path / f"rank_{rank}_softmax_weight.pt")
    with pytest.raises(CheckpointError, match=r"rank\(s\) \[1\] missing"):
        merge_arcface_softmax(tmp_path)
    torch.save(torch.randn(5, 8), tmp_path / "rank_1_softmax_weight.pt")   # 11 classes: 4, 4, 3 expected
    with pytest.raises(CheckpointError, match="arcface_torch's split"):
        merge_arcface_softmax(tmp_path)


def test_planted_payload_in_a_softmax_file_never_runs(tmp_path):
    marker = tmp_path / "marker"

    class Planted:
        def __reduce__(self):
            return (marker.touch, ())

    torch.save({"weight": torch.randn(2, 4), "x": Planted()}, tmp_path / "softmax_fc_gpu_0.pt")
    with pytest.raises(CheckpointError, match="pickled object"):
        merge_arcface_softmax(tmp_path)
    assert not marker.exists()


def test_consolidated_file_of_ours_with_centers(tmp_path):
    model = create_backbone("mobilefacenet", embedding_size=64, input_size=32)
    centers = torch.randn(7, 64)
    path = tmp_path / "ours.safetensors"
    save_consolidated(path, model, {"backbone": "mobilefacenet", "embedding_size": 64, "image_size": 32},
                      head_centers=centers)
    state, loaded = load_init_state(path, backbone="mobilefacenet", embedding_size=64, image_size=32)
    assert torch.equal(loaded, centers)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with pytest.raises(CheckpointError, match="embedding_size=64"):
        load_init_state(path, backbone="mobilefacenet", embedding_size=128)
