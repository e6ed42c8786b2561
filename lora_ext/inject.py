"""Model-level LoRA API: inject adapters, pick/delete them, merge, unload, summarise.

Every function here either does its whole job or raises before changing the model: inputs
are resolved and validated first (targets, types, names, ranks), the model is touched last.

Adapter bookkeeping lives on the model in ``model._lora_ext_configs`` ({name: LoraConfig}, in
creation order); the per-layer state (tensors, active and merged lists) lives in each
LoraLinear.
"""

from __future__ import annotations

import difflib
import re
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lora_ext.config import LoraConfig
from lora_ext.layer import LoraLinear, check_adapter_name, is_supported

_CONFIGS_ATTR = "_lora_ext_configs"


# -- bookkeeping ---------------------------------------------------------------------------
def adapter_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """{adapter name: LoraConfig} of the adapters on ``model`` (empty if none)."""
    return getattr(model, _CONFIGS_ATTR, None) or {}


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLinear]]:
    """(dotted name, layer) of every LoraLinear in ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear)]


def active_adapters(model: nn.Module) -> list[str]:
    """Names of the active adapters (those the forward pass uses), in the order given."""
    recorded = getattr(model, "_lora_ext_active", None) or []
    return [n for n in recorded if n in adapter_configs(model)]


def _require_adapters(model: nn.Module, what: str) -> None:
    if not lora_layers(model):
        raise ValueError(f"{what}: the model has no LoRA layers; call lora_ext.inject_ first")


# -- target matching -----------------------------------------------------------------------
def _candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) pairs that target_modules may match: every named submodule except the
    root and the insides of LoraLinear layers (their base_layer is not a separate target)."""
    inside: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p) for p in inside):
            continue
        if isinstance(module, LoraLinear):
            inside.append(name + ".")
        yield name, module


def _name_matches(names: list[str] | str, key: str) -> bool:
    # PEFT's check_target_module_exists: a string is a regex for the full name; a list
    # matches the exact name or a dotted suffix.
    if isinstance(names, str):
        return re.fullmatch(names, key) is not None
    return key in names or any(key.endswith("." + n) for n in names)


def _close_names(query: str, names: list[str]) -> list[str]:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    close = difflib.get_close_matches(query, leaves, n=5, cutoff=0.5)
    close += [n for n in difflib.get_close_matches(query, names, n=3, cutoff=0.6) if n not in close]
    return close


def _unmatched_error(
    model: nn.Module, entry: str, names: list[str], modules: dict, excluded: bool
) -> ValueError:
    after = " left by exclude_modules" if excluded else ""
    adaptable = sorted(
        {
            n.rsplit(".", 1)[-1]
            for n in names
            if is_supported(modules[n]) or isinstance(modules[n], LoraLinear)
        }
    )
    close = _close_names(entry, names)
    hint = f"close module names: {close}" if close else "no module name is close"
    return ValueError(
        f"target_modules: {entry!r} matches no module of {type(model).__name__}{after} ({hint}; "
        f"adaptable layer names: {adaptable[:20]})"
    )


def resolve_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    """The modules ``config`` selects, as (name, module), validated without touching the
    model: every target_modules entry must match something and every match must be a
    supported layer (nn.Linear, Conv1D, or an already wrapped LoraLinear).

    Raises: ValueError for entries matching nothing (with close names), TypeError for an
    unsupported layer type.
    """
    candidates = list(_candidate_modules(model))
    names = [n for n, _ in candidates]
    modules = dict(candidates)
    target = config.target_modules
    exclude = config.exclude_modules
    selected = [
        (n, m)
        for n, m in candidates
        if _name_matches(target, n) and not (exclude and _name_matches(exclude, n))
    ]
    entries = [target] if isinstance(target, str) else target
    for entry in entries:
        single: list[str] | str = entry if isinstance(target, str) else [entry]
        if not any(_name_matches(single, n) for n, _ in selected):
            raise _unmatched_error(model, entry, names, modules, excluded=bool(exclude))
    for name, module in selected:
        if not (isinstance(module, LoraLinear) or is_supported(module)):
            raise TypeError(
                f"target_modules: {name!r} is a {type(module).__name__}; lora_ext adapts "
                "nn.Linear and transformers' Conv1D layers only (narrow target_modules, "
                "e.g. with a regex or exclude_modules)"
            )
    return selected


# -- inject --------------------------------------------------------------------------------
def check_adapter_name_free(model: nn.Module, adapter_name: str) -> None:
    """Raise ValueError if ``adapter_name`` is already used by a config or a layer of model."""
    existing = set(adapter_configs(model))
    existing |= {a for _, layer in lora_layers(model) for a in layer.lora_A}
    if adapter_name in existing:
        raise ValueError(
            f"adapter_name: {adapter_name!r} is already in use on this model (adapters: "
            f"{sorted(existing)}); pick another name or delete_adapter first"
        )


def inject_(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> nn.Module:
    """Add LoRA adapter ``adapter_name`` to the layers ``config.target_modules`` selects, in
    place. Matching layers are wrapped in LoraLinear (the original layer becomes its
    ``base_layer``); every non-LoRA parameter of the model is frozen (biases stay trainable
    per ``config.bias``).

    The first adapter on a model becomes the active one; later adapters are added inactive
    (as PEFT's add_adapter), so their tensors stay frozen until ``set_adapter`` picks them.

    Returns: ``model``. On any error the model is left unchanged.
    """
    return _inject(
        model, config, adapter_name, init=config.init if isinstance(config, LoraConfig) else None
    )


def _inject(model: nn.Module, config: LoraConfig, adapter_name: str, init: str | None) -> nn.Module:
    """inject_ with the init overridable: load_adapter passes init=None (zeros, no random
    draws) for tensors it overwrites next, or "pissa" to residualise W as PEFT does."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config: got {type(config).__name__}, need lora_ext.LoraConfig")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: got {type(model).__name__}, need a torch.nn.Module")
    check_adapter_name(adapter_name)
    check_adapter_name_free(model, adapter_name)
    existing = adapter_configs(model)
    in_layers = any(layer.lora_A for _, layer in lora_layers(model))
    targets = resolve_targets(model, config)
    plans = []
    for name, module in targets:
        layer = module if isinstance(module, LoraLinear) else None
        base = layer.base_layer if layer is not None else module
        r = config.rank_for(name)
        if init == "pissa":
            weight = base.weight
            dims = weight.shape
            if r > min(dims):
                raise ValueError(
                    f"rank for {name!r}: got r={r} with init='pissa', need r <= {min(dims)} "
                    f"(the smaller side of its weight {tuple(dims)})"
                )
            if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
                raise TypeError(
                    f"init='pissa' on {name!r}: weight dtype {weight.dtype} is not float"
                )
        plans.append((name, module, r, config.alpha_for(name)))

    # -- from here on nothing can fail on bad input: mutate the model
    first = not existing and not in_layers
    for name, module, r, alpha in plans:
        if isinstance(module, LoraLinear):
            layer = module
        else:
            layer = LoraLinear(module)
            _set_submodule(model, name, layer)
        layer.add_adapter(
            adapter_name,
            r=r,
            alpha=alpha,
            dropout=config.dropout,
            use_rslora=config.use_rslora,
            init=init,
        )
    configs = dict(existing)
    configs[adapter_name] = config
    setattr(model, _CONFIGS_ATTR, configs)
    active = [adapter_name] if first else active_adapters(model)
    _apply_active(model, active)
    return model


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _apply_active(model: nn.Module, names: list[str]) -> None:
    """Set the active adapters on every layer and the trainable flags on the whole model:
    LoRA tensors of active adapters train, everything else is frozen except the biases the
    active adapters' configs ask for."""
    model._lora_ext_active = list(names)
    layers = lora_layers(model)
    for _, layer in layers:
        layer.set_adapter(names)
    lora_ids = {
        id(p) for _, layer in layers for d in (layer.lora_A, layer.lora_B) for p in d.values()
    }
    bias_ids = {id(p) for _, p in _trained_biases(model)}
    for param in model.parameters():
        if id(param) not in lora_ids:  # LoRA tensors: set by layer.set_adapter
            param.requires_grad_(id(param) in bias_ids)


def _trained_biases(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The biases the active adapters train, chosen as PEFT does: bias="all" every parameter
    with "bias" in its name, "lora_only" the biases of layers carrying an active adapter."""
    configs = adapter_configs(model)
    modes = {configs[n].bias for n in active_adapters(model) if n in configs}
    if modes <= {"none"}:
        return []
    adapted = {
        f"{name}.base_layer.bias"
        for name, layer in lora_layers(model)
        if layer.active_adapters and layer.base_layer.bias is not None
    }
    return [
        (n, p)
        for n, p in model.named_parameters()
        if ".lora_A." not in n
        and ".lora_B." not in n
        and (("all" in modes and "bias" in n) or ("lora_only" in modes and n in adapted))
    ]


# -- adapters ------------------------------------------------------------------------------
def set_adapter(model: nn.Module, adapter_name: str | list[str]) -> nn.Module:
    """Make ``adapter_name`` (or a list of names, whose outputs are summed) the active
    adapter(s); only their tensors require grad. A merged model is unmerged first (with a
    warning), as in PEFT.

    Returns: ``model``.
    """
    _require_adapters(model, "set_adapter")
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    configs = adapter_configs(model)
    if not names:
        raise ValueError("adapter_name: got an empty list, need at least one adapter name")
    for name in names:
        if name not in configs:
            raise ValueError(
                f"adapter_name: {name!r} is not on this model (adapters: {list(configs)})"
            )
    if len(set(names)) != len(names):
        raise ValueError(f"adapter_name: got duplicates in {names}")
    if any(layer.merged for _, layer in lora_layers(model)):
        warnings.warn("set_adapter: the model is merged; unmerging it first", stacklevel=2)
        unmerge_(model)
    _apply_active(model, names)
    return model


def delete_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Remove adapter ``adapter_name`` from every layer. Layers left without adapters are
    replaced by their plain base layer. If it was active, the remaining active adapters (or
    else the first remaining adapter) become active. A merged adapter must be unmerged first.

    Returns: ``model``.
    """
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise ValueError(
            f"adapter_name: {adapter_name!r} is not on this model (adapters: {list(configs)})"
        )
    layers = lora_layers(model)
    merged = [n for n, layer in layers if adapter_name in layer.merged_adapters]
    if merged:
        raise ValueError(
            f"delete_adapter: {adapter_name!r} is merged into {len(merged)} layers (first: "
            f"{merged[0]!r}); call lora_ext.unmerge_(model) first"
        )
    for name, layer in layers:
        if adapter_name in layer.lora_A:
            layer.delete_adapter(adapter_name)
        if not layer.lora_A:
            _set_submodule(model, name, layer.base_layer)
    remaining = {n: c for n, c in configs.items() if n != adapter_name}
    active = [n for n in active_adapters(model) if n != adapter_name]
    if remaining:
        setattr(model, _CONFIGS_ATTR, remaining)
        _apply_active(model, active or [next(iter(remaining))])
    else:
        _drop_bookkeeping(model)
    return model


def _drop_bookkeeping(model: nn.Module) -> None:
    for attr in (_CONFIGS_ATTR, "_lora_ext_active"):
        if attr in model.__dict__:
            delattr(model, attr)


# -- parameters ----------------------------------------------------------------------------
def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The tensors training updates: lora_A and lora_B of the active adapters, in module
    order, plus the biases their config trains (``bias="all"/"lora_only"``).

    Right after inject_ / set_adapter this is exactly the set of parameters with
    requires_grad (parameters the caller unfreezes later, e.g. a head, are not included).
    """
    _require_adapters(model, "lora_parameters")
    groups = _split_params(model)
    return groups["lora_A"] + groups["lora_B"] + groups["bias"]


def _split_params(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    out: dict[str, list[nn.Parameter]] = {"lora_A": [], "lora_B": [], "bias": []}
    lora_ids = set()
    for _, layer in lora_layers(model):
        for name in layer.active_adapters:
            out["lora_A"].append(layer.lora_A[name])
            out["lora_B"].append(layer.lora_B[name])
        lora_ids.update(id(p) for d in (layer.lora_A, layer.lora_B) for p in d.values())
    out["bias"] = [p for _, p in _trained_biases(model) if id(p) not in lora_ids]
    return out


def lora_param_groups(
    model: nn.Module, lr: float, lr_ratio: float = 16.0, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """Optimizer parameter groups for LoRA+ (Hayou et al. 2024): B learns ``lr_ratio`` times
    faster than A.

    Returns: [{"name": "lora_A", "params": [...], "lr": lr, "weight_decay": weight_decay},
    {"name": "lora_B", ..., "lr": lr * lr_ratio}, and {"name": "bias", ..., "lr": lr,
    "weight_decay": 0.0} when biases train]. Pass it to any torch optimizer.
    """
    if not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr: got {lr!r}, need a positive float")
    if not isinstance(lr_ratio, (int, float)) or not lr_ratio > 0:
        raise ValueError(f"lr_ratio: got {lr_ratio!r}, need a positive float")
    _require_adapters(model, "lora_param_groups")
    split = _split_params(model)
    groups = [
        {"name": "lora_A", "params": split["lora_A"], "lr": lr, "weight_decay": weight_decay},
        {
            "name": "lora_B",
            "params": split["lora_B"],
            "lr": lr * lr_ratio,
            "weight_decay": weight_decay,
        },
        {"name": "bias", "params": split["bias"], "lr": lr, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


# -- merge ---------------------------------------------------------------------------------
def merge_(model: nn.Module, safe: bool = False) -> nn.Module:
    """Merge the active adapters into the base weights in place (W += s B A via the compiled
    ``ops.merge_``, accumulated in float32, rounded once). The forward is then the plain
    base layers. Merging an already merged adapter is a no-op with one warning.

    safe=True: every layer is checked first (a finite delta, no finite weight overflowing:
    ``ops.merge_is_safe``); if one fails, ValueError is raised and no weight changes.

    Returns: ``model``.
    """
    _require_adapters(model, "merge_")
    _merge(model, safe=safe, warn=True)
    return model


def _merge(model: nn.Module, safe: bool, warn: bool) -> None:
    layers = lora_layers(model)
    if safe:
        # every layer is checked before any is merged: a refusal leaves the model untouched
        for name, layer in layers:
            todo = [a for a in layer.active_adapters if a not in layer.merged_adapters]
            problem = layer.merge_problem(todo)
            if problem:
                raise ValueError(f"safe merge: {problem} in {name!r}; nothing was merged")
    skipped: set[str] = set()
    for _, layer in layers:
        skipped.update(layer.merge())  # checked above, all layers before any merge
    if skipped and warn:
        warnings.warn(
            f"merge_: adapter(s) {sorted(skipped)} already merged; nothing done for them",
            stacklevel=3,
        )


def unmerge_(model: nn.Module) -> nn.Module:
    """Subtract every merged adapter from the base weights (the inverse of merge_, up to
    rounding of the weight dtype). Warns once if nothing was merged.

    Returns: ``model``.
    """
    _require_adapters(model, "unmerge_")
    done = [layer.unmerge() for _, layer in lora_layers(model)]
    if not any(done):
        warnings.warn("unmerge_: nothing is merged; nothing done", stacklevel=2)
    return model


def merge_and_unload(model: nn.Module, safe: bool = False) -> nn.Module:
    """Merge the active adapters and replace every LoraLinear by its base layer, in place.

    The result holds plain nn.Linear / Conv1D modules only (no LoRA code, inactive adapters
    are dropped), ready for export. Base parameters stay frozen.

    Returns: ``model`` (the same object).
    """
    _require_adapters(model, "merge_and_unload")
    _merge(model, safe=safe, warn=False)
    for name, layer in lora_layers(model):
        _set_submodule(model, name, layer.base_layer)
    _drop_bookkeeping(model)
    return model


# -- summary -------------------------------------------------------------------------------
def summary(model: nn.Module) -> str:
    """A readable table: adapters (rank, alpha, scale, layers adapted, active, merged) and
    trainable vs total parameters."""
    layers = lora_layers(model)
    configs = adapter_configs(model)
    active = active_adapters(model)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lines = [f"{type(model).__name__}: {len(layers)} LoRA layers"]
    lines.append(
        f"  {'adapter':<12} {'r':>4} {'alpha':>7} {'scale':>8} {'layers':>7}  state  targets"
    )
    for name, cfg in configs.items():
        with_adapter = [layer for _, layer in layers if name in layer.lora_A]
        ranks = sorted({layer.r[name] for layer in with_adapter})
        rank = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
        scales = sorted({layer.scaling[name] for layer in with_adapter})
        scale = f"{scales[0]:.4g}" if len(scales) == 1 else f"{scales[0]:.3g}-{scales[-1]:.3g}"
        merged = any(name in layer.merged_adapters for layer in with_adapter)
        state = "merged" if merged else ("active" if name in active else "-")
        lines.append(
            f"  {name:<12} {rank:>4} {cfg.alpha:>7g} {scale:>8} {len(with_adapter):>7}  "
            f"{state:<6} {cfg.target_modules}"
        )
    pct = 100.0 * trainable / total if total else 0.0
    lines.append(f"  trainable params: {trainable:,} / {total:,} ({pct:.3f}%)")
    return "\n".join(lines)
