"""DoRA (weight-decomposed LoRA, Liu et al. 2024) on a LoraLinear, PEFT-compatible.

An adapter created with ``use_dora=True`` has, next to A [r, in] and B [out, r], a trained
magnitude vector m [out] (``layer.lora_magnitude_vector[name]``; PEFT's
``lora_magnitude_vector``), initialised to the row norms of W + s B A over the input dim (so the
layer is unchanged at start), kept in float32 over a 16-bit base like the A/B masters. With
V = W + s B A and n = ||V||_row (a constant: detached, as in the paper's section 4.3 and PEFT):

    forward:  y = (m / n) * (x W^T + s (drop(x) A^T) B^T) + b        [..., out]
    merge:    W' = (m / n)[:, None] * V                                 (float32, rounded once)
    unmerge:  W  = W' / (m / n)[:, None] - s B A                        (n cached at merge)

The forward is one call of the fused op ``ops.lora_linear`` without bias followed by a row
scaling, so the LoRA path keeps the op's seed-recomputed dropout mask (nothing x-sized saved
for it). n comes from the compiled ``ops.dora_norm``, which forms V in tiles of rows (CPU) or
element by element (CUDA) and never materialises it; merges use ``ops.dora_merge_`` (in place,
tiled, one rounding).

Dropout: ours drops only the LoRA path's input, as everywhere in lora_ext. PEFT with
dropout > 0 in train mode computes ``x W^T + b + (m/n - 1) * (drop(x) W^T) + (m/n) s
drop(x) A^T B^T``: its magnitude term also sees the dropped x. With dropout 0, or in eval mode,
the two are identical (the parity tests compare there).

Limits (refused with a ValueError naming the adapter): a DoRA adapter runs alone (it cannot
be active together with other adapters, since its norm is defined on W alone), and on a layer
it is merged alone (no other adapter merged into the same weight before or after it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from lora_ext import ops

if TYPE_CHECKING:  # layer.py imports this module
    from lora_ext.layer import LoraLinear


def is_dora(layer: LoraLinear, name: str) -> bool:
    """Whether adapter ``name`` of ``layer`` is a DoRA adapter (has a magnitude vector)."""
    return name in layer.lora_magnitude_vector


def check_base(name: str, base: nn.Module) -> None:
    """DoRA needs a plain floating-point base weight (its row norms ||W + sBA||): refuse a
    quantized one (bitsandbytes' Params4bit / Int8Params, or any other parameter subclass or
    integer weight), naming the layer and the option."""
    weight = base.weight
    if type(weight) is not nn.Parameter or not weight.dtype.is_floating_point:
        raise ValueError(
            f"use_dora=True: {name!r} is a {type(base).__name__} whose weight is a "
            f"{type(weight).__name__} of {weight.dtype} (a quantized base?); DoRA needs a "
            "floating-point base weight for its norm ||W + sBA||: set use_dora=False, or "
            "load the base unquantized (no base_quantization)"
        )


def weight_norm(layer: LoraLinear, name: str) -> torch.Tensor:
    """n = ||W + s B A|| per output row, [out] float32 (float64 over a float64 base), detached:
    the compiled ``ops.dora_norm`` over the base weight and the adapter's A, B masters."""
    return ops.dora_norm(
        layer.base_weight().detach(),
        layer.lora_A[name].detach(),
        layer.lora_B[name].detach(),
        layer.scaling[name],
    )


def add_magnitude(layer: LoraLinear, name: str) -> None:
    """Create adapter ``name``'s magnitude vector m [out] = ||W + s B A||_row (after A, B and,
    for PiSSA, W's residual were set: the layer's output is unchanged), in A's dtype."""
    dtype = layer.lora_A[name].dtype
    layer.lora_magnitude_vector[name] = nn.Parameter(weight_norm(layer, name).to(dtype))


def drop(layer: LoraLinear, name: str) -> None:
    """Forget adapter ``name``'s DoRA state (magnitude, merge-time norm), if any."""
    if name in layer.lora_magnitude_vector:
        del layer.lora_magnitude_vector[name]
    layer._dora_norms.pop(name, None)


def check_alone(names: list[str], dora_names: list[str], what: str) -> None:
    """A DoRA adapter must be the only one in ``names`` (active or merged adapters)."""
    if dora_names and len(names) > 1:
        raise ValueError(
            f"{what}: {names} include the DoRA adapter(s) {dora_names}; a DoRA adapter "
            "(use_dora=True) runs alone, since its norm ||W + sBA|| is defined on the base "
            "weight: activate or merge it by itself"
        )


def forward_factor(layer: LoraLinear, pending: list[str]) -> torch.Tensor | None:
    """The row scaling m / n [out] (float32, differentiable w.r.t. m; n detached) that the
    forward applies to ``x W^T + s (drop(x) A^T) B^T`` when the pending adapter is DoRA, else
    None. ValueError if a DoRA adapter is pending together with others."""
    dora_names = [n for n in pending if is_dora(layer, n)]
    if not dora_names:
        return None
    check_alone(pending, dora_names, "active adapters")
    if layer.merged_adapters:
        raise ValueError(
            f"DoRA adapter {pending[0]!r} is active on a layer with merged adapters "
            f"{layer.merged_adapters}; its norm needs the unmerged weight: unmerge first"
        )
    name = pending[0]
    return layer.lora_magnitude_vector[name] / weight_norm(layer, name)


def merge_factor(layer: LoraLinear, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(factor m / n [out], n [out]) for merging adapter ``name`` into the current weight."""
    norm = weight_norm(layer, name)
    magnitude = layer.lora_magnitude_vector[name].detach().to(norm.dtype)
    return magnitude / norm, norm


def merge_problem(layer: LoraLinear, name: str) -> str | None:
    """Why merging DoRA adapter ``name`` would not be safe (a zero or non-finite row norm, a
    non-finite factor or delta, a weight overflowing its dtype), or None."""
    factor, _ = merge_factor(layer, name)
    ok = ops.dora_merge_is_safe(
        layer.base_weight().detach(),
        layer.lora_A[name].detach(),
        layer.lora_B[name].detach(),
        layer.scaling[name],
        factor,
    )
    if ok:
        return None
    return (
        f"merging DoRA adapter {name!r} gives a non-finite factor m/||W + sBA|| or delta, or "
        f"would overflow the {layer.base_weight().dtype} weight"
    )


def merge(layer: LoraLinear, name: str) -> None:
    """W <- (m / n) * (W + s B A) in place (``ops.dora_merge_``: float32, one rounding, tiles);
    n is cached on the layer for ``unmerge``, as PEFT does."""
    check_alone(
        [*layer.merged_adapters, name],
        [n for n in [*layer.merged_adapters, name] if is_dora(layer, n)],
        "merge",
    )
    factor, norm = merge_factor(layer, name)
    ops.dora_merge_(
        layer.base_weight(),
        layer.lora_A[name].detach(),
        layer.lora_B[name].detach(),
        layer.scaling[name],
        factor,
    )
    layer._dora_norms[name] = norm


def unmerge(layer: LoraLinear, name: str) -> None:
    """W <- W' / (m / n) - s B A with the n cached at merge time (one rounding)."""
    weight = layer.base_weight()
    norm = layer._dora_norms.pop(name).to(weight.device)
    magnitude = layer.lora_magnitude_vector[name].detach().to(norm.dtype)
    ops.dora_merge_(
        weight,
        layer.lora_A[name].detach(),
        layer.lora_B[name].detach(),
        layer.scaling[name],
        magnitude / norm,
        inverse=True,
    )
