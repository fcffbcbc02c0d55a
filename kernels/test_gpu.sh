#!/usr/bin/env bash
# On a GPU machine: build the CUDA kernels in place, run every kernel test (CUDA ones included), then the GPU benchmark.
#
#   bash kernels/test_gpu.sh            # from anywhere inside the repository, with the project's venv active
#
# Uses the torch of the current environment (no build isolation). TORCH_CUDA_ARCH_LIST defaults to this
# GPU's architecture only, to compile fast; CUDA_HOME is found by setup.py (/usr/local/cuda or nvcc's folder).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"

"$PYTHON" - <<'PY'
import torch
assert torch.version.cuda, f"torch {torch.__version__} is not a CUDA build"
assert torch.cuda.is_available(), "no GPU is visible to torch"
name, capability = torch.cuda.get_device_name(), torch.cuda.get_device_capability()
print(f"GPU: {name} (capability {capability}), torch {torch.__version__}")
PY

if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST="$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
  export TORCH_CUDA_ARCH_LIST
fi
echo "== build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
start=$(date +%s)
FACECL_BUILD_CUDA=1 "$PYTHON" setup.py --quiet build_ext --inplace
echo "built in $(( $(date +%s) - start )) s"

"$PYTHON" - <<'PY'
from tests.kernels.conftest import cuda_kernels_available
assert cuda_kernels_available(), "toolkit._C has no CUDA kernels: the CUDA tests would all be skipped"
PY

echo "== kernel tests (CPU and CUDA)"
"$PYTHON" -m pytest -q -rs tests/kernels

echo "== GPU benchmark"
"$PYTHON" benchmarks/bench_kernels.py --device cuda "$@"
