#!/usr/bin/env bash
# Compile-only CUDA build, for CI machines without a GPU.
#
# A second virtual environment (.venv-cuda) gets the CUDA 13.0 build of torch; every .cu file
# under csrc/cuda is compiled and linked for sm_80 and sm_90 with FORCE_CUDA=1, out of tree
# (build/cuda/, so the CPU build in lora_ext/ is left alone), and the resulting lora_ext._C is
# imported on this GPU-less machine: its ops must carry CUDA kernels and build_info must say
# so. A CUDA kernel that never compiled here does not count as written.
#
# Env: CUDA_HOME (default /usr/local/cuda-13.0), CUDA_VENV (default .venv-cuda),
#      TORCH_CUDA_SPEC (default torch==2.14.1), TORCH_CUDA_ARCH_LIST (default "8.0;9.0"),
#      MAX_JOBS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

VENV=${CUDA_VENV:-.venv-cuda}
PYTHON=${PYTHON:-python3}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda-13.0}
export PATH="$CUDA_HOME/bin:$PATH"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0"}
export MAX_JOBS=${MAX_JOBS:-2}
export FORCE_CUDA=1
unset LORA_EXT_CPU_ONLY

echo "== venv $VENV with ${TORCH_CUDA_SPEC:-torch==2.14.1}"
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q "${TORCH_CUDA_SPEC:-torch==2.14.1}" numpy ninja setuptools wheel
"$VENV/bin/python" - <<'PY'
import torch
assert torch.version.cuda, f"{torch.__version__} is not a CUDA build of torch"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU visible: {torch.cuda.is_available()}")
PY
"$CUDA_HOME/bin/nvcc" --version | tail -1

echo "== compile + link (archs $TORCH_CUDA_ARCH_LIST, $MAX_JOBS jobs)"
build_start=$(date +%s)
rm -rf build/cuda/lib
"$VENV/bin/python" setup.py -q build_ext --build-lib build/cuda/lib --build-temp build/cuda/temp
so=$(ls build/cuda/lib/lora_ext/_C*.so)
echo "built $so in $(( $(date +%s) - build_start )) s"

echo "== every .cu compiled to SASS for every arch (cubins inside the object files)"
"$VENV/bin/python" - build/cuda/temp "$TORCH_CUDA_ARCH_LIST" csrc/cuda/*.cu <<'PY'
import struct
import sys
from pathlib import Path

temp, archs, sources = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
want = {int(a.replace(".", "")) for a in archs.replace(",", ";").split(";") if a.strip()}


def cubin_archs(blob: bytes) -> set[int]:
    """SM versions of the CUDA ELF images (e_machine 190) embedded in an object file."""
    found, i = set(), blob.find(b"\x7fELF")
    while i >= 0:
        if blob[i + 4] == 2 and struct.unpack_from("<H", blob, i + 18)[0] == 190:
            flags = struct.unpack_from("<I", blob, i + 48)[0]
            # ELF ABI v8 (CUDA >= 12.8) keeps the SM in bits 8-15, older ones in bits 0-7
            found.add((flags >> 8) & 0xFF if blob[i + 8] >= 8 else flags & 0xFF)
        i = blob.find(b"\x7fELF", i + 4)
    return found


for src in sources:
    objs = list(temp.rglob(Path(src).with_suffix(".o").as_posix()))
    assert objs, f"no object file for {src} under {temp}"
    got = cubin_archs(objs[0].read_bytes())
    assert want <= got, f"{src}: cubins for sm {sorted(got)}, expected {sorted(want)}"
    print(f"ok {src}: sm_{', sm_'.join(str(a) for a in sorted(got))}")
PY

echo "== import on a machine without a GPU"
"$VENV/bin/python" - "$so" <<'PY'
import importlib.util
import sys

import torch

spec = importlib.util.spec_from_file_location("lora_ext._C", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)  # registers torch.ops.lora_ext.*
info = mod.build_info()
print("build_info:", info)
assert info["cuda"] and info["cuda_archs"], info
for op in ("lora_linear", "lora_linear_backward", "merge_", "merge_check", "dropout_mask"):
    for key in ("CPU", "CUDA"):
        ok = torch._C._dispatch_has_kernel_for_dispatch_key(f"lora_ext::{op}", key)
        assert ok, f"lora_ext::{op} has no {key} kernel"
print("every op has CPU and CUDA kernels")
for key in ("AutocastCUDA", "AutocastCPU"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key("lora_ext::lora_linear", key), key
assert mod.build_info()["cuda_kernel_variants"] == ["simple", "fast"], mod.build_info()
print("lora_linear has autocast kernels; CUDA kernel variants: simple, fast")
# the CPU kernels of this build still run
x, w, a, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(2, 8), torch.randn(5, 2)
y, _ = torch.ops.lora_ext.lora_linear(x, w, None, a, b, 0.5, 0.0, torch.zeros((), dtype=torch.long))
assert torch.allclose(y, x @ w.T + 0.5 * (x @ a.T) @ b.T, atol=1e-5)
PY
echo "== CUDA compile-only build done in $(( $(date +%s) - start )) s"
