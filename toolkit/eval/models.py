# Models to evaluate: a toolkit checkpoint / exported backbone (torch) or an ONNX file (onnxruntime).
"""An `Embedder` maps a batch of aligned faces, N x 3 x S x S float32 in [-1, 1] ((rgb - 127.5) / 127.5, the
toolkit's normalisation and that of insightface's ONNX models), to raw (unnormalised) N x D embeddings.

`load_model(path)`:
- `*.onnx`: onnxruntime (CUDA provider when available, else CPU); the graph takes the normalised
  N x 3 x H x W input and returns N x D (insightface model-zoo recognition models are of this form);
- anything else (run folder, checkpoints/ folder, checkpoint, consolidated `.safetensors` / `.pt`):
  `toolkit.export.load_backbone(path, device)`, which returns the eval-mode backbone and its metadata
  (backbone, embedding_size, image_size, input_normalisation, step).
A file that is neither raises FaceCLError naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from toolkit.errors import FaceCLError


class Embedder:
    """A callable batch -> embeddings with the facts the evaluation needs (name, input size, dimension)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], *, name: str, image_size: int,
                 embedding_size: int | None, device: torch.device, metadata: dict | None = None):
        self.fn, self.name, self.image_size = fn, name, image_size
        self.embedding_size, self.device = embedding_size, device
        self.metadata = metadata or {}

    @torch.no_grad()
    def __call__(self, images_NCHW: torch.Tensor) -> torch.Tensor:
        return self.fn(images_NCHW).float()

    @classmethod
    def from_module(cls, module: torch.nn.Module, *, name: str, image_size: int, embedding_size: int | None = None,
                    device: torch.device | str = "cpu", metadata: dict | None = None) -> "Embedder":
        """Wrap an eval-mode torch backbone; batches are moved to `device`, embeddings come back on CPU."""
        device = torch.device(device)
        module = module.to(device).eval()

        def run(images_NCHW: torch.Tensor) -> torch.Tensor:
            return module(images_NCHW.to(device, non_blocking=True)).float().cpu()

        return cls(run, name=name, image_size=image_size, embedding_size=embedding_size, device=device,
                   metadata=metadata)


def _onnx_embedder(path: Path) -> Embedder:
    try:
        import onnxruntime as ort
    except ImportError:
        raise FaceCLError(f"evaluating {path} needs onnxruntime: pip install onnxruntime") from None
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    try:
        session = ort.InferenceSession(str(path), providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types for every kind of bad file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FaceCLError(f"{path} is not a loadable ONNX model ({first[:200]})") from None
    inputs = session.get_inputs()
    if len(inputs) != 1 or len(inputs[0].shape) != 4:
        raise FaceCLError(f"{path}: expected one N x 3 x H x W input, got "
                          f"{[(i.name, i.shape) for i in inputs]}")
    height = inputs[0].shape[2]
    image_size = height if isinstance(height, int) else 112
    out_shape = session.get_outputs()[0].shape
    embedding_size = out_shape[1] if len(out_shape) == 2 and isinstance(out_shape[1], int) else None
    input_name = inputs[0].name

    def run(images_NCHW: torch.Tensor) -> torch.Tensor:
        out = session.run(None, {input_name: np.ascontiguousarray(images_NCHW.numpy(), dtype=np.float32)})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32).reshape(len(images_NCHW), -1))

    device = torch.device("cuda" if "CUDAExecutionProvider" in session.get_providers() else "cpu")
    return Embedder(run, name=path.stem, image_size=image_size, embedding_size=embedding_size, device=device,
                    metadata={"format": "onnx", "providers": session.get_providers()})


def load_model(path: str | Path, device: torch.device | str | None = None) -> Embedder:
    """The Embedder of a model path (see the module docstring); GPU when present unless `device` says."""
    path = Path(path)
    if not path.exists():
        raise FaceCLError(f"model not found: {path}")
    if path.suffix.lower() == ".onnx":
        return _onnx_embedder(path)
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        from toolkit.export import load_backbone
    except ImportError as exc:
        raise FaceCLError(f"cannot load {path}: torch checkpoints need toolkit.export.load_backbone, which this "
                          f"checkout does not have ({exc}); evaluate an .onnx export instead") from None
    try:
        module, meta = load_backbone(path, device=device)
    except FaceCLError as exc:
        raise FaceCLError(f"--model {path} is not a model FaceCL can load: {exc}") from None
    except Exception as exc:  # a file that is not a checkpoint fails in many ways inside torch/safetensors
        raise FaceCLError(f"{path} is not a model this toolkit can load ({type(exc).__name__}: "
                          f"{str(exc).strip()[:200]})") from None
    # meta['input_normalisation'] is recorded in the report; the toolkit trains on (rgb - 127.5) / 127.5 only.
    name = path.stem if path.is_file() else path.name
    return Embedder.from_module(module, name=name, image_size=int(meta.get("image_size", 112)),
                                embedding_size=meta.get("embedding_size"), device=device, metadata=dict(meta))
