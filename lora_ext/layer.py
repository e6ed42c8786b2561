"""LoraLinear: a wrapper that adds named LoRA adapters to an nn.Linear or a GPT-2 Conv1D.

As in PEFT's ``tuners/lora/layer.py`` the original layer is kept untouched as ``base_layer``
(its parameters keep their names under ``<module>.base_layer``) and the adapters live next to
it: ``lora_A[name]`` [r, in] and ``lora_B[name]`` [out, r]. The forward pass is one call of
the compiled op ``lora_ext.ops.lora_linear``; merging uses ``lora_ext.ops.merge_``.

transformers' ``Conv1D`` (GPT-2) stores its weight as [in, out]; everything here works on the
[out, in] view ``weight.t()`` (the ops accept non-contiguous views), which is what PEFT's
``fan_in_fan_out`` does.

A bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` base (QLoRA) computes its own output; the
LoRA branch is then the LoRA-only op and merging dequantizes (``lora_ext/quantized.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from lora_ext import dora, ops, quantized


def _conv1d_class() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional: then only nn.Linear exists
        return None
    return Conv1D


def is_supported(module: nn.Module) -> bool:
    """True for the layer types LoraLinear can wrap: nn.Linear, transformers' Conv1D and
    bitsandbytes' Linear4bit / Linear8bitLt (nn.Linear subclasses)."""
    conv1d = _conv1d_class()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def out_in(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a supported layer (a bitsandbytes weight is packed, a
    Conv1D weight is [in, out])."""
    if quantized.is_quantized(module):
        return module.out_features, module.in_features
    out_f, in_f = module.weight.shape
    return (out_f, in_f) if isinstance(module, nn.Linear) else (in_f, out_f)


def check_adapter_name(adapter_name: object) -> str:
    """Adapter names become keys of nn.ParameterDict, so they cannot contain dots."""
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter_name: got {adapter_name!r}, need a non-empty string without '.'")
    return adapter_name


class LoraLinear(nn.Module):
    """A linear layer plus LoRA adapters: y = base(x) + sum_i s_i * (drop(x) A_i^T) B_i^T.

    Args:
        base_layer: the nn.Linear (weight [out, in]) or transformers Conv1D (weight [in, out])
            to wrap. It is kept as ``self.base_layer``; its parameters are not copied. Its
            weight is frozen (the op gives it no gradient); a bias may still train.

    Several adapters may be active at once; their contributions are summed. The op is then
    called once with the adapters stacked along the rank: A = cat(A_i) [sum r_i, in],
    B = cat(s_i * B_i) [out, sum r_i], scale 1 — exactly sum_i s_i B_i A_i x. The dropout mask
    is then shared by the stacked adapters (one mask on x), so in train mode with dropout
    they must use the same dropout rate.

    A DoRA adapter (``add_adapter(..., use_dora=True)``, see ``lora_ext.dora``) adds a trained
    magnitude vector m [out]: y = (m / ||W + sBA||_row) * (x W^T + s (drop(x) A^T) B^T) + b.
    It runs and merges alone (not together with other adapters on the layer).
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        # A LoRA layer will call the op: load the compiled library now, not inside the first
        # forward, which may be under torch.compile(fullgraph=True) (loading is no graph op)
        ops.load_library()
        if isinstance(base_layer, LoraLinear):
            raise TypeError("base_layer: got a LoraLinear; add an adapter to it instead")
        if not is_supported(base_layer):
            raise TypeError(
                f"base_layer: got {type(base_layer).__name__}, need nn.Linear or "
                "transformers' Conv1D"
            )
        self.base_layer = base_layer
        self.fan_in_fan_out = not isinstance(base_layer, nn.Linear)  # Conv1D: weight [in, out]
        self.quantized = quantized.is_quantized(base_layer)  # bitsandbytes 4/8-bit base
        if self.quantized:
            quantized.keep_layout(base_layer)
        self.requantize_error = 0.0  # max |delta| a merge_(requantize=True) added
        self.out_features, self.in_features = out_in(base_layer)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        # DoRA (lora_ext/dora.py): magnitude vectors m [out] of the use_dora adapters, and the
        # row norms cached when one is merged (unmerge needs them)
        self.lora_magnitude_vector = nn.ParameterDict()
        self._dora_norms: dict[str, torch.Tensor] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        # the op gives no gradient to the base weight: it is frozen here, as PEFT's model does
        base_layer.weight.requires_grad_(False)
        # a layer wrapped into an eval-mode model must not start dropping out
        self.train(base_layer.training)

    # -- the base weight ---------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight parameter, in its own layout (code that reads
        ``module.weight`` keeps working after wrapping)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias parameter (or None)."""
        return self.base_layer.bias

    def base_weight(self) -> torch.Tensor:
        """The base weight as an [out, in] tensor (a transposed view for Conv1D)."""
        if self.quantized:
            raise TypeError(
                f"the base layer is a bitsandbytes {quantized.kind_of(self.base_layer)} layer: "
                "its weight is packed; lora_ext.quantized.dequantized_weight(layer.base_layer) "
                "gives it as a float [out, in] tensor"
            )
        weight = self.base_layer.weight
        return weight.t() if self.fan_in_fan_out else weight

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    # -- adapters ----------------------------------------------------------------------
    def add_adapter(
        self,
        adapter_name: str,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str | None = "kaiming",
        use_dora: bool = False,
    ) -> None:
        """Create adapter ``adapter_name``: A [r, in], B [out, r] on the base weight's device,
        in its dtype (float32 over a float16/bfloat16 base, as PEFT), scale alpha / r
        (alpha / sqrt(r) with use_rslora).

        init "kaiming" / "gaussian" leave the layer's output unchanged (B = 0); "pissa" sets
        A, B from the top-r SVD of W and replaces W by W - scale * B A (also unchanged);
        None leaves A = B = 0 without drawing random numbers (for tensors loaded next).

        use_dora: also a DoRA magnitude vector m [out] = ||W + s B A||_row (in A's dtype), set
        after A, B (and PiSSA's residual W): see ``lora_ext.dora``.
        """
        check_adapter_name(adapter_name)
        if adapter_name in self.lora_A:
            raise ValueError(f"adapter_name: {adapter_name!r} already exists on this layer")
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"r: got {r!r}, need a positive int")
        if init == "pissa" and r > min(self.in_features, self.out_features):
            raise ValueError(
                f"r: got {r} with init='pissa', need r <= min(in, out) = "
                f"{min(self.in_features, self.out_features)}"
            )
        weight = self.base_layer.weight
        wdtype = quantized.float_dtype(self.base_layer) if self.quantized else weight.dtype
        # As PEFT (autocast_adapter_dtype): adapters over a float16/bfloat16 base are kept in
        # float32, so their updates are not rounded away; the forward casts them for the op.
        dtype = torch.float32 if wdtype in (torch.float16, torch.bfloat16) else wdtype
        factory = {"dtype": dtype, "device": weight.device}
        lora_a = nn.Parameter(torch.empty(r, self.in_features, **factory))
        lora_b = nn.Parameter(torch.empty(self.out_features, r, **factory))
        scale = alpha / math.sqrt(r) if use_rslora else alpha / r
        with torch.no_grad():
            if init == "kaiming":
                # the default of nn.Linear and of PEFT / loralib: kaiming-uniform(a=sqrt(5))
                nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
                lora_b.zero_()
            elif init == "gaussian":
                nn.init.normal_(lora_a, std=1.0 / r)  # PEFT's "gaussian": std 1/r
                lora_b.zero_()
            elif init == "pissa":
                self._pissa_init(lora_a, lora_b, r, scale)
            elif init is None:
                lora_a.zero_()
                lora_b.zero_()
            else:
                raise ValueError(f"init: got {init!r}, need 'kaiming', 'gaussian' or 'pissa'")
        self.lora_A[adapter_name] = lora_a
        self.lora_B[adapter_name] = lora_b
        self.r[adapter_name] = r
        self.alpha[adapter_name] = alpha
        self.scaling[adapter_name] = scale
        self.dropout[adapter_name] = float(dropout)
        self.use_rslora[adapter_name] = bool(use_rslora)
        if use_dora:
            dora.add_magnitude(self, adapter_name)

    def _pissa_init(self, lora_a: torch.Tensor, lora_b: torch.Tensor, r: int, scale: float) -> None:
        # PEFT's pissa_init: W = U S Vh; A = sqrt(S_r / s) Vh_r, B = U_r sqrt(S_r / s), so
        # s * B A is the best rank-r approximation of W, and W keeps the residual.
        w = self.base_weight()
        w32 = w.to(torch.float32)
        u, s_vals, vh = torch.linalg.svd(w32, full_matrices=False)
        root = torch.sqrt(s_vals[:r] / scale)
        a = root[:, None] * vh[:r]
        b = u[:, :r] * root[None, :]
        lora_a.copy_(a)
        lora_b.copy_(b)
        w.copy_(w32 - scale * (b @ a))

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter (it must not be merged)."""
        if adapter_name not in self.lora_A:
            raise KeyError(f"adapter_name: {adapter_name!r} is not on this layer")
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged; unmerge it before deleting")
        del self.lora_A[adapter_name]
        del self.lora_B[adapter_name]
        for table in (self.r, self.alpha, self.scaling, self.dropout, self.use_rslora):
            del table[adapter_name]
        dora.drop(self, adapter_name)
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]

    def set_adapter(self, adapter_names: str | Iterable[str]) -> None:
        """Make these adapters (those present on this layer) the active ones; only active
        adapters' tensors require grad."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self.active_adapters = [n for n in names if n in self.lora_A]
        for name in self.lora_A:
            trainable = name in self.active_adapters
            self.lora_A[name].requires_grad_(trainable)
            self.lora_B[name].requires_grad_(trainable)
            if name in self.lora_magnitude_vector:
                self.lora_magnitude_vector[name].requires_grad_(trainable)

    # -- math ----------------------------------------------------------------------------
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """scale * B A for one adapter, in float32, as an [out, in] tensor."""
        a = self.lora_A[adapter_name].detach().to(torch.float32)
        b = self.lora_B[adapter_name].detach().to(torch.float32)
        return self.scaling[adapter_name] * (b @ a)

    def pending_adapters(self) -> list[str]:
        """The active adapters not merged into the base weight (what forward adds)."""
        return [
            n for n in self.active_adapters if n in self.lora_A and n not in self.merged_adapters
        ]

    def stack_adapters(
        self, names: list[str], dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The one stacking of several adapters: (A [sum r, in], B [out, sum r]) with each
        B_i pre-scaled, so that ``B @ A = sum_i scale_i B_i A_i``. Used by forward (several
        active adapters: one op call), the safe-merge check and the hot-swap export.

        Args:
            names: adapters on this layer, in order.
            dtype: cast A and B_i to it before scaling (float32 for checks and exports);
                None keeps the parameters' dtype and their autograd graph.
        """
        cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))
        a = torch.cat([cast(self.lora_A[n]) for n in names], dim=0)
        b = torch.cat([cast(self.lora_B[n]) * self.scaling[n] for n in names], dim=1)
        return a, b

    def merge_problem(self, adapter_names: Iterable[str]) -> str | None:
        """Why merging these adapters would not be safe, or None: a non-finite delta, or a
        finite weight entry that would overflow to inf/nan in the weight's dtype. The check
        is the compiled op's (``ops.merge_is_safe``, tiled in float32: no weight-sized
        temporary), over all the adapters stacked, so a refusal leaves the weight untouched."""
        names = list(adapter_names)
        if not names:
            return None
        with torch.no_grad():
            if len(names) == 1 and dora.is_dora(self, names[0]):
                return dora.merge_problem(self, names[0])
            a, b = self.stack_adapters(names, dtype=torch.float32)
            if ops.merge_is_safe(self.base_weight().detach(), a, b, 1.0):
                return None
        return (
            f"merging {names} gives a non-finite delta or would overflow the "
            f"{self.base_weight().dtype} weight"
        )

    def _op_adapters(self, names: list[str]) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        """(A, B, scale, dropout_p) for one op call over the pending adapters."""
        if len(names) == 1:
            name = names[0]
            return self.lora_A[name], self.lora_B[name], self.scaling[name], self.dropout[name]
        rates = {self.dropout[n] for n in names}
        if self.training and len(rates) > 1 and max(rates) > 0:
            raise ValueError(
                f"active adapters {names} have different dropout rates {sorted(rates)}; "
                "in train mode they share one dropout mask, so they need the same rate"
            )
        a, b = self.stack_adapters(names)
        return a, b, 1.0, max(rates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]. Merged adapters are already in the base weight; the
        others go through the fused op (dropout in train mode only)."""
        pending = self.pending_adapters()
        if not pending:
            return self.base_layer(x)
        # DoRA: the op's output without bias is scaled per row by m / ||W + sBA|| (dora.py)
        factor = dora.forward_factor(self, pending)
        lora_a, lora_b, scale, dropout_p = self._op_adapters(pending)
        if self.quantized:  # base output from bitsandbytes, the LoRA branch from lora_delta
            p = dropout_p if self.training else 0.0
            return quantized.lora_forward(self.base_layer, x, lora_a, lora_b, scale, p)
        weight = self.base_weight()
        # the op computes in one dtype: under torch.autocast the op's autocast kernel casts
        # every input to the autocast dtype (LoRA parameters stay float32 masters); otherwise
        # the base weight's (casts are differentiable)
        if not torch.is_autocast_enabled(x.device.type):
            if x.dtype != weight.dtype:
                x = x.to(weight.dtype)
            if lora_a.dtype != weight.dtype:
                lora_a, lora_b = lora_a.to(weight.dtype), lora_b.to(weight.dtype)
        bias = self.base_layer.bias
        # The op gives no gradient to bias (frozen by contract); a bias trained with
        # bias="all"/"lora_only" is added outside the op so that it gets one.
        bias_in_op = bias if factor is None and (bias is None or not bias.requires_grad) else None
        y = ops.lora_linear(
            x,
            weight,
            bias_in_op,
            lora_a,
            lora_b,
            scale,
            dropout_p=dropout_p if self.training else 0.0,
        )
        if factor is not None:
            y = y * factor.to(y.dtype)
        if bias is not None and bias_in_op is None:
            y = y + bias
        return y

    # -- merge -------------------------------------------------------------------------
    def merge(
        self,
        adapter_names: Iterable[str] | None = None,
        safe: bool = False,
        requantize: bool = False,
    ) -> list[str]:
        """Add scale * B A of each named adapter (default: the active ones) into the base
        weight in place via ``ops.merge_``. Already merged adapters are skipped.

        safe=True checks (once, over all of them) that the deltas are finite and that no
        finite weight would overflow before touching the weight, and raises ValueError
        (weight bit-identical) otherwise.

        A bitsandbytes (4/8-bit) base is merged in place only with requantize=True: the
        float32 merge is quantized again (an error the layer records in
        ``requantize_error``); without it ValueError, the layer unchanged. Dequantizing
        instead (no second rounding) is ``lora_ext.merge_and_unload``.

        Returns: the names that were already merged (skipped).
        """
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        for name in names:
            if name not in self.lora_A:
                raise KeyError(f"adapter_names: {name!r} is not on this layer")
        skipped = [n for n in names if n in self.merged_adapters]
        todo = [n for n in names if n not in self.merged_adapters]
        if self.quantized:
            self._merge_requantized(todo, requantize)
            return skipped
        both = [*self.merged_adapters, *todo]
        dora.check_alone(both, [n for n in both if dora.is_dora(self, n)], "merge")
        if safe:
            # all adapters are checked before any is merged, so a failure leaves W untouched
            problem = self.merge_problem(todo)
            if problem:
                raise ValueError(f"safe merge: {problem}; nothing was merged")
        with torch.no_grad():
            weight = self.base_weight()
            for name in todo:
                if dora.is_dora(self, name):
                    dora.merge(self, name)
                    self.merged_adapters.append(name)
                    continue
                # detached: a merge is never part of a graph
                ops.merge_(
                    weight,
                    self.lora_A[name].detach(),
                    self.lora_B[name].detach(),
                    self.scaling[name],
                )
                self.merged_adapters.append(name)
        return skipped

    def _merge_requantized(self, todo: list[str], requantize: bool, name: str = "") -> None:
        kind = quantized.kind_of(self.base_layer)
        if not todo:
            return
        if not requantize:
            raise ValueError(
                f"merge: layer {name or self.extra_repr()!r} has a bitsandbytes {kind} base; "
                "merging into it rounds twice (float merge, then quantization). Use "
                "lora_ext.merge_and_unload(model, dtype=...) to dequantize and merge with one "
                "rounding, or pass requantize=True to merge back into the quantized base"
            )
        self.install_requantized(todo, *quantized.requantize_merged(self, name, todo))

    def install_requantized(self, names: list[str], param: nn.Parameter, error: float) -> None:
        """Put a re-quantized merged weight (``quantized.requantize_merged``) in place."""
        self.base_layer.weight = param
        self.merged_adapters.extend(names)
        self.requantize_error = max(self.requantize_error, error)

    def unmerge(self) -> list[str]:
        """Subtract the merged adapters from the base weight (in reverse merge order).

        A bitsandbytes base merged with requantize=True cannot be unmerged (its float
        weight is gone; subtracting would round a third time): ValueError.

        Returns: the names unmerged.
        """
        if self.quantized and self.merged_adapters:
            raise ValueError(
                f"unmerge: adapters {self.merged_adapters} were merged into a re-quantized "
                f"bitsandbytes {quantized.kind_of(self.base_layer)} base "
                "(merge_(requantize=True)); that cannot be undone exactly: reload the base "
                "model and the adapter"
            )
        done = []
        with torch.no_grad():
            weight = self.base_weight()
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                if dora.is_dora(self, name):
                    dora.unmerge(self, name)
                    done.append(name)
                    continue
                ops.merge_(
                    weight,
                    self.lora_A[name].detach(),
                    self.lora_B[name].detach(),
                    -self.scaling[name],
                )
                done.append(name)
        return done

    def extra_repr(self) -> str:
        adapters = ", ".join(
            f"{n}(r={self.r[n]}, alpha={self.alpha[n]:g}, scale={self.scaling[n]:.4g}, "
            f"dropout={self.dropout[n]:g}{', dora' if dora.is_dora(self, n) else ''})"
            for n in self.lora_A
        )
        kind = "Conv1D" if self.fan_in_fan_out else "Linear"
        return (
            f"{kind} {self.in_features} -> {self.out_features}, adapters=[{adapters}], "
            f"active={self.active_adapters}, merged={self.merged_adapters}"
        )
