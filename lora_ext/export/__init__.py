"""lora_ext.export: merged (or adapter hot-swap) ONNX export of LoRA models, fp16/int8
variants, verification in onnxruntime, and a small onnxruntime runner.

    from lora_ext.export import export_onnx, OnnxRunner
    report = export_onnx(model, tokenizer(texts, return_tensors="pt", padding=True),
                         "model.onnx", dtype="fp32", quantize=None, verify=True)
    print(report.table())
    runner = OnnxRunner("model.onnx", tokenizer)
    runner("a great film").labels
"""

from __future__ import annotations

from lora_ext.export.adapters import adapter_tensors, read_onnx_adapter, save_onnx_adapter
from lora_ext.export.decoder import (
    DecoderExportError,
    DecoderReport,
    export_decoder,
    save_decoder_adapter,
)
from lora_ext.export.exporter import (
    DEFAULT_OPSET,
    ExportReport,
    UnsupportedModuleError,
    VerificationError,
    VerifyCheck,
    export_onnx,
)
from lora_ext.export.quantize import calibration_runs, quantize_int8, save_ort_format, to_fp16
from lora_ext.export.runner import DecoderRunner, GenerationOutput, OnnxRunner, RunnerOutput

__all__ = [
    "DEFAULT_OPSET",
    "DecoderExportError",
    "DecoderReport",
    "DecoderRunner",
    "GenerationOutput",
    "ExportReport",
    "OnnxRunner",
    "RunnerOutput",
    "UnsupportedModuleError",
    "VerificationError",
    "VerifyCheck",
    "adapter_tensors",
    "calibration_runs",
    "export_decoder",
    "export_onnx",
    "quantize_int8",
    "read_onnx_adapter",
    "save_decoder_adapter",
    "save_onnx_adapter",
    "save_ort_format",
    "to_fp16",
]
