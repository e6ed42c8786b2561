"""Typed wrappers of the compiled ops (``torch.ops.lora_ext.*``): the only module that calls them.

Besides the wrappers, this module registers what the C++ side leaves to Python:

- a fake (meta) implementation of every op, so torch.compile / torch.export can trace them;
- the autograd formula of ``lora_linear`` (backward is the compiled ``lora_linear_backward``),
  so the op works under ``torch.compile(fullgraph=True)`` without a hidden autograd.Function.

The dropout seed travels as a one-element int64 tensor drawn with ``torch.randint`` from the
default generator of x's device (CPU or CUDA): torch.manual_seed makes runs reproducible,
torch.compile traces a fresh seed per step instead of baking a Python int into the graph, and
a CUDA graph replays a fresh draw (the CUDA kernels read the seed on the device).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "build_info",
    "cuda_kernel_variants",
    "cuda_kernels",
    "dora_merge_",
    "dora_merge_is_safe",
    "dora_norm",
    "dropout_mask",
    "load_library",
    "lora_delta",
    "lora_linear",
    "make_seed",
    "merge_",
    "merge_is_safe",
]

_ops = torch.ops.lora_ext  # resolved per attribute, after load_library() registered them
_loaded = False


def load_library() -> None:
    """Load the compiled ``lora_ext._C`` (registers ``torch.ops.lora_ext.*``) and the Python
    halves of the ops (fake kernels, autograd), once, on the first op call: importing the
    layer or the export package never needs the compiled library."""
    global _loaded
    if _loaded:
        return
    try:
        from lora_ext import _C  # noqa: F401
    except ImportError as exc:  # exercised only on a broken install
        raise ImportError(
            "lora_ext's compiled extension (lora_ext._C) is missing or does not match the "
            f"installed torch {torch.__version__}. Build it from the repository root with\n"
            "    pip install --no-build-isolation -e .\n"
            "(or `make build`); LORA_EXT_CPU_ONLY=1 skips the CUDA kernels. "
            f"Original error: {exc}"
        ) from exc
    _register_fakes()
    torch.library.register_autograd(
        "lora_ext::lora_linear", _lora_linear_backward, setup_context=_lora_linear_setup_context
    )
    torch.library.register_autograd(
        "lora_ext::lora_delta", _lora_delta_backward, setup_context=_lora_delta_setup_context
    )
    _loaded = True


_SEED_HIGH = 2**62


def build_info() -> dict[str, Any]:
    """How the compiled extension was built.

    Returns:
        dict with ``version``, ``cuda`` (bool: CUDA kernels compiled in), ``cuda_archs``
        (e.g. ``["8.0", "9.0"]``), ``cuda_version``, ``torch_version`` (compiled against),
        ``openmp``, ``cpu_dispatch``, ``compiler`` and ``dropout_rng``.
    """
    load_library()
    from lora_ext import _C

    return dict(_C.build_info())


def cuda_kernel_variants() -> list[str]:
    """The CUDA kernel variants compiled in: ``["simple", "fast"]`` in a CUDA build, else
    ``[]``. ``simple`` is the default; ``fast`` is the vectorised merge and the forward /
    backward that never write drop(x) (``LORA_EXT_CUDA_KERNELS=fast`` makes it the default)."""
    return list(build_info()["cuda_kernel_variants"])


@contextlib.contextmanager
def cuda_kernels(variant: str) -> Iterator[None]:
    """Run the ops on the GPU with the ``"simple"`` or the ``"fast"`` CUDA kernels inside the
    block (a process-wide switch; CPU kernels are not affected)."""
    if variant not in ("simple", "fast"):
        raise ValueError(f"variant must be 'simple' or 'fast', got {variant!r}")
    load_library()
    from lora_ext import _C

    before = _C._set_cuda_fast_kernels(variant == "fast")
    try:
        yield
    finally:
        _C._set_cuda_fast_kernels(before)


def make_seed(seed: int | Tensor | None = None, device: torch.device | str | None = None) -> Tensor:
    """The dropout seed as the op takes it: a 0-d int64 tensor, on the CPU or on ``device``.

    ``None`` draws a fresh one from ``device``'s default generator (the CPU's by default),
    reproducible under torch.manual_seed; on CUDA the draw is a device op, so a CUDA graph
    replays a fresh seed (and the kernels read it on the device: no host sync). An int or a
    one-element integer tensor is used as given.
    """
    dev = torch.device("cpu") if device is None else torch.device(device)
    if seed is None:
        return torch.randint(0, _SEED_HIGH, (), dtype=torch.int64, device=dev)
    if isinstance(seed, Tensor):
        if seed.numel() != 1 or seed.dtype.is_floating_point or seed.dtype.is_complex:
            raise ValueError(
                f"seed must be an int or a one-element integer tensor, got a {seed.dtype} "
                f"tensor of shape {tuple(seed.shape)}"
            )
        # a seed already on the wanted device stays there (no copy, no sync)
        return seed.reshape(()).to(device=dev, dtype=torch.int64)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, a tensor or None, got {type(seed).__name__}")
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed must fit in 64 bits, got {seed}")
    if seed >= 2**63:  # same 64 bits, as the C++ side reads them
        seed -= 2**64
    return torch.tensor(seed, dtype=torch.int64, device=dev)


def _seed_device(t: Tensor) -> torch.device | None:
    """Where the seed of an op on ``t`` lives: on a CUDA device with it, else on the CPU."""
    return t.device if t.device.type == "cuda" else None


def _check_scale_p(scale: float, dropout_p: float) -> None:
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")


# A constant seed for dropout_p == 0 (the kernels ignore it then): no allocation per call.
_NO_SEED = torch.zeros((), dtype=torch.int64)


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    dropout_p: float = 0.0,
    seed: int | Tensor | None = None,
) -> Tensor:
    """Fused LoRA linear: ``y = x W^T + bias + scale * (drop(x) A^T) B^T``.

    ``drop(x) = x * mask / (1 - dropout_p)`` where the mask is a pure function of (seed, flat
    element index of x as [tokens, in]), recomputed in backward instead of being stored.

    Args:
        x: [..., in] input (any leading dims, any strides).
        weight: [out, in] frozen base weight (may be a non-contiguous view, e.g. Conv1D.weight.t()).
        bias: [out] frozen bias or None.
        lora_a: [r, in] LoRA down projection A.
        lora_b: [out, r] LoRA up projection B.
        scale: alpha / r (or alpha / sqrt(r) for rsLoRA); must be finite.
        dropout_p: probability of dropping an element of x on the LoRA path, in [0, 1).
            Pass 0 in eval mode.
        seed: mask seed; None draws a fresh one from torch's default generator.

    Returns:
        y: [..., out]. Differentiable w.r.t. x, lora_a and lora_b (not weight, bias).
    """
    _check_scale_p(scale, dropout_p)
    if torch.is_grad_enabled() and (
        weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        raise ValueError(
            "lora_linear: weight and bias are frozen (no gradient flows to them); "
            "set requires_grad=False on the base layer's parameters"
        )
    load_library()
    seed_t = make_seed(seed, _seed_device(x)) if dropout_p > 0.0 else _NO_SEED
    y, _ = _ops.lora_linear.default(
        x, weight, bias, lora_a, lora_b, float(scale), float(dropout_p), seed_t
    )
    return y


def lora_delta(
    x: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    dropout_p: float = 0.0,
    seed: int | Tensor | None = None,
) -> Tensor:
    """The LoRA branch alone: ``y = scale * (drop(x) A^T) B^T``, for a base layer that
    computes its own output (a bitsandbytes 4-bit / 8-bit layer: ``base(x) + lora_delta(x)``).

    The same kernels and the same dropout mask as ``lora_linear`` for the same seed (a pure
    function of (seed, flat index of x as [tokens, in])); backward keeps x and
    ``xa = drop(x) A^T`` [..., r], nothing else of x's size.

    Args:
        x: [..., in] input (any leading dims, any strides).
        lora_a: [r, in]. lora_b: [out, r]. Same dtype and device as x.
        scale: finite scaling factor. dropout_p: in [0, 1) (0 in eval mode).
        seed: mask seed; None draws a fresh one from torch's default generator.

    Returns:
        y: [..., out], differentiable w.r.t. x, lora_a and lora_b.
    """
    _check_scale_p(scale, dropout_p)
    load_library()
    seed_t = make_seed(seed, _seed_device(x)) if dropout_p > 0.0 else _NO_SEED
    y, _ = _ops.lora_delta.default(x, lora_a, lora_b, float(scale), float(dropout_p), seed_t)
    return y


def merge_(
    weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float, safe: bool = False
) -> Tensor:
    """In place ``weight += scale * lora_b @ lora_a``, accumulated in float32, rounded once.

    Works in tiles (no temporary of the weight's size). Unmerge is ``merge_`` with ``-scale``.

    Args:
        weight: [out, in] weight to update; may be a non-contiguous view (``conv.weight.t()``).
        lora_a: [r, in]. lora_b: [out, r]. Their dtype may differ from weight's.
        scale: finite scaling factor.
        safe: first check that the delta is finite and that no finite weight would become
            inf/nan; if not, raise ValueError and leave weight bit-identical.

    Returns:
        weight (the same tensor, updated).
    """
    _check_scale_p(scale, 0.0)
    load_library()
    with torch.no_grad():  # merging is never part of a graph; also allows leaf parameters
        if safe and not bool(_ops.merge_check.default(weight, lora_a, lora_b, float(scale))):
            raise ValueError(
                f"merge_(safe=True): scale * lora_b @ lora_a (scale={scale}, lora_a "
                f"{tuple(lora_a.shape)}, lora_b {tuple(lora_b.shape)}) is not finite or would "
                f"overflow weight {tuple(weight.shape)} ({weight.dtype}); weight left unchanged"
            )
        _ops.merge_.default(weight, lora_a, lora_b, float(scale))
    return weight


def merge_is_safe(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float) -> bool:
    """Whether ``merge_(weight, lora_a, lora_b, scale)`` keeps every finite weight finite and
    adds a finite delta; tiled in float32 like the merge itself (no weight-sized temporary).

    Args:
        weight: [out, in]. lora_a: [r, in]. lora_b: [out, r]. scale: finite.
    """
    _check_scale_p(scale, 0.0)
    load_library()
    with torch.no_grad():
        return bool(_ops.merge_check.default(weight, lora_a, lora_b, float(scale)))


def dora_norm(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float) -> Tensor:
    """DoRA's row norms ``n_i = ||W_i + scale * B_i A||_2`` over the input dim, in tiles of
    rows (``W + s B A`` is never materialised), accumulated in float32.

    Args:
        weight: [out, in] (any strides: ``conv.weight.t()`` for a GPT-2 Conv1D).
        lora_a: [r, in]. lora_b: [out, r]. Their dtype may differ from weight's.
        scale: finite scaling factor.

    Returns:
        n: [out] float32 (float64 for a float64 weight), no autograd graph (DoRA detaches it).
    """
    _check_scale_p(scale, 0.0)
    load_library()
    with torch.no_grad():
        return _ops.dora_norm.default(weight, lora_a, lora_b, float(scale))


def dora_merge_(
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    factor: Tensor,
    inverse: bool = False,
) -> Tensor:
    """In place, per output row i: ``W_i <- factor_i * (W_i + scale * B_i A)`` (DoRA's merge,
    factor = m / n), or with ``inverse`` ``W_i <- W_i / factor_i - scale * B_i A`` (unmerge);
    computed in float32 and rounded once into W's dtype, in tiles (no weight-sized temporary).

    Args:
        weight: [out, in] (any strides). lora_a: [r, in]. lora_b: [out, r].
        scale: finite. factor: [out] floating.

    Returns:
        weight (the same tensor, updated).
    """
    _check_scale_p(scale, 0.0)
    load_library()
    with torch.no_grad():
        _ops.dora_merge_.default(weight, lora_a, lora_b, float(scale), factor, bool(inverse))
    return weight


def dora_merge_is_safe(
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    factor: Tensor,
    inverse: bool = False,
) -> bool:
    """Whether ``dora_merge_`` with these arguments has a finite delta and finite factors and
    keeps every finite weight finite in its dtype; reads, writes nothing (same tiles)."""
    _check_scale_p(scale, 0.0)
    load_library()
    with torch.no_grad():
        return bool(
            _ops.dora_merge_check.default(
                weight, lora_a, lora_b, float(scale), factor, bool(inverse)
            )
        )


def dropout_mask(like: Tensor, seed: int | Tensor, dropout_p: float, offset: int = 0) -> Tensor:
    """The keep-mask (True = kept) lora_linear uses for an x of ``like``'s shape.

    Args:
        like: any tensor; the mask gets its shape and device.
        seed: the seed given to lora_linear.
        dropout_p: drop probability in [0, 1).
        offset: flat index of the first element (the mask of a slice of a larger x).

    Returns:
        bool tensor of ``like.shape`` on ``like.device``.
    """
    _check_scale_p(1.0, dropout_p)
    load_library()
    seed_t = make_seed(seed, _seed_device(like))
    return _ops.dropout_mask.default(like, seed_t, float(dropout_p), int(offset))


# ---------------------------------------------------------------------------------------------
# fake (meta) implementations: shapes, dtypes and strides of the real kernels' outputs


def _rows_shape(x: Tensor, last: int) -> list[int]:
    return [*x.shape[:-1], last]


def _check_devices(ref_name: str, ref: Tensor, **tensors: Tensor | None) -> None:
    """The compiled kernels' device check, for the fake kernels: a meta tensor among real ones
    dispatches here, and must fail naming the argument instead of returning garbage."""
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise RuntimeError(
                f"lora_ext: {name} is on {t.device} but {ref_name} is on {ref.device}: "
                "all tensors must be on one device"
            )


def _check_seed_device(seed: Tensor, x: Tensor) -> None:
    if seed.device.type != "cpu" and seed.device != x.device:
        raise RuntimeError(
            f"lora_ext: seed must be on the CPU (or, for a CUDA kernel, on x's device), got a "
            f"seed on {seed.device} with x on {x.device}"
        )


def _lora_linear_fake(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed):
    _check_devices("x", x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b)
    _check_seed_device(seed, x)
    torch._check(x.dim() >= 1, lambda: "x must have shape [..., in_features]")
    torch._check(
        weight.dim() == 2 and weight.shape[1] == x.shape[-1],
        lambda: f"weight must be [out, {x.shape[-1]}], got {tuple(weight.shape)}",
    )
    torch._check(
        lora_a.dim() == 2 and lora_a.shape[1] == x.shape[-1],
        lambda: f"lora_a must be [r, {x.shape[-1]}], got {tuple(lora_a.shape)}",
    )
    torch._check(
        lora_b.dim() == 2
        and lora_b.shape[0] == weight.shape[0]
        and lora_b.shape[1] == lora_a.shape[0],
        lambda: f"lora_b must be [{weight.shape[0]}, {lora_a.shape[0]}], got {tuple(lora_b.shape)}",
    )
    if bias is not None:
        torch._check(
            bias.dim() == 1 and bias.shape[0] == weight.shape[0],
            lambda: f"bias must have shape [{weight.shape[0]}], got {tuple(bias.shape)}",
        )
    y = x.new_empty(_rows_shape(x, weight.shape[0]))
    xa = x.new_empty(_rows_shape(x, lora_a.shape[0]))
    return y, xa


def _lora_linear_backward_fake(
    grad_y, x, weight, lora_a, lora_b, xa, scale, dropout_p, seed, output_mask
):
    _check_devices("x", x, grad_y=grad_y, weight=weight, lora_a=lora_a, lora_b=lora_b, xa=xa)
    _check_seed_device(seed, x)
    return (
        x.new_empty(x.shape) if output_mask[0] else None,
        lora_a.new_empty(lora_a.shape) if output_mask[1] else None,
        lora_b.new_empty(lora_b.shape) if output_mask[2] else None,
    )


def _lora_delta_fake(x, lora_a, lora_b, scale, dropout_p, seed):
    _check_devices("x", x, lora_a=lora_a, lora_b=lora_b)
    _check_seed_device(seed, x)
    torch._check(x.dim() >= 1, lambda: "x must have shape [..., in_features]")
    torch._check(
        lora_a.dim() == 2 and lora_a.shape[1] == x.shape[-1],
        lambda: f"lora_a must be [r, {x.shape[-1]}], got {tuple(lora_a.shape)}",
    )
    torch._check(
        lora_b.dim() == 2 and lora_b.shape[1] == lora_a.shape[0],
        lambda: f"lora_b must be [out, {lora_a.shape[0]}], got {tuple(lora_b.shape)}",
    )
    return x.new_empty(_rows_shape(x, lora_b.shape[0])), x.new_empty(
        _rows_shape(x, lora_a.shape[0])
    )


def _lora_delta_backward_fake(grad_y, x, lora_a, lora_b, xa, scale, dropout_p, seed, output_mask):
    _check_devices("x", x, grad_y=grad_y, lora_a=lora_a, lora_b=lora_b, xa=xa)
    _check_seed_device(seed, x)
    return (
        x.new_empty(x.shape) if output_mask[0] else None,
        lora_a.new_empty(lora_a.shape) if output_mask[1] else None,
        lora_b.new_empty(lora_b.shape) if output_mask[2] else None,
    )


def _merge_fake(weight, lora_a, lora_b, scale):
    _check_devices("weight", weight, lora_a=lora_a, lora_b=lora_b)
    return None


def _merge_check_fake(weight, lora_a, lora_b, scale):
    _check_devices("weight", weight, lora_a=lora_a, lora_b=lora_b)
    return weight.new_empty((), dtype=torch.bool)


def _dora_norm_fake(weight, lora_a, lora_b, scale):
    _check_devices("weight", weight, lora_a=lora_a, lora_b=lora_b)
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    return weight.new_empty((weight.shape[0],), dtype=acc)


def _dora_merge_fake(weight, lora_a, lora_b, scale, factor, inverse):
    _check_devices("weight", weight, lora_a=lora_a, lora_b=lora_b, factor=factor)
    return None


def _dora_merge_check_fake(weight, lora_a, lora_b, scale, factor, inverse):
    _check_devices("weight", weight, lora_a=lora_a, lora_b=lora_b, factor=factor)
    return weight.new_empty((), dtype=torch.bool)


def _dropout_mask_fake(like, seed, dropout_p, offset=0):
    return like.new_empty(like.shape, dtype=torch.bool)


def _register_fakes() -> None:
    torch.library.register_fake("lora_ext::lora_linear")(_lora_linear_fake)
    torch.library.register_fake("lora_ext::lora_linear_backward")(_lora_linear_backward_fake)
    torch.library.register_fake("lora_ext::lora_delta")(_lora_delta_fake)
    torch.library.register_fake("lora_ext::lora_delta_backward")(_lora_delta_backward_fake)
    torch.library.register_fake("lora_ext::merge_")(_merge_fake)
    torch.library.register_fake("lora_ext::merge_check")(_merge_check_fake)
    torch.library.register_fake("lora_ext::dropout_mask")(_dropout_mask_fake)
    torch.library.register_fake("lora_ext::dora_norm")(_dora_norm_fake)
    torch.library.register_fake("lora_ext::dora_merge_")(_dora_merge_fake)
    torch.library.register_fake("lora_ext::dora_merge_check")(_dora_merge_check_fake)


# ---------------------------------------------------------------------------------------------
# autograd of lora_linear: the saved tensors are x (the caller's own), the frozen weight, A, B,
# xa [..., r] and the 0-d seed. Nothing else of x's size: the mask is recomputed from the seed.


def _lora_linear_setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scale, dropout_p, seed = inputs
    _, xa = output
    ctx.scale = scale
    ctx.dropout_p = dropout_p
    ctx.save_for_backward(x, weight, lora_a, lora_b, xa, seed)
    ctx.mark_non_differentiable(xa)


def _lora_linear_backward(ctx, grad_y, grad_xa):
    x, weight, lora_a, lora_b, xa, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    output_mask = [bool(need[0]), bool(need[3]), bool(need[4])]
    if need[1] or need[2]:
        raise RuntimeError(
            "lora_ext.lora_linear: weight and bias are frozen (no gradient); "
            "set requires_grad=False on them"
        )
    if grad_y is None or not any(output_mask):
        return None, None, None, None, None, None, None, None
    grad_x, grad_a, grad_b = lora_linear_grads(
        grad_y, x, weight, lora_a, lora_b, xa, ctx.scale, ctx.dropout_p, seed, output_mask
    )
    return grad_x, None, None, grad_a, grad_b, None, None, None


def lora_linear_grads(grad_y, x, weight, lora_a, lora_b, xa, scale, dropout_p, seed, mask3):
    """(grad_x, grad_a, grad_b) of lora_linear (``mask3`` says which are wanted): the compiled
    kernel, or under backward(create_graph=True) the same formula in differentiable PyTorch
    ops, for double backward. Shared by the op's autograd and quantized.py's fused 4-bit path."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (grad_y, x, lora_a, lora_b)):
        return _differentiable_backward(
            grad_y, x, weight, lora_a, lora_b, scale, dropout_p, seed, mask3
        )
    return _ops.lora_linear_backward.default(
        grad_y, x, weight, lora_a, lora_b, xa, scale, dropout_p, seed, mask3
    )


def _differentiable_backward(grad_y, x, weight, lora_a, lora_b, scale, dropout_p, seed, mask3):
    """The backward of lora_linear in plain PyTorch ops (autograd records them), used when
    backward itself is differentiated (create_graph=True: double backward, gradient penalties,
    Hessian-vector products). The same formula as the compiled kernel, the same mask."""
    if dropout_p > 0.0:
        keep = _ops.dropout_mask.default(x, seed, float(dropout_p), 0)
        drop = keep.to(x.dtype) / (1.0 - dropout_p)
        x_drop = x * drop
    else:
        drop, x_drop = None, x
    g = (grad_y @ lora_b) * scale  # [..., r]
    grad_x = grad_a = grad_b = None
    if mask3[0]:
        lora_term = g @ lora_a
        grad_x = grad_y @ weight + (lora_term * drop if drop is not None else lora_term)
    if mask3[1]:
        grad_a = g.reshape(-1, g.shape[-1]).t() @ x_drop.reshape(-1, x.shape[-1])
    if mask3[2]:
        xa = x_drop @ lora_a.t()
        grad_b = scale * (grad_y.reshape(-1, grad_y.shape[-1]).t() @ xa.reshape(-1, xa.shape[-1]))
    return grad_x, grad_a, grad_b


# ---------------------------------------------------------------------------------------------
# autograd of lora_delta: as lora_linear's without the base weight (saved: x, A, B, xa, seed)


def _lora_delta_setup_context(ctx, inputs, output):
    x, lora_a, lora_b, scale, dropout_p, seed = inputs
    _, xa = output
    ctx.scale = scale
    ctx.dropout_p = dropout_p
    ctx.save_for_backward(x, lora_a, lora_b, xa, seed)
    ctx.mark_non_differentiable(xa)


def _lora_delta_backward(ctx, grad_y, grad_xa):
    x, lora_a, lora_b, xa, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    output_mask = [bool(need[0]), bool(need[1]), bool(need[2])]
    if grad_y is None or not any(output_mask):
        return None, None, None, None, None, None
    if torch.is_grad_enabled() and any(t.requires_grad for t in (grad_y, x, lora_a, lora_b)):
        # double backward: the same formula in differentiable PyTorch ops, zero base weight
        weight = x.new_zeros((lora_b.shape[0], x.shape[-1]))
        grad_x, grad_a, grad_b = _differentiable_backward(
            grad_y, x, weight, lora_a, lora_b, ctx.scale, ctx.dropout_p, seed, output_mask
        )
    else:
        grad_x, grad_a, grad_b = _ops.lora_delta_backward.default(
            grad_y, x, lora_a, lora_b, xa, ctx.scale, ctx.dropout_p, seed, output_mask
        )
    return grad_x, grad_a, grad_b, None, None, None
