"""Pure-PyTorch reference of every compiled op (float64-capable; no extension needed).

Used by the tests as the oracle (computed in float64, and in the op's dtype for the "our error
at most 2x PyTorch's error" rule) and usable as a fallback. ``dropout_mask`` reproduces the
C++/CUDA counter-based mask (csrc/rng.h) bit for bit with int64 tensor arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "dora_merge",
    "dora_merge_float32",
    "dora_norm",
    "dropout_mask",
    "error_bound",
    "keep_threshold",
    "lora_delta",
    "lora_linear",
    "merge",
    "merge_naive",
]

_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _lowbias32(x: Tensor) -> Tensor:
    # x holds uint32 values in int64; products may wrap int64, the low 32 bits stay exact
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def keep_threshold(p: float) -> int:
    """Element i is dropped iff hash(i) < threshold; P(keep) = 1 - threshold / 2^32."""
    t = p * 4294967296.0 + 0.5
    return _M32 if t >= 4294967295.0 else int(t)


def dropout_mask(
    shape: Sequence[int],
    seed: int | Tensor,
    p: float,
    device: torch.device | str | None = None,
    offset: int = 0,
) -> Tensor:
    """The keep-mask of lora_linear for an x of ``shape`` (bool, True = kept).

    A pure function of (seed, flat index of x as a contiguous tensor), identical to csrc/rng.h;
    ``offset`` is the flat index of the first element.
    """
    n = math.prod(shape)
    if p == 0.0:
        return torch.ones(tuple(shape), dtype=torch.bool, device=device)
    seed = int(seed.item()) if isinstance(seed, Tensor) else int(seed)
    z = _splitmix64(seed & _M64)
    k0, k1 = z & _M32, z >> 32
    idx = torch.arange(offset, offset + n, dtype=torch.int64, device=device)
    lo, hi = idx & _M32, idx >> 32
    khi = ((hi * 0x9E3779B9) & _M32) ^ k1
    h = _lowbias32(_lowbias32(lo ^ k0) ^ khi)
    return (h >= keep_threshold(p)).reshape(tuple(shape))


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    dropout_p: float = 0.0,
    seed: int | Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """``x W^T + bias + scale * (drop(x) A^T) B^T`` with plain PyTorch ops in x's dtype.

    Args:
        x: [..., in]; weight: [out, in]; bias: [out] or None; lora_a: [r, in]; lora_b: [out, r].
        dropout_p, seed: the mask is ``dropout_mask(x.shape, seed, dropout_p)`` unless ``mask``
            (bool, x's shape) is given.

    Returns:
        [..., out], differentiable by autograd w.r.t. every input.
    """
    if dropout_p > 0.0:
        if mask is None:
            if seed is None:
                raise ValueError("reference.lora_linear: dropout_p > 0 needs a seed or a mask")
            mask = dropout_mask(x.shape, seed, dropout_p, x.device)
        x_drop = x * mask.to(x.dtype) / (1.0 - dropout_p)
    else:
        x_drop = x
    return F.linear(x, weight, bias) + scale * F.linear(F.linear(x_drop, lora_a), lora_b)


def lora_delta(
    x: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    dropout_p: float = 0.0,
    seed: int | Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """``scale * (drop(x) A^T) B^T`` [..., out]: lora_linear without the base weight and bias
    (x: [..., in]; lora_a: [r, in]; lora_b: [out, r]; the same mask rules)."""
    if dropout_p > 0.0:
        if mask is None:
            if seed is None:
                raise ValueError("reference.lora_delta: dropout_p > 0 needs a seed or a mask")
            mask = dropout_mask(x.shape, seed, dropout_p, x.device)
        x = x * mask.to(x.dtype) / (1.0 - dropout_p)
    return scale * F.linear(F.linear(x, lora_a), lora_b)


def merge(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float) -> Tensor:
    """Exact merge, out of place: ``weight + scale * B A`` in float64, rounded once to weight's dtype."""
    delta = scale * (lora_b.double() @ lora_a.double())
    return (weight.double() + delta).to(weight.dtype)


def merge_naive(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float) -> Tensor:
    """What plain PyTorch does in weight's dtype (the PEFT way): ``weight + scale * (B @ A)``."""
    return weight + scale * (lora_b.to(weight.dtype) @ lora_a.to(weight.dtype))


def dora_norm(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float) -> Tensor:
    """||W + scale B A|| per output row [out], materialised in float64 (the oracle)."""
    v = weight.double() + scale * (lora_b.double() @ lora_a.double())
    return torch.linalg.vector_norm(v, dim=1)


def dora_merge(
    weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float, magnitude: Tensor
) -> Tensor:
    """DoRA's merged weight m / ||W + sBA|| * (W + sBA) [out, in], in float64."""
    v = weight.double() + scale * (lora_b.double() @ lora_a.double())
    return (magnitude.double() / torch.linalg.vector_norm(v, dim=1))[:, None] * v


def dora_merge_float32(
    weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float, magnitude: Tensor
) -> Tensor:
    """DoRA's merge computed in float32 arithmetic throughout (V = W + sBA, its row norms,
    m / n * V), returned in float32: rounded once to W's dtype, the merge a float32
    implementation can at best produce."""
    v = weight.float() + scale * (lora_b.float() @ lora_a.float())
    return (magnitude.float() / torch.linalg.vector_norm(v, dim=1))[:, None] * v


def error_bound(ours: Tensor, same_dtype: Tensor, exact: Tensor) -> tuple[float, float]:
    """The accuracy rule of the tests: our error at most 2x plain PyTorch's, both vs float64.

    Args:
        ours: result of the compiled op, in the op's dtype.
        same_dtype: the same computation with plain PyTorch ops in the op's dtype.
        exact: the same computation in float64 (same inputs, upcast).

    Returns:
        (our max abs error, allowed max abs error). The allowance is 2x PyTorch's max error,
        plus one unit in the last place of the largest exact value (so that a PyTorch error of
        exactly 0 on a tiny problem does not demand bit-exactness).
    """
    exact = exact.double()
    err = (ours.double() - exact).abs().max().item() if ours.numel() else 0.0
    err_torch = (same_dtype.double() - exact).abs().max().item() if ours.numel() else 0.0
    ulp = torch.finfo(ours.dtype).eps * (exact.abs().max().item() if ours.numel() else 0.0)
    return err, 2.0 * err_torch + ulp
