#!/usr/bin/env bash
# One GPU, one script: build the CUDA kernels, run the CUDA tests, then the GPU figures (bandwidth, head, training,
# training against insightface's arcface_torch).
#
#   bash benchmarks/run_gpu.sh          # from a fresh checkout with requirements.txt installed (venv active)
#
# Budget: under 11 minutes on one H100/H200-class GPU. Steps and their limits (seconds):
#   1. build toolkit._C with CUDA for this GPU's architecture only            (~1 min)
#   2. tests/kernels, CUDA included (kernels/test_gpu.sh's checks)             (~1 min)
#   3. bench_bandwidth.py: stats / gradient kernels against a device copy      (<1 min)
#   4. bench_head.py: 1 GPU, C_local 100k and 250k, r 1.0, 0.2 and 0.3 (the sampled kernel), plus
#      bench_sampling.py: the class sampling per step alone                 (~1.5 min)
#   5. bench_train.py: iresnet100, bf16, batch 128, engine single, 1 GPU        (~2 min)
#   6. bench_train.py --peer arcface_torch: the toolkit's step against arcface_torch's own train_v2 step
#      (iresnet100, fp16 with loss scaling as arcface_torch trains, batch 128, 93,431 classes as MS1MV3,
#      1 GPU, Partial FC sample rate 1 and 0.2); needs insightface's repository: $FACECL_INSIGHTFACE_REPO
#      (a checkout or git directory), else /work/.mirror/deepinsight+insightface/repo; skipped without it (~3 min)
# Results: benchmarks/results/gpu_<step>_<UTC time>.json (.md) and benchmarks/results/gpu_summary_<UTC time>.md.
# A step that fails is reported in the summary and the script goes on; the exit status is non-zero then.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
RESULTS="benchmarks/results"
SUMMARY="$RESULTS/gpu_summary_$STAMP.md"
mkdir -p "$RESULTS"
status=0
started=$(date +%s)

"$PYTHON" - <<'PY' || exit 2
import torch
assert torch.version.cuda, f"torch {torch.__version__} is not a CUDA build"
assert torch.cuda.is_available(), "no GPU is visible to torch"
print(f"GPU: {torch.cuda.get_device_name()} (capability {torch.cuda.get_device_capability()}), torch {torch.__version__}")
PY

{
  echo "# FaceCL GPU figures ($STAMP)"
  echo
  "$PYTHON" -c 'import torch; print(f"- GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")'
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo
} > "$SUMMARY"

# step NAME LIMIT_S COMMAND...: runs the command with a time limit, logs it, records the outcome in the summary.
step() {
  local name="$1" limit="$2"
  shift 2
  local log="$RESULTS/gpu_${name}_$STAMP.log" begin=$(date +%s)
  echo "== $name (limit ${limit} s): $*"
  timeout "$limit" "$@" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  local took=$(( $(date +%s) - begin ))
  if [ "$rc" -ne 0 ]; then
    status=1
    echo "- **$name failed** (exit $rc after $took s): see \`$log\`" >> "$SUMMARY"
  else
    echo "- $name: done in $took s" >> "$SUMMARY"
  fi
  return 0
}

if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST="$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
  export TORCH_CUDA_ARCH_LIST
fi
step build 240 env FACECL_BUILD_CUDA=1 MAX_JOBS="${MAX_JOBS:-8}" "$PYTHON" setup.py --quiet build_ext --inplace
step cuda_tests 150 "$PYTHON" -m pytest -q -rs -x tests/kernels -k cuda
step bandwidth 60 "$PYTHON" benchmarks/bench_bandwidth.py --device cuda --json "$RESULTS/gpu_bandwidth_$STAMP.json"
step head 150 "$PYTHON" benchmarks/bench_head.py --device cuda --classes-per-rank 100000 250000 --rows 4096 \
  --sample-rates 1.0 0.2 0.3 --repeat 5 --json "$RESULTS/gpu_head_$STAMP.json"
step sampling 60 "$PYTHON" benchmarks/bench_sampling.py --device cuda --rows 4096 \
  --json "$RESULTS/gpu_sampling_$STAMP.json"
step train 180 "$PYTHON" benchmarks/bench_train.py --device cuda --backbone iresnet100 --precision bf16 \
  --batch-size 128 --engines single --num-classes 100000 --warmup-steps 3 --steps 10 --max-load 1000 \
  --out "$RESULTS/gpu_train_$STAMP.json"
if "$PYTHON" -c 'import sys; sys.path.insert(0, "benchmarks"); import arcface_torch_peer as p; sys.exit(p.insightface_repo() is None)'; then
  step train_arcface_torch 300 "$PYTHON" benchmarks/bench_train.py --peer arcface_torch --device cuda \
    --backbone iresnet100 --precision fp16 --batch-size 128 --engines single --num-classes 93431 \
    --sample-rates 1,0.2 --warmup-steps 3 --steps 10 --max-load 1000 --out "$RESULTS/gpu_train_arcface_torch_$STAMP.json"
else
  status=1
  echo "- **train_arcface_torch skipped**: insightface's repository is not on this machine (set FACECL_INSIGHTFACE_REPO)" >> "$SUMMARY"
fi

{
  echo
  for part in bandwidth head sampling; do
    json="$RESULTS/gpu_${part}_$STAMP.json"
    [ -f "$json" ] || continue
    echo "## $part"
    echo
    "$PYTHON" - "$json" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))["results"]
keys = list(rows[0])
print("| " + " | ".join(keys) + " |")
print("|" + "---|" * len(keys))
for row in rows:
    print("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
PY
    echo
  done
  if [ -f "$RESULTS/gpu_train_$STAMP.md" ]; then
    echo "## train"
    echo
    cat "$RESULTS/gpu_train_$STAMP.md"
  fi
  if [ -f "$RESULTS/gpu_train_arcface_torch_$STAMP.md" ]; then
    echo
    echo "## train against arcface_torch"
    echo
    cat "$RESULTS/gpu_train_arcface_torch_$STAMP.md"
  fi
  echo
  echo "Total: $(( $(date +%s) - started )) s"
} >> "$SUMMARY"
echo "== summary: $SUMMARY"
cat "$SUMMARY"
exit $status
