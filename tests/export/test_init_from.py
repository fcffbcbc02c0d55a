# init-from: arcface_torch backbones (their module naming, re-stated here) and per-rank softmax files map onto ours.

import pytest
import torch
from torch import nn

from toolkit.errors import CheckpointError
from toolkit.export.consolidate import save_consolidated
from toolkit.export.init_from import load_init_state, merge_arcface_softmax
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


class TheirMbfLarge(nn.Module):            # MobileFaceNet(blocks=(2, 8, 12, 4), scale=4): layers, conv_sep, features
    def __init__(self, num_features=512):
        super().__init__()
        self.layers = nn.ModuleList([
            conv_block(3, 256, 3, 2, 1), their_residual(256, 2, 128), TheirDepthWise(256, 256, False, 2, 128),
            their_residual(256, 8, 128), TheirDepthWise(256, 512, False, 2, 256), their_residual(512, 12, 256),
            TheirDepthWise(512, 512, False, 2, 512), their_residual(512, 4, 256)])
        self.conv_sep = conv_block(512, 512, 1, 1, 0)
        self.features = nn.Module()
        self.features.layers = nn.Sequential(conv_block(512, 512, 7, 1, 0, groups=512, act=False), nn.Flatten(),
                                             nn.Linear(512, num_features, bias=False), nn.BatchNorm1d(num_features))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.features.layers(self.conv_sep(x))


@pytest.mark.parametrize("ours, theirs, wrap", [
    ("iresnet18", lambda: TheirIResNet((2, 2, 2, 2)), "module."),
    ("mobilefacenet_large", TheirMbfLarge, ""),
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
    with pytest.raises(CheckpointError, match="does not correspond|tensors, FaceCL"):
        load_init_state(path, backbone="iresnet34")
    with pytest.raises(CheckpointError, match="no arcface_torch counterpart"):
        load_init_state(path, backbone="mobilefacenet")


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
