"""export_onnx: a (LoRA-adapted) transformers model to an ONNX file that onnxruntime runs.

The export is a pipeline of named stages over one context object (``_Export``), run in the
order of ``_STAGES`` inside a staging directory next to the target; nothing is written at the
target until every stage has passed (then ``_io.commit`` moves the files with os.replace):

- ``_check_arguments``: every argument and the output directory (exists, writable), before
  any work;
- ``_copy_model``: a float32 eval-mode deep copy (the caller's model is never changed) and
  the verification inputs (the example, random inputs of other batch and sequence sizes);
- ``_reference_outputs``: PyTorch's outputs on them;
- ``_merge_or_hot_swap``: the LoRA adapters merged into the copy, or (``merge=False``) every
  adapted layer's A and B turned into graph inputs (adapter hot-swap, see adapters.py);
- ``_prepare_for_tracing``: exact rewrites: eager attention (a leaner graph than SDPA's),
  BERT-family key bias dropped and value bias folded, a classifier that reads token 0 only
  gets its last layer for that token alone (rewrite.py; checked);
- ``_check_ops``: one forward pass records the ops per module; an op without an ONNX form
  (e.g. a custom CUDA kernel) is named with its module;
- ``_trace_to_onnx``: torch.onnx.export (the TorchScript exporter: dynamic batch/sequence
  axes, plain MatMul/Gemm/LayerNormalization..., no onnxscript dependency); Reshape targets
  computed from Shape ops become constants (graph_passes.py);
- ``_fuse``: optional operator fusion (``optimize="bert"``, com.microsoft contrib ops);
- ``_convert_precision``: optional fp16 conversion or int8 quantization (quantize.py);
- ``_add_metadata``: hot-swap defaults and the facts the runner reads;
- ``_save_staged``, ``_verify_in_onnxruntime``, ``_write_ort_format``: saved in the staging
  directory (external data above ~1.8 GB), verified in onnxruntime against the references,
  optionally converted to the ORT format.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from lora_ext.config import Task
from lora_ext.layer import LoraLinear

from . import adapters as _adapters
from . import graph_passes as _graph_passes
from . import rewrite as _rewrite
from ._io import (
    EXTERNAL_DATA_THRESHOLD,
    check_output_path,
    commit,
    file_size,
    initializer_bytes,
    output_parents,
    save_model,
    staging_dir,
)
from .quantize import Int8Summary, quantize_int8, save_ort_format, to_fp16
from .session import ort_session

logger = logging.getLogger("lora_ext.export")

DTYPES = ("fp32", "fp16")
QUANTIZE = (None, "int8")
# None: plain ONNX (standard ops only, any runtime). "bert": fused com.microsoft contrib ops
# (Attention, SkipLayerNormalization, BiasGelu, EmbedLayerNormalization) that only
# onnxruntime (CPU, GPU and mobile builds) runs.
OPTIMIZE = (None, "bert")
# 17: LayerNormalization is one op; run by onnxruntime >= 1.11 and most edge runtimes.
DEFAULT_OPSET = 17
# accepted opsets; the TorchScript exporter writes up to 20, 21 is reached with onnx's
# version converter (no op the exports use changed meaning in 21)
OPSETS = range(17, 22)
_TORCH_MAX_OPSET = 20
# max |onnx - torch| / max |torch| accepted by verify, per variant. fp32 is the contract;
# fp16 carries ~1e-3 relative rounding per layer; int8 is judged by task agreement
# (argmax), so only finiteness is enforced by default.
DEFAULT_TOLERANCE: dict[str, float | None] = {"fp32": 1e-4, "fp16": 2e-2, "int8": None}
# The quality gate of quantized files (fp16, int8): the fraction of verification rows whose
# argmax equals PyTorch's (a classifier: one row per sequence; a causal LM: one per
# position, i.e. next-token agreement), over every verification input together, counting
# only rows PyTorch decides (its top probability at least NEAR_TIE above the runner-up: no
# precision settles a near-tie). Below it nothing is written unless
# ``accept_low_agreement=True`` (CLI --accept-low-agreement). Quantized exports verify on
# one more random batch (QUALITY_ROWS sequences) so that the fraction is not of a handful.
# 0.8, not 0.9: the rows are mostly random token ids, where a good int8 file agrees less than
# on text (bench_export: the fused int8 of the trained MiniLM classifier, 99.3% on 1,000 real
# snippets, agreed on 26 of 29 decided random rows, 89.7%); the gate stops broken files (the
# causal-LM int8 of issue 13 at 61%), it is no accuracy measurement.
DEFAULT_MIN_AGREEMENT = 0.8
NEAR_TIE = 0.1
QUALITY_ROWS = 32
# namespaces of ops the ONNX exporter knows; anything else (a custom C++/CUDA op) has no
# ONNX form
_ONNX_NAMESPACES = {"aten", "prim", "prims", "profiler"}


class VerificationError(RuntimeError):
    """The exported file does not match PyTorch within the tolerance (nothing was written)."""


class UnsupportedModuleError(TypeError):
    """A module of the model cannot be expressed in ONNX; the message names it."""


@dataclass
class VerifyCheck:
    """One comparison of onnxruntime against PyTorch.

    ``max_rel`` is max |onnx - torch| / max |torch| over the whole output (an elementwise
    ratio is meaningless where logits cross zero); ``argmax_agree`` is the fraction of rows
    (last axis) whose argmax matches.
    """

    inputs: str  # "example", "random", "base (no adapter)", "ort format"
    batch: int
    seq: int
    max_abs: float
    max_rel: float
    argmax_agree: float
    rows: int = 0  # rows of the output (batch, or batch x seq for [b, s, v])
    decided_rows: int = 0  # of which PyTorch decides (top-2 probability margin >= NEAR_TIE)
    decided_agree: float = 1.0  # argmax agreement over the decided rows


@dataclass
class ExportReport:
    """What export_onnx wrote and measured. ``dtype`` is the weights of the file written
    ("fp32", "fp16" or "int8"); ``agreement`` the argmax agreement with PyTorch over the
    verification rows PyTorch decides (near-ties excluded; None if there were none), the
    quality gate of fp16/int8 files (``min_agreement``)."""

    path: Path
    files: list[Path]
    size_bytes: int
    dtype: str
    quantize: str | None
    opset: int
    input_names: list[str]
    output_names: list[str]
    lora_inputs: list[str] = field(default_factory=list)
    optimize: str | None = None
    first_token_only: bool = False
    fused_ops: dict[str, int] = field(default_factory=dict)
    int8: dict[str, Any] = field(default_factory=dict)
    merged_layers: int = 0
    external_data: bool = False
    adapter_path: Path | None = None
    ort_path: Path | None = None
    tolerance: float | None = None
    checks: list[VerifyCheck] = field(default_factory=list)
    ort_latency_ms: float | None = None
    export_seconds: float = 0.0
    agreement: float | None = None
    min_agreement: float | None = None
    accepted_low_agreement: bool = False

    @property
    def max_rel(self) -> float | None:
        return max((c.max_rel for c in self.checks), default=None)

    @property
    def max_abs(self) -> float | None:
        return max((c.max_abs for c in self.checks), default=None)

    def __repr__(self) -> str:
        return f"<ExportReport {self.summary()}>"

    def summary(self) -> str:
        """One line: what was written, where, how big, how it verified."""
        verified = (
            f"max rel {self.max_rel:.1e}"
            + (f", argmax agreement {self.agreement:.1%}" if self.agreement is not None else "")
            if self.checks
            else "not verified"
        )
        return (
            f"{self.dtype} ONNX (opset {self.opset}) at {self.path}, "
            f"{self.size_bytes / 1e6:.1f} MB, {verified}"
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("path", "adapter_path", "ort_path"):
            out[key] = None if out[key] is None else str(out[key])
        out["files"] = [str(p) for p in self.files]
        out["max_rel"] = self.max_rel
        out["max_abs"] = self.max_abs
        return out

    def table(self) -> str:
        """A readable summary: the files, then one line per verification."""
        lines = [
            f"ONNX {self.dtype} (opset {self.opset}) -> {self.path}",
            f"  size {self.size_bytes / 1e6:.1f} MB"
            + (" (external data)" if self.external_data else "")
            + f", export {self.export_seconds:.1f} s"
            + (
                f", onnxruntime latency {self.ort_latency_ms:.2f} ms (example inputs)"
                if self.ort_latency_ms is not None
                else ""
            ),
            f"  inputs {', '.join(self.input_names)} -> {', '.join(self.output_names)}",
        ]
        if self.lora_inputs:
            lines.append(
                f"  hot-swap: {len(self.lora_inputs) // 2} LoRA layers as graph inputs"
                + (f"; adapter file {self.adapter_path}" if self.adapter_path else "")
            )
        elif self.merged_layers:
            lines.append(f"  merged LoRA layers: {self.merged_layers}")
        if self.first_token_only:
            lines.append("  last layer computes token 0 only (the classifier reads nothing else)")
        if self.optimize:
            fused = ", ".join(f"{n} {k}" for n, k in self.fused_ops.items() if k) or "nothing"
            lines.append(f"  optimize={self.optimize!r} (onnxruntime contrib ops): fused {fused}")
        if self.int8:
            lines.append("  " + Int8Summary(**self.int8).line())
        if self.ort_path:
            lines.append(f"  ORT format: {self.ort_path}")
        if self.checks:
            tol = "none" if self.tolerance is None else f"{self.tolerance:.0e}"
            lines.append(f"  verify vs PyTorch (tolerance on max rel: {tol})")
            lines.append(
                f"    {'inputs':<18} {'batch':>5} {'seq':>5} {'max abs':>10} {'max rel':>10}"
                f" {'argmax':>7}"
            )
            for c in self.checks:
                lines.append(
                    f"    {c.inputs:<18} {c.batch:>5} {c.seq:>5} {c.max_abs:>10.2e} "
                    f"{c.max_rel:>10.2e} {c.argmax_agree:>6.1%}"
                )
        if self.min_agreement is not None and self.agreement is not None:
            lines.append(
                f"  quality gate: argmax agreement {self.agreement:.1%} (minimum "
                f"{self.min_agreement:.0%})"
                + (" BELOW, written by override" if self.accepted_low_agreement else "")
            )
        return "\n".join(lines)


# -- inputs -------------------------------------------------------------------------------
def _check_inputs(example_inputs: Any) -> dict[str, torch.Tensor]:
    if not isinstance(example_inputs, Mapping) or not example_inputs:
        raise TypeError(
            f"example_inputs: got {type(example_inputs).__name__}, need a non-empty mapping "
            "{name: tensor [batch, seq]} such as a tokenizer's output (return_tensors='pt')"
        )
    out: dict[str, torch.Tensor] = {}
    shape = None
    for name, value in example_inputs.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"example_inputs[{name!r}]: got {type(value).__name__}, need a tensor")
        if value.dim() != 2:
            raise ValueError(
                f"example_inputs[{name!r}]: got shape {list(value.shape)}, need [batch, seq]"
            )
        if value.numel() == 0:
            raise ValueError(
                f"example_inputs[{name!r}]: got shape {list(value.shape)}, need at least one "
                "sequence of at least one token"
            )
        if shape is not None and tuple(value.shape) != shape:
            raise ValueError(
                f"example_inputs[{name!r}]: got shape {list(value.shape)}, but the other "
                f"inputs are {list(shape)}"
            )
        shape = tuple(value.shape)
        out[str(name)] = value.detach().cpu()
    return out


def _check_calibration(
    calibration: Iterable[Mapping[str, torch.Tensor]] | None,
    example: dict[str, torch.Tensor],
    quantize: str | None,
) -> list[dict[str, np.ndarray]]:
    """The calibration inputs as onnxruntime feeds (the example's names and dtypes)."""
    names = list(example)
    if calibration is None:
        return []
    if quantize != "int8":
        raise ValueError(
            f"calibration: only used by quantize='int8' (got quantize={quantize!r}); leave it None"
        )
    if isinstance(calibration, Mapping):
        raise TypeError(
            "calibration: got one mapping; need an iterable of them (one per run), e.g. "
            "[tokenizer(text, return_tensors='pt') for text in texts]"
        )
    feeds: list[dict[str, np.ndarray]] = []
    for i, item in enumerate(calibration):
        if not isinstance(item, Mapping):
            raise TypeError(
                f"calibration[{i}]: got {type(item).__name__}, need a mapping "
                "{name: tensor [batch, seq]}"
            )
        missing = [n for n in names if n not in item]
        if missing:
            raise ValueError(
                f"calibration[{i}]: missing input(s) {missing}; need the example's names {names}"
            )
        feed = {}
        for name in names:
            value = item[name]
            value = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
            value = np.asarray(value)
            if value.ndim != 2:
                raise ValueError(
                    f"calibration[{i}][{name!r}]: got shape {list(value.shape)}, need [batch, seq]"
                )
            feed[name] = value.astype(example[name].numpy().dtype, copy=False)
        feeds.append(feed)
    if not feeds:
        raise ValueError("calibration: got no inputs; pass None to skip smoothing")
    return feeds


def _vocab_size(model: nn.Module, fallback: int) -> int:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    return int(getattr(emb, "num_embeddings", fallback))


def _random_inputs(
    example: dict[str, torch.Tensor], model: nn.Module, batch: int, seq: int, gen: torch.Generator
) -> dict[str, torch.Tensor]:
    """Fresh inputs of shape [batch, seq] shaped like the example: random token ids over the
    vocabulary, right-padded attention masks of random lengths (row 0 full), random token
    types, positions 0..seq-1."""
    config = getattr(model, "config", None)
    out = {}
    for name, ex in example.items():
        if name == "attention_mask" or name.endswith("_mask"):
            lengths = torch.randint(1, seq + 1, (batch,), generator=gen)
            lengths[0] = seq
            value = (torch.arange(seq)[None, :] < lengths[:, None]).to(ex.dtype)
        elif name == "position_ids":
            value = torch.arange(seq, dtype=ex.dtype).expand(batch, seq).contiguous()
        elif name == "token_type_ids":
            types = int(getattr(config, "type_vocab_size", 1) or 1)
            value = torch.randint(0, types, (batch, seq), generator=gen, dtype=ex.dtype)
        elif ex.is_floating_point():
            value = torch.rand(batch, seq, generator=gen, dtype=ex.dtype)
        else:
            high = (
                _vocab_size(model, int(ex.max()) + 1) if name == "input_ids" else int(ex.max()) + 1
            )
            value = torch.randint(0, max(high, 1), (batch, seq), generator=gen, dtype=ex.dtype)
        out[name] = value
    return out


def _default_shapes(batch: int, seq: int) -> list[tuple[int, int]]:
    return [(batch + 1, seq + 5), (1, seq + 13)]


# -- the export module -------------------------------------------------------------------
def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(
        f"model: its forward returned {type(out).__name__}; need a tensor, a tuple starting "
        "with one, or an output with .logits"
    )


class _ExportWrapper(nn.Module):
    """Positional forward (input tensors, then A'/B' pairs) -> logits, as tracing needs.

    ``plain_inputs`` (the traced wrapper of a plain export): a bidirectional encoder gets its
    padding mask as the additive [batch, 1, 1, seq] mask, ``(1 - mask) * finfo.min``, that
    its attention adds (transformers returns a 4-D mask as given) instead of transformers'
    mask construction, whose index arithmetic (a Flatten of [batch, seq] and a Gather of
    batch x seq x seq indices) other runtimes cannot shape (tract); and a model that takes
    ``token_type_ids`` the example lacks gets zeros shaped like ``input_ids`` (what it uses
    by default; a BERT-family encoder only) instead of a slice of its constant buffer. Same
    outputs, fewer nodes.
    """

    def __init__(
        self,
        model: nn.Module,
        names: list[str],
        lora: list[_adapters.LoraInputLinear],
        plain_inputs: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.names = names
        self.lora = lora
        params = _forward_params(model)
        # no KV cache in the graph: the export is a single full-sequence pass
        self.extra: dict[str, Any] = {"use_cache": False} if "use_cache" in params else {}
        # only a BERT-family encoder reads absent token types as zeros; GPT-2 takes
        # token_type_ids too, but adds wte(token_type_ids) only when they are given
        self.zero_token_types = (
            plain_inputs
            and "token_type_ids" in params
            and "token_type_ids" not in names
            and "input_ids" in names
            and _bidirectional(model)
        )
        self.additive_mask = plain_inputs and "attention_mask" in names and _bidirectional(model)

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        n = len(self.names)
        for i, layer in enumerate(self.lora):
            layer.lora_a, layer.lora_b = args[n + 2 * i], args[n + 2 * i + 1]
        feeds = dict(zip(self.names, args[:n]))
        if self.zero_token_types:
            feeds["token_type_ids"] = torch.zeros_like(feeds["input_ids"])
        if self.additive_mask:
            mask = feeds["attention_mask"][:, None, None, :].to(torch.float32)
            feeds["attention_mask"] = (1.0 - mask) * torch.finfo(torch.float32).min
        try:
            return _logits(self.model(**feeds, **self.extra))
        finally:
            for layer in self.lora:
                layer.lora_a = layer.lora_b = None


def _bidirectional(model: nn.Module) -> bool:
    """Every attention of ``model`` is non-causal (BERT-family encoders), as transformers
    marks it with ``is_causal``; False when nothing says so."""
    if getattr(getattr(model, "config", None), "is_decoder", False):
        return False
    flags = [
        m.is_causal for m in model.modules() if isinstance(getattr(m, "is_causal", None), bool)
    ]
    return bool(flags) and not any(flags)


def _forward_params(model: nn.Module) -> set[str]:
    import inspect

    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


# -- module and op checks -----------------------------------------------------------------
def _check_modules(model: nn.Module) -> None:
    """Modules we know cannot be exported as they are."""
    for name, module in model.named_modules():
        cls = type(module)
        if cls.__module__.startswith("peft."):
            raise UnsupportedModuleError(
                f"module {name!r} is a PEFT layer ({cls.__name__}); merge it with PEFT's "
                "merge_and_unload() first, or load the adapter with lora_ext.load_adapter"
            )
        if isinstance(module, LoraLinear):
            raise UnsupportedModuleError(
                f"module {name!r} is still a LoraLinear after merging; this is a bug"
            )


class _OpRecorder:
    """Records, for one forward pass, every dispatched op with the innermost module running
    it, so an op the exporter cannot translate is reported with its module."""

    def __init__(self, model: nn.Module) -> None:
        self.names = {id(m): n or type(m).__name__ for n, m in model.named_modules()}
        self.stack: list[tuple[str, str]] = []  # (module name, class) of running modules
        self.first_user: dict[str, tuple[str, str]] = {}  # op -> (module name, class)
        self.classes = {id(m): type(m).__name__ for m in model.modules()}

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        from torch.utils._python_dispatch import TorchDispatchMode

        recorder = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
                # OpOverload: namespace + name; anything else (a higher-order op) by str()
                namespace = getattr(func, "namespace", None)
                name = getattr(func, "_opname", None)
                op = f"{namespace}::{name}" if namespace and name else str(func)
                if op not in recorder.first_user:
                    top = recorder.stack[-1] if recorder.stack else ("<model>", "")
                    recorder.first_user[op] = top
                return func(*args, **(kwargs or {}))

        def pre(module: nn.Module, _args: Any) -> None:
            key = id(module)
            if key in self.names:
                self.stack.append((self.names[key], self.classes[key]))

        def post(module: nn.Module, _args: Any, _out: Any) -> None:
            if id(module) in self.names and self.stack:
                self.stack.pop()

        h1 = nn.modules.module.register_module_forward_pre_hook(pre)
        h2 = nn.modules.module.register_module_forward_hook(post, always_call=True)
        try:
            with Mode():
                return fn(*args)
        finally:
            h1.remove()
            h2.remove()

    def unsupported(self) -> list[tuple[str, str, str]]:
        return [
            (op, mod, cls)
            for op, (mod, cls) in self.first_user.items()
            if "::" in op and op.split("::")[0] not in _ONNX_NAMESPACES
        ]

    def module_of(self, message: str) -> str | None:
        """The module that first ran an op named in an exporter error message."""
        for op in re.findall(r"\b([A-Za-z_]\w*::\w+)", message):
            if op in self.first_user:
                mod, cls = self.first_user[op]
                return f"op {op} is used by module {mod!r} ({cls})"
        return None


# -- verification -------------------------------------------------------------------------
def _compare(name: str, shape: tuple[int, int], out: np.ndarray, ref: np.ndarray) -> VerifyCheck:
    if out.shape != ref.shape:
        raise VerificationError(
            f"verify ({name} inputs): onnxruntime output shape {list(out.shape)} != PyTorch "
            f"{list(ref.shape)}"
        )
    if not np.isfinite(out).all():
        raise VerificationError(f"verify ({name} inputs): onnxruntime output has NaN/inf")
    out64, ref64 = out.astype(np.float64), ref.astype(np.float64)
    max_abs = float(np.abs(out64 - ref64).max()) if out.size else 0.0
    scale = float(np.abs(ref64).max()) if ref.size else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    same = out.argmax(-1) == ref.argmax(-1)
    agree = float(same.mean()) if out.size else 1.0
    rows = int(np.prod(out.shape[:-1])) if out.ndim else 0
    decided = _decided(ref64) if out.size else np.zeros(0, dtype=bool)
    n_decided = int(decided.sum())
    decided_agree = float(same[decided].mean()) if n_decided else 1.0
    return VerifyCheck(
        name, int(shape[0]), int(shape[1]), max_abs, max_rel, agree, rows, n_decided, decided_agree
    )


def _decided(logits: np.ndarray) -> np.ndarray:
    """Rows (all axes but the last) whose top softmax probability exceeds the runner-up's
    by at least NEAR_TIE."""
    if logits.shape[-1] < 2:
        return np.ones(logits.shape[:-1], dtype=bool)
    z = logits - logits.max(-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(-1, keepdims=True)
    top2 = np.sort(p, axis=-1)[..., -2:]
    return (top2[..., 1] - top2[..., 0]) >= NEAR_TIE


def _latency_ms(session: Any, feeds: dict[str, np.ndarray], runs: int = 10) -> float:
    for _ in range(2):
        session.run(None, feeds)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


# -- the export: a pipeline of stages over one context ------------------------------------
@dataclass
class _Export:
    """Everything one export carries from stage to stage: the arguments (checked), then what
    each stage produces. Stages read and fill it in the order of ``_STAGES``."""

    # arguments, checked by _check_arguments
    model: nn.Module
    example: dict[str, torch.Tensor]
    target: Path
    dtype: str
    quantize: str | None
    verify: bool
    merge: bool
    optimize: str | None
    opset: int
    output_name: str
    tol: float | None
    shapes: list[tuple[int, int]]
    external_data: bool | None
    ort_format: bool
    calib: list[dict[str, np.ndarray]]
    task: str | None
    first_token_only: bool | None
    seed: int
    say: Callable[[str], None]
    t_start: float
    min_agreement: float | None = None
    accept_low_agreement: bool = False
    make_parents: bool = False
    # the staging directory next to the target
    tmp: Path = Path()
    # _copy_model, _reference_outputs
    work: nn.Module | None = None
    layers: list[tuple[str, LoraLinear]] = field(default_factory=list)
    cases: list[tuple[str, dict[str, torch.Tensor]]] = field(default_factory=list)
    refs: list[np.ndarray] = field(default_factory=list)
    # _merge_or_hot_swap: the hot-swap LoRA inputs (stand-in modules, names, values, axes)
    lora_modules: list[_adapters.LoraInputLinear] = field(default_factory=list)
    lora_names: list[str] = field(default_factory=list)
    lora_values: list[torch.Tensor] = field(default_factory=list)
    lora_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    # _prepare_for_tracing
    wrapper: _ExportWrapper | None = None
    pruned: bool = False
    # _check_ops
    recorder: _OpRecorder | None = None
    out_axes: dict[int, str] = field(default_factory=dict)
    base_ref: np.ndarray | None = None
    # _trace_to_onnx and the graph stages
    raw: Path = Path()
    graph: onnx.ModelProto | None = None
    heads: int = 0
    hidden: int = 0
    fused_ops: dict[str, int] = field(default_factory=dict)
    int8_summary: Int8Summary | None = None
    # _save_staged and after
    staged_model: Path = Path()
    staged: list[Path] = field(default_factory=list)
    report: ExportReport | None = None
    feeds_all: list[dict[str, np.ndarray]] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return list(self.example)

    @property
    def variant(self) -> str:
        return self.quantize or self.dtype

    @property
    def batch_seq(self) -> tuple[int, int]:
        batch, seq = next(iter(self.example.values())).shape
        return int(batch), int(seq)


def export_onnx(
    model: nn.Module,
    example_inputs: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    dtype: str = "fp32",
    quantize: str | None = None,
    verify: bool = True,
    merge: bool = True,
    *,
    optimize: str | None = None,
    opset: int = DEFAULT_OPSET,
    output_name: str = "logits",
    tolerance: float | None = None,
    verify_shapes: Sequence[tuple[int, int]] | None = None,
    external_data: bool | None = None,
    ort_format: bool = False,
    calibration: Iterable[Mapping[str, torch.Tensor]] | None = None,
    task: str | None = None,
    first_token_only: bool | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    min_agreement: float | None = None,
    accept_low_agreement: bool = False,
    make_parents: bool = False,
) -> ExportReport:
    """Export ``model`` to ONNX at ``path`` and check it in onnxruntime.

    Args:
        model: a transformers-style model (plain, or with lora_ext LoRA layers); never
            modified (a deep copy is merged and exported).
        example_inputs: {name: tensor [batch, seq]} (e.g. a tokenizer's output); the names
            become the graph inputs, in this order, with dynamic axes "batch" and "sequence".
        path: output file (``.onnx``); its directory must exist and be writable (or, with
            ``make_parents``, is created: atomically, nothing is left if the export fails).
        dtype: "fp32" or "fp16" (weights and activations in half; inputs/outputs unchanged).
        quantize: None or "int8" (onnxruntime dynamic quantization, int8 weights per
            channel, embeddings per column, activations smoothed on ``calibration``);
            combine with dtype="fp32".
        verify: run the file in onnxruntime on the example inputs and on fresh random inputs
            of other batch/sequence sizes and compare with PyTorch; a failure raises
            VerificationError and writes nothing.
        merge: True: fold the LoRA adapters into the weights (plain MatMul/Gemm graph).
            False: adapter hot-swap, every adapted layer's A and B become graph inputs and
            the model's active adapter is written to ``<stem>.onnx_adapter`` next to it.
        optimize: None (default): a plain ONNX graph of standard ops that any ONNX runtime
            loads. "bert": fuse the graph with onnxruntime's transformer optimizer (BERT-family
            encoders): Attention, SkipLayerNormalization, BiasGelu and
            EmbedLayerNormalization, com.microsoft contrib ops that onnxruntime (CPU, CUDA,
            mobile builds) runs but other runtimes do not. The copy is exported with the
            eager attention implementation (same outputs as SDPA; verify compares with the
            model as given), because the fusion patterns do not match the SDPA graph.
            Needs merge=True and dtype="fp32" (int8 may follow).
        opset: ONNX opset, 17 to 21.
        output_name: name of the graph output (the model's logits).
        tolerance: max accepted relative error (max |onnx - torch| / max |torch|); default
            1e-4 for fp32, 2e-2 for fp16, none for int8 (judged by argmax agreement).
        verify_shapes: (batch, seq) of the random verification inputs; default two sizes
            that differ from the example's.
        external_data: store weights in ``<name>.data``; None: only when over ~2 GB.
        ort_format: also write ``<stem>.ort`` (the ORT format of onnxruntime mobile builds).
        calibration: int8 only: representative inputs, {name: tensor [batch, seq]} each
            with the example's names (e.g. a few hundred training sentences, tokenized one
            at a time). The activations they produce choose the per-channel smoothing that
            keeps int8 close to fp32 (see lora_ext/export/quantize.py); None: plain dynamic
            quantization, no smoothing (measurably less accurate on real models).
        task: recorded in the file's metadata for the runner ("seq-cls", "causal-lm");
            default from the model class.
        first_token_only: the last encoder layer of a classifier that reads token 0 only
            (BERT-family ForSequenceClassification) computes that token alone: ~1/L less
            work for an L-layer encoder, same logits (lora_ext/export/rewrite.py; checked in PyTorch
            before the export, then verified in onnxruntime as always). None (default):
            when the model qualifies; True: required (ValueError if it does not qualify);
            False: never (every position of every layer, as the model runs in PyTorch).
        seed: seed of the random verification inputs.
        log: progress callback (default: the "lora_ext.export" logger at INFO).
        min_agreement: the quality gate of quantized files (fp16, int8): the fraction of
            verification rows whose argmax matches PyTorch's (next-token agreement for a
            causal LM), over the rows PyTorch decides (top-2 probability margin >=
            NEAR_TIE, 0.1); default DEFAULT_MIN_AGREEMENT (0.8). Quantized exports verify
            on one more random batch of QUALITY_ROWS (32) sequences. Below it
            VerificationError, nothing written.
        accept_low_agreement: write a quantized file below ``min_agreement`` anyway, with a
            warning and ``report.accepted_low_agreement`` set.
        make_parents: create the missing directories of ``path`` (atomically: they appear
            with the file, or not at all).

    Returns: ExportReport (files, size, verification figures, onnxruntime latency).

    Raises:
        ValueError / TypeError: bad arguments (named). FileNotFoundError / PermissionError:
        the output directory is missing or not writable (before any work).
        UnsupportedModuleError: a module has no ONNX form (named). VerificationError: the
        file does not match PyTorch (by how much), or a quantized file is below the quality
        gate; no file is left at ``path``.
    """
    ctx = _check_arguments(
        model,
        example_inputs,
        path,
        dtype=dtype,
        quantize=quantize,
        verify=verify,
        merge=merge,
        optimize=optimize,
        opset=opset,
        output_name=output_name,
        tolerance=tolerance,
        verify_shapes=verify_shapes,
        external_data=external_data,
        ort_format=ort_format,
        calibration=calibration,
        task=task,
        first_token_only=first_token_only,
        seed=seed,
        say=log or logger.info,
        min_agreement=min_agreement,
        accept_low_agreement=accept_low_agreement,
        make_parents=make_parents,
    )
    with output_parents(ctx.target) as where, staging_dir(where) as ctx.tmp:
        for stage in _STAGES:
            stage(ctx)
        written = commit(ctx.staged, where.parent)
    return _finish_report(ctx, [ctx.target.parent / p.name for p in written])


def _check_arguments(
    model: nn.Module,
    example_inputs: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    dtype: str,
    quantize: str | None,
    verify: bool,
    merge: bool,
    optimize: str | None,
    opset: int,
    output_name: str,
    tolerance: float | None,
    verify_shapes: Sequence[tuple[int, int]] | None,
    external_data: bool | None,
    ort_format: bool,
    calibration: Iterable[Mapping[str, torch.Tensor]] | None,
    task: str | None,
    first_token_only: bool | None,
    seed: int,
    say: Callable[[str], None],
    min_agreement: float | None = None,
    accept_low_agreement: bool = False,
    make_parents: bool = False,
) -> _Export:
    """Every argument checked, and the output directory, before any work."""
    t_start = time.perf_counter()
    if dtype not in DTYPES:
        raise ValueError(f"dtype: got {dtype!r}, need one of {DTYPES}")
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize: got {quantize!r}, need one of {QUANTIZE}")
    if quantize is not None and dtype != "fp32":
        raise ValueError(f"quantize={quantize!r} needs dtype='fp32' (got dtype={dtype!r})")
    if optimize not in OPTIMIZE:
        raise ValueError(f"optimize: got {optimize!r}, need one of {OPTIMIZE}")
    if optimize is not None and (dtype != "fp32" or not merge):
        raise ValueError(
            f"optimize={optimize!r} needs dtype='fp32' and merge=True (got dtype={dtype!r}, "
            f"merge={merge!r}): the fused contrib ops run in fp32 on CPU and fuse constant "
            "weights only"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: got {type(model).__name__}, need a torch.nn.Module")
    if not merge:
        _adapters.check_no_dora(model)
    if not isinstance(opset, int) or isinstance(opset, bool) or opset not in OPSETS:
        raise ValueError(f"opset: got {opset!r}, need an int in [{OPSETS[0]}, {OPSETS[-1]}]")
    if min_agreement is not None and not 0.0 <= float(min_agreement) <= 1.0:
        raise ValueError(f"min_agreement: got {min_agreement!r}, need a fraction in [0, 1]")
    example = _check_inputs(example_inputs)
    target = check_output_path(path, make_parents=bool(make_parents))
    variant = quantize or dtype
    tol = DEFAULT_TOLERANCE[variant] if tolerance is None else float(tolerance)
    batch, seq = next(iter(example.values())).shape
    shapes = list(_default_shapes(batch, seq) if verify_shapes is None else verify_shapes)
    if verify_shapes is None and variant != "fp32":
        shapes.append((QUALITY_ROWS, seq))  # rows for the quality gate
    for b, s in shapes:
        if b < 1 or s < 1:
            raise ValueError(f"verify_shapes: got {(b, s)}, need positive (batch, seq)")
    if ort_format and external_data:
        raise ValueError("ort_format=True cannot be combined with external_data=True")
    calib = _check_calibration(calibration, example, quantize)
    if first_token_only not in (None, True, False):
        raise ValueError(f"first_token_only: got {first_token_only!r}, need None, True or False")
    if first_token_only:
        why_not = _rewrite.first_token_reason(model)
        if why_not:
            raise ValueError(f"first_token_only=True: the model does not qualify: {why_not}")
    return _Export(
        model=model,
        example=example,
        target=target,
        dtype=dtype,
        quantize=quantize,
        verify=verify,
        merge=merge,
        optimize=optimize,
        opset=opset,
        output_name=output_name,
        tol=tol,
        shapes=shapes,
        external_data=external_data,
        ort_format=ort_format,
        calib=calib,
        task=task,
        first_token_only=first_token_only,
        seed=seed,
        say=say,
        t_start=t_start,
        min_agreement=(
            None
            if variant == "fp32"
            else DEFAULT_MIN_AGREEMENT
            if min_agreement is None
            else float(min_agreement)
        ),
        accept_low_agreement=bool(accept_low_agreement),
        make_parents=bool(make_parents),
    )


def _copy_model(ctx: _Export) -> None:
    """A float32 eval-mode deep copy (the caller's model is never changed), its LoRA layers,
    and the verification inputs: the example, then random inputs of other shapes."""
    model = ctx.model
    ctx.say(f"copying the model ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params)")
    work = copy.deepcopy(model)
    # nn.Module's own cpu()/float(): transformers refuses .float() on models it loaded
    # from a quantized file (GGUF), although their weights are plain float tensors here
    nn.Module.float(nn.Module.cpu(work)).eval()
    ctx.work = work
    ctx.layers = _adapters.lora_layers(work)
    gen = torch.Generator().manual_seed(ctx.seed)
    ctx.cases = [("example", ctx.example)] + [
        ("random", _random_inputs(ctx.example, work, b, s, gen)) for b, s in ctx.shapes
    ]


def _reference_outputs(ctx: _Export) -> None:
    """PyTorch's outputs on every verification input, from the unmerged copy."""
    if not ctx.verify:
        return
    ctx.say(f"PyTorch reference outputs on {len(ctx.cases)} input sets")
    if not ctx.merge:
        for _, layer in ctx.layers:
            if layer.merged_adapters:  # the base export needs the unmerged weights
                layer.unmerge()
    with torch.no_grad():
        for _, inputs in ctx.cases:
            ctx.refs.append(_ExportWrapper(ctx.work, ctx.names, [])(*inputs.values()).numpy())


def _merge_or_hot_swap(ctx: _Export) -> None:
    """Fold the adapters into the copy's weights, or (merge=False) replace every adapted
    layer by a stand-in whose A' and B' become graph inputs."""
    work = ctx.work
    if ctx.merge:
        if ctx.layers:
            from lora_ext.inject import merge_and_unload

            ctx.say(f"merging {len(ctx.layers)} LoRA layers into the copy")
            merge_and_unload(work)
    else:
        if not ctx.layers:
            raise ValueError(
                "merge=False: the model has no LoRA layers; the hot-swap export turns "
                "each adapted layer's A and B into graph inputs (inject_ or load_adapter "
                "first), or use merge=True for a plain model"
            )
        ctx.say(f"hot-swap: {len(ctx.layers)} LoRA layers become graph inputs")
        for layer_name, layer in ctx.layers:
            if layer.merged_adapters:
                layer.unmerge()
            a, b = _adapters.layer_tensors(layer)
            stand_in = _adapters.LoraInputLinear(layer.base_layer)
            _set_submodule(work, layer_name, stand_in)
            ctx.lora_modules.append(stand_in)
            name_a, name_b = _adapters.input_names(layer_name)
            ctx.lora_names += [name_a, name_b]
            ctx.lora_values += [a, b]
            ctx.lora_axes[name_a] = {1: _adapters.LORA_R}
            ctx.lora_axes[name_b] = {0: _adapters.LORA_R}
    _check_modules(work)


def _prepare_for_tracing(ctx: _Export) -> None:
    """Exact rewrites of the copy: eager attention, attention biases folded, a classifier's
    last layer for token 0 only."""
    work = ctx.work
    # always: SDPA's traced graph carries a NaN guard (IsNaN + Where over every
    # attention-probability tensor) and a longer mask construction, ~10% of MiniLM's
    # onnxruntime time on CPU, and the BERT fusion patterns match only the eager graph
    _use_eager_attention(work, ctx.say)
    # (not with optimize="bert": its fusion patterns match transformers' own mask graph)
    plain = ctx.optimize is None
    ctx.wrapper = _ExportWrapper(work, ctx.names, ctx.lora_modules, plain_inputs=plain).eval()
    # (not before optimize="bert": its attention fusion matches the graph with the biases)
    if ctx.merge and ctx.optimize is None:
        folded = _rewrite.fold_attention_biases(work)
        if folded:
            ctx.say(f"attention biases: key bias dropped, value bias folded ({folded} layers)")
    if ctx.first_token_only is not False:
        lora_values = ctx.lora_values
        why_not = _rewrite.prune_to_first_token(
            work,
            [inputs for _, inputs in ctx.cases],
            lambda _m, inputs, run=ctx.wrapper: run(*inputs.values(), *lora_values),
        )
        ctx.pruned = why_not is None
        if ctx.pruned:
            ctx.say("last layer: token 0 only (the classifier reads nothing else)")
        elif ctx.first_token_only:
            raise ValueError(f"first_token_only=True: {why_not}")


def _trace_args(ctx: _Export) -> tuple[torch.Tensor, ...]:
    return tuple(ctx.example.values()) + tuple(ctx.lora_values)


def _check_ops(ctx: _Export) -> None:
    """One forward pass records the op each module runs: an op outside aten/prim (a custom
    C++/CUDA kernel) has no ONNX form and is named with its module. Also the output's
    dynamic axes and, for hot-swap, the base model's output (adapters of rank 0)."""
    ctx.recorder = _OpRecorder(ctx.work)
    with torch.no_grad():
        out = ctx.recorder.run(ctx.wrapper, *_trace_args(ctx))
    bad = ctx.recorder.unsupported()
    if bad:
        op, mod, cls = bad[0]
        raise UnsupportedModuleError(
            f"module {mod!r} ({cls}) calls {op}, which has no ONNX form; "
            + (
                f"{len(bad) - 1} more such op(s): {[b[0] for b in bad[1:]]}; "
                if len(bad) > 1
                else ""
            )
            + "replace the module with plain PyTorch ops before exporting"
        )
    ctx.out_axes = {0: "batch", 1: "sequence"} if out.dim() == 3 else {0: "batch"}
    if ctx.verify and ctx.lora_names:
        # the base model's output (adapters off) through the same stand-ins, rank 0
        zeros = tuple(
            torch.zeros(*(0 if i == d else n for i, n in enumerate(v.shape)))
            for v, d in zip(ctx.lora_values, [1, 0] * len(ctx.lora_modules))
        )
        with torch.no_grad():
            ctx.base_ref = ctx.wrapper(*ctx.example.values(), *zeros).numpy()


def _trace_to_onnx(ctx: _Export) -> None:
    """torch.onnx.export (TorchScript exporter, dynamic batch/sequence axes); standard ONNX
    domains only; Reshape targets computed from Shape ops become constants where symbolic
    shapes allow."""
    names = ctx.names
    ctx.raw = ctx.tmp / "torch_export" / "model.onnx"
    ctx.raw.parent.mkdir()
    ctx.say(f"torch.onnx.export (opset {ctx.opset}) of inputs {names} -> {ctx.output_name!r}")
    dynamic_axes = {n: {0: "batch", 1: "sequence"} for n in names}
    dynamic_axes[ctx.output_name] = ctx.out_axes
    dynamic_axes.update(ctx.lora_axes)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # TracerWarnings, the exporter's deprecation
            torch.onnx.export(
                ctx.wrapper,
                _trace_args(ctx),
                str(ctx.raw),
                dynamo=False,
                input_names=names + ctx.lora_names,
                output_names=[ctx.output_name],
                dynamic_axes=dynamic_axes,
                opset_version=min(ctx.opset, _TORCH_MAX_OPSET),
                do_constant_folding=True,
            )
    except Exception as exc:
        where = ctx.recorder.module_of(str(exc))
        raise UnsupportedModuleError(
            f"torch.onnx.export failed: {str(exc).strip().splitlines()[0]}"
            + (f" ({where})" if where else "")
        ) from exc
    graph = onnx.load(str(ctx.raw))
    if ctx.opset > _TORCH_MAX_OPSET:
        from onnx import version_converter

        graph = version_converter.convert_version(graph, ctx.opset)
        onnx.save_model(graph, str(ctx.raw))  # optimize="bert" reads the file
    foreign = sorted({n.domain for n in graph.graph.node if n.domain not in ("", "ai.onnx")})
    if foreign:
        node = next(n for n in graph.graph.node if n.domain in foreign)
        raise UnsupportedModuleError(
            f"the exported graph has ops outside standard ONNX (domain {foreign}), e.g. "
            f"node {node.name!r} ({node.op_type})"
        )
    constant_shapes = 0
    if ctx.optimize is None:  # the fusion patterns match the exporter's shape arithmetic
        graph, constant_shapes = _graph_passes.constant_reshapes(graph)
    if constant_shapes:
        ctx.say(f"{constant_shapes} Reshape targets made constant (shape arithmetic removed)")
    if ctx.quantize is None and ctx.optimize is None:
        # int8 quantizes the LM head's MatMul weight and the table separately: left alone
        graph, tied = _graph_passes.share_tied_weights(graph)
        if tied:
            ctx.say(f"{tied} tied weight(s) stored once (the LM head reads the embedding)")
    ctx.graph = graph
    ctx.heads, ctx.hidden = _attention_shape(ctx.work)
    ctx.work = ctx.wrapper = None  # the PyTorch copy is no longer needed


def _fuse(ctx: _Export) -> None:
    """optimize="bert": onnxruntime's transformer optimizer fuses attention, SkipLayerNorm,
    BiasGelu (and EmbedLayerNorm unless int8 follows) into com.microsoft contrib ops."""
    if ctx.optimize != "bert":
        return
    ctx.say(f"fusing with onnxruntime's transformer optimizer (bert, {ctx.heads} heads)")
    # int8 keeps the embedding lookups as Gathers: quantize_int8 gives their tables
    # one scale per column, onnxruntime's EmbedLayerNormalization quantization one
    # per table (3x the logit error on MiniLM)
    ctx.graph, ctx.fused_ops = _optimize_bert(
        ctx.raw, ctx.heads, ctx.hidden, embed_layer_norm=ctx.quantize is None
    )
    if not ctx.fused_ops.get("Attention"):
        # still correct (verify below), but the main speed-up is missing
        logger.warning(
            "optimize='bert': no Attention was fused (fused: %s); the graph's "
            "attention does not match onnxruntime's BERT patterns",
            ctx.fused_ops or "nothing",
        )


def _convert_precision(ctx: _Export) -> None:
    """fp16 weights and activations, or int8 quantization (smoothing calibrated on
    ``calibration``, see quantize.py); hot-swap LoRA MatMuls stay float."""
    if ctx.dtype == "fp16":
        ctx.say("converting weights and activations to fp16")
        ctx.graph = to_fp16(ctx.graph)
    if ctx.quantize != "int8":
        return
    calib = ctx.calib
    ctx.say(
        "int8 dynamic quantization (per channel, onnxruntime)"
        + (f", smoothing calibrated on {len(calib)} run(s)" if calib else "")
    )
    lora_set = set(ctx.lora_names)
    skip = [n.name for n in ctx.graph.graph.node if lora_set.intersection(n.input)]
    big = initializer_bytes(ctx.graph) > EXTERNAL_DATA_THRESHOLD
    lora_feeds = {n: v.numpy() for n, v in zip(ctx.lora_names, ctx.lora_values)}
    ctx.graph, ctx.int8_summary = quantize_int8(
        ctx.graph,
        ctx.tmp,
        exclude_nodes=skip,
        external_data=big,
        calibration=[feed | lora_feeds for feed in calib] if calib else None,
    )
    ctx.say(ctx.int8_summary.line())


def _add_metadata(ctx: _Export) -> None:
    """Rank-0 defaults of the hot-swap inputs, and the facts the runner reads. The traced
    intermediate shapes (value_info) go: runtimes infer their own, and leftovers with a
    symbolic batch make some refuse the file (tract)."""
    del ctx.graph.graph.value_info[:]
    if ctx.lora_names:
        _add_rank0_defaults(ctx.graph, ctx.lora_names, ctx.lora_values)
    _set_metadata(
        ctx.graph,
        ctx.model,
        ctx.variant,
        ctx.merge,
        len(ctx.layers),
        ctx.task,
        ctx.lora_names,
        ctx.optimize,
        ctx.pruned,
    )


def _save_staged(ctx: _Export) -> None:
    """The model (and a hot-swap export's adapter file) saved in the staging directory; the
    report started."""
    ctx.staged_model = ctx.tmp / ctx.target.name
    ctx.staged, used_external = save_model(ctx.graph, ctx.staged_model, ctx.external_data)
    ctx.graph = None
    ctx.report = ExportReport(
        path=ctx.target,
        files=[],
        size_bytes=file_size(ctx.staged),
        dtype=ctx.variant,
        quantize=ctx.quantize,
        opset=ctx.opset,
        input_names=ctx.names,
        output_names=[ctx.output_name],
        lora_inputs=ctx.lora_names,
        optimize=ctx.optimize,
        first_token_only=ctx.pruned,
        fused_ops=ctx.fused_ops,
        int8=ctx.int8_summary.to_dict() if ctx.int8_summary else {},
        merged_layers=len(ctx.layers) if ctx.merge else 0,
        external_data=used_external,
        tolerance=ctx.tol,
    )
    if ctx.lora_names and any(v.shape[0] * v.shape[1] for v in ctx.lora_values):
        adapter_staged = ctx.tmp / (ctx.target.stem + _adapters.ADAPTER_SUFFIX)
        _adapters.write_adapter_file(
            {n: v.numpy() for n, v in zip(ctx.lora_names, ctx.lora_values) if v.numel()},
            adapter_staged,
        )
        ctx.staged.insert(0, adapter_staged)


def _verify_in_onnxruntime(ctx: _Export) -> None:
    """The staged file in onnxruntime (CPU) on every verification input against PyTorch,
    the base model through the rank-0 defaults (hot-swap), and a latency figure; over the
    tolerance raises VerificationError (nothing is written)."""
    if not ctx.verify:
        return
    ctx.say("verifying in onnxruntime (CPU)")
    report, names = ctx.report, ctx.names
    session = ort_session(ctx.staged_model)
    lora_feeds = {n: v.numpy() for n, v in zip(ctx.lora_names, ctx.lora_values)}
    ctx.feeds_all = [
        {k: v.numpy() for k, v in inputs.items()} | lora_feeds for _, inputs in ctx.cases
    ]
    for (kind, inputs), feeds, ref in zip(ctx.cases, ctx.feeds_all, ctx.refs):
        got = session.run([ctx.output_name], feeds)[0]
        shape = tuple(next(iter(inputs.values())).shape)
        report.checks.append(_compare(kind, shape, got, ref))
    if ctx.lora_names:
        # the rank-0 defaults: a run fed no adapter inputs is the base model
        got = session.run([ctx.output_name], {k: ctx.feeds_all[0][k] for k in names})[0]
        report.checks.append(_compare("base (no adapter)", ctx.batch_seq, got, ctx.base_ref))
    report.ort_latency_ms = _latency_ms(session, ctx.feeds_all[0])
    del session
    _enforce(report, ctx.tol, ctx.target)
    _quality_gate(ctx)


def _quality_gate(ctx: _Export) -> None:
    """A quantized file (fp16, int8) whose argmax agreement with PyTorch over the decided
    verification rows (see NEAR_TIE) is below ``min_agreement`` is not written, unless
    ``accept_low_agreement`` (then loudly)."""
    report = ctx.report
    rows = sum(c.decided_rows for c in report.checks)
    if rows:
        report.agreement = sum(c.decided_agree * c.decided_rows for c in report.checks) / rows
    report.min_agreement = ctx.min_agreement
    if ctx.min_agreement is None or report.agreement is None:
        return
    if report.agreement >= ctx.min_agreement:
        return
    what = (
        f"{ctx.variant} file agrees with PyTorch on {report.agreement:.1%} of {rows} "
        f"verification rows (argmax{', next token' if ctx.out_axes.get(1) else ''}, near-ties "
        f"excluded), below the minimum {ctx.min_agreement:.0%}"
    )
    if not ctx.accept_low_agreement:
        raise VerificationError(
            f"quality gate: the {what}; nothing was written to {ctx.target} (pass "
            "accept_low_agreement=True, CLI --accept-low-agreement, to write it anyway)"
        )
    report.accepted_low_agreement = True
    message = f"quality gate overridden: writing the {what}"
    logger.warning(message)
    if ctx.say is not logger.info:
        ctx.say(f"WARNING: {message}")


def _write_ort_format(ctx: _Export) -> None:
    """ort_format=True: <stem>.ort next to the model, verified like the model."""
    if not ctx.ort_format:
        return
    ort_staged = ctx.tmp / (ctx.target.stem + ".ort")
    ctx.say("writing the ORT format")
    save_ort_format(ctx.staged_model, ort_staged)
    if ctx.verify:
        session = ort_session(ort_staged)
        got = session.run([ctx.output_name], ctx.feeds_all[0])[0]
        ctx.report.checks.append(_compare("ort format", ctx.batch_seq, got, ctx.refs[0]))
        del session
        _enforce(ctx.report, ctx.tol, ctx.target)
    ctx.staged.insert(0, ort_staged)


# the order of the work; nothing is written at the target until every stage has passed
_STAGES: tuple[Callable[[_Export], None], ...] = (
    _copy_model,
    _reference_outputs,
    _merge_or_hot_swap,
    _prepare_for_tracing,
    _check_ops,
    _trace_to_onnx,
    _fuse,
    _convert_precision,
    _add_metadata,
    _save_staged,
    _verify_in_onnxruntime,
    _write_ort_format,
)


def _finish_report(ctx: _Export, written: list[Path]) -> ExportReport:
    """The report with the files as committed."""
    report = ctx.report
    report.files = written
    report.size_bytes = file_size([p for p in written if p.suffix not in (".ort", ".onnx_adapter")])
    report.adapter_path = next((p for p in written if p.suffix == ".onnx_adapter"), None)
    report.ort_path = next((p for p in written if p.suffix == ".ort"), None)
    report.export_seconds = time.perf_counter() - ctx.t_start
    ctx.say(f"wrote {ctx.target} ({report.size_bytes / 1e6:.1f} MB)")
    return report


def _enforce(report: ExportReport, tol: float | None, target: Path) -> None:
    if tol is None:
        return
    worst = max(report.checks, key=lambda c: c.max_rel)
    if worst.max_rel > tol:
        raise VerificationError(
            f"verify failed: max relative error {worst.max_rel:.3e} (max abs "
            f"{worst.max_abs:.3e}) > tolerance {tol:.1e} on {worst.inputs} inputs, batch "
            f"{worst.batch} x seq {worst.seq}; nothing was written to {target}"
        )


def _use_eager_attention(model: nn.Module, say: Callable[[str], None]) -> None:
    """Switch a transformers model to the eager attention implementation (explicit
    MatMul/Softmax/MatMul and an additive mask): the same outputs as SDPA (verify compares
    with the model as given), a leaner graph, and the pattern the attention fusion
    matches."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current in (None, "eager"):
        return
    setter = getattr(model, "set_attn_implementation", None)
    if callable(setter):
        setter("eager")
    else:
        config._attn_implementation = "eager"
    say(f"attention implementation {current!r} -> 'eager' for the export")


def _attention_shape(model: nn.Module) -> tuple[int, int]:
    """(num_attention_heads, hidden_size) from the config; 0 means "let the optimizer guess",
    which fails on graphs whose reshapes are computed from Shape ops (as these are)."""
    config = getattr(model, "config", None)
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    return heads, hidden


def _optimize_bert(
    raw: Path, heads: int, hidden: int, embed_layer_norm: bool = True
) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Fuse a BERT-family graph with onnxruntime.transformers.optimizer (Python fusions
    only, opt_level=0: the result has no hardware-specific layout and onnxruntime applies its
    own graph optimisations at load time). Returns (graph, {fused op: count})."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    raw = raw.resolve()
    # the optimizer logs through the root logger ("Failed to detect num_heads ...")
    quiet = logging.getLogger("onnxruntime.transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    # its symbolic shape inference saves the model as sym_shape_infer_temp.onnx (+ weights)
    # in the current directory when a shape stays unknown: run it in the staging directory
    try:
        with contextlib.chdir(raw.parent):
            options = FusionOptions("bert")
            options.enable_embed_layer_norm = embed_layer_norm
            opt = optimize_model(
                str(raw),
                model_type="bert",
                num_heads=heads,
                hidden_size=hidden,
                opt_level=0,
                use_gpu=False,
                optimization_options=options,
            )
    finally:
        quiet.setLevel(level)
    stats = {k: int(v) for k, v in opt.get_fused_operator_statistics().items() if v}
    graph = opt.model
    if stats:
        # onnx's shape inference stops at contrib ops, and the int8 quantizer needs the type
        # of every MatMul output; onnxruntime's symbolic shape inference knows these ops
        graph = _graph_passes.symbolic_shapes(graph) or graph
    # the fused nodes live in com.microsoft; declare it (shape inference in the int8
    # quantizer and some loaders refuse a domain without an opset import)
    if any(n.domain == "com.microsoft" for n in graph.graph.node) and not any(
        o.domain == "com.microsoft" for o in graph.opset_import
    ):
        graph.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return graph, stats


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _add_rank0_defaults(
    graph: onnx.ModelProto, lora_names: list[str], lora_values: list[torch.Tensor]
) -> None:
    """Give every LoRA graph input a default value of rank 0 ([in, 0] / [0, out]) so that
    feeding no adapter runs the base model (as Olive's optional adapter inputs do)."""
    from onnx import numpy_helper

    for name, value in zip(lora_names, lora_values):
        shape = list(value.shape)
        shape[1 if name.endswith(".lora_A.weight") else 0] = 0
        graph.graph.initializer.append(
            numpy_helper.from_array(np.zeros(shape, dtype=np.float32), name)
        )


def _set_metadata(
    graph: onnx.ModelProto,
    model: nn.Module,
    variant: str,
    merged: bool,
    n_layers: int,
    task: str | None,
    lora_names: list[str],
    optimize: str | None = None,
    first_token_only: bool = False,
) -> None:
    """Facts the runner needs (task, labels, hot-swap inputs), as model metadata."""
    import lora_ext

    config = getattr(model, "config", None)
    if task is None:
        task = Task.of_model(model)
    meta = {
        "lora_ext.version": lora_ext.__version__,
        "lora_ext.variant": variant,
        "lora_ext.lora": "hot-swap" if not merged else ("merged" if n_layers else "none"),
    }
    if task:
        meta["lora_ext.task"] = Task(task).value
    if optimize:
        meta["lora_ext.optimize"] = optimize
    if first_token_only:
        meta["lora_ext.first_token_only"] = "1"
    id2label = getattr(config, "id2label", None)
    if task == Task.SEQ_CLS and id2label:
        meta["lora_ext.id2label"] = json.dumps({int(k): v for k, v in id2label.items()})
    if lora_names:
        meta["lora_ext.lora_inputs"] = json.dumps(lora_names)
    del graph.metadata_props[:]
    for key, value in meta.items():
        graph.metadata_props.add(key=key, value=value)
