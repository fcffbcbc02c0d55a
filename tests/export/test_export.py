# Export: ONNX (BN folded, checker, onnxruntime == PyTorch, insightface loads it), safetensors, TorchScript.
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors import safe_open

from toolkit.export import load_backbone
from toolkit.export.consolidate import save_consolidated
from toolkit.export.deploy import export_model
from toolkit.models import create_backbone

FACES = 64


def trained_looking(name: str, seed: int = 0) -> torch.nn.Module:
    """A registry backbone whose batch norms have non-trivial statistics (folding them must matter)."""
    torch.manual_seed(seed)
    model = create_backbone(name)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.normal_(0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.bias.normal_(0, 0.1)
                if module.weight.requires_grad:
                    module.weight.normal_(1, 0.2)
    return model.eval()


@pytest.fixture(scope="module", params=["iresnet18", "mobilefacenet"])
def consolidated(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    path = folder / f"{request.param}.safetensors"
    save_consolidated(path, trained_looking(request.param), {"backbone": request.param, "embedding_size": 512,
                                                            "image_size": 112}, step=7)
    return path


@pytest.fixture(scope="module")
def onnx_file(consolidated):
    out = consolidated.with_suffix(".onnx")
    result = export_model(consolidated, "onnx", out)
    assert result.num_bytes == out.stat().st_size
    return out


def faces_rgb_normalised(count: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(count, 3, 112, 112, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.slow  # over 3 s: full suite (CI) only, not the inner loop
def test_onnx_graph(onnx_file):
    proto = onnx.load(str(onnx_file))
    onnx.checker.check_model(proto, full_check=True)
    ops = {node.op_type for node in proto.graph.node}
    assert "BatchNormalization" not in ops
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 112, 112]
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["input_normalisation"] == "rgb, (x - 127.5) / 127.5" and props["step"] == "7"


@pytest.mark.slow  # over 3 s: full suite (CI) only, not the inner loop
def test_onnxruntime_equals_pytorch_on_64_faces(consolidated, onnx_file):
    model, _ = load_backbone(consolidated)
    faces = faces_rgb_normalised(FACES)
    with torch.no_grad():
        expected = model(faces).numpy()
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": faces.numpy()})[0]
    assert got.shape == (FACES, 512)
    assert np.abs(got - expected).max() < 1e-4
    # Another batch size through the same graph (dynamic batch axis).
    assert session.run(None, {"input": faces[:5].numpy()})[0].shape == (5, 512)


def test_insightface_model_zoo_loads_it_and_get_feat_matches(consolidated, onnx_file):
    model_zoo = pytest.importorskip("insightface.model_zoo")
    recognizer = model_zoo.get_model(str(onnx_file), providers=["CPUExecutionProvider"])
    assert recognizer is not None and recognizer.taskname == "recognition"
    assert (recognizer.input_mean, recognizer.input_std) == (127.5, 127.5)  # it normalises; our graph does not
    rng = np.random.default_rng(3)
    faces_bgr = [rng.integers(0, 256, (112, 112, 3), dtype=np.uint8) for _ in range(8)]
    features = recognizer.get_feat(faces_bgr)
    # Our convention, computed independently: BGR -> RGB, (x - 127.5) / 127.5, N x 3 x H x W.
    rgb = np.stack([face[:, :, ::-1] for face in faces_bgr]).astype(np.float32)
    images = (torch.from_numpy(rgb).permute(0, 3, 1, 2) - 127.5) / 127.5
    model, _ = load_backbone(consolidated)
    with torch.no_grad():
        expected = model(images).numpy()
    assert np.abs(features - expected).max() < 1e-4


def test_safetensors_export_is_the_backbone_alone(consolidated, tmp_path):
    out = tmp_path / "b.safetensors"
    export_model(consolidated, "safetensors", out)
    model, meta = load_backbone(consolidated)
    with safe_open(str(out), framework="pt") as handle:
        assert set(handle.keys()) == set(model.state_dict())
        assert handle.metadata()["format"] == "pt" and handle.metadata()["facecl_backbone"] == meta["backbone"]
        for key, value in model.state_dict().items():
            assert torch.equal(handle.get_tensor(key), value)


def test_torchscript_export_runs_like_the_model(consolidated, tmp_path):
    out = tmp_path / "b.pt"
    export_model(consolidated, "torchscript", out)
    scripted = torch.jit.load(str(out))
    model, _ = load_backbone(consolidated)
    faces = faces_rgb_normalised(4, seed=5)
    with torch.no_grad():
        assert torch.allclose(scripted(faces), model(faces), atol=1e-5, rtol=0)
