# init-from with insightface's own arcface_torch code: every backbone of theirs maps onto ours; same outputs.
"""Runs their backbones/ and partial_fc_v2.py from a temporary copy (fixture `arcface_torch_copy`; skipped where
there is no insightface repository: tests/export/test_init_from.py re-states their naming for that case).

One patch of the copy, only where timm is not installed: their vit.py imports `DropPath, to_2tuple,
trunc_normal_` from `timm.models.layers`; that line is pointed at `_timm_shim.py` (TIMM_SHIM below: the same
three functions, a few lines) written next to it. Nothing else of theirs is changed. Their modules are
imported under a private package name and removed from sys.modules afterwards.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import re
import shutil
import sys
import warnings

import pytest
import torch
from torch import nn

from toolkit.export.arcface_names import ARCFACE_COUNTERPARTS, map_arcface_backbone
from toolkit.export.init_from import load_init_state
from toolkit.models import create_backbone

TIMM_IMPORT = "from timm.models.layers import DropPath, to_2tuple, trunc_normal_"
TIMM_SHIM = '''# Stand-in for the three timm helpers arcface_torch's vit.py imports (written by a FaceCL test).
import collections.abc

import torch


def to_2tuple(x):
    return tuple(x) if isinstance(x, collections.abc.Iterable) and not isinstance(x, str) else (x, x)


def trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0):
    return torch.nn.init.trunc_normal_(tensor, mean, std, a, b)


class DropPath(torch.nn.Module):
    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        return x * x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep) / keep
'''
PACKAGE = "facecl_test_arcface_torch"
THEIR_TO_OURS = {theirs: ours for ours, names in ARCFACE_COUNTERPARTS.items() for theirs in names}


def _import(name: str, path, package_dir=None):
    spec = importlib.util.spec_from_file_location(
        name, path, submodule_search_locations=[str(package_dir)] if package_dir else None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def theirs(arcface_torch_copy, tmp_path_factory):
    """(their backbones package, their partial_fc_v2 module, their get_model names), from a private copy."""
    root = tmp_path_factory.mktemp("their_backbones")
    shutil.copytree(arcface_torch_copy / "backbones", root / "backbones")
    if importlib.util.find_spec("timm") is None:
        vit = root / "backbones" / "vit.py"
        text = vit.read_text()
        assert TIMM_IMPORT in text, "their vit.py no longer imports timm's helpers in one line: update the shim"
        vit.write_text(text.replace(TIMM_IMPORT, "from ._timm_shim import DropPath, to_2tuple, trunc_normal_"))
        (root / "backbones" / "_timm_shim.py").write_text(TIMM_SHIM)
    backbones = _import(PACKAGE, root / "backbones" / "__init__.py", root / "backbones")
    partial_fc = _import(f"{PACKAGE}_partial_fc_v2", arcface_torch_copy / "partial_fc_v2.py")
    names = re.findall(r'name == "([^"]+)"', (root / "backbones" / "__init__.py").read_text())
    yield backbones, partial_fc, names
    for name in [n for n in sys.modules if n.startswith(PACKAGE)]:
        del sys.modules[name]


@contextlib.contextmanager
def quiet():
    """Their forward passes call torch.cuda.amp.autocast, which warns (deprecated; no CUDA here) on every call."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def build_theirs(backbones, name: str, *, meta: bool = False, monkeypatch=None) -> nn.Module:
    with quiet():
        if not meta:
            return backbones.get_model(name, num_features=512)
        # Their ViT reads its drop-path rates with .item() from torch.linspace: that one tensor stays on the CPU.
        linspace = torch.linspace
        monkeypatch.setattr(torch, "linspace", lambda *a, **k: linspace(*a, **{**k, "device": "cpu"}))
        with torch.device("meta"):
            return backbones.get_model(name, num_features=512)


def perturb_(model: nn.Module, seed: int, he_convs: bool = False) -> nn.Module:
    """Every norm, bias and BN statistic away from its init value, so that two swapped tensors change the output;
    with `he_convs` the convolutions at He scale (their iresnet init, std 0.1, takes r18's outputs to 1e8)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif tensor.dim() == 4 and he_convs:
                tensor.copy_(noise * (2.0 / tensor[0].numel()) ** 0.5)
            elif tensor.dim() <= 1:  # biases, norm / PReLU weights, running means
                tensor.add_(0.1 * noise)
    return model.eval()


def test_every_backbone_of_theirs_has_a_facecl_counterpart(theirs):
    _, _, names = theirs
    assert len(names) >= 16, names
    assert sorted(set(names) - set(THEIR_TO_OURS)) == []


@pytest.mark.parametrize("name", ["r18", "r34", "r50", "r100", "r200",
                                  pytest.param("r2060", marks=pytest.mark.slow), "mbf", "mbf_large", "vit_t",
                                  "vit_t_dp005_mask0", "vit_s", "vit_s_dp005_mask_0", "vit_b", "vit_b_dp005_mask_005",
                                  "vit_l_dp005_mask_005", "vit_h"])
def test_their_full_size_state_dict_maps_tensor_for_tensor(theirs, name, monkeypatch):
    backbones, _, _ = theirs
    their = build_theirs(backbones, name, meta=True, monkeypatch=monkeypatch).state_dict()  # names and shapes
    state = map_arcface_backbone(their, THEIR_TO_OURS[name], where=name)
    assert len(state) == len(their)
    assert {id(v) for v in state.values()} == {id(v) for v in their.values()}  # each of theirs used once


def _save_as_train_v2(model: nn.Module, folder, kind: str):
    """model.pt (rank 0, every epoch and at the end) or checkpoint_gpu_0.pt (save_all_states), as train_v2 writes."""
    if kind == "model.pt":
        torch.save(model.state_dict(), folder / "model.pt")
    else:
        torch.save({"epoch": 1, "global_step": 10, "state_dict_backbone": model.state_dict(),
                    "state_dict_softmax_fc": {"weight": torch.randn(5, 512)}}, folder / kind)
    return folder / kind


@pytest.mark.parametrize("name, kind", [
    ("mbf", "model.pt"),
    pytest.param("mbf_large", "checkpoint_gpu_0.pt", marks=pytest.mark.slow),
    pytest.param("r18", "model.pt", marks=pytest.mark.slow),
    pytest.param("vit_t", "model.pt", marks=pytest.mark.slow),
    pytest.param("vit_s_dp005_mask_0", "checkpoint_gpu_0.pt", marks=pytest.mark.slow),
    pytest.param("vit_b_dp005_mask_005", "model.pt", marks=pytest.mark.slow),
    pytest.param("vit_l_dp005_mask_005", "model.pt", marks=pytest.mark.slow),
])
def test_their_backbone_and_ours_give_the_same_outputs(theirs, name, kind, tmp_path, capsys):
    backbones, _, _ = theirs
    torch.manual_seed(0)
    their_model = perturb_(build_theirs(backbones, name), seed=1, he_convs=name.startswith("r"))
    path = _save_as_train_v2(their_model, tmp_path, kind)
    ours = THEIR_TO_OURS[name]
    state, _ = load_init_state(path, backbone=ours, embedding_size=512, image_size=112)
    with torch.device("meta"):  # no init: every tensor comes from their file
        model = create_backbone(ours)
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), quiet():
        expected, got = their_model(x), model(x)
    difference = (got - expected).abs().max().item()
    count = sum(p.numel() for p in model.parameters())
    with capsys.disabled():
        print(f"\n{name} -> {ours} ({count:,} parameters, {kind}): max |ours - theirs| = {difference:.2e} "
              f"(outputs up to {expected.abs().max():.2f})")
    # fp32 on CPU: the ViTs differ by summation order (their matmul softmax, our SDPA), at most 2.4e-5 for vit_l
    # with outputs up to 17; a swapped or misplaced tensor changes them by O(1).
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def _their_small_vit(backbones, mask_ratio: float) -> nn.Module:
    """Their VisionTransformer with vit_t's layout at 36x36 (4 x 4 tokens): fast, every per-block tensor kept."""
    with quiet():
        vit = importlib.import_module(f"{PACKAGE}.vit")
        return vit.VisionTransformer(img_size=36, patch_size=9, num_classes=64, embed_dim=256, depth=12, num_heads=8,
                                     drop_path_rate=0.0, norm_layer="ln", mask_ratio=mask_ratio)


@pytest.mark.slow  # a few seconds; tests/export/test_init_from.py checks the same on a re-statement
def test_their_masking_and_mask_token_match_ours_and_their_ratio_is_always_a_tenth(theirs, tmp_path, capsys):
    # Their forward_features calls self.random_masking(x) without the ratio: its default 0.1 applies whatever
    # mask_ratio the model was built with (vit_b_dp005_mask_005 masks 10%). Ours takes model.mask_ratio as given.
    backbones, _, _ = theirs
    torch.manual_seed(0)
    their_model = perturb_(_their_small_vit(backbones, mask_ratio=0.05), seed=3)
    torch.save(their_model.state_dict(), tmp_path / "model.pt")
    state, _ = load_init_state(tmp_path / "model.pt", backbone="vit_t", embedding_size=64, image_size=36)
    outputs = {}
    x = torch.randn(4, 3, 36, 36, generator=torch.Generator().manual_seed(4))
    for label, ratio in (("ours 0.1", 0.1), ("ours 0.05", 0.05), ("theirs", None)):
        if ratio is None:
            model = their_model
        else:
            with torch.device("meta"):
                model = create_backbone("vit_t", embedding_size=64, input_size=36, mask_ratio=ratio)
            model.load_state_dict(state, strict=True, assign=True)
        torch.manual_seed(5)  # the same noise draws the same kept tokens (ours sorted, theirs shuffled)
        with torch.no_grad(), quiet():
            outputs[label] = model.train()(x)
    difference = (outputs["ours 0.1"] - outputs["theirs"]).abs().max().item()
    with capsys.disabled():
        print(f"\ntheir vit (vit_t layout, 36x36, mask_ratio 0.05) in training vs ours at mask_ratio 0.1: "
              f"max |ours - theirs| = {difference:.2e}")
    torch.testing.assert_close(outputs["ours 0.1"], outputs["theirs"], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(outputs["ours 0.05"], outputs["theirs"], atol=1e-2)


@pytest.mark.slow  # a few seconds
def test_their_partial_fc_v2_files_of_a_vit_run_merge_in_class_order(theirs, tmp_path, monkeypatch):
    # train_v2 with save_all_states writes, per rank, checkpoint_gpu_{rank}.pt: the backbone, PartialFC_V2's
    # state dict ({"weight": its classes' rows}), the optimizer's (AdamW for the ViTs) and the scheduler's.
    backbones, partial_fc, _ = theirs
    num_classes, world = 11, 3
    their_backbone = _their_small_vit(backbones, mask_ratio=0.1)
    rows = []
    for rank in range(world):
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.distributed, "get_rank", lambda rank=rank: rank)
        monkeypatch.setattr(torch.distributed, "get_world_size", lambda: world)
        module = partial_fc.PartialFC_V2(lambda logits, labels: logits, 64, num_classes, sample_rate=0.3, fp16=True)
        rows.append((module.class_start, module.weight.detach().clone()))
        optimizer = torch.optim.AdamW([{"params": their_backbone.parameters()}, {"params": module.parameters()}],
                                      lr=1e-3, weight_decay=0.1)
        module.weight.square().sum().backward()
        optimizer.step()  # AdamW state (exp_avg, exp_avg_sq, step) for the centers in the file
        rows[-1] = (module.class_start, module.weight.detach().clone())
        # Their PolynomialLRWarmup passes verbose= to torch's LRScheduler, which this torch no longer takes; its
        # state dict is torch's plus warmup_iters.
        scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=100, power=1.0)
        torch.save({"epoch": 1, "global_step": 10, "state_dict_backbone": their_backbone.state_dict(),
                    "state_dict_softmax_fc": module.state_dict(), "state_optimizer": optimizer.state_dict(),
                    "state_lr_scheduler": {**scheduler.state_dict(), "warmup_iters": 10}},
                   tmp_path / f"checkpoint_gpu_{rank}.pt")
    monkeypatch.undo()
    assert [start for start, _ in rows] == [0, 4, 8]  # their split: the first C % W ranks hold one more class
    state, centers = load_init_state(tmp_path / "checkpoint_gpu_0.pt", backbone="vit_t", embedding_size=64,
                                     image_size=36, softmax=tmp_path)
    assert torch.equal(centers, torch.cat([weight for _, weight in rows]))
    assert torch.equal(state["patch_embed.weight"], their_backbone.patch_embed.proj.weight)
