"""Save and load adapters in PEFT's on-disk format, with safetensors only.

A PEFT adapter directory holds ``adapter_config.json`` (PEFT's LoraConfig fields) and
``adapter_model.safetensors`` whose keys are ``base_model.model.<module path>.lora_A.weight``
[r, in] and ``...lora_B.weight`` [out, r] (no adapter name in the keys; biases, when the
adapter trains them, under their module path). Both directions work: adapters saved by
``peft.PeftModel.save_pretrained`` load here, and ours load with
``peft.PeftModel.from_pretrained(base, dir)``.

Pickle files (``adapter_model.bin``, ``.pt``) are refused: unpickling runs arbitrary code.

PiSSA adapters are saved with ``init_lora_weights="pissa"``; as in PEFT, loading one onto the
original base model recomputes the SVD residual of W and then loads A and B.

``modules_to_save`` (whole modules trained next to LoRA, e.g. the classifier head of a PEFT
``SEQ_CLS`` adapter) are stored as PEFT stores them: every ``state_dict`` tensor of each
selected module under its plain path (PEFT's in-model ``classifier.modules_to_save.<adapter>
.weight`` is saved as ``base_model.model.classifier.weight``). A module is selected as in
PEFT: its dotted name ends with one of the entries. Unlike PEFT, which keeps one copy of the
module per adapter, lora_ext keeps a single copy: loading writes the saved tensors into the
model's own module (``model.classifier``), so it is shared by every adapter on the model and
the last adapter loaded with it wins.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_ext.config import LoraConfig
from lora_ext.inject import (
    _inject,
    adapter_configs,
    check_adapter_name_free,
    lora_layers,
    resolve_targets,
)
from lora_ext.layer import LoraLinear, check_adapter_name

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# {adapter name: {"modules_to_save": [...], "task_type": ...}} for adapters loaded with
# modules_to_save, so that save_adapter writes them back the same way by default.
_SAVED_MODULES_ATTR = "_lora_ext_modules_to_save"


def _pickle_error(path: Path) -> ValueError:
    return ValueError(
        f"{path}: this is a pickle file; lora_ext reads adapters from safetensors only, because "
        "unpickling can run arbitrary code. If you trust the file, convert it once: "
        'python -c "import torch, safetensors.torch as st; '
        f"st.save_file(torch.load('{path.name}', weights_only=True), '{WEIGHTS_NAME}')\""
    )


def _find_files(path: str | os.PathLike) -> tuple[Path, Path]:
    """(config path, safetensors path) for an adapter directory or its weights file."""
    path = Path(path)
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise _pickle_error(path)
        if path.suffix != ".safetensors":
            raise ValueError(
                f"path: got {str(path)!r}, need an adapter directory or a .safetensors file"
            )
        weights, folder = path, path.parent
    elif path.is_dir():
        folder = path
        weights = folder / WEIGHTS_NAME
        if not weights.is_file():
            pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise _pickle_error(pickles[0])
            raise FileNotFoundError(f"path: {str(path)!r} has no {WEIGHTS_NAME}")
    else:
        raise FileNotFoundError(f"path: {str(path)!r} does not exist")
    config = folder / CONFIG_NAME
    if not config.is_file():
        raise FileNotFoundError(f"path: {str(folder)!r} has no {CONFIG_NAME}")
    return config, weights


def _default_adapter(model: nn.Module) -> str:
    configs = adapter_configs(model)
    if not configs:
        raise ValueError("the model has no LoRA adapters; call lora_ext.inject_ first")
    active = getattr(model, "_lora_ext_active", None) or []
    if len(configs) == 1:
        return next(iter(configs))
    if len(active) == 1:
        return active[0]
    raise ValueError(
        f"adapter_name: the model has adapters {list(configs)} (active: {active}); name the one to save"
    )


def _bias_names(model: nn.Module, config: LoraConfig, adapted: list[str]) -> list[str]:
    """Names of the bias parameters saved with an adapter, as PEFT picks them: every
    parameter with "bias" in its name for bias="all", the adapted layers' biases for
    bias="lora_only"."""
    if config.bias == "none":
        return []
    names = [n for n, _ in model.named_parameters()]
    if config.bias == "all":
        return [n for n in names if "bias" in n and ".lora_" not in n]
    return [f"{m}.base_layer.bias" for m in adapted if f"{m}.base_layer.bias" in names]


def _module_names_arg(arg: str, value: Any) -> list[str]:
    """A modules_to_save value as a list of non-empty strings ([] for None / empty)."""
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ValueError(
            f"{arg}: got {value!r}, need a list of module names such as ['classifier']"
        )
    for name in value:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{arg}: entry {name!r} is not a non-empty string")
    return list(value)


def _select_modules(model: nn.Module, patterns: list[str], arg: str) -> list[tuple[str, nn.Module]]:
    """(name, module) of the modules that ``modules_to_save`` entries select: as PEFT does,
    each module whose dotted name ends with an entry (modules inside a selected one travel
    with it). Entries that match nothing are skipped, as PEFT does (its SEQ_CLS configs list
    both "classifier" and "score"); if none matches, ValueError. A module holding LoRA layers
    is refused: its tensors would mix base weights with an adapter's."""
    if not patterns:
        return []
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not name or not any(name.endswith(p) for p in patterns):
            continue
        if any(name.startswith(f"{outer}.") for outer, _ in found):
            continue
        if any(isinstance(m, LoraLinear) for m in module.modules()):
            raise ValueError(
                f"{arg}: {patterns!r} selects {name!r}, which holds LoRA layers; a module "
                "to save must not also be a LoRA target"
            )
        found.append((name, module))
    if not found:
        raise ValueError(
            f"{arg}: {patterns!r} matches no module of {type(model).__name__} "
            f"(top-level modules: {[n for n, _ in model.named_children()]})"
        )
    return found


def _module_tensors(modules: list[tuple[str, nn.Module]]) -> dict[str, torch.Tensor]:
    """{"<module>.<state_dict key>": the live parameter or buffer} of the selected modules."""
    return {
        f"{name}.{key}": tensor
        for name, module in modules
        for key, tensor in module.state_dict(keep_vars=True).items()
    }


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str | None = None,
    modules_to_save: Sequence[str] | None = None,
    task_type: str | None = None,
) -> Path:
    """Write one adapter as PEFT does: ``adapter_config.json`` + ``adapter_model.safetensors``.

    Args:
        model: a model with LoRA adapters (merged or not).
        path: the directory to write (created if needed; existing files are replaced).
        adapter_name: which adapter; default: the only one, or the only active one.
        modules_to_save: PEFT's ``modules_to_save``: names of whole modules saved with the
            adapter (e.g. ``["classifier"]``, a trained head; every tensor of its
            ``state_dict``, as ``base_model.model.classifier.weight`` [labels, hidden] ...).
            Default: what the adapter was loaded with (see ``load_adapter``), else none.
            These modules are shared by all adapters on the model (one copy, not PEFT's one
            per adapter), so their current values are written.
        task_type: PEFT's ``task_type`` for the config (e.g. ``"SEQ_CLS"``). Default: what
            the adapter was loaded with, else None.

    Returns: the directory path.
    """
    from safetensors.torch import save_file

    name = _default_adapter(model) if adapter_name is None else adapter_name
    configs = adapter_configs(model)
    if name not in configs:
        raise ValueError(f"adapter_name: {name!r} is not on this model (adapters: {list(configs)})")
    config = configs[name]
    layers = [(n, layer) for n, layer in lora_layers(model) if name in layer.lora_A]
    tensors: dict[str, torch.Tensor] = {}
    for module_name, layer in layers:
        tensors[f"{PREFIX}{module_name}.lora_A.weight"] = layer.lora_A[name].detach()
        tensors[f"{PREFIX}{module_name}.lora_B.weight"] = layer.lora_B[name].detach()
    params = dict(model.named_parameters())
    for bias_name in _bias_names(model, config, [n for n, _ in layers]):
        tensors[PREFIX + bias_name] = params[bias_name].detach()
    recorded = getattr(model, _SAVED_MODULES_ATTR, {}).get(name, {})
    if modules_to_save is None:
        modules_to_save = recorded.get("modules_to_save")
    if task_type is None:
        task_type = recorded.get("task_type")
    patterns = _module_names_arg("modules_to_save", modules_to_save)
    for key, tensor in _module_tensors(_select_modules(model, patterns, "modules_to_save")).items():
        tensors[PREFIX + key] = tensor.detach()
    tensors = {k: v.to("cpu").contiguous() for k, v in tensors.items()}

    base_cls = type(model)
    extra: dict[str, Any] = {
        "modules_to_save": patterns or None,
        "task_type": task_type,
        "base_model_name_or_path": getattr(model, "name_or_path", None) or None,
        "auto_mapping": {
            "base_model_class": base_cls.__name__,
            "parent_library": base_cls.__module__,
        },
    }
    peft_config = config.to_peft_dict(
        fan_in_fan_out=any(layer.fan_in_fan_out for _, layer in layers), **extra
    )
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
    return out


def load_adapter(
    model: nn.Module, path: str | os.PathLike, adapter_name: str = "default"
) -> nn.Module:
    """Load a PEFT-format adapter (saved by PEFT or by ``save_adapter``) into ``model``.

    All or nothing: the config, every key and every shape (LoRA tensors and
    ``modules_to_save`` tensors alike) are checked against the model before it is touched;
    on a mismatch ValueError names the first one and the model is exactly as before. The
    adapter becomes active if it is the model's first one (else ``set_adapter`` picks it,
    as in PEFT).

    ``modules_to_save`` (e.g. the classifier head of a PEFT SEQ_CLS adapter, saved as
    ``base_model.model.classifier.weight`` [labels, hidden] and ``.bias`` [labels]): every
    tensor of each selected module must be in the file; they are copied into the model's
    own module, which is therefore shared by all adapters on the model (PEFT keeps one copy
    per adapter; here the last adapter loaded with the module sets it). The config's
    ``modules_to_save`` and ``task_type`` are remembered for ``save_adapter``.

    Args:
        model: the base model (plain, or already carrying other adapters).
        path: the adapter directory (or its .safetensors file next to adapter_config.json).
        adapter_name: the name to give the adapter on this model.

    Returns: ``model``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_adapter_name(adapter_name)
    config_path, weights_path = _find_files(path)
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{config_path}: need a JSON object, got {type(raw).__name__}")
    patterns = _module_names_arg(f"{CONFIG_NAME} modules_to_save", raw.get("modules_to_save"))
    # LoraConfig describes the LoRA part only; the saved modules are handled here.
    config = LoraConfig.from_peft_dict({**raw, "modules_to_save": None})
    try:
        state = load_file(str(weights_path))
    except SafetensorError as exc:
        raise ValueError(f"{weights_path}: not a readable safetensors file ({exc})") from None

    check_adapter_name_free(model, adapter_name)
    targets = resolve_targets(model, config)
    saved_modules = _select_modules(model, patterns, f"{CONFIG_NAME} modules_to_save")
    target_names = {n for n, _ in targets}
    for module_name, _ in saved_modules:
        inside = [t for t in target_names if t == module_name or t.startswith(f"{module_name}.")]
        if inside:
            raise ValueError(
                f"{CONFIG_NAME}: modules_to_save selects {module_name!r}, which target_modules "
                f"also adapts ({inside[0]!r}); a module cannot be both"
            )
    module_tensors = _module_tensors(saved_modules)

    # expected tensors, with the names the model will have after injection
    expected: dict[str, tuple[int, ...]] = {}
    wrapped: set[str] = set()
    for module_name, module in targets:
        base = module.base_layer if isinstance(module, LoraLinear) else module
        out_f, in_f = base.weight.shape
        if not isinstance(base, nn.Linear):  # Conv1D: weight [in, out]
            out_f, in_f = in_f, out_f
        r = config.rank_for(module_name)
        expected[f"{module_name}.lora_A.weight"] = (r, in_f)
        expected[f"{module_name}.lora_B.weight"] = (out_f, r)
        if not isinstance(module, LoraLinear):
            wrapped.add(module_name)
    post_params = {_post_name(n, wrapped): p for n, p in model.named_parameters()}

    loaded: dict[str, torch.Tensor] = {}
    for key in sorted(state):
        name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        tensor = state[key]
        if name in module_tensors:
            target = module_tensors[name]
            need = tuple(target.shape)
            if tensor.is_floating_point() != target.is_floating_point():
                raise ValueError(
                    f"{weights_path.name}: key {key!r} has dtype {tensor.dtype} but the model's "
                    f"tensor is {target.dtype}"
                )
        elif name in expected:
            need = expected[name]
        elif "bias" in name.rsplit(".", 1)[-1] and name in post_params and config.bias != "none":
            need = tuple(post_params[name].shape)
        else:
            raise ValueError(
                f"{weights_path.name}: key {key!r} does not fit the model: no such LoRA "
                f"tensor for target_modules={config.target_modules!r} nor tensor of "
                f"modules_to_save={patterns!r} (expected keys like {PREFIX}{next(iter(expected))})"
            )
        if tuple(tensor.shape) != need:
            raise ValueError(
                f"{weights_path.name}: key {key!r} has shape {list(tensor.shape)} but the model "
                f"needs {list(need)}"
            )
        if not tensor.is_floating_point() and name not in module_tensors:
            raise ValueError(
                f"{weights_path.name}: key {key!r} has dtype {tensor.dtype}, need floating point"
            )
        loaded[name] = tensor
    missing = [n for n in expected if n not in loaded]
    if missing:
        raise ValueError(
            f"{weights_path.name}: missing key {PREFIX + missing[0]!r} ({len(missing)} missing "
            f"of {len(expected)} LoRA tensors the config selects)"
        )
    missing = [n for n in module_tensors if n not in loaded]
    if missing:
        raise ValueError(
            f"{weights_path.name}: missing key {PREFIX + missing[0]!r} ({len(missing)} missing "
            f"of {len(module_tensors)} tensors of modules_to_save={patterns!r})"
        )

    # everything fits: now change the model. PiSSA residualises W exactly as PEFT does on
    # load; otherwise A and B start at zero (no random draws) and are overwritten here.
    _inject(model, config, adapter_name, init="pissa" if config.init == "pissa" else None)
    layers = dict(lora_layers(model))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in loaded.items():
            module_name, _, leaf = name.rpartition(".")
            if name in module_tensors:  # the live tensor of the (unwrapped) saved module
                module_tensors[name].copy_(tensor)
            elif leaf == "weight" and module_name.endswith((".lora_A", ".lora_B")):
                layer_name, _, which = module_name.rpartition(".")
                table = getattr(layers[layer_name], which)
                table[adapter_name].copy_(tensor)
            else:
                params[name].copy_(tensor)
    if patterns:
        recorded = dict(getattr(model, _SAVED_MODULES_ATTR, {}))
        recorded[adapter_name] = {"modules_to_save": patterns, "task_type": raw.get("task_type")}
        setattr(model, _SAVED_MODULES_ATTR, recorded)
    return model


def _post_name(param_name: str, wrapped: set[str]) -> str:
    """A parameter's name once the modules in ``wrapped`` are wrapped in LoraLinear
    (``x.query.bias`` -> ``x.query.base_layer.bias``)."""
    module_name, _, leaf = param_name.rpartition(".")
    return f"{module_name}.base_layer.{leaf}" if module_name in wrapped else param_name
