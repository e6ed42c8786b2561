"""lora_ext: a compiled LoRA toolkit, from fine-tuning to a merged ONNX file.

The layers, each importing only those above it (an import-linter contract in ``make lint``):

    lora_ext            core: ops, reference, config, layer, inject (model level), io
    lora_ext.export     ONNX export, quantization, hot-swap adapters, runner
    lora_ext.training   data, bundled models, trainer, checkpoints, run files, plots
    lora_ext.cli        the ``lora-ext`` command (the only layer joining training and export)

Importing is cheap: the compiled library loads on the first op call (``lora_ext.ops``).

    import lora_ext
    cfg = lora_ext.LoraConfig(r=8, alpha=16, dropout=0.05, target_modules=["query", "value"])
    lora_ext.inject_(model, cfg)
    ...
    plain = lora_ext.merge_and_unload(model)
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

from lora_ext.config import LoraConfig, Task
from lora_ext.inject import (
    delete_adapter,
    inject_,
    lora_param_groups,
    lora_parameters,
    merge_,
    merge_and_unload,
    set_adapter,
    summary,
    unmerge_,
)
from lora_ext.io import load_adapter, save_adapter
from lora_ext.layer import LoraLinear
from lora_ext.ops import build_info

try:  # the version lives in one place: setup.py's metadata
    __version__ = _version("lora_ext")
except PackageNotFoundError:  # a source tree on sys.path without an install
    __version__ = "0+unknown"

__all__ = [
    "LoraConfig",
    "LoraLinear",
    "Task",
    "__version__",
    "build_info",
    "delete_adapter",
    "inject_",
    "load_adapter",
    "lora_param_groups",
    "lora_parameters",
    "merge_",
    "merge_and_unload",
    "save_adapter",
    "set_adapter",
    "summary",
    "unmerge_",
]
