"""lora_ext.export: merged (or adapter hot-swap) ONNX export of LoRA models, fp16/int8
variants, verification in onnxruntime, and a small onnxruntime runner.

    from lora_ext.export import export_onnx, OnnxRunner
    report = export_onnx(model, tokenizer(texts, return_tensors="pt", padding=True),
                         "model.onnx", dtype="fp32", quantize=None, verify=True)
    print(report.table())
    runner = OnnxRunner("model.onnx", tokenizer)
    runner("a great film").labels

Names are imported lazily (PEP 562): ``lora_ext.export.cli`` stays cheap to import for the
``lora-ext`` command line, which loads torch/onnx/onnxruntime only when a command runs.
"""

from __future__ import annotations

import importlib
from typing import Any

_API: dict[str, str] = {
    "export_onnx": "exporter",
    "ExportReport": "exporter",
    "VerifyCheck": "exporter",
    "VerificationError": "exporter",
    "UnsupportedModuleError": "exporter",
    "DEFAULT_OPSET": "exporter",
    "OnnxRunner": "runner",
    "RunnerOutput": "runner",
    "save_onnx_adapter": "adapters",
    "read_onnx_adapter": "adapters",
    "adapter_tensors": "adapters",
    "quantize_int8": "quantize",
    "calibration_runs": "quantize",
    "to_fp16": "quantize",
    "save_ort_format": "quantize",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    module_name = _API.get(name)
    if module_name is None:
        raise AttributeError(f"module 'lora_ext.export' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module_name}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
