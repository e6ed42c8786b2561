#!/usr/bin/env bash
# One call on a machine with a GPU and no network: build the CUDA extension for this GPU, run
# the GPU op tests, the op benchmark (both CUDA kernel variants), the merge bandwidth benchmark
# and a short bf16 SmolLM2 fine-tune against PEFT (LoRA, DoRA, and QLoRA with both of its
# 4-bit forward paths when bitsandbytes is importable there); copy the JSON and logs to $OUT; print the
# table last. Every step has a time limit, so the summary is printed even when one hangs.
#
# GPU_CHECK_DEVICE=cpu is a dry run of this same script on a machine without a GPU (CI runs it
# on every push): the same steps, imports, files and flags, with the CPU device and tiny shapes,
# results written to a temporary folder (the committed JSON is left alone).
#
# Needs a Python whose torch is a CUDA build, already installed (nothing is downloaded). It is
# taken from $PYTHON, else .venv-cuda, else .venv, else python3 on PATH.
# Env: GPU_CHECK_DEVICE (cuda | cpu), TORCH_CUDA_ARCH_LIST (default: this GPU's arch only),
#      MAX_JOBS, GPU_CHECK_QUICK=1 (fewer benchmark repeats), GPU_CHECK_RESULTS (folder for the
#      benchmark JSON; default benchmarks/results on a GPU, a temporary folder in a dry run),
#      OUT (a folder: the JSON and the logs are copied there; the device tool brings $OUT back).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
start=$(date +%s)
DEV=${GPU_CHECK_DEVICE:-cuda}
case "$DEV" in cuda | cpu) ;; *)
  echo "gpu-check: GPU_CHECK_DEVICE must be cuda or cpu, got '$DEV'" >&2
  exit 2
  ;;
esac
# scripts run by path (benchmarks/*.py) and pytest import lora_ext from this tree (in-place build)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
LOGS=$(mktemp -d /tmp/lora_ext_gpu_check.XXXXXX)
if [ "$DEV" = cuda ]; then
  RESULTS=${GPU_CHECK_RESULTS:-$ROOT/benchmarks/results}
else
  RESULTS=${GPU_CHECK_RESULTS:-$LOGS/results}
fi
mkdir -p "$RESULTS"

usable() {
  if [ "$DEV" = cuda ]; then
    "$1" -c "import sys, torch; sys.exit(0 if torch.version.cuda and torch.cuda.is_available() else 1)" 2>/dev/null
  else
    "$1" -c "import torch" 2>/dev/null
  fi
}
PY=""
for cand in "${PYTHON:-}" .venv-cuda/bin/python .venv/bin/python python3; do
  if [ -n "$cand" ] && command -v "$cand" >/dev/null 2>&1 && usable "$cand"; then PY=$cand; break; fi
done
if [ -z "$PY" ]; then
  echo "gpu-check: no Python with a CUDA build of torch and a visible GPU (set PYTHON=...)" >&2
  exit 2
fi

echo "== preflight ($DEV)"
# everything the later steps import or read, checked before minutes go into the build
"$PY" - "$DEV" <<'PY' || exit 2
import importlib.util, pathlib, sys
import torch
dev = sys.argv[1]
where = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}) on {where}")
missing = [m for m in ("numpy", "setuptools", "pytest") if importlib.util.find_spec(m) is None]
files = ["setup.py", "benchmarks/bench_op.py", "benchmarks/bench_merge.py",
         "benchmarks/bench_finetune.py", "benchmarks/_common.py", "tests/core/test_ops.py",
         "tests/core/test_properties.py", "tests/core/test_mixed_precision.py",
         "tests/core/test_kernels.py", "tests/conftest.py"]
missing += [f for f in files if not pathlib.Path(f).is_file()]
if missing:
    sys.exit(f"gpu-check: missing {missing}")
optional = {m: importlib.util.find_spec(m) is not None
            for m in ("peft", "transformers", "hypothesis", "ninja", "bitsandbytes")}
print("optional packages:", ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in optional.items()))
PY
[ "$DEV" = cuda ] && { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true; }

# step NAME LIMIT_S CMD...: runs CMD with a time limit, its output in $LOGS/NAME.log. The limit
# is cut to what is left of the whole check's budget, so the summary always gets printed.
if [ "$DEV" = cuda ]; then BUDGET=${GPU_CHECK_BUDGET:-460}; else BUDGET=${GPU_CHECK_BUDGET:-1500}; fi
declare -A RC SECS
step() {
  local name=$1 limit=$2
  shift 2
  local t0 left
  t0=$(date +%s)
  left=$((BUDGET - (t0 - start) - 15))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    RC[$name]=125 SECS[$name]=0
    echo "gpu-check: $name skipped, the ${BUDGET} s budget is spent" | tee "$LOGS/$name.log"
    return
  fi
  timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  RC[$name]=$?
  SECS[$name]=$(($(date +%s) - t0))
  [ "${RC[$name]}" -eq 124 ] && echo "gpu-check: $name hit its ${limit} s limit" >>"$LOGS/$name.log"
  echo "   $name: rc=${RC[$name]} in ${SECS[$name]} s"
}

echo "== build"
if [ "$DEV" = cuda ]; then
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    export TORCH_CUDA_ARCH_LIST
  fi
  export FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
  unset LORA_EXT_CPU_ONLY
  echo "   archs $TORCH_CUDA_ARCH_LIST, $MAX_JOBS jobs"
  # --force: an in-place lora_ext/_C*.so left by a CPU-only build must not be taken for this one
  step build 240 "$PY" setup.py -q build_ext --inplace --force
else
  export LORA_EXT_CPU_ONLY=1 MAX_JOBS=${MAX_JOBS:-2}
  # up to date after `make test` (pip install -e . builds in place): then nothing is compiled
  step build 900 "$PY" setup.py -q build_ext --inplace
fi
if [ "${RC[build]}" -ne 0 ]; then
  tail -40 "$LOGS/build.log"
  echo "gpu-check: BUILD FAILED" >&2
  exit 1
fi
"$PY" - "$DEV" <<'PY' || exit 1
import sys
from lora_ext import ops
info = ops.build_info()
print("   build_info:", {k: info[k] for k in ("version", "cuda", "cuda_archs", "torch_version")})
if sys.argv[1] == "cuda" and not info["cuda"]:
    sys.exit("gpu-check: the build has no CUDA kernels")
PY

echo "== tests ($DEV cases of the op table, both CUDA kernel variants; autocast, graph replay)"
# the device table of tests/core: only this device's cases (CI runs the CPU suite on every push)
export LORA_EXT_TEST_DEVICES=$DEV
step tests 180 "$PY" -m pytest -q -p no:cacheprovider tests/core/test_ops.py \
  tests/core/test_mixed_precision.py tests/core/test_kernels.py tests/core/test_properties.py
tail -15 "$LOGS/tests.log"

echo "== benchmarks"
quick=()
[ "${GPU_CHECK_QUICK:-0}" = "1" ] && quick=(--quick)
if [ "$DEV" = cuda ]; then
  step bench_op 120 "$PY" benchmarks/bench_op.py --device cuda --out "$RESULTS" "${quick[@]}"
  step bench_merge 60 "$PY" benchmarks/bench_merge.py --device cuda --out "$RESULTS" "${quick[@]}"
  step bench_finetune 200 "$PY" benchmarks/bench_finetune.py --device cuda --steps 60 \
    --variants lora,dora,qlora --out "$RESULTS"
else
  step bench_op 240 "$PY" benchmarks/bench_op.py --device cpu --tiny --quick --out "$RESULTS"
  step bench_merge 120 "$PY" benchmarks/bench_merge.py --device cpu --tiny --quick --out "$RESULTS"
  step bench_finetune 300 "$PY" benchmarks/bench_finetune.py --device cpu --tiny --steps 4 \
    --variants lora,dora,qlora --out "$RESULTS"
fi

echo
echo "================ gpu-check summary ($DEV) ================"
summary=$(grep -E "passed|failed|error" "$LOGS/tests.log" | tail -1)
echo "build ${SECS[build]} s | tests ${SECS[tests]} s (${summary:-no summary}, rc=${RC[tests]})" \
  "| bench_op ${SECS[bench_op]} s (rc=${RC[bench_op]}) | bench_merge ${SECS[bench_merge]} s" \
  "(rc=${RC[bench_merge]}) | bench_finetune ${SECS[bench_finetune]} s (rc=${RC[bench_finetune]})"
for b in bench_op bench_merge bench_finetune; do
  echo
  if [ "${RC[$b]}" -eq 0 ]; then
    # each benchmark prints its table after the line '== table'
    awk '/^== table/{p=1; next} p' "$LOGS/$b.log"
  else
    echo "$b FAILED (rc=${RC[$b]}):"
    tail -20 "$LOGS/$b.log"
  fi
done
echo
echo "total: $(($(date +%s) - start)) s; logs in $LOGS, JSON in $RESULTS"
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
  # at most 8 files come back from a device: this run's 3 JSON files and 5 logs
  cp "$RESULTS"/bench_*_"$DEV"*.json "$LOGS"/*.log "$OUT"/ 2>/dev/null
  echo "copied the results and logs to $OUT"
fi
ok=0
for s in tests bench_op bench_merge bench_finetune; do [ "${RC[$s]}" -eq 0 ] || ok=1; done
exit $ok
