"""Post-export conversions of an ONNX graph: fp16 weights, int8 quantization (onnxruntime
dynamic quantization, per channel, with activation smoothing calibrated on real inputs) and
the ORT format of onnxruntime's mobile builds.

All of them keep the graph's inputs and outputs as they are (int64 ids in, float32 logits
out), so the runner and the verification feed every variant the same way.

int8, in three steps (``quantize_int8``):

1. Smoothing (SmoothQuant, Xiao et al. 2023), where calibration inputs are given. Dynamic
   quantization gives each MatMul input one uint8 scale per run; transformer activations
   have a few channels ~10-30x larger than the rest (MiniLM: one LayerNorm channel, one
   GELU channel per layer), so that scale wastes most of the 256 levels on them. For a
   MatMul ``X W`` with constant ``W``, ``X W = (X / s) (s W)`` for any per-channel ``s``:
   the graph gets ``Mul(X, 1/s)`` and ``W`` rows are scaled by ``s``, which moves the range
   from the activation (per-tensor scale) into the weight (per-output-channel scale).
   ``s_j = max|X_j|^a / max|W_j|^(1 - a)``; ``a`` is chosen per MatMul input from a grid by
   simulating the int8 MatMul on calibration rows, and a Mul is inserted only where it at
   least halves that error (each costs one elementwise pass at run time).
2. onnxruntime ``quantize_dynamic``: int8 weights per output channel, uint8 activations
   quantized per run (U8S8, the fast path of x86 VNNI and ARM dot-product kernels).
3. Embedding tables (Gather on a constant table of >= 65,536 values): int8 with one scale
   per hidden dimension (onnxruntime's own Gather quantization uses one scale per table),
   dequantized after the lookup (Cast + Mul by the column scales: DequantizeLinear's
   arithmetic with zero point 0, in ops every runtime and opset has).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ._io import save_model
from .session import ort_session

logger = logging.getLogger("lora_ext.export")

# Attention and EmbedLayerNormalization exist only in a graph fused by optimize="bert" and
# hold most of its weights there; plain graphs have MatMul (and Gather, see EMBEDDING_*).
QUANTIZED_OP_TYPES = ["MatMul", "Attention", "EmbedLayerNormalization"]
# smaller tables (token types, a few hundred positions) gain nothing worth a dequantize op
EMBEDDING_MIN_ELEMENTS = 1 << 16
# smoothing exponents tried per MatMul input (0 = no smoothing)
SMOOTH_ALPHAS = (0.0, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)
# insert the smoothing Mul only where it divides the simulated int8 error by at least this
SMOOTH_MIN_GAIN = 2.0
# calibration rows kept per MatMul input for the error simulation (subsampled per run)
SMOOTH_ROWS = 512


@dataclass
class Int8Summary:
    """What quantize_int8 did: counts of MatMuls quantized, inputs smoothed (with their
    exponent and simulated error before/after), embedding tables quantized per column."""

    matmuls: int = 0
    embeddings: list[str] = field(default_factory=list)
    smoothed: dict[str, dict[str, float]] = field(default_factory=dict)
    calibration_runs: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        smooth = (
            f", {len(self.smoothed)} MatMul input(s) smoothed on {self.calibration_runs} "
            "calibration run(s)"
            if self.calibration_runs
            else ", no calibration (no smoothing)"
        )
        return (
            f"int8: {self.matmuls} MatMul weights per channel, {len(self.embeddings)} "
            f"embedding table(s) per column{smooth}"
        )


# calibration runs: half one text per run (what an edge device runs), half in padded batches of
# this many texts (batched serving: the pad rows change each run's dynamic range; smoothing
# calibrated on single runs alone lost 2-3 points of agreement on padded batches of 16-64)
CALIBRATION_BATCH = 16
# calibration texts the exports of lora-ext (train --export, export --int8, the demo) use
CALIBRATION_SAMPLES = 256


def calibration_runs(
    tokenizer: Any,
    texts: Iterable[str],
    max_length: int = 128,
    batch: int = CALIBRATION_BATCH,
) -> list[dict[str, Any]]:
    """export_onnx's int8 ``calibration`` inputs from representative texts (e.g. a few
    hundred training sentences, never the ones int8 is evaluated on): the first half one
    text per run, unpadded, the rest in right-padded batches of ``batch``, so that the
    smoothing fits both the batch-1 and the batched regime.

    Returns: a list of tokenizer outputs ({input_ids, attention_mask, ...} [b, T] int64).
    """
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError("calibration texts: got none (or only blank ones); need >= 1")
    if batch < 1:
        raise ValueError(f"batch: got {batch}, need >= 1")
    half = (len(texts) + 1) // 2
    groups = [[t] for t in texts[:half]]
    groups += [texts[i : i + batch] for i in range(half, len(texts), batch)]
    return [
        dict(
            tokenizer(
                group, truncation=True, max_length=max_length, padding=True, return_tensors="pt"
            )
        )
        for group in groups
    ]


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Weights and activations in float16; float graph inputs and outputs stay float32 (a
    Cast at each boundary), so logits come out float32 and hot-swap LoRA inputs are fed in
    float32 as for the other variants.

    Uses onnxruntime's converter (onnxruntime.transformers.float16).
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=True)


# -- smoothing ----------------------------------------------------------------------------
def _use_counts(model: onnx.ModelProto) -> Counter[str]:
    """How many node inputs read each value: an initializer read once can be rewritten
    without changing any other node."""
    return Counter(name for node in model.graph.node for name in node.input)


def _constant_matmuls(model: onnx.ModelProto, exclude: set[str]) -> dict[str, list[onnx.NodeProto]]:
    """{activation input: nodes reading it} for MatMuls (and the fused com.microsoft
    Attention of optimize="bert", whose input 1 is the [hidden, 3 x hidden] QKV weight) with a
    2-D float32 constant weight used by nothing else, so that scaling its rows changes only
    these nodes."""
    inits = {i.name: i for i in model.graph.initializer}
    users = _use_counts(model)
    groups: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        plain = node.op_type == "MatMul" and node.domain in ("", "ai.onnx")
        fused = node.op_type == "Attention" and node.domain == "com.microsoft"
        if not (plain or fused) or node.name in exclude:
            continue
        w = inits.get(node.input[1])
        if w is None or len(w.dims) != 2 or w.data_type != onnx.TensorProto.FLOAT:
            continue
        if users[node.input[1]] != 1 or node.input[0] in inits:
            continue
        groups.setdefault(node.input[0], []).append(node)
    return groups


def _batched_weight_matmuls(model: onnx.ModelProto) -> list[str]:
    """Names of the MatMuls whose constant weight (input 1) has more than 2 dimensions."""
    dims = {i.name: len(i.dims) for i in model.graph.initializer}
    return [
        n.name
        for n in model.graph.node
        if n.op_type == "MatMul" and len(n.input) > 1 and dims.get(n.input[1], 2) > 2
    ]


@dataclass
class _Calib:
    """Per MatMul input: channel-wise |max| over all runs; per run the channel-wise min/max
    (a run's dynamic quantization range follows from them); a sample of rows and the run
    each row came from."""

    absmax: np.ndarray  # [K]
    lo: np.ndarray  # [runs, K]
    hi: np.ndarray  # [runs, K]
    rows: np.ndarray  # [R, K]
    run_of_row: np.ndarray  # [R]


def _calibrate(
    model: onnx.ModelProto,
    names: list[str],
    feeds: list[dict[str, np.ndarray]],
    workdir: Path,
    external_data: bool,
    rows: int = SMOOTH_ROWS,
) -> dict[str, _Calib]:
    """Run the float graph on ``feeds`` with ``names`` as extra outputs (onnxruntime, CPU)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    declared = {o.name for o in probe.graph.output}
    for name in names:
        if name not in declared:
            probe.graph.output.append(helper.make_empty_tensor_value_info(name))
    path = workdir / "int8_calibration.onnx"
    save_model(probe, path, external_data)
    del probe
    session = ort_session(path)
    per_run = max(1, -(-rows // max(len(feeds), 1)))
    rng = np.random.default_rng(0)
    acc: dict[str, tuple[list, list, list, list]] = {name: ([], [], [], []) for name in names}
    for run, feed in enumerate(feeds):
        for name, value in zip(names, session.run(names, feed)):
            x = value.reshape(-1, value.shape[-1]).astype(np.float32, copy=False)
            pick = x if len(x) <= per_run else x[rng.choice(len(x), per_run, replace=False)]
            lo, hi, sample, where = acc[name]
            lo.append(x.min(0))
            hi.append(x.max(0))
            sample.append(pick)
            where.append(np.full(len(pick), run))
    del session
    out = {}
    for name, (lo, hi, sample, where) in acc.items():
        lo_a, hi_a = np.stack(lo), np.stack(hi)
        absmax = np.maximum(np.abs(lo_a).max(0), np.abs(hi_a).max(0))
        out[name] = _Calib(absmax, lo_a, hi_a, np.concatenate(sample), np.concatenate(where))
    return out


def _int8_matmul_error(calib: _Calib, w: np.ndarray, y: np.ndarray, s: np.ndarray) -> float:
    """Relative squared error ||Xq Wq - X W||^2 / ||X W||^2 over the sampled rows of the
    int8 MatMul of the smoothed operands, as onnxruntime's dynamic quantization computes it:
    X / s in uint8 with one scale and zero point per run (range from the run's min/max,
    including 0), s W in int8 per output column (symmetric). ``y`` = X W (float)."""
    ws = s[:, None] * w
    wscale = np.maximum(np.abs(ws).max(0), 1e-30) / 127.0
    wq = np.clip(np.rint(ws / wscale), -127, 127) * wscale
    lo = np.minimum((calib.lo / s).min(1), 0.0)  # per run
    hi = np.maximum((calib.hi / s).max(1), 0.0)
    scale = (hi - lo) / 255.0
    scale[scale == 0] = 1.0
    zero = np.rint(-lo / scale)
    scale, zero = scale[calib.run_of_row, None], zero[calib.run_of_row, None]
    xq = (np.clip(np.rint(calib.rows / s / scale) + zero, 0, 255) - zero) * scale
    ref = float((y**2).sum())
    return float(((xq @ wq - y) ** 2).sum()) / ref if ref > 0 else 0.0


def smooth_activations(
    model: onnx.ModelProto,
    feeds: list[dict[str, np.ndarray]],
    workdir: Path,
    exclude_nodes: Iterable[str] = (),
    external_data: bool = False,
) -> tuple[onnx.ModelProto, dict[str, dict[str, float]]]:
    """SmoothQuant for dynamic int8 (see the module docstring), calibrated on ``feeds``.

    Args:
        model: the float32 graph (changed in place and returned).
        feeds: calibration runs, {graph input name: array} each (real, representative data).
        workdir: for the calibration copy of the graph.
        exclude_nodes: MatMuls to leave alone (the hot-swap LoRA ones, kept in float).

    Returns: (graph, {MatMul input: {"alpha", "error", "error_unsmoothed"}} of what was
    smoothed).
    """
    groups = _constant_matmuls(model, set(exclude_nodes))
    if not groups or not feeds:
        return model, {}
    calib = _calibrate(model, list(groups), feeds, workdir, external_data)
    inits = {i.name: i for i in model.graph.initializer}
    inserted: dict[int, onnx.NodeProto] = {}
    done: dict[str, dict[str, float]] = {}
    for name, nodes in groups.items():
        c = calib[name]
        weights = [numpy_helper.to_array(inits[n.input[1]]) for n in nodes]
        w = np.concatenate(weights, axis=1).astype(np.float32)
        amax = np.maximum(c.absmax, 1e-5)
        wmax = np.maximum(np.abs(w).max(1), 1e-5)
        y = c.rows @ w
        base = _int8_matmul_error(c, w, y, np.ones_like(amax))
        best_alpha, best_err, best_s = 0.0, base, None
        for alpha in SMOOTH_ALPHAS[1:]:
            s = (amax**alpha / wmax ** (1 - alpha)).astype(np.float32)
            err = _int8_matmul_error(c, w, y, s)
            if err < best_err:
                best_alpha, best_err, best_s = alpha, err, s
        if best_s is None or best_err * SMOOTH_MIN_GAIN > base:
            continue
        inv = numpy_helper.from_array((1.0 / best_s).astype(np.float32), f"{name}_smooth_inv")
        model.graph.initializer.append(inv)
        smoothed = f"{name}_smoothed"
        inserted[id(nodes[0])] = helper.make_node(
            "Mul", [name, inv.name], [smoothed], name=f"{nodes[0].name}_smooth"
        )
        for node, weight in zip(nodes, weights):
            scaled = (weight * best_s[:, None]).astype(np.float32)
            inits[node.input[1]].CopyFrom(numpy_helper.from_array(scaled, node.input[1]))
            node.input[0] = smoothed
        done[name] = {"alpha": best_alpha, "error": best_err, "error_unsmoothed": base}
    if inserted:
        # the Mul goes right before the first MatMul reading it: topological order holds
        nodes = []
        for node in model.graph.node:
            if id(node) in inserted:
                nodes.append(inserted[id(node)])
            nodes.append(node)
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return model, done


# -- embeddings ---------------------------------------------------------------------------
def quantize_embeddings(
    model: onnx.ModelProto, min_elements: int = EMBEDDING_MIN_ELEMENTS
) -> list[str]:
    """Gather on a constant float32 table [rows, dim] of >= ``min_elements`` values ->
    Gather on an int8 table, then Cast + Mul by one scale per column (axis -1 of the gathered
    rows: DequantizeLinear with zero point 0). In place; returns the tables converted.

    A per-column scale follows the hidden dimensions' very different ranges (the outlier
    channels again), which one scale per table does not; the table shrinks 4x.
    """
    inits = {i.name: i for i in model.graph.initializer}
    users = _use_counts(model)
    graph_outputs = {o.name for o in model.graph.output}
    done: list[str] = []
    nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        table = inits.get(node.input[0]) if node.op_type == "Gather" and node.input else None
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if (
            table is None
            or node.domain not in ("", "ai.onnx")
            or axis != 0
            or len(table.dims) != 2
            or table.data_type != onnx.TensorProto.FLOAT
            or int(np.prod(table.dims)) < min_elements
            or users[table.name] != 1
            or node.output[0] in graph_outputs
        ):
            nodes.append(node)
            continue
        w = numpy_helper.to_array(table)
        scale = (np.maximum(np.abs(w).max(0), 1e-30) / 127.0).astype(np.float32)
        q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
        name = table.name
        model.graph.initializer.remove(table)
        model.graph.initializer.extend(
            [
                numpy_helper.from_array(q, f"{name}_int8"),
                numpy_helper.from_array(scale, f"{name}_scale"),
            ]
        )
        rows = f"{node.output[0]}_int8"
        nodes.append(
            helper.make_node("Gather", [f"{name}_int8", node.input[1]], [rows], name=node.name)
        )
        # DequantizeLinear(axis=-1) with zero point 0, as Cast + Mul: the same arithmetic in
        # ops every runtime and opset has (onnx's reference runtime implements
        # DequantizeLinear from opset 19 only)
        nodes.append(
            helper.make_node(
                "Cast",
                [rows],
                [f"{rows}_float"],
                name=f"{node.name}_dequantize_cast",
                to=onnx.TensorProto.FLOAT,
            )
        )
        nodes.append(
            helper.make_node(
                "Mul",
                [f"{rows}_float", f"{name}_scale"],
                [node.output[0]],
                name=f"{node.name}_dequantize",
            )
        )
        done.append(name)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return done


# -- the int8 path ------------------------------------------------------------------------
def quantize_int8(
    model: onnx.ModelProto,
    workdir: Path,
    exclude_nodes: Iterable[str] = (),
    external_data: bool = False,
    calibration: Iterable[Mapping[str, np.ndarray]] | None = None,
) -> tuple[onnx.ModelProto, Int8Summary]:
    """int8 weights (per output channel / per embedding column) with activation smoothing
    calibrated on ``calibration``; see the module docstring.

    Args:
        model: the float32 graph.
        workdir: a directory for the intermediate files (quantize_dynamic works on paths).
        exclude_nodes: nodes kept in float (the hot-swap LoRA MatMuls, whose weights are
            graph inputs).
        external_data: write the intermediates with external data (models > 2 GB).
        calibration: feeds {graph input name: array [batch, seq]} of representative inputs
            (a few hundred real sentences, see calibration_runs); None: no smoothing.

    Returns: (the quantized graph, Int8Summary).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # onnxruntime's int8 MatMul takes a 2-D weight only (per-channel zero points of a
    # batched [n, k, m] weight fail at run time): such MatMuls (the reassociated attention
    # of a first-token-only last layer, a few kFLOP) stay in float
    exclude = list(exclude_nodes) + _batched_weight_matmuls(model)
    summary = Int8Summary()
    feeds = [dict(f) for f in calibration] if calibration is not None else []
    if feeds:
        model, summary.smoothed = smooth_activations(model, feeds, workdir, exclude, external_data)
        summary.calibration_runs = len(feeds)
    src = workdir / "int8_input.onnx"
    dst = workdir / "int8_output.onnx"
    save_model(model, src, external_data)
    # quantize_dynamic logs a hint about pre-processing (symbolic shape inference), which
    # fails on transformer graphs with data-dependent mask shapes and changes nothing for
    # dynamic quantization of MatMul weights.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(
            str(src),
            str(dst),
            per_channel=True,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=QUANTIZED_OP_TYPES,
            nodes_to_exclude=exclude,
            use_external_data_format=external_data,
        )
    finally:
        root.setLevel(level)
    out = onnx.load(str(dst))
    summary.matmuls = sum(
        n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul", "QAttention")
        for n in out.graph.node
    )
    summary.embeddings = quantize_embeddings(out)
    return out, summary


def save_ort_format(model_path: Path, ort_path: Path) -> None:
    """Convert a saved .onnx file to the ORT format (flatbuffer) that onnxruntime's mobile /
    minimal builds load. Basic (platform-independent) graph optimisations only, as
    onnxruntime's own converter does by default, so the file runs on any CPU."""
    ort_session(model_path, save_ort_to=ort_path)
    if not ort_path.is_file():
        raise RuntimeError(f"onnxruntime did not write the ORT format file {ort_path}")
