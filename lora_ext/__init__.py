"""lora_ext: a compiled LoRA toolkit, from fine-tuning to a merged ONNX file.

The public API is imported lazily (PEP 562): ``import lora_ext`` stays cheap and the
compiled library is loaded by the first call that needs it, with a clear error if it
was never built (see ``lora_ext.ops``).

    import lora_ext
    cfg = lora_ext.LoraConfig(r=8, alpha=16, dropout=0.05, target_modules=["query", "value"])
    lora_ext.inject_(model, cfg)
    ...
    plain = lora_ext.merge_and_unload(model)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> submodule that defines it
_API: dict[str, str] = {
    "LoraConfig": "config",
    "LoraLinear": "layer",
    "inject_": "inject",
    "lora_parameters": "inject",
    "lora_param_groups": "inject",
    "merge_": "inject",
    "unmerge_": "inject",
    "merge_and_unload": "inject",
    "set_adapter": "inject",
    "delete_adapter": "inject",
    "summary": "inject",
    "save_adapter": "io",
    "load_adapter": "io",
    "build_info": "ops",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str) -> Any:
    module_name = _API.get(name)
    if module_name is None:
        raise AttributeError(f"module 'lora_ext' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"lora_ext.{module_name}"), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
