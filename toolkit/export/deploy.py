# Export of a trained backbone for deployment: ONNX (BN folded, insightface-compatible), safetensors, TorchScript.
"""`export_model(path, fmt, out)` takes anything `load_backbone` reads and writes the backbone alone.

ONNX conventions (those of insightface's model zoo, which loads recognition models with
`insightface.model_zoo.get_model(path)`):
- input `input`: N x 3 x H x W float32, RGB, normalised as (x - 127.5) / 127.5 (the toolkit's training
  normalisation). The graph holds no normalisation: insightface's ArcFaceONNX converts its BGR uint8
  crops to RGB and applies (x - 127.5) / 127.5 itself unless the graph starts with Sub and Mul nodes.
- output `embedding`: N x embedding_size, not L2-normalised. Batch is a dynamic axis; H and W are fixed
  (insightface reads the crop size from the input shape).
- batch norm folded: BN after a Conv or Gemm/MatMul is merged into its weights; BN with no foldable
  producer (IResNet's pre-activation BN, which follows a PReLU) becomes one Mul and one Add with the
  precomputed per-channel scale and shift. No BatchNormalization node remains.
- `metadata_props` state the normalisation, the input layout, backbone, sizes and step.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from toolkit.errors import FaceCLError
from toolkit.export.consolidate import FORMAT_VERSION, METADATA_FORMAT
from toolkit.export.files import atomic_output, check_output_path, tensor_entry, write_safetensors
from toolkit.export.load import load_backbone

FORMATS = ("onnx", "safetensors", "torchscript")
SUFFIXES = {"onnx": ".onnx", "safetensors": ".safetensors", "torchscript": ".pt"}
ONNX_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "input", "embedding"


@dataclass
class ExportResult:
    out: Path
    num_bytes: int
    fmt: str
    metadata: dict[str, Any]
    details: dict[str, Any]


def _string_metadata(meta: dict[str, Any]) -> dict[str, str]:
    return {"format": METADATA_FORMAT, "format_version": str(FORMAT_VERSION),
            **{k: str(v) for k, v in meta.items() if v is not None}}


def export_model(path: str | Path, fmt: str, out: str | Path, *, overwrite: bool = False) -> ExportResult:
    """Write the backbone of `path` (checkpoint, run or consolidated file) as onnx, safetensors or torchscript."""
    if fmt not in FORMATS:
        raise FaceCLError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    out = Path(out)
    check_output_path(out, overwrite)
    model, meta = load_backbone(path)
    details: dict[str, Any] = {}
    if fmt == "safetensors":
        entries = [tensor_entry(k, v.detach().contiguous()) for k, v in model.state_dict().items()]
        size = atomic_output(out, lambda tmp: write_safetensors(tmp, entries, _string_metadata(meta)))
    elif fmt == "torchscript":
        size = atomic_output(out, lambda tmp: _write_torchscript(model, meta, tmp))
    else:
        size = atomic_output(out, lambda tmp: details.update(write_onnx(model, meta, tmp)))
    return ExportResult(out=out, num_bytes=size, fmt=fmt, metadata=meta, details=details)


def _example_input(meta: dict[str, Any], batch: int = 2) -> torch.Tensor:
    size = int(meta["image_size"])
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _write_torchscript(model: torch.nn.Module, meta: dict[str, Any], tmp: Path) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (_example_input(meta),), check_trace=False)
        torch.jit.save(traced, str(tmp), _extra_files={"facecl.json": json.dumps(_string_metadata(meta))})


# ----- ONNX --------------------------------------------------------------------------------------------------

def write_onnx(model: torch.nn.Module, meta: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """Export, fold batch norms, attach metadata, check; returns counts of what folding did."""
    import onnx

    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter warns that it is the legacy path
        torch.onnx.export(model.eval(), (_example_input(meta),), buffer, dynamo=False, opset_version=ONNX_OPSET,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], do_constant_folding=True,
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    proto = onnx.load_from_string(buffer.getvalue())
    counts = fold_batchnorm(proto)
    remove_unused_initializers(proto)
    props = {"input_normalisation": str(meta["input_normalisation"]),
             "input_layout": f"N x 3 x {meta['image_size']} x {meta['image_size']} float32, RGB",
             "output": f"N x {meta['embedding_size']} embedding, not L2-normalised",
             "backbone": str(meta["backbone"]), "embedding_size": str(meta["embedding_size"]),
             "image_size": str(meta["image_size"]), "step": str(meta.get("step")), "producer": "FaceCL"}
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = (f"FaceCL {meta['backbone']} face embedding; input {props['input_layout']} normalised "
                        f"{props['input_normalisation']}; output {props['output']}")
    onnx.checker.check_model(proto)
    onnx.save(proto, str(tmp))
    num_bn = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return {"opset": ONNX_OPSET, "batch_norms": num_bn, **counts}


def insightface_routes(image_size: int) -> bool:
    """Whether insightface's model zoo (`model_zoo.get_model`) takes an ONNX model of this input size as a
    recognition model: it routes square inputs of at least 112 pixels that are a multiple of 16."""
    return image_size >= 112 and image_size % 16 == 0


def folding_summary(details: dict[str, Any]) -> str:
    """'50 batch norms of the model folded: 49 by the exporter (into the convolutions before them), 1 into a
    matrix product' from write_onnx's counts; no BatchNormalization node is left either way."""
    ours = [(details.get("into_conv", 0), "into a convolution"), (details.get("into_gemm", 0), "into a linear layer"),
            (details.get("into_matmul", 0), "into a matrix product"),
            (details.get("to_mul_add", 0), "into a per-channel scale and shift (no foldable layer before it)")]
    total = int(details.get("batch_norms", sum(count for count, _ in ours)))
    by_exporter = total - sum(count for count, _ in ours)
    where = ([f"{by_exporter} by the exporter (into the convolutions before them)"] if by_exporter > 0 else []) + \
        [f"{count} {what}" for count, what in ours if count]
    return f"{total} batch norm{'s' if total != 1 else ''} of the model folded" + (f": {', '.join(where)}" if where else "")


def remove_unused_initializers(proto) -> None:
    used = {name for node in proto.graph.node for name in node.input}
    used |= {o.name for o in proto.graph.output}
    keep = [init for init in proto.graph.initializer if init.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)


def fold_batchnorm(proto) -> dict[str, int]:
    """Merge every inference BatchNormalization into its producer (Conv, Gemm, MatMul) when it is that
    producer's only consumer, else replace it by Mul + Add; returns how many of each."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    graph = proto.graph
    inits = {init.name: init for init in graph.initializer}
    alias = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity" and n.input[0] in inits}

    def const(name: str):
        name = alias.get(name, name)
        return numpy_helper.to_array(inits[name]) if name in inits else None

    def add_init(name: str, array) -> str:
        unique, index = name, 0
        while unique in inits:
            index += 1
            unique = f"{name}_{index}"
        tensor = numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), unique)
        graph.initializer.append(tensor)
        inits[unique] = tensor
        return unique

    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    graph_outputs = {o.name for o in graph.output}
    producer = {out: node for node in graph.node for out in node.output}
    ranks = _tensor_ranks(proto)
    counts = {"into_conv": 0, "into_gemm": 0, "into_matmul": 0, "to_mul_add": 0}
    new_nodes = []
    for node in graph.node:
        if node.op_type != "BatchNormalization":
            new_nodes.append(node)
            continue
        x, scale_name, bias_name, mean_name, var_name = node.input[:5]
        params = [const(n) for n in (scale_name, bias_name, mean_name, var_name)]
        if any(p is None for p in params) or len(node.output) != 1:
            new_nodes.append(node)  # training-mode or dynamic BN: leave it (the check below reports it)
            continue
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)
        s = gamma / np.sqrt(var + eps)
        t = beta - mean * s
        prod = producer.get(x)
        sole = prod is not None and uses.get(x, 0) == 1 and x not in graph_outputs
        base = node.name or f"bn_{len(new_nodes)}"
        # Conv (out channels first) and Gemm (transB=1: out x in): the weight's rows scale by s, the bias
        # becomes b * s + t, and the producer takes over the BN's output.
        weighted = sole and const(prod.input[1]) is not None and (
            prod.op_type == "Conv" or (prod.op_type == "Gemm" and _gemm_foldable(prod)))
        if weighted:
            w = const(prod.input[1]).astype(np.float64)
            b = const(prod.input[2]).astype(np.float64) if len(prod.input) > 2 and prod.input[2] else np.zeros(len(s))
            prod.input[1] = add_init(f"{base}.folded_weight", w * s.reshape(-1, *([1] * (w.ndim - 1))))
            bias_input = add_init(f"{base}.folded_bias", b * s + t)
            if len(prod.input) > 2:
                prod.input[2] = bias_input
            else:
                prod.input.append(bias_input)
            prod.output[0] = node.output[0]
            counts["into_conv" if prod.op_type == "Conv" else "into_gemm"] += 1
        elif sole and prod.op_type == "MatMul" and const(prod.input[1]) is not None \
                and const(prod.input[1]).ndim == 2:
            w = const(prod.input[1]).astype(np.float64)                       # in x out
            prod.input[1] = add_init(f"{base}.folded_weight", w * s[None, :])
            new_nodes.append(helper.make_node("Add", [x, add_init(f"{base}.folded_bias", t)], [node.output[0]],
                                              name=f"{base}.folded_shift"))
            counts["into_matmul"] += 1
        else:
            rank = ranks.get(x, 4)
            shape = (-1,) + (1,) * max(rank - 2, 0)
            scaled = f"{x}.bn_scaled"
            new_nodes.append(helper.make_node("Mul", [x, add_init(f"{base}.scale", s.reshape(shape))], [scaled],
                                              name=f"{base}.affine_scale"))
            new_nodes.append(helper.make_node("Add", [scaled, add_init(f"{base}.shift", t.reshape(shape))],
                                              [node.output[0]], name=f"{base}.affine_shift"))
            counts["to_mul_add"] += 1
    del graph.node[:]
    del graph.value_info[:]   # shapes of renamed intermediates are stale; onnxruntime re-infers them
    graph.node.extend(_topological(new_nodes, {i.name for i in graph.input} | set(inits)))
    left = sum(1 for n in graph.node if n.op_type == "BatchNormalization")
    if left:
        raise FaceCLError(f"{left} BatchNormalization node(s) could not be folded (not in inference form)")
    del onnx  # imported for its side effect of registering the proto types
    return counts


def _gemm_foldable(node) -> bool:
    attrs = {a.name: a for a in node.attribute}
    return (attrs["transB"].i if "transB" in attrs else 0) == 1 and (attrs["transA"].i if "transA" in attrs else 0) == 0 \
        and (attrs["alpha"].f if "alpha" in attrs else 1.0) == 1.0 and (attrs["beta"].f if "beta" in attrs else 1.0) == 1.0


def _tensor_ranks(proto) -> dict[str, int]:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(proto)
    ranks = {}
    for info in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
            ranks[info.name] = len(info.type.tensor_type.shape.dim)
    return ranks


def _topological(nodes: list, available: set[str]) -> list:
    """Nodes reordered so that each comes after the producers of its inputs (folding moves outputs)."""
    available = set(available) | {""}
    pending = list(nodes)
    ordered = []
    while pending:
        progressed = False
        rest = []
        for node in pending:
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
                progressed = True
            else:
                rest.append(node)
        if not progressed:
            raise AssertionError(f"ONNX graph has a cycle or an unknown input near node {rest[0].name!r}")
        pending = rest
    return ordered
