"""Model-level LoRA API: inject adapters, pick/delete them, merge, unload, summarise.

Every function here either does its whole job or raises before changing the model: inputs
are resolved and validated first (targets, types, names, ranks), the model is touched last.

Adapter bookkeeping lives on the model in ``model._lora_ext_configs`` ({name: LoraConfig}, in
creation order); the per-layer state (tensors, active and merged lists) lives in each
LoraLinear.
"""

from __future__ import annotations

import copy
import difflib
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lora_ext import dora, quantized
from lora_ext.config import (
    FLOAT32_MAX,
    LoraConfig,
    NameMatcher,
    Task,
    matched_entries,
    names_match,
    scale_of,
)
from lora_ext.layer import LoraLinear, check_adapter_name, is_supported, out_in

_CONFIGS_ATTR = "_lora_ext_configs"
# {adapter name: {"modules_to_save": [...], "task_type": ...}}: the whole modules (e.g. a
# classifier head) an adapter trains and saves, resolved when it was injected or loaded.
SAVED_MODULES_ATTR = "_lora_ext_modules_to_save"
# PEFT's SEQ_CLS task adds these to modules_to_save (PeftModelForSequenceClassification)
SEQ_CLS_HEADS = ("classifier", "score")


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


def resolve_targets(
    model: nn.Module, config: LoraConfig, matcher: NameMatcher | None = None
) -> list[tuple[str, nn.Module]]:
    """The modules ``config`` selects, as (name, module), validated without touching the
    model: every target_modules entry must match something and every match must be a
    supported layer (nn.Linear, Conv1D, or an already wrapped LoraLinear).

    Names are matched with PEFT's rules (``check_target_module_exists``); regexes run with
    bounded work (``matcher``, a fresh ``NameMatcher`` by default).

    Raises: ValueError for entries matching nothing (with close names) or a regex that
    runs out of time, TypeError for an unsupported layer type.
    """
    matcher = matcher or NameMatcher()
    candidates = list(_candidate_modules(model))
    names = [n for n, _ in candidates]
    modules = dict(candidates)
    target = config.target_modules
    exclude = config.exclude_modules
    target_set = target if isinstance(target, str) else frozenset(target)
    exclude_set = exclude if exclude is None or isinstance(exclude, str) else frozenset(exclude)
    selected = []
    hit: set[str] = set()  # list entries that select at least one module
    for n, m in candidates:
        if isinstance(target_set, str):
            if not matcher.fullmatch("target_modules", target_set, n):
                continue
        else:
            entries = matched_entries(target_set, n)
            if not entries:
                continue
        if exclude_set and names_match(exclude_set, n, matcher, "exclude_modules"):
            continue
        if not isinstance(target_set, str):
            hit |= entries
        selected.append((n, m))
    if isinstance(target, str):
        if not selected:
            raise _unmatched_error(model, target, names, modules, excluded=bool(exclude))
    else:
        for entry in target:
            if entry not in hit:
                raise _unmatched_error(model, entry, names, modules, excluded=bool(exclude))
    for name, module in selected:
        if not (isinstance(module, LoraLinear) or is_supported(module)):
            raise TypeError(
                f"target_modules: {name!r} is a {type(module).__name__}; lora_ext adapts "
                "nn.Linear and transformers' Conv1D layers only (narrow target_modules, "
                "e.g. with a regex or exclude_modules)"
            )
    return selected


# -- modules_to_save -----------------------------------------------------------------------
def select_modules(
    model: nn.Module, patterns: Sequence[str], arg: str
) -> list[tuple[str, nn.Module]]:
    """(name, module) of the modules ``modules_to_save`` entries select: as PEFT does, each
    module whose dotted name ends with an entry (modules inside a selected one travel with
    it). Entries that match nothing are skipped, as PEFT does (its SEQ_CLS configs list both
    "classifier" and "score"); if none matches, ValueError. A module holding LoRA layers is
    refused: its tensors would mix base weights with an adapter's."""
    if not patterns:
        return []
    wanted = frozenset(patterns)
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        # name.endswith(p) for some p, as a set look-up of every suffix of the name
        if not name or not any(name[i:] in wanted for i in range(len(name))):
            continue
        if any(name.startswith(f"{outer}.") for outer, _ in found):
            continue
        if any(isinstance(m, LoraLinear) for m in module.modules()):
            raise ValueError(
                f"{arg}: {list(patterns)!r} selects {name!r}, which holds LoRA layers; a module "
                "to save must not also be a LoRA target"
            )
        found.append((name, module))
    if not found:
        raise ValueError(
            f"{arg}: {list(patterns)!r} matches no module of {type(model).__name__} "
            f"(top-level modules: {[n for n, _ in model.named_children()]})"
        )
    return found


def default_modules_to_save(model: nn.Module) -> tuple[list[str], str | None]:
    """(modules_to_save, PEFT task_type) that ``modules_to_save=None`` means for ``model``:
    for a sequence classifier its task head, as PEFT's SEQ_CLS task (a head that was
    initialised for this task has to learn, and an adapter without it would be useless)."""
    if Task.of_model(model) is not Task.SEQ_CLS:
        return [], None
    heads = [h for h in SEQ_CLS_HEADS if isinstance(getattr(model, h, None), nn.Module)]
    if not heads:
        raise ValueError(
            f"modules_to_save: {type(model).__name__} is a sequence classifier without a head "
            f"named {list(SEQ_CLS_HEADS)}; name its (freshly initialised) head, e.g. "
            "modules_to_save=['my_head'], so that it trains and is saved with the adapter, or "
            "pass modules_to_save=[] to keep it frozen"
        )
    return heads, "SEQ_CLS"


def saved_modules(model: nn.Module, adapter_name: str) -> dict[str, Any]:
    """{"modules_to_save": [...], "task_type": ...} recorded for an adapter ({} if none)."""
    return dict(getattr(model, SAVED_MODULES_ATTR, {}).get(adapter_name, {}))


def _resolve_saved(
    model: nn.Module, config: LoraConfig, targets: list[tuple[str, nn.Module]]
) -> tuple[list[str], str | None]:
    """(modules_to_save patterns, task_type) for a new adapter, validated: they select
    modules, and none of them is also a LoRA target."""
    if config.modules_to_save is None:
        patterns, task_type = default_modules_to_save(model)
    else:
        patterns = list(config.modules_to_save)
        task_type = "SEQ_CLS" if patterns and Task.of_model(model) is Task.SEQ_CLS else None
    chosen = select_modules(model, patterns, "modules_to_save")
    target_names = [n for n, _ in targets]
    for module_name, _ in chosen:
        inside = [t for t in target_names if t == module_name or t.startswith(f"{module_name}.")]
        if inside:
            raise ValueError(
                f"modules_to_save selects {module_name!r}, which target_modules also adapts "
                f"({inside[0]!r}); a module cannot be both"
            )
    return patterns, task_type


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
    ``base_layer``); every non-LoRA parameter of the model is frozen, except the biases
    ``config.bias`` trains and the modules of ``config.modules_to_save``: by default, on a
    sequence classifier, its freshly initialised head (``classifier`` / ``score``), which
    trains and is saved with the adapter, as PEFT's SEQ_CLS task does.

    The first adapter on a model becomes the active one; later adapters are added inactive
    (as PEFT's add_adapter), so their tensors stay frozen until ``set_adapter`` picks them.

    Returns: ``model``. On any error the model is left unchanged.
    """
    return _inject(
        model, config, adapter_name, init=config.init if isinstance(config, LoraConfig) else None
    )


@dataclass
class InjectPlan:
    """What ``_inject`` will do, fully validated before the model is touched."""

    adapter_name: str
    config: LoraConfig
    init: str | None
    targets: list[tuple[str, nn.Module, int, float]]  # (name, module, r, alpha)
    modules_to_save: list[str]
    task_type: str | None
    saved: list[tuple[str, nn.Module]] = field(default_factory=list)  # modules_to_save


def plan_inject(
    model: nn.Module,
    config: LoraConfig,
    adapter_name: str,
    init: str | None,
    matcher: NameMatcher | None = None,
) -> InjectPlan:
    """Validate an injection without touching the model: the targets, each one's rank
    (at most min(in, out)) and scale (finite in float32), and the modules to save."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config: got {type(config).__name__}, need lora_ext.LoraConfig")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: got {type(model).__name__}, need a torch.nn.Module")
    check_adapter_name(adapter_name)
    check_adapter_name_free(model, adapter_name)
    matcher = matcher or NameMatcher()
    targets = resolve_targets(model, config, matcher)
    plans = []
    for name, module in targets:
        base = module.base_layer if isinstance(module, LoraLinear) else module
        weight = base.weight
        if config.use_dora:
            dora.check_base(name, base)
        r = config.rank_for(name, matcher)
        alpha = config.alpha_for(name, matcher)
        dims = out_in(base)
        if r > min(dims):
            raise ValueError(
                f"rank for {name!r}: got r={r}, need r <= {min(dims)} (the smaller side of its "
                f"weight {dims}: a larger rank adds parameters but not expressiveness)"
            )
        scale = scale_of(alpha, r, config.use_rslora)
        if not scale <= FLOAT32_MAX:
            raise ValueError(
                f"alpha (lora_alpha): {alpha!r} with r={r} gives {name!r} the scale {scale:.3g}, "
                f"which overflows float32 (max {FLOAT32_MAX:.3g}); need a smaller alpha"
            )
        if init == "pissa" and weight.dtype not in (
            torch.float32,
            torch.float16,
            torch.bfloat16,
            torch.float64,
        ):
            raise TypeError(f"init='pissa' on {name!r}: weight dtype {weight.dtype} is not float")
        plans.append((name, module, r, alpha))
    patterns, task_type = _resolve_saved(model, config, targets)
    saved = select_modules(model, patterns, "modules_to_save")
    return InjectPlan(adapter_name, config, init, plans, patterns, task_type, saved)


class _Rollback:
    """Undo a failed injection (and whatever the caller wrote inside it): the module tree,
    the new adapter on already wrapped layers, their active lists, in-place written tensors
    (``protect``), every requires_grad flag and the bookkeeping attributes. Used as a
    context manager around the mutation; on an exception it restores, then re-raises."""

    _ATTRS = (_CONFIGS_ATTR, "_lora_ext_active", SAVED_MODULES_ATTR)

    def __init__(self, model: nn.Module, adapter_name: str, protect: list[torch.Tensor]):
        self.model = model
        self.adapter_name = adapter_name
        self.attrs = {a: copy.copy(model.__dict__[a]) for a in self._ATTRS if a in model.__dict__}
        self.flags = [(p, p.requires_grad) for p in model.parameters()]
        self.layers = [(layer, list(layer.active_adapters)) for _, layer in lora_layers(model)]
        self.tensors = [(t, t.detach().clone()) for t in protect]
        self.replaced: list[tuple[str, nn.Module]] = []

    def __enter__(self) -> _Rollback:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if exc_type is None:
            return False
        with torch.no_grad():
            for name, original in reversed(self.replaced):
                _set_submodule(self.model, name, original)
            for layer, active in self.layers:
                if self.adapter_name in layer.lora_A:
                    layer.delete_adapter(self.adapter_name)
                layer.active_adapters = active
            for tensor, saved in self.tensors:
                tensor.copy_(saved)
            for param, flag in self.flags:
                param.requires_grad_(flag)
            for attr in self._ATTRS:
                if attr in self.attrs:
                    self.model.__dict__[attr] = self.attrs[attr]
                else:
                    self.model.__dict__.pop(attr, None)
        return False


def _inject(
    model: nn.Module,
    config: LoraConfig,
    adapter_name: str,
    init: str | None,
    plan: InjectPlan | None = None,
    fill: Callable[[], None] | None = None,
    protect: Sequence[torch.Tensor] = (),
) -> nn.Module:
    """inject_ with the init overridable: load_adapter passes init=None (zeros, no random
    draws) for tensors it overwrites next in ``fill`` (called inside the all-or-nothing
    region; ``protect`` lists the tensors it writes in place), or "pissa" to residualise W
    as PEFT does. Any exception while the model changes rolls every change back."""
    if plan is None:
        plan = plan_inject(model, config, adapter_name, init)
    quant = _plan_quantization(model, config, plan)
    existing = adapter_configs(model)
    first = not existing and not any(layer.lora_A for _, layer in lora_layers(model))
    protect = list(protect)
    if init == "pissa":  # PiSSA rewrites each target's W in place
        protect += [
            (m.base_layer if isinstance(m, LoraLinear) else m).weight for _, m, _, _ in plan.targets
        ]
    with _Rollback(model, adapter_name, protect) as undo:
        for name, q_layer in quant.items():  # QLoRA: the frozen base in 4/8 bits first
            undo.replaced.append((name, model.get_submodule(name)))
            _set_submodule(model, name, q_layer)
        for name, module, r, alpha in plan.targets:
            module = quant.get(name, module)
            if isinstance(module, LoraLinear):
                layer = module
            else:
                layer = LoraLinear(module)
                _set_submodule(model, name, layer)
                undo.replaced.append((name, module))
            layer.add_adapter(
                adapter_name,
                r=r,
                alpha=alpha,
                dropout=config.dropout,
                use_rslora=config.use_rslora,
                init=init,
                use_dora=config.use_dora,
            )
        configs = dict(existing)
        configs[adapter_name] = config
        setattr(model, _CONFIGS_ATTR, configs)
        recorded = dict(getattr(model, SAVED_MODULES_ATTR, {}))
        if plan.modules_to_save:
            recorded[adapter_name] = {
                "modules_to_save": list(plan.modules_to_save),
                "task_type": plan.task_type,
            }
            setattr(model, SAVED_MODULES_ATTR, recorded)
        if fill is not None:
            fill()
        _apply_active(model, [adapter_name] if first else active_adapters(model))
    return model


def _plan_quantization(model: nn.Module, config: LoraConfig, plan: InjectPlan) -> dict:
    """{module name: bitsandbytes layer} replacing the float base's linear layers when
    ``config.base_quantization`` is set (the heads and modules_to_save stay float); built
    and checked before the model changes."""
    kind = getattr(config, "base_quantization", None)
    if kind is None:
        return {}
    keep = [name for name, _ in plan.saved]
    return quantized.plan_quantization(model, kind, keep, LoraLinear).replacements


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _apply_active(model: nn.Module, names: list[str]) -> None:
    """Set the active adapters on every layer and the trainable flags on the whole model:
    LoRA tensors of active adapters train, everything else is frozen except the biases the
    active adapters' configs ask for and their modules_to_save (e.g. a classifier head)."""
    model._lora_ext_active = list(names)
    layers = lora_layers(model)
    for _, layer in layers:
        layer.set_adapter(names)
    lora_ids = {id(p) for _, layer in layers for d in _lora_tables(layer) for p in d.values()}
    train_ids = {id(p) for _, p in _trained_biases(model)}
    train_ids |= {id(p) for p in _saved_module_params(model)}
    for param in model.parameters():
        if id(param) not in lora_ids:  # LoRA tensors: set by layer.set_adapter
            param.requires_grad_(id(param) in train_ids)


def _lora_tables(layer: LoraLinear) -> tuple[nn.ParameterDict, ...]:
    """A layer's per-adapter parameter tables: A, B and the DoRA magnitude vectors."""
    return (layer.lora_A, layer.lora_B, layer.lora_magnitude_vector)


def _saved_module_params(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the active adapters' modules_to_save (shared by all adapters)."""
    recorded = getattr(model, SAVED_MODULES_ATTR, {})
    patterns = sorted(
        {p for n in active_adapters(model) for p in recorded.get(n, {}).get("modules_to_save", [])}
    )
    seen: set[int] = set()
    out = []
    for _, module in select_modules(model, patterns, "modules_to_save"):
        for param in module.parameters():
            if id(param) not in seen:
                seen.add(id(param))
                out.append(param)
    return out


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
        and ".lora_magnitude_vector." not in n
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
    dora.check_alone(names, [n for n in names if configs[n].use_dora], "set_adapter")
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
    recorded = dict(getattr(model, SAVED_MODULES_ATTR, {}))
    if recorded.pop(adapter_name, None) is not None:
        setattr(model, SAVED_MODULES_ATTR, recorded)
    if remaining:
        setattr(model, _CONFIGS_ATTR, remaining)
        _apply_active(model, active or [next(iter(remaining))])
    else:
        _drop_bookkeeping(model)
    return model


def _drop_bookkeeping(model: nn.Module) -> None:
    for attr in (_CONFIGS_ATTR, "_lora_ext_active", SAVED_MODULES_ATTR):
        if attr in model.__dict__:
            delattr(model, attr)


# -- parameters ----------------------------------------------------------------------------
def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The tensors training updates: lora_A and lora_B of the active adapters, in module
    order, their DoRA magnitude vectors (``use_dora``), plus the biases their config trains (``bias="all"/"lora_only"``) and the
    parameters of their ``modules_to_save`` (e.g. a sequence classifier's head).

    Right after inject_ / set_adapter this is exactly the set of parameters with
    requires_grad (parameters the caller unfreezes later are not included).
    """
    _require_adapters(model, "lora_parameters")
    groups = _split_params(model)
    return (
        groups["lora_A"]
        + groups["lora_B"]
        + groups["lora_magnitude"]
        + groups["bias"]
        + groups["modules_to_save"]
    )


def _split_params(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    out: dict[str, list[nn.Parameter]] = {
        "lora_A": [],
        "lora_B": [],
        "lora_magnitude": [],
        "bias": [],
        "modules_to_save": [],
    }
    lora_ids = set()
    for _, layer in lora_layers(model):
        for name in layer.active_adapters:
            out["lora_A"].append(layer.lora_A[name])
            out["lora_B"].append(layer.lora_B[name])
            if name in layer.lora_magnitude_vector:
                out["lora_magnitude"].append(layer.lora_magnitude_vector[name])
        lora_ids.update(id(p) for d in _lora_tables(layer) for p in d.values())
    out["bias"] = [p for _, p in _trained_biases(model) if id(p) not in lora_ids]
    bias_ids = {id(p) for p in out["bias"]}
    out["modules_to_save"] = [
        p for p in _saved_module_params(model) if id(p) not in lora_ids | bias_ids
    ]
    return out


def lora_param_groups(
    model: nn.Module, lr: float, lr_ratio: float = 16.0, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """Optimizer parameter groups for LoRA+ (Hayou et al. 2024): B learns ``lr_ratio`` times
    faster than A.

    Returns: [{"name": "lora_A", "params": [...], "lr": lr, "weight_decay": weight_decay},
    {"name": "lora_B", ..., "lr": lr * lr_ratio}, {"name": "lora_magnitude", ..., "lr": lr,
    "weight_decay": 0.0} for DoRA magnitude vectors (trained at A's rate, as in the DoRA
    paper, and never decayed: decay would shrink the layer's output; PEFT's LoRA+ puts 1-D
    tensors with B instead), {"name": "bias", ..., "lr": lr,
    "weight_decay": 0.0} when biases train, and {"name": "modules_to_save", ..., "lr": lr,
    "weight_decay": weight_decay} when whole modules train (a sequence classifier's head)].
    Pass it to any torch optimizer.
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
        {
            "name": "lora_magnitude",
            "params": split["lora_magnitude"],
            "lr": lr,
            "weight_decay": 0.0,
        },
        {"name": "bias", "params": split["bias"], "lr": lr, "weight_decay": 0.0},
        {
            "name": "modules_to_save",
            "params": split["modules_to_save"],
            "lr": lr,
            "weight_decay": weight_decay,
        },
    ]
    return [g for g in groups if g["params"]]


# -- merge ---------------------------------------------------------------------------------
def merge_(model: nn.Module, safe: bool = False, requantize: bool = False) -> nn.Module:
    """Merge the active adapters into the base weights in place (W += s B A via the compiled
    ``ops.merge_``, accumulated in float32, rounded once). The forward is then the plain
    base layers. Merging an already merged adapter is a no-op with one warning.

    safe=True: every layer is checked first (a finite delta, no finite weight overflowing:
    ``ops.merge_is_safe``); if one fails, ValueError is raised and no weight changes.

    A bitsandbytes (4/8-bit) base is never re-quantized silently: without ``requantize=True``
    ValueError names the first such layer, the model unchanged. With it, each such layer is
    dequantized, merged in float32 and quantized again by bitsandbytes; the error that adds
    (max |dequantized merged weight - float32 merge|) is in each layer's
    ``requantize_error``. Such a merge cannot be unmerged. ``merge_and_unload`` dequantizes
    instead (one rounding).

    Returns: ``model``.
    """
    _require_adapters(model, "merge_")
    _merge(model, safe=safe, warn=True, requantize=requantize)
    return model


def _requantized(model: nn.Module, requantize: bool) -> list[tuple[LoraLinear, list, Any, float]]:
    """(layer, adapters, new weight, error) of every quantized layer with pending adapters,
    all built before any is installed; ValueError naming the layer without ``requantize``."""
    built = []
    for name, layer in lora_layers(model):
        todo = [a for a in layer.active_adapters if a not in layer.merged_adapters]
        if not layer.quantized or not todo:
            continue
        if not requantize:
            raise ValueError(
                f"merge_: layer {name!r} has a bitsandbytes {quantized.kind_of(layer.base_layer)} "
                "base; merging into it would round twice (float merge, then quantization), so "
                "nothing was merged. Use lora_ext.merge_and_unload(model, dtype=...) to "
                "dequantize and merge with one rounding, or merge_(model, requantize=True) to "
                "merge back into the quantized base (the error is reported)"
            )
        built.append((layer, todo, *quantized.requantize_merged(layer, name, todo)))
    return built


def _merge(model: nn.Module, safe: bool, warn: bool, requantize: bool | None = False) -> None:
    """Merge the plain layers (and, requantize=True, the quantized ones; None: leave those
    to the caller)."""
    requantized = [] if requantize is None else _requantized(model, requantize)
    layers = [(n, layer) for n, layer in lora_layers(model) if not layer.quantized]
    for name, layer in layers:  # a DoRA adapter merges alone: checked on every layer first
        both = [*layer.merged_adapters, *layer.active_adapters]
        both = list(dict.fromkeys(both))
        dora.check_alone(both, [a for a in both if dora.is_dora(layer, a)], f"merge of {name!r}")
    if safe:
        # every layer is checked before any is merged: a refusal leaves the model untouched
        for name, layer in layers:
            todo = [a for a in layer.active_adapters if a not in layer.merged_adapters]
            problem = layer.merge_problem(todo)
            if problem:
                raise ValueError(f"safe merge: {problem} in {name!r}; nothing was merged")
    for layer, todo, param, error in requantized:  # built and checked above
        layer.install_requantized(todo, param, error)
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
    for name, layer in lora_layers(model):  # refused before anything is unmerged
        if layer.quantized and layer.merged_adapters:
            raise ValueError(
                f"unmerge_: layer {name!r} was merged into its re-quantized bitsandbytes base "
                "(merge_(requantize=True)); that cannot be undone exactly, nothing was unmerged: "
                "reload the base model and the adapter"
            )
    done = [layer.unmerge() for _, layer in lora_layers(model)]
    if not any(done):
        warnings.warn("unmerge_: nothing is merged; nothing done", stacklevel=2)
    return model


def merge_and_unload(
    model: nn.Module, safe: bool = False, dtype: torch.dtype | None = None
) -> nn.Module:
    """Merge the active adapters and replace every LoraLinear by its base layer, in place.

    The result holds plain nn.Linear / Conv1D modules only (no LoRA code, inactive adapters
    are dropped), ready for export. Base parameters stay frozen.

    A bitsandbytes (4/8-bit) base, adapted or not, becomes a plain nn.Linear: bitsandbytes
    dequantizes it row tile by row tile in float32, ``s B A`` is added in float32 and the
    result is rounded once to ``dtype`` (None: the dtype the layer was quantized from, its
    compute dtype, else float32). It is never quantized again. All of them are built
    before the model changes.

    Returns: ``model`` (the same object).
    """
    _require_adapters(model, "merge_and_unload")
    plain = {
        name: quantized.dequantize_merged(layer, name, dtype, safe=safe)
        for name, layer in lora_layers(model)
        if layer.quantized
    }
    _merge(model, safe=safe, warn=False, requantize=None)
    for name, layer in lora_layers(model):
        _set_submodule(model, name, plain.get(name, layer.base_layer))
    quantized.dequantize_(model, dtype)  # the quantized layers no adapter targets
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
