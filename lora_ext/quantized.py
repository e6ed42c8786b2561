"""QLoRA: LoRA over a frozen bitsandbytes 4-bit (nf4) or 8-bit (LLM.int8) base.

The quantization is bitsandbytes' own (``Linear4bit`` / ``Linear8bitLt``, as PEFT and
transformers use it; its CPU backend runs here, CUDA on a GPU): this module never quantizes
a number itself. What it adds:

- ``quantize_base_`` / ``plan_quantization``: turn the frozen base's ``nn.Linear`` (and GPT-2
  ``Conv1D``, transposed first, as transformers does) layers into bitsandbytes layers, the
  way QLoRA does: every linear layer except the output heads (``lm_head``, ``classifier``,
  ``score``) and ``modules_to_save``. Everything is checked before the model changes.
- ``lora_forward``: a LoraLinear over such a layer is ``base_layer(x)`` (bitsandbytes' kernel)
  plus the LoRA branch from the compiled LoRA-only op ``ops.lora_delta`` (dropout recomputed
  from the seed, nothing x-sized saved but x); or, on the "fused" path (``qlora_path``, the
  CPU's default in training), bitsandbytes' ``dequantize_4bit`` into a transient weight and
  one call of the fused ``ops.lora_linear``.
- ``dequantize_merged``: merging dequantizes the base tile by tile in float32, adds ``s B A``
  in float32 (``ops.merge_``) and rounds once to the target dtype: a plain ``nn.Linear``.
  ``requantize``: merging back into 4/8 bits, only on explicit request, with the error it
  adds reported.

bitsandbytes is imported lazily: the rest of lora_ext works without it.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from lora_ext import ops

__all__ = [
    "HEADS",
    "QUANTIZATIONS",
    "QuantizationPlan",
    "dequantize_",
    "dequantize_merged",
    "dequantized_weight",
    "float_dtype",
    "is_quantized",
    "keep_layout",
    "kind_of",
    "lora_forward",
    "plan_quantization",
    "quantize_base_",
    "qlora_path",
    "quantize_linear",
    "requantize_merged",
]

QUANTIZATIONS = ("nf4", "int8")
# output heads QLoRA keeps in full precision (transformers' bnb integration skips them too)
HEADS = ("lm_head", "classifier", "score")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_TILE_ELEMENTS = 1 << 20  # float32 elements per dequantization tile (4 MiB)


def _bnb():
    """The bitsandbytes module, or ImportError with the install line."""
    try:
        import bitsandbytes
    except ImportError as exc:  # pragma: no cover - bitsandbytes is in the [train] extra
        raise ImportError(
            "a 4-bit/8-bit base needs bitsandbytes: pip install bitsandbytes "
            '(or pip install "lora_ext[train]")'
        ) from exc
    return bitsandbytes


def _bnb_classes() -> tuple[type, ...]:
    """(Linear4bit, Linear8bitLt) when bitsandbytes is importable, else ()."""
    import sys

    if "bitsandbytes" not in sys.modules:  # a model holding bnb layers imported it already
        return ()
    bnb = sys.modules["bitsandbytes"]
    return (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


def is_quantized(module: nn.Module) -> bool:
    """True for a bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` layer."""
    classes = _bnb_classes()
    return bool(classes) and isinstance(module, classes)


def kind_of(module: nn.Module) -> str:
    """ "nf4" / "fp4" (Linear4bit's quant_type) or "int8" for a bitsandbytes layer."""
    bnb = _bnb()
    if isinstance(module, bnb.nn.Linear8bitLt):
        return "int8"
    return str(module.weight.quant_type)


def float_dtype(module: nn.Module) -> torch.dtype:
    """The floating dtype a bitsandbytes layer stands for: the dtype its 4-bit weight was
    quantized from (its quant_state's), else its compute dtype, else its bias's, else float32."""
    state = getattr(module.weight, "quant_state", None)
    if state is not None and state.dtype in _FLOATS:
        return state.dtype
    compute = getattr(module, "compute_dtype", None)
    if compute in _FLOATS:
        return compute
    if module.bias is not None and module.bias.dtype in _FLOATS:
        return module.bias.dtype
    return torch.float32


# -- quantizing a float base ----------------------------------------------------------------
def _conv1d_class() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def _weight_out_in(module: nn.Module) -> torch.Tensor:
    """The [out, in] weight of an nn.Linear or (transposed view) a Conv1D."""
    conv1d = _conv1d_class()
    weight = module.weight.detach()
    return weight.t() if conv1d is not None and isinstance(module, conv1d) else weight


def quantize_linear(module: nn.Module, kind: str) -> nn.Module:
    """A new bitsandbytes layer holding ``module``'s weight quantized (``module`` itself is
    not changed): ``Linear4bit`` (nf4, compute dtype = the weight's dtype) or
    ``Linear8bitLt`` (int8 weights, no fp16 copy, threshold 0), on the weight's device.

    Args:
        module: an nn.Linear ([out, in] weight) or a GPT-2 Conv1D ([in, out], transposed
            first, as transformers does when it loads GPT-2 in 4 bits).
        kind: "nf4" or "int8".
    """
    bnb = _bnb()
    weight = _weight_out_in(module).contiguous()
    out_f, in_f = weight.shape
    has_bias = module.bias is not None
    device = weight.device
    if kind == "nf4":
        layer = bnb.nn.Linear4bit(
            in_f, out_f, bias=has_bias, compute_dtype=weight.dtype, quant_type="nf4", device="meta"
        )
        # a fresh tensor: bitsandbytes replaces the Params' data, never the original's
        param = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(
            in_f, out_f, bias=has_bias, has_fp16_weights=False, threshold=0.0, device="meta"
        )
        param = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False)
    layer.weight = param
    if has_bias:
        layer.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
    layer = layer.to(device)  # bitsandbytes quantizes on the move to a device
    layer.train(module.training)
    keep_layout(layer)
    return layer


def keep_layout(layer: nn.Module) -> None:
    """Turn off bitsandbytes' CPU repacking of a Linear4bit (on CPUs with AVX512-BF16 its
    first eval-mode forward without grad rewrites the weight in place into a CPU layout with
    bfloat16 block scales): the layer then computes the same numbers in train and eval mode,
    before and after a merge, as the PEFT twin over the same base does."""
    if hasattr(layer, "support_avx512bf16_for_cpu"):
        layer.support_avx512bf16_for_cpu = False


@dataclass
class QuantizationPlan:
    """The layers ``quantize_base_`` replaces, checked, with their bitsandbytes versions
    already built (the model is not touched until they are swapped in)."""

    kind: str
    replacements: dict[str, nn.Module]  # module name -> new bitsandbytes layer


def _quantizable(module: nn.Module) -> bool:
    conv1d = _conv1d_class()
    if is_quantized(module):
        return False
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def plan_quantization(
    model: nn.Module, kind: str, keep: Iterable[str] = (), lora_layer_type: type | None = None
) -> QuantizationPlan:
    """Check and build the bitsandbytes layers for every quantizable layer of ``model``
    (nn.Linear, Conv1D) except the output heads, the modules named in ``keep`` (and what is
    inside them) and layers already quantized. The model is not changed.

    Args:
        model: the float model.
        kind: "nf4" or "int8" (LoraConfig.base_quantization).
        keep: module names to leave in full precision (``modules_to_save``).
        lora_layer_type: LoraLinear: a layer already wrapped over a float base is refused
            (quantize when the first adapter is injected).

    Raises:
        ValueError naming the layer and ``base_quantization`` for a layer bitsandbytes cannot
        quantize (a float64 weight, a meta / non-CPU/CUDA tensor); ImportError without
        bitsandbytes.
    """
    if kind not in QUANTIZATIONS:
        raise ValueError(f"base_quantization: got {kind!r}, need one of {QUANTIZATIONS} or None")
    _bnb()
    keep = tuple(keep)
    replacements: dict[str, nn.Module] = {}
    skip: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name == k or name.startswith(k + ".") for k in skip):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf in HEADS or name in keep or is_quantized(module):
            skip.append(name)
            continue
        if lora_layer_type is not None and isinstance(module, lora_layer_type):
            if not is_quantized(module.base_layer):
                raise ValueError(
                    f"base_quantization={kind!r}: {name!r} already holds a LoRA adapter over a "
                    "float base; quantize the base when the first adapter is injected"
                )
            skip.append(name)
            continue
        if not _quantizable(module):
            continue
        weight = module.weight
        if weight.dtype not in _FLOATS:
            raise ValueError(
                f"base_quantization={kind!r}: layer {name!r} has {weight.dtype} weights; "
                "bitsandbytes quantizes float32, float16 and bfloat16 layers only (cast the "
                "model, e.g. model.float(), or set base_quantization=None)"
            )
        if weight.device.type not in ("cpu", "cuda"):
            raise ValueError(
                f"base_quantization={kind!r}: layer {name!r} is on {weight.device}; "
                "bitsandbytes quantizes CPU and CUDA tensors (load the weights first)"
            )
        if weight.numel() == 0:
            raise ValueError(
                f"base_quantization={kind!r}: layer {name!r} has an empty weight "
                f"{tuple(weight.shape)}; bitsandbytes cannot quantize it"
            )
    for name, module in model.named_modules():
        if not name or any(name == k or name.startswith(k + ".") for k in skip):
            continue
        if _quantizable(module) and not (
            lora_layer_type is not None and isinstance(module, lora_layer_type)
        ):
            try:
                replacements[name] = quantize_linear(module, kind)
            except (RuntimeError, ValueError) as exc:
                raise ValueError(
                    f"base_quantization={kind!r}: bitsandbytes cannot quantize layer {name!r} "
                    f"({type(module).__name__}, weight {tuple(module.weight.shape)}): {exc}"
                ) from None
    return QuantizationPlan(kind, replacements)


def quantize_base_(model: nn.Module, kind: str, keep: Iterable[str] = ()) -> nn.Module:
    """Quantize ``model``'s linear layers in place as ``plan_quantization`` selects them
    (what ``inject_`` does for ``LoraConfig(base_quantization=kind)``, without adapters):
    all are built and checked first, so an error leaves the model unchanged.

    Returns: ``model``.
    """
    plan = plan_quantization(model, kind, keep)
    for name, layer in plan.replacements.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)
    return model


# -- forward ---------------------------------------------------------------------------------
# The QLoRA forward has two paths, switched process-wide (``qlora_path``, or the environment
# variable LORA_EXT_QLORA_PATH when the process starts):
#   "separate": the bitsandbytes layer's own forward (its 4-bit GEMM) plus ops.lora_delta;
#   "fused": bitsandbytes' dequantize_4bit into a transient weight (what its CPU training path
#            does inside the GEMM too), then one fused ops.lora_linear call: one autograd node
#            per layer, the LoRA term written into the GEMM's output, dY W and the LoRA grad_x
#            summed in one pass. The dequantized weight lives only inside forward and backward.
#   "auto" (default): fused on the CPU (measured faster there: benchmarks/bench_qlora.py),
#            separate on other devices until a device run (make gpu-check) says otherwise.
_PATHS = ("auto", "fused", "separate")
_path = os.environ.get("LORA_EXT_QLORA_PATH", "auto")  # checked at first use


@contextlib.contextmanager
def qlora_path(path: str) -> Iterator[None]:
    """Inside the block, 4-bit LoRA layers run the ``"fused"``, ``"separate"`` or ``"auto"``
    forward (see the comment above; a process-wide switch)."""
    global _path
    if path not in _PATHS:
        raise ValueError(f"path must be one of {_PATHS}, got {path!r}")
    before, _path = _path, path
    try:
        yield
    finally:
        _path = before


def _use_fused_on(device: torch.device) -> bool:
    """The switch's answer for a device: "fused", or "auto" on the CPU."""
    if _path not in _PATHS:  # a typo in the environment must not silently pick a path
        raise ValueError(f"LORA_EXT_QLORA_PATH must be one of {_PATHS}, got {_path!r}")
    return _path == "fused" or (_path == "auto" and device.type == "cpu")


def _use_fused(base_layer: nn.Module, x: torch.Tensor) -> bool:
    """The fused path applies: a plain 4-bit layer, training with grad, no autocast."""
    if not _use_fused_on(x.device):
        return False
    state = getattr(base_layer.weight, "quant_state", None)
    return (
        state is not None  # Linear4bit (Linear8bitLt also rounds x to int8: separate)
        and not getattr(state, "packing_format_for_cpu", False)
        and tuple(state.shape) == (base_layer.out_features, base_layer.in_features)
        and torch.is_grad_enabled()
        and not torch.is_autocast_enabled(x.device.type)
        and x.numel() > 0
        and (base_layer.bias is None or not base_layer.bias.requires_grad)
    )


class _Fused4bit(torch.autograd.Function):
    """y [..., out] = x W^T + bias + scale * (drop(x) A^T) B^T with W = dequantize_4bit(base),
    through the fused op; saved: x, A, B, xa [..., r], the seed (the mask is recomputed) and the
    layer (its packed 4-bit weight): W is dequantized again in backward, as bitsandbytes does."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, base_layer, bias, scale, dropout_p, seed):
        weight = _dequantize_4bit(base_layer, x.dtype)
        y, xa = ops._ops.lora_linear.default(
            x, weight, bias, lora_a, lora_b, scale, dropout_p, seed
        )
        ctx.save_for_backward(x, lora_a, lora_b, xa, seed)
        ctx.base_layer, ctx.scale, ctx.dropout_p = base_layer, scale, dropout_p
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, lora_a, lora_b, xa, seed = ctx.saved_tensors
        weight = _dequantize_4bit(ctx.base_layer, x.dtype)
        mask = [bool(n) for n in ctx.needs_input_grad[:3]]
        grads = ops.lora_linear_grads(
            grad_y, x, weight, lora_a, lora_b, xa, ctx.scale, ctx.dropout_p, seed, mask
        )
        return (*grads, None, None, None, None, None)


def _dequantize_4bit(base_layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The layer's [out, in] weight by bitsandbytes' own dequantize_4bit, in ``dtype``, in one
    call (the forward's transient weight; ``dequantized_weight`` is the merge's, in tiles)."""
    weight = base_layer.weight
    full = _bnb().functional.dequantize_4bit(weight.data, weight.quant_state)
    return full if full.dtype == dtype else full.to(dtype)


def lora_forward(
    base_layer: nn.Module,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    dropout_p: float,
) -> torch.Tensor:
    """``base_layer(x) + scale * (drop(x) A^T) B^T`` [..., out] for a bitsandbytes base.

    Separate path: the base output is bitsandbytes' own kernel; the LoRA branch is
    ``ops.lora_delta`` in x's dtype (the autocast dtype inside torch.autocast), A [r, in] and
    B [out, r] cast to it (casts are differentiable: float32 masters get float32 gradients),
    its result cast to the base output's dtype, as PEFT does. Fused path (4-bit, training):
    everything in the layer's compute dtype, as bitsandbytes computes its GEMM.
    """
    if _use_fused(base_layer, x):
        return _fused_forward(base_layer, x, lora_a, lora_b, scale, dropout_p)
    y = base_layer(x)
    dev = x.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    if dtype not in (*_FLOATS, torch.float64):
        dtype = lora_a.dtype
    xs, a, b = _in_dtype(dtype, x, lora_a, lora_b)
    delta = ops.lora_delta(xs, a, b, scale, dropout_p)
    return y + (delta if delta.dtype == y.dtype else delta.to(y.dtype))


def _in_dtype(dtype: torch.dtype, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors cast to ``dtype`` (differentiable casts; no copy when already there)."""
    return tuple(t if t.dtype == dtype else t.to(dtype) for t in tensors)


def _fused_forward(base_layer, x, lora_a, lora_b, scale, dropout_p) -> torch.Tensor:
    """The fused path: bitsandbytes' compute dtype for x, W, bias, A, B; y in x's dtype."""
    fix = getattr(_bnb().nn.modules, "fix_4bit_weight_quant_state_from_module", None)
    if fix is not None:  # what Linear4bit.forward does first (a state kept on the module)
        fix(base_layer)
    if not getattr(base_layer, "compute_type_is_set", True):
        base_layer.set_compute_type(x)
        base_layer.compute_type_is_set = True
    dtype = getattr(base_layer, "compute_dtype", None) or x.dtype
    xs, a, b = _in_dtype(dtype, x, lora_a, lora_b)
    bias = base_layer.bias
    if bias is not None and bias.dtype != dtype:
        bias = bias.detach().to(dtype)
    ops.load_library()
    seed = ops.make_seed(None, ops._seed_device(x)) if dropout_p > 0.0 else ops._NO_SEED
    y = _Fused4bit.apply(xs, a, b, base_layer, bias, float(scale), float(dropout_p), seed)
    return y if y.dtype == x.dtype else y.to(x.dtype)


# -- dequantize, merge ----------------------------------------------------------------------
def _absmax_f32(state) -> torch.Tensor:
    """A 4-bit weight's per-block scales as float32 (un-nesting double quantization)."""
    bnb = _bnb()
    absmax = state.absmax
    if state.nested:
        absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return absmax.float()


def _row_tiles(rows: int, cols: int, align: int) -> Iterable[tuple[int, int]]:
    """[r0, r1) row ranges of about _TILE_ELEMENTS elements, each r0 * cols a multiple of
    ``align`` (a 4-bit tile must start on a quantization block)."""
    step = align // math.gcd(cols, align)
    per = max(step, (_TILE_ELEMENTS // max(cols, 1)) // step * step)
    for r0 in range(0, rows, per):
        yield r0, min(rows, r0 + per)


def _dequantized_tiles(module: nn.Module) -> Iterable[tuple[int, int, torch.Tensor]]:
    """(r0, r1, float32 [r1 - r0, in] tile) of a bitsandbytes layer's weight, in order: the
    library's own dequantization (``dequantize_4bit`` / ``int8_vectorwise_dequant``) applied
    to one row tile at a time, so no float32 copy of the whole weight exists."""
    bnb = _bnb()
    out_f, in_f = module.out_features, module.in_features
    weight = module.weight
    if isinstance(module, bnb.nn.Linear8bitLt):
        # the first forward moves the row scales from the weight to the layer's state
        cb = weight.data
        scb = weight.SCB if weight.SCB is not None else getattr(module.state, "SCB", None)
        if cb.dtype != torch.int8 or scb is None:
            raise ValueError(
                f"{type(module).__name__}: weight is not quantized (dtype {cb.dtype}); "
                "move the layer to its device first"
            )
        for r0, r1 in _row_tiles(out_f, in_f, 1):
            yield r0, r1, bnb.functional.int8_vectorwise_dequant(cb[r0:r1], scb[r0:r1]).float()
        return
    state = weight.quant_state
    if state is None:
        raise ValueError(
            f"{type(module).__name__}: weight is not quantized yet; move it to a device first"
        )
    packed = weight.data
    if getattr(state, "packing_format_for_cpu", False):
        # repacked by bitsandbytes' CPU inference path (see keep_layout): its own inverse of
        # the nibble layout; the block scales it keeps are bfloat16 [in / block, out]
        unpack = copy.copy(state)
        unpack.original_nested = False  # the scales are taken as they are, not re-quantized
        packed, _ = bnb.functional._convert_weight_packed_for_cpu_inverse(packed, unpack)
        absmax = state.absmax.t().reshape(-1).float()
    else:
        absmax = _absmax_f32(state)
    packed = packed.reshape(-1)
    if packed.dtype != torch.uint8:  # quant_storage other than uint8 (e.g. for FSDP)
        packed = packed.view(torch.uint8)
    block = state.blocksize
    for r0, r1 in _row_tiles(out_f, in_f, block):
        e0, e1 = r0 * in_f, r1 * in_f
        tile_state = bnb.functional.QuantState(
            absmax=absmax[e0 // block : (e1 + block - 1) // block],
            shape=torch.Size((r1 - r0, in_f)),
            code=state.code,
            blocksize=block,
            quant_type=state.quant_type,
            dtype=torch.float32,
        )
        tile = packed[e0 // 2 : (e1 + 1) // 2].reshape(-1, 1)
        yield r0, r1, bnb.functional.dequantize_4bit(tile, tile_state)


def dequantized_weight(module: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The [out, in] weight of a bitsandbytes layer dequantized by bitsandbytes, in float32
    tiles, rounded once to ``dtype``."""
    out = torch.empty(
        module.out_features, module.in_features, dtype=dtype, device=module.weight.device
    )
    for r0, r1, tile in _dequantized_tiles(module):
        out[r0:r1].copy_(tile)
    return out


def _merged_weight(
    module: nn.Module, lora_a: torch.Tensor | None, lora_b: torch.Tensor | None, dtype
) -> torch.Tensor:
    """dequantize(W) + B A ([out, in]), each float32 tile merged by ``ops.merge_`` (float32
    accumulation) and rounded once into a ``dtype`` tensor."""
    out = torch.empty(
        module.out_features, module.in_features, dtype=dtype, device=module.weight.device
    )
    for r0, r1, tile in _dequantized_tiles(module):
        if lora_a is not None:
            ops.merge_(tile, lora_a, lora_b[r0:r1], 1.0)
        out[r0:r1].copy_(tile)
    return out


def _stacked(layer, names: list[str], device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if not names:
        return None, None
    a, b = layer.stack_adapters(names, dtype=torch.float32)
    return a.detach().to(device), b.detach().to(device)


def _check_finite(name: str, merged: torch.Tensor, dtype: torch.dtype) -> None:
    if not bool(torch.isfinite(merged).all()):
        raise ValueError(
            f"merge of {name!r}: dequantized W + s B A is not finite in {dtype} (an adapter "
            "with inf/nan values or a delta beyond the dtype's range); nothing was merged"
        )


def dequantize_merged(
    layer, name: str, dtype: torch.dtype | None = None, safe: bool = False
) -> nn.Linear:
    """A plain nn.Linear equal to a LoraLinear over a bitsandbytes base with its pending
    (active, unmerged) adapters merged: W' = round_dtype(dequantize(W) + s B A), dequantized
    and merged in float32 row tiles, rounded once. The layer is not changed.

    Args:
        layer: a LoraLinear whose ``base_layer`` is a bitsandbytes layer (or that layer).
        name: its module name (for errors).
        dtype: the merged weight's dtype; None: the layer's float dtype (``float_dtype``).
        safe: check that the merged weight is finite (ValueError otherwise).
    """
    base = getattr(layer, "base_layer", layer)
    pending = layer.pending_adapters() if base is not layer else []
    dtype = dtype or float_dtype(base)
    if dtype not in (*_FLOATS, torch.float64):
        raise ValueError(f"dtype: got {dtype}, need a floating dtype for the merged weight")
    a, b = _stacked(layer, pending, base.weight.device)
    weight = _merged_weight(base, a, b, dtype)
    if safe:
        _check_finite(name, weight, dtype)
    plain = nn.Linear(
        base.in_features, base.out_features, bias=base.bias is not None, device="meta"
    )
    plain.weight = nn.Parameter(weight, requires_grad=False)
    if base.bias is not None:
        plain.bias = nn.Parameter(base.bias.detach().to(dtype).clone(), requires_grad=False)
    plain.train(base.training)
    return plain


def dequantize_(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every bitsandbytes layer of ``model`` (not inside a LoRA layer) by a plain
    nn.Linear with the dequantized weight, in place; all are built before any is swapped.

    Returns: ``model``.
    """
    built = [
        (n, dequantize_merged(m, n, dtype)) for n, m in model.named_modules() if is_quantized(m)
    ]
    for name, plain in built:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, plain)
    return model


def requantize_merged(layer, name: str, names: list[str]) -> tuple[nn.Parameter, float]:
    """Merge ``names`` into a LoraLinear's bitsandbytes base and quantize the result again
    (the explicit ``merge_(model, requantize=True)``): the float merge rounded to the base's
    float dtype, quantized by bitsandbytes with the base's settings. The layer is not changed.

    Returns:
        (the new weight parameter to install, max |dequantize(new) - float32 merge|: the error
        the re-quantization adds).
    """
    bnb = _bnb()
    base = layer.base_layer
    device = base.weight.device
    dtype = float_dtype(base)
    a, b = _stacked(layer, names, device)
    merged32 = _merged_weight(base, a, b, torch.float32)
    _check_finite(name, merged32, torch.float32)
    if isinstance(base, bnb.nn.Linear8bitLt):
        param = bnb.nn.Int8Params(
            merged32.to(dtype), requires_grad=False, has_fp16_weights=False
        ).to(device)
        check = bnb.functional.int8_vectorwise_dequant(param.data, param.SCB).float()
    else:
        old = base.weight
        param = bnb.nn.Params4bit(
            merged32.to(dtype),
            requires_grad=False,
            quant_type=old.quant_type,
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_storage=old.quant_storage,
        ).to(device)
        check = bnb.functional.dequantize_4bit(param.data, param.quant_state).float()
    error = float((check - merged32).abs().max()) if merged32.numel() else 0.0
    return param, error
