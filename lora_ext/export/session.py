"""The one place that opens an onnxruntime session: the exporter's verification, int8
calibration, the ORT-format conversion, the runner and the benchmarks all come here, so a
session option (log level, threads, providers) is chosen once."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CPU = ("CPUExecutionProvider",)


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build has it, CPU always."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def ort_session(
    path: str | os.PathLike,
    *,
    providers: Sequence[str] | None = CPU,
    threads: int | None = None,
    inter_op_threads: int | None = None,
    save_ort_to: Path | None = None,
) -> Any:
    """An ``onnxruntime.InferenceSession`` on ``path``.

    Args:
        path: the .onnx (or .ort) file.
        providers: execution providers in order of preference; default CPU only (the
            exporter verifies on CPU); None: CUDA when present, then CPU.
        threads: intra-op threads (None: onnxruntime's choice, all cores).
        inter_op_threads: inter-op threads (None: onnxruntime's choice).
        save_ort_to: also write the model in the ORT format (onnxruntime's mobile builds) to
            this path, with basic (platform-independent) graph optimisations only, as
            onnxruntime's own converter does by default, so the file runs on any CPU.

    Warnings are not logged (severity 3): hot-swap LoRA inputs with defaults and the
    exporter's unused initializers warn by design.

    Raises:
        ValueError: onnxruntime cannot load the file (not ONNX, corrupt, unsupported op),
            naming it, with onnxruntime's first line.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads: got {threads}, need >= 1")
        options.intra_op_num_threads = threads
    if inter_op_threads is not None:
        options.inter_op_num_threads = inter_op_threads
    if save_ort_to is not None:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(save_ort_to)
        options.add_session_config_entry("session.save_model_format", "ORT")
    chosen = default_providers() if providers is None else list(providers)
    try:
        return ort.InferenceSession(str(path), options, providers=chosen)
    except Exception as exc:  # onnxruntime's own classes (InvalidProtobuf, Fail...)
        if type(exc).__module__.startswith("onnxruntime"):
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"{str(path)!r}: onnxruntime cannot load it ({first})") from None
        raise
