"""Adapter hot-swap: the LoRA tensors of a model as ONNX graph inputs and as adapter files.

One base ONNX file serves many adapters (``export_onnx(..., merge=False)``): every adapted
layer computes ``y = x W^T + b + (x A') B'`` where ``A'`` and ``B'`` are graph inputs named
as ONNX Runtime / Olive name them,

    <module path>.lora_A.weight   [in, lora_r]    (A transposed: the MatMul layout)
    <module path>.lora_B.weight   [lora_r, out]   (scale * B, transposed)

with the rank a dynamic dimension ``lora_r`` and a default value of rank 0 (an empty
tensor), so a run without an adapter is the base model. The LoRA scale (alpha / r) is folded
into B', so adapters of any rank and alpha fit the same graph. The tensors of one adapter
are stored in onnxruntime's adapter format (``.onnx_adapter``, written with
``onnxruntime.AdapterFormat``) and fed with ``RunOptions.add_active_adapter`` -- see
``OnnxRunner(adapter=...)``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lora_ext.layer import LoraLinear

from ._io import check_output_path, commit, staging_dir

ADAPTER_SUFFIX = ".onnx_adapter"
LORA_R = "lora_r"  # the name of the dynamic rank dimension, as Olive names it


def input_names(module_name: str) -> tuple[str, str]:
    """The graph input names of one adapted layer: (A' [in, r], B' [r, out])."""
    return f"{module_name}.lora_A.weight", f"{module_name}.lora_B.weight"


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLinear]]:
    """The LoraLinear modules of ``model`` as (name, module), in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear)]


def check_no_dora(model: nn.Module) -> None:
    """A hot-swap graph takes A' and B' as inputs and adds x A' B' to the base MatMul; DoRA's
    row scaling m / ||W + sBA|| is not expressible there: refuse, naming the option."""
    for name, layer in lora_layers(model):
        dora = [n for n in layer.pending_adapters() if n in layer.lora_magnitude_vector]
        if dora:
            raise ValueError(
                f"merge=False (hot-swap, `lora-ext export --hot-swap`): {name!r} has the DoRA "
                f"adapter {dora[0]!r}, whose row scaling m / ||W + sBA|| a hot-swap graph "
                "cannot express; export it merged (merge=True, without --hot-swap)"
            )


def layer_tensors(layer: LoraLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """(A' [in, r], B' [r, out]) in float32 for one LoraLinear: its pending adapters stacked
    along the rank with their scale folded into B' (``LoraLinear.stack_adapters``, what its
    forward computes); rank 0 when none is pending."""
    pending = layer.pending_adapters()
    if not pending:
        return (
            torch.zeros(layer.in_features, 0, dtype=torch.float32),
            torch.zeros(0, layer.out_features, dtype=torch.float32),
        )
    with torch.no_grad():
        a, b = layer.stack_adapters(pending, dtype=torch.float32)
    return a.t().contiguous().cpu(), b.t().contiguous().cpu()


def adapter_tensors(model: nn.Module) -> dict[str, np.ndarray]:
    """The hot-swap inputs for the adapter(s) active on ``model``: {input name: float32
    array}, for every LoraLinear whose active adapters are not merged.

    Raises:
        ValueError: the model has no LoraLinear layers, or an adapter is merged into the
            weights (its tensors would then count twice against a base export).
    """
    check_no_dora(model)
    layers = lora_layers(model)
    if not layers:
        raise ValueError(
            "model: got a model without LoRA layers; inject_ or load_adapter an adapter first"
        )
    out: dict[str, np.ndarray] = {}
    for name, layer in layers:
        if layer.merged_adapters:
            raise ValueError(
                f"model: adapter(s) {layer.merged_adapters} are merged into {name!r}; "
                "unmerge_ the model first (the base export expects unmerged weights)"
            )
        a, b = layer_tensors(layer)
        if a.shape[1] == 0:
            continue
        name_a, name_b = input_names(name)
        out[name_a] = a.numpy()
        out[name_b] = b.numpy()
    if not out:
        raise ValueError("model: no adapter is active on its LoRA layers; set_adapter one first")
    return out


def save_onnx_adapter(
    model_or_tensors: nn.Module | dict[str, np.ndarray], path: str | os.PathLike
) -> Path:
    """Write the active adapter of ``model`` (or ready tensors from ``adapter_tensors``) to
    an onnxruntime adapter file that ``OnnxRunner(adapter=path)`` feeds to a base model
    exported with ``merge=False``. The write is atomic.

    Args:
        model_or_tensors: a model carrying LoRA layers (the base it was exported from, with
            the adapter to save active), or {input name: float32 array [in, r] / [r, out]}.
        path: the output file, ending in ``.onnx_adapter``.

    Returns: the path written.
    """
    target = check_output_path(path, suffix=ADAPTER_SUFFIX)
    if isinstance(model_or_tensors, nn.Module):
        tensors = adapter_tensors(model_or_tensors)
    else:
        tensors = dict(model_or_tensors)
        for key, value in tensors.items():
            if not key.endswith((".lora_A.weight", ".lora_B.weight")):
                raise ValueError(
                    f"model_or_tensors: key {key!r} is not a LoRA input name "
                    "('<module>.lora_A.weight' or '<module>.lora_B.weight')"
                )
            if not isinstance(value, np.ndarray) or value.ndim != 2:
                raise ValueError(f"model_or_tensors[{key!r}]: need a 2-D numpy array")
    with staging_dir(target) as tmp:
        staged = tmp / target.name
        write_adapter_file(tensors, staged)
        commit([staged], target.parent)
    return target


def write_adapter_file(tensors: dict[str, np.ndarray], path: Path) -> None:
    """Write {name: array} with onnxruntime.AdapterFormat (float32), not atomically."""
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters(
        {
            k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v, dtype=np.float32))
            for k, v in tensors.items()
        }
    )
    fmt.export_adapter(str(path))


def read_onnx_adapter(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of an onnxruntime adapter file, {name: float32 array}."""
    import onnxruntime as ort

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"adapter: {str(p)!r} does not exist")
    fmt = ort.AdapterFormat.read_adapter(str(p))
    params = fmt.get_parameters()
    return {k: np.array(params[k].numpy()) for k in sorted(params)}


class LoraInputLinear(nn.Module):
    """Export-time stand-in for a LoraLinear: ``base_layer(x) + (x @ A') @ B'`` where A' and
    B' are set by the export wrapper from its forward arguments (so tracing turns them into
    graph inputs)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_a: torch.Tensor | None = None
        self.lora_b: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lora_a is None or self.lora_b is None:
            raise RuntimeError("LoraInputLinear: the export wrapper did not set A' and B'")
        return self.base_layer(x) + (x @ self.lora_a) @ self.lora_b
