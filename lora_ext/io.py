"""Save and load adapters in PEFT's on-disk format, with safetensors only.

A PEFT adapter directory holds ``adapter_config.json`` (PEFT's LoraConfig fields) and
``adapter_model.safetensors`` whose keys are ``base_model.model.<module path>.lora_A.weight``
[r, in] and ``...lora_B.weight`` [out, r] (no adapter name in the keys; biases, when the
adapter trains them, under their module path). Both directions work: adapters saved by
``peft.PeftModel.save_pretrained`` load here, and ours load with
``peft.PeftModel.from_pretrained(base, dir)``.

Pickle files (``adapter_model.bin``, ``.pt``) are refused: unpickling runs arbitrary code.

DoRA adapters (``use_dora: true``) add each layer's magnitude vector m [out] under
``base_model.model.<module path>.lora_magnitude_vector``, the key PEFT 0.21 writes (the
``...lora_magnitude_vector.weight`` spelling of other PEFT versions loads too). A magnitude
vector in a file whose config says ``use_dora: false``, or a DoRA config without them, is
refused naming the key.

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
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_ext import ops
from lora_ext.config import LoraConfig, NameMatcher, scale_of
from lora_ext.inject import (
    _inject,
    adapter_configs,
    lora_layers,
    plan_inject,
    saved_modules,
    select_modules,
)
from lora_ext.layer import LoraLinear, check_adapter_name, out_in

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MAX_CONFIG_BYTES = 1 << 20  # PEFT's adapter_config.json is a few KB
# The largest factor by which a loaded adapter's update may multiply an input: max |s B A x|
# <= s ||B||_inf ||A||_inf max |x| (max absolute row sums). Hidden states above
# sqrt(float32 max) ~ 1.8e19 overflow when squared by the norm or attention that follows,
# so an update that can scale inputs of magnitude 1e3 past that yields NaN logits. Real
# adapters sit below 1e4 (trained: ~1e2; PiSSA: ~1e4); 3e38 in lora_B is far above.
MAX_ADAPTER_GAIN = 1e16
MAGNITUDE = (
    "lora_magnitude_vector"  # DoRA's m [out] in PEFT's files: <module>.lora_magnitude_vector
)


def _pickle_error(path: Path) -> ValueError:
    return ValueError(
        f"{path}: this is a pickle file; lora_ext reads adapters from safetensors only, because "
        "unpickling can run arbitrary code. If you trust the file, convert it once: "
        'python -c "import torch, safetensors.torch as st; '
        f"st.save_file(torch.load('{path.name}', weights_only=True), '{WEIGHTS_NAME}')\""
    )


def _kind(path: Path) -> str:
    """ "file", "dir", "missing" or what else the path is (after symlinks)."""
    try:
        mode = path.stat().st_mode
    except OSError:  # missing, dangling or looping symlink, no permission
        return "missing"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    return "special file (FIFO, device or socket)"


def _find_files(path: str | os.PathLike) -> tuple[Path, Path]:
    """(config path, safetensors path) for an adapter directory or its weights file; both
    must be regular files (symlinks are followed, as in a Hugging Face cache folder)."""
    path = Path(path)
    kind = _kind(path)
    if kind == "file":
        if path.suffix in PICKLE_SUFFIXES:
            raise _pickle_error(path)
        if path.suffix != ".safetensors":
            raise ValueError(
                f"path: got {str(path)!r}, need an adapter directory or a .safetensors file"
            )
        weights, folder = path, path.parent
    elif kind == "dir":
        folder = path
        weights = folder / WEIGHTS_NAME
        weights_kind = _kind(weights)
        if weights_kind == "missing":
            pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise _pickle_error(pickles[0])
            raise FileNotFoundError(f"path: {str(path)!r} has no {WEIGHTS_NAME}")
        if weights_kind != "file":
            raise ValueError(f"{weights}: is a {weights_kind}, need a regular file")
    elif kind == "missing":
        raise FileNotFoundError(f"path: {str(path)!r} does not exist")
    else:
        raise ValueError(f"path: {str(path)!r} is a {kind}, need an adapter directory")
    config = folder / CONFIG_NAME
    config_kind = _kind(config)
    if config_kind == "missing":
        raise FileNotFoundError(f"path: {str(folder)!r} has no {CONFIG_NAME}")
    if config_kind != "file":
        raise ValueError(f"{config}: is a {config_kind}, need a regular file")
    return config, weights


def _read_config(path: Path) -> dict[str, Any]:
    """The JSON object of adapter_config.json: a regular file of at most MAX_CONFIG_BYTES,
    UTF-8, strict JSON (no NaN / Infinity literals)."""
    try:  # O_NONBLOCK: a FIFO swapped in after the check cannot block the open
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise ValueError(f"{path}: cannot be opened ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path}: is not a regular file")
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ValueError(f"{path}: larger than {MAX_CONFIG_BYTES:,} bytes; not an adapter config")

    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON value")

    try:
        raw = json.loads(data.decode("utf-8"), parse_constant=no_constant)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except RecursionError:
        raise ValueError(f"{path}: not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, over-long integers
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: need a JSON object, got {type(raw).__name__}")
    return raw


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
            Default: the adapter's own (``LoraConfig.modules_to_save``: by default a
            sequence classifier's head; or what it was loaded with, see ``load_adapter``).
            These modules are shared by all adapters on the model (one copy, not PEFT's one
            per adapter), so their current values are written.
        task_type: PEFT's ``task_type`` for the config (e.g. ``"SEQ_CLS"``). Default:
            "SEQ_CLS" for an adapter that saves a sequence classifier's head, what the
            adapter was loaded with, else None.

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
        if name in layer.lora_magnitude_vector:
            tensors[f"{PREFIX}{module_name}.{MAGNITUDE}"] = layer.lora_magnitude_vector[
                name
            ].detach()
    params = dict(model.named_parameters())
    for bias_name in _bias_names(model, config, [n for n, _ in layers]):
        tensors[PREFIX + bias_name] = params[bias_name].detach()
    recorded = saved_modules(model, name)
    if modules_to_save is None:
        modules_to_save = recorded.get("modules_to_save")
    if task_type is None:
        task_type = recorded.get("task_type")
    patterns = _module_names_arg("modules_to_save", modules_to_save)
    for key, tensor in _module_tensors(select_modules(model, patterns, "modules_to_save")).items():
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
    # each file is written under a temporary name, flushed, then renamed over the old one,
    # weights first: a kill leaves the previous adapter or the new one, never half a file
    weights_tmp = out / f".{WEIGHTS_NAME}.tmp-{os.getpid()}"
    config_tmp = out / f".{CONFIG_NAME}.tmp-{os.getpid()}"
    try:
        save_file(tensors, str(weights_tmp), metadata={"format": "pt"})
        config_tmp.write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
        for tmp in (weights_tmp, config_tmp):
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(weights_tmp, out / WEIGHTS_NAME)
        os.replace(config_tmp, out / CONFIG_NAME)
    finally:
        for tmp in (weights_tmp, config_tmp):
            tmp.unlink(missing_ok=True)
    return out


def load_adapter(
    model: nn.Module, path: str | os.PathLike, adapter_name: str = "default"
) -> nn.Module:
    """Load a PEFT-format adapter (saved by PEFT or by ``save_adapter``) into ``model``.

    All or nothing: the config, every key, shape and dtype (from the safetensors header,
    before any tensor is read), then every value are checked before the model is touched;
    a failure while the model changes rolls it back. On any error the model is exactly as
    before (bit for bit, trainable flags included). Refused, with the field or tensor named:
    a config that is not strict JSON, of the wrong type or range (nothing is coerced:
    ``r: 4.9`` is an error), regexes that are invalid, too complex or that run too long
    (``NameMatcher``), a NaN/Inf tensor, a value that overflows the dtype it is used in, a
    scale that overflows float32, an update whose gain exceeds ``MAX_ADAPTER_GAIN``,
    pickles, and files that are not regular files. The adapter becomes active if it is the
    model's first one (else ``set_adapter`` picks it, as in PEFT).

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
    from safetensors import SafetensorError, safe_open

    check_adapter_name(adapter_name)
    config_path, weights_path = _find_files(path)
    raw = _read_config(config_path)
    config = LoraConfig.from_peft_dict(raw)
    task_type = raw.get("task_type")
    if task_type is not None and not isinstance(task_type, str):
        raise ValueError(f"{CONFIG_NAME}: task_type: got {task_type!r}, need a string or null")
    init = "pissa" if config.init == "pissa" else None
    try:
        plan = plan_inject(model, config, adapter_name, init, NameMatcher(where=f"{CONFIG_NAME}: "))
    except ValueError as exc:
        msg = str(exc)
        raise ValueError(msg if msg.startswith(CONFIG_NAME) else f"{CONFIG_NAME}: {msg}") from None
    plan.task_type = task_type
    module_tensors = _module_tensors(plan.saved)
    patterns = plan.modules_to_save

    # expected tensors, with the names the model will have after injection
    expected: dict[str, tuple[int, ...]] = {}
    weights: dict[str, torch.Tensor] = {}  # layer name -> its base weight [out, in] view
    wrapped: set[str] = set()
    for module_name, module, r, _ in plan.targets:
        base = module.base_layer if isinstance(module, LoraLinear) else module
        out_f, in_f = out_in(base)  # a bitsandbytes weight is packed: its dtype is not float
        weight = base.weight
        if not isinstance(base, nn.Linear):  # Conv1D: weight [in, out]
            weight = weight.t()
        expected[f"{module_name}.lora_A.weight"] = (r, in_f)
        expected[f"{module_name}.lora_B.weight"] = (out_f, r)
        if config.use_dora:
            expected[f"{module_name}.{MAGNITUDE}"] = (out_f,)
        weights[module_name] = weight
        if not isinstance(module, LoraLinear):
            wrapped.add(module_name)
    post_params = {_post_name(n, wrapped): p for n, p in model.named_parameters()}

    def fits(key: str, name: str, shape: tuple[int, ...], dtype: str) -> torch.Tensor | None:
        """The model tensor ``name`` will be copied into (None for a LoRA tensor), after
        checking that the key belongs to the adapter and its shape and dtype fit."""
        floating = dtype.startswith(("F", "BF"))
        target: torch.Tensor | None = None
        if name in module_tensors:
            target = module_tensors[name]
            need = tuple(target.shape)
            if floating != target.is_floating_point():
                raise ValueError(
                    f"{weights_path.name}: key {key!r} has dtype {dtype} but the model's "
                    f"tensor is {target.dtype}"
                )
        elif name in expected:
            need = expected[name]
        elif name.endswith(f".{MAGNITUDE}") and not config.use_dora:
            raise ValueError(
                f"{weights_path.name}: key {key!r} is a DoRA magnitude vector, but "
                f"{CONFIG_NAME} has use_dora=false: a DoRA adapter needs use_dora=true (and "
                "a LoRA adapter has no magnitude vectors)"
            )
        elif "bias" in name.rsplit(".", 1)[-1] and name in post_params and config.bias != "none":
            target = post_params[name]
            need = tuple(target.shape)
        else:
            raise ValueError(
                f"{weights_path.name}: key {key!r} does not fit the model: no such LoRA "
                f"tensor for target_modules={config.target_modules!r} nor tensor of "
                f"modules_to_save={patterns!r} (expected keys like {PREFIX}{next(iter(expected))})"
            )
        if shape != need:
            raise ValueError(
                f"{weights_path.name}: key {key!r} has shape {list(shape)} but the model "
                f"needs {list(need)}"
            )
        if not floating and name not in module_tensors:
            raise ValueError(
                f"{weights_path.name}: key {key!r} has dtype {dtype}, need floating point"
            )
        return target

    loaded: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            # 1. keys, shapes and dtypes from the header, before any tensor is read
            names: dict[str, str] = {}  # file key -> tensor name in the model
            into: dict[str, torch.Tensor | None] = {}  # tensor name -> model tensor it sets
            for key in sorted(f.keys()):
                name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
                if name.endswith(f".{MAGNITUDE}.weight"):  # older PEFT spelling
                    name = name[: -len(".weight")]
                if name in into:
                    raise ValueError(
                        f"{weights_path.name}: key {key!r} names the same tensor as another key"
                    )
                piece = f.get_slice(key)
                into[name] = fits(key, name, tuple(piece.get_shape()), piece.get_dtype())
                names[key] = name
            missing = [n for n in expected if n not in into]
            if missing:
                dora_hint = (
                    f"; {CONFIG_NAME} has use_dora=true, which needs a DoRA magnitude vector "
                    "per adapted layer"
                    if missing[0].endswith(f".{MAGNITUDE}")
                    else ""
                )
                raise ValueError(
                    f"{weights_path.name}: missing key {PREFIX + missing[0]!r} ({len(missing)} "
                    f"missing of {len(expected)} LoRA tensors the config selects{dora_hint})"
                )
            missing = [n for n in module_tensors if n not in into]
            if missing:
                raise ValueError(
                    f"{weights_path.name}: missing key {PREFIX + missing[0]!r} ({len(missing)} "
                    f"missing of {len(module_tensors)} tensors of modules_to_save={patterns!r})"
                )
            # 2. the values: finite, and representable where they will be used
            for key, name in names.items():
                tensor = f.get_tensor(key)
                target = into[name]
                if target is None:  # the forward casts A and B to the base weight's dtype
                    layer = name.rsplit(".", 1 if name.endswith(MAGNITUDE) else 2)[0]
                    dtype = weights[layer].dtype
                else:
                    dtype = target.dtype
                _check_values(weights_path.name, key, tensor, dtype)
                loaded[name] = tensor
    except SafetensorError as exc:
        raise ValueError(f"{weights_path}: not a readable safetensors file ({exc})") from None
    except OSError as exc:
        raise ValueError(f"{weights_path}: cannot be read ({exc})") from None

    # 3. each layer's update: scale, gain, and (float16 weights) the merged weight
    if init != "pissa":  # PiSSA's W is replaced at load; its factors come from W's SVD
        for module_name, _, r, alpha in plan.targets:
            a = loaded[f"{module_name}.lora_A.weight"]
            b = loaded[f"{module_name}.lora_B.weight"]
            scale = scale_of(alpha, r, config.use_rslora)
            _check_update(weights_path.name, module_name, weights[module_name], a, b, scale)
            if config.use_dora:
                magnitude = loaded[f"{module_name}.{MAGNITUDE}"]
                _check_dora(
                    weights_path.name, module_name, weights[module_name], a, b, scale, magnitude
                )

    # everything fits: now change the model (rolled back if anything fails on the way).
    # PiSSA residualises W exactly as PEFT does on load; otherwise A and B start at zero
    # (no random draws) and are overwritten here.
    protect = list(module_tensors.values())
    protect += [post_params[n] for n in loaded if n in post_params and n not in module_tensors]

    def fill() -> None:
        layers = dict(lora_layers(model))
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in loaded.items():
                module_name, _, leaf = name.rpartition(".")
                if name in module_tensors:  # the live tensor of the (unwrapped) saved module
                    module_tensors[name].copy_(tensor)
                elif leaf == MAGNITUDE:
                    layers[module_name].lora_magnitude_vector[adapter_name].copy_(tensor)
                elif leaf == "weight" and module_name.endswith((".lora_A", ".lora_B")):
                    layer_name, _, which = module_name.rpartition(".")
                    table = getattr(layers[layer_name], which)
                    table[adapter_name].copy_(tensor)
                else:
                    params[name].copy_(tensor)

    _inject(model, config, adapter_name, init, plan=plan, fill=fill, protect=protect)
    return model


def _check_values(file: str, key: str, tensor: torch.Tensor, dtype: torch.dtype) -> None:
    """A floating tensor must be finite and fit ``dtype`` (the dtype it is used in)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    t = tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.to(torch.float32)
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{file}: key {key!r} has {int(bad.sum())} non-finite values (first: "
            f"{float(t[where])} at {list(where)}); an adapter must be finite"
        )
    if dtype.is_floating_point:
        big = float(t.abs().max())
        limit = torch.finfo(dtype).max
        if big > limit:
            raise ValueError(
                f"{file}: key {key!r} holds {big:.3g}, which overflows {dtype} (max "
                f"{limit:.3g}), the dtype the model uses it in"
            )


def _check_update(
    file: str, name: str, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float
) -> None:
    """The update s B A of one layer must not blow up activations (MAX_ADAPTER_GAIN) nor,
    merged into a float16 weight, overflow it."""
    a64 = a.to(torch.float64)
    b64 = b.to(torch.float64)
    gain = scale * float(b64.abs().sum(1).max()) * float(a64.abs().sum(1).max())
    if not gain <= MAX_ADAPTER_GAIN:  # also catches inf / nan
        raise ValueError(
            f"{file}: the update of {name!r} (scale {scale:.3g} x lora_B x lora_A) can "
            f"multiply an input by up to {gain:.3g}, more than {MAX_ADAPTER_GAIN:.0e}: its "
            "activations would overflow float32 (lora_A/lora_B values or lora_alpha too "
            "large for a trained adapter)"
        )
    if weight.dtype == torch.float16 and not weight.is_meta:
        a32 = a.to(weight.device, torch.float32)
        b32 = b.to(weight.device, torch.float32)
        if not ops.merge_is_safe(weight.detach(), a32, b32, scale):
            raise ValueError(
                f"{file}: the update of {name!r} would overflow its float16 weight "
                f"(max {torch.finfo(torch.float16).max:.0f})"
            )


def _check_dora(
    file: str,
    name: str,
    weight: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    magnitude: torch.Tensor,
) -> None:
    """DoRA's row scaling m / ||W + sBA|| must be finite and at most MAX_ADAPTER_GAIN (a zero
    row norm, or a magnitude far beyond the weight's, would blow the layer's output up)."""
    if weight.is_meta:
        return
    device = weight.device
    norm = ops.dora_norm(
        weight.detach(), a.to(device, torch.float32), b.to(device, torch.float32), scale
    )
    factor = magnitude.to(device, norm.dtype).abs() / norm
    worst = float(factor.max()) if factor.numel() else 0.0
    if not worst <= MAX_ADAPTER_GAIN:
        raise ValueError(
            f"{file}: key {PREFIX}{name}.{MAGNITUDE}: DoRA's row scaling m / ||W + sBA|| reaches "
            f"{worst:.3g} (more than {MAX_ADAPTER_GAIN:.0e}, or a zero row norm); the layer's "
            "output would overflow"
        )


def _post_name(param_name: str, wrapped: set[str]) -> str:
    """A parameter's name once the modules in ``wrapped`` are wrapped in LoraLinear
    (``x.query.bias`` -> ``x.query.base_layer.bias``)."""
    module_name, _, leaf = param_name.rpartition(".")
    return f"{module_name}.base_layer.{leaf}" if module_name in wrapped else param_name
