#!/usr/bin/env bash
# One call on a machine with a GPU and no network: build the CUDA extension, run the CUDA tests
# (and the CPU op tests), run the op benchmark on the GPU, print a short table last.
#
# Needs a Python whose torch is a CUDA build, already installed (nothing is downloaded). It is
# taken from $PYTHON, else .venv-cuda, else .venv, else python3 on PATH.
# Env: TORCH_CUDA_ARCH_LIST (default: this GPU's arch only, for a faster build), MAX_JOBS,
#      GPU_CHECK_QUICK=1 (fewer benchmark repeats), OUT (a folder: the benchmark JSON, named
#      after the GPU, and the build/test/bench logs are copied there; the device tool brings
#      $OUT back, so commit the JSON to benchmarks/results/ from there).
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

has_cuda_torch() {
  "$1" -c "import sys, torch; sys.exit(0 if torch.version.cuda and torch.cuda.is_available() else 1)" 2>/dev/null
}
PY=""
for cand in "${PYTHON:-}" .venv-cuda/bin/python .venv/bin/python python3; do
  if [ -n "$cand" ] && command -v "$cand" >/dev/null 2>&1 && has_cuda_torch "$cand"; then PY=$cand; break; fi
done
if [ -z "$PY" ]; then
  echo "gpu-check: no Python with a CUDA build of torch and a visible GPU (set PYTHON=...)" >&2
  exit 2
fi
"$PY" - <<'PY'
import torch
print(f"python with torch {torch.__version__} (CUDA {torch.version.cuda}) on {torch.cuda.get_device_name()}")
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  export TORCH_CUDA_ARCH_LIST
fi
export FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-8}
unset LORA_EXT_CPU_ONLY

echo "== build (sm $TORCH_CUDA_ARCH_LIST)"
build_start=$(date +%s)
# in place (lora_ext/_C*.so): no pip, no network, no isolated build environment
if ! "$PY" setup.py -q build_ext --inplace > /tmp/lora_ext_gpu_build.log 2>&1; then
  tail -40 /tmp/lora_ext_gpu_build.log
  echo "gpu-check: BUILD FAILED" >&2
  exit 1
fi
build_s=$(( $(date +%s) - build_start ))
"$PY" -c "from lora_ext import ops; print('build_info:', ops.build_info())"

echo "== tests (CUDA + CPU op tests)"
test_start=$(date +%s)
"$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_ops.py 2>&1 | tee /tmp/lora_ext_gpu_tests.log | tail -25
test_rc=${PIPESTATUS[0]}
test_s=$(( $(date +%s) - test_start ))
test_summary=$(grep -E "passed|failed|error" /tmp/lora_ext_gpu_tests.log | tail -1)

echo "== benchmark (GPU)"
bench_start=$(date +%s)
quick=()
[ "${GPU_CHECK_QUICK:-0}" = "1" ] && quick=(--quick)
"$PY" benchmarks/bench_op.py --device cuda "${quick[@]}" > /tmp/lora_ext_gpu_bench.log 2>&1
bench_rc=$?
bench_s=$(( $(date +%s) - bench_start ))

echo
echo "================ gpu-check summary ================"
echo "build: ${build_s} s   tests: ${test_s} s (${test_summary:-no summary}, rc=$test_rc)   bench: ${bench_s} s (rc=$bench_rc)"
# the benchmark's own table is the last thing it prints
awk '/^lora_ext op benchmark/{p=1} p' /tmp/lora_ext_gpu_bench.log
[ $bench_rc -eq 0 ] || tail -20 /tmp/lora_ext_gpu_bench.log
echo "total: $(( $(date +%s) - start )) s"
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
  cp benchmarks/results/bench_op_cuda_*.json /tmp/lora_ext_gpu_build.log \
     /tmp/lora_ext_gpu_tests.log /tmp/lora_ext_gpu_bench.log "$OUT"/ 2>/dev/null
  echo "copied the results and logs to $OUT"
fi
[ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
