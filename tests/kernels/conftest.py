# Shared helpers of the kernel tests: devices (CUDA skipped without a GPU), dtypes, tolerances, input makers.
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import toolkit.ops as ops
from toolkit.heads.margin import Margin

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from measure import peak_bytes  # noqa: E402  (the benchmarks' measurement, so tests and figures agree)


def cuda_kernels_available() -> bool:
    return (ops.FUSED_KERNELS_AVAILABLE and torch.cuda.is_available()
            and torch._C._dispatch_has_kernel_for_dispatch_key("facecl::margin_softmax_ce", "CUDA"))


requires_kernels = pytest.mark.skipif(not ops.FUSED_KERNELS_AVAILABLE,
                                      reason=f"fused kernels unavailable: {ops.UNAVAILABLE_REASON}")

# Test ids contain "cpu" / "cuda": `pytest tests/kernels -k cuda` runs the GPU half (kernels/test_gpu.sh).
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not cuda_kernels_available(),
                                                             reason="needs a GPU and a CUDA build of the kernels")),
]

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16"),
          pytest.param(torch.float16, id="fp16")]

# Relative tolerance of gradients stored in the input dtype (the fp32-accumulated value rounded once).
GRAD_RTOL = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}

MARGINS = [
    pytest.param(Margin(scale=64.0, m1=1.0, m2=0.5, m3=0.0), id="arcface"),
    pytest.param(Margin(scale=64.0, m1=1.0, m2=0.0, m3=0.4), id="cosface"),
    pytest.param(Margin(scale=32.0, m1=1.0, m2=0.3, m3=0.2), id="arc+cos"),
    pytest.param(Margin(scale=30.0, m1=1.2, m2=0.2, m3=0.1), id="combined-m1"),
]

# Target cosines spanning the whole range: below cos(pi - 0.5) = -0.878 ArcFace's fallback applies, and at
# exactly +-1 the reference's acos clamp is active (zero slope through the margin).
TARGET_COSINES = [-1.0, -0.97, -0.9, -0.8, -0.3, 0.0, 0.2, 0.5, 0.8, 0.95, 0.999, 1.0]


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = "") -> None:
    """max |actual - expected| <= rtol * max |expected| (norm-wise relative error, robust to near-zero entries)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = max(float(expected.abs().max()) if expected.numel() else 0.0, 1e-12)
    error = float((actual - expected).abs().max()) if expected.numel() else 0.0
    assert error <= rtol * scale, f"{what}: max error {error:.3g} > {rtol:g} * {scale:.3g}"


def unit_rows(num_rows: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(num_rows, dim, generator=generator), dim=1)


def cosine_case(num_rows: int, num_cols: int, seed: int, *, with_foreign_rows: bool = True):
    """(cos_NC in [-1, 1] with TARGET_COSINES on the targets, local_target_N with some -1 rows)."""
    gen = torch.Generator().manual_seed(seed)
    cos_NC = torch.rand(num_rows, num_cols, generator=gen) * 2 - 1
    local_target_N = torch.randint(0, num_cols, (num_rows,), generator=gen)
    rows = torch.arange(num_rows)
    cos_NC[rows, local_target_N] = torch.tensor(TARGET_COSINES)[rows % len(TARGET_COSINES)]
    if with_foreign_rows:
        local_target_N[1::4] = -1  # targets owned by another rank
    return cos_NC, local_target_N


def row_weights(num_rows: int, seed: int = 0) -> torch.Tensor:
    """Distinct positive weights per row, so per-row gradient scaling is tested too."""
    return torch.rand(num_rows, generator=torch.Generator().manual_seed(seed)) + 0.5


def allocator_peak_bytes(run_step) -> int:
    """Peak of the CPU allocator's running total during run_step (benchmarks/measure.py: profiler memory events)."""
    return peak_bytes(run_step, "cpu")
