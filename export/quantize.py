"""Post-export conversions of an ONNX graph: fp16 weights, int8 dynamic quantization
(onnxruntime, per channel) and the ORT format of onnxruntime's mobile builds.

All of them keep the graph's inputs and outputs as they are (int64 ids in, float32 logits
out), so the runner and the verification feed every variant the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import onnx

logger = logging.getLogger("lora_ext.export")

# MatMul and Gather (embedding tables) in every graph; Attention and EmbedLayerNormalization
# exist only in a graph fused by optimize="bert" and hold most of its weights there.
QUANTIZED_OP_TYPES = ["MatMul", "Gather", "Attention", "EmbedLayerNormalization"]


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Weights and activations in float16; float graph inputs and outputs stay float32 (a
    Cast at each boundary), so logits come out float32 and hot-swap LoRA inputs are fed in
    float32 as for the other variants.

    Uses onnxruntime's converter (onnxruntime.transformers.float16).
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=True)


def quantize_int8(
    model: onnx.ModelProto,
    workdir: Path,
    exclude_nodes: Iterable[str] = (),
    external_data: bool = False,
) -> onnx.ModelProto:
    """onnxruntime dynamic quantization: int8 weights per output channel, uint8 activations
    quantized on the fly (U8S8, the fast path of x86 VNNI and ARM dot-product kernels).
    MatMul and Gather (the embedding tables) are quantized; ``exclude_nodes`` are kept in
    float (the hot-swap LoRA MatMuls, whose weights are graph inputs).

    Args:
        model: the float32 graph.
        workdir: a directory for the intermediate files (quantize_dynamic works on paths).
        external_data: write the quantized intermediate with external data (models > 2 GB).

    Returns: the quantized graph.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src = workdir / "int8_input.onnx"
    dst = workdir / "int8_output.onnx"
    if external_data:
        onnx.save_model(model, str(src), save_as_external_data=True, location=src.name + ".data")
    else:
        onnx.save_model(model, str(src))
    # quantize_dynamic logs a hint about pre-processing (symbolic shape inference), which
    # fails on transformer graphs with data-dependent mask shapes and changes nothing for
    # dynamic quantization of MatMul/Gather weights.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(
            str(src),
            str(dst),
            per_channel=True,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=QUANTIZED_OP_TYPES,
            nodes_to_exclude=list(exclude_nodes),
            use_external_data_format=external_data,
        )
    finally:
        root.setLevel(level)
    return onnx.load(str(dst))


def save_ort_format(model_path: Path, ort_path: Path) -> None:
    """Convert a saved .onnx file to the ORT format (flatbuffer) that onnxruntime's mobile /
    minimal builds load. Basic (platform-independent) graph optimisations only, as
    onnxruntime's own converter does by default, so the file runs on any CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # hot-swap LoRA inputs with defaults warn by design
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(ort_path)
    options.add_session_config_entry("session.save_model_format", "ORT")
    ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    if not ort_path.is_file():
        raise RuntimeError(f"onnxruntime did not write the ORT format file {ort_path}")
