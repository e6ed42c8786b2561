"""Weight-only int4/int8 (``MatMulNBits``) for decoder folders.

- ``quantize_weights``: every constant MatMul of a graph (our own GPT-2 graph) with
  onnxruntime's ``MatMulNBitsQuantizer``: RTN (round to nearest, block-wise, symmetric or
  not) or k_quant.
- ``gptq_layers``: GPTQ (Frantar et al. 2022) in place of RTN in a symmetric int4 graph (the
  builder's or ours): each MatMul's int4 weights are chosen so that its output on
  calibration text changes least, on exactly the grid and in the layout RTN writes (the
  builder's bytes are reproduced exactly by ``rtn_sym_grid`` + ``pack_int4``), so the file
  has the same size and runs on the same fast kernels. Calibration: one run of the fp32
  graph per text, with the MatMul inputs as extra outputs.

Measured on SmolLM2-135M + LoRA (16 held-out bbc-news validation texts x 128 tokens,
teacher-forced against fp32 PyTorch, perplexity 43.40; all folders 90.0 MB unless said):
the builder's RTN (block 32, symmetric) 58.7% next-token agreement, perplexity 59.76;
GPTQ of the layers (32 bbc-news training texts) 64.8% / 59.80; GPTQ of the layers and the
tied LM head / embedding table 69.1% / 56.47 (decode speed unchanged). Tried and dropped:
onnxruntime's HQQ (float zero points): 77.0% / 47.31 at block 32 (103.3 MB) and 65.0% /
57.08 at block 64, but MatMulNBits with float zero points decodes about 12x slower on the
CPU (10 vs 125 tokens/s), slower than fp32; HQQ with its zero points rounded to 4-bit
integers 61.4% / 56.89 (91.7 MB), the same as RTN asymmetric (61.4% / 56.83, 91.7 MB).
MatMulNBits' ``accuracy_level`` on the GPTQ folder: 4 (int8 activations, the default)
69.1% / 56.47 at 193.6 decode tokens/s; 1 (fp32) and 0 (unset) 69.9% / 56.41 at 121.7 and
108.7 tokens/s: level 4 costs 0.8 points of agreement for 1.6x the speed.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

METHODS = ("rtn", "k_quant")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """onnxruntime's quantizer logs every node at INFO: WARNING and up only, meanwhile."""
    log = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


def quantize_weights(
    onnx_path: Path,
    bits: int,
    block_size: int,
    symmetric: bool,
    method: str,
    accuracy_level: int,
    exclude: Sequence[str] = (),
) -> None:
    """Weight-only ``MatMulNBits`` quantization of the graph's constant MatMuls, in place
    (onnxruntime's ``MatMulNBitsQuantizer``): ``method`` "rtn" (round to nearest, block-wise,
    symmetric or not) or "k_quant". MatMuls
    whose weight is not an initializer (the tied LM head reads Transpose(embedding); LoRA
    inputs) stay float, and so do the nodes named in ``exclude``."""
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mq

    from ._io import save_model

    model = onnx.load(str(onnx_path))
    if method not in METHODS:
        raise ValueError(f"method: got {method!r}, need one of {METHODS}")
    if method == "k_quant":
        algo: Any = mq.KQuantWeightOnlyQuantConfig()
    else:
        algo = mq.DefaultWeightOnlyQuantConfig(
            block_size=block_size,
            is_symmetric=symmetric,
            accuracy_level=accuracy_level,
            bits=bits,
        )
    quantizer = mq.MatMulNBitsQuantizer(
        model,
        bits=bits,
        block_size=block_size,
        is_symmetric=symmetric,
        accuracy_level=accuracy_level,
        nodes_to_exclude=list(exclude),
        algo_config=algo,
    )
    with quiet():
        quantizer.process()
    out = quantizer.model.model
    (onnx_path.parent / (onnx_path.name + ".data")).unlink(missing_ok=True)
    save_model(out, onnx_path, external_data=True)


# -- GPTQ on MatMulNBits' own symmetric int4 grid ---------------------------------------
def rtn_sym_grid(groups: Any) -> tuple[Any, Any]:
    """onnxruntime's symmetric 4-bit grid for blocks ``groups`` [..., block] (torch float32):
    the element of largest magnitude, with its sign, maps to -8, so scale = it / -8, and
    q = clamp(floor(w / scale + 0.5) + 8, 0, 15). Returns (scale [...], 1/scale or 0 [...]).
    (Matches the builder's MatMulNBits bytes exactly: tested.)"""
    import torch

    idx = groups.abs().argmax(-1, keepdim=True)
    scale = torch.gather(groups, -1, idx)[..., 0] / -8.0
    recip = torch.where(scale != 0, 1.0 / torch.where(scale == 0, 1.0, scale), 0.0)
    return scale, recip


def quantize_sym(w: Any, recip: Any) -> Any:
    """q in [0, 15] of w (any shape) with the grid's reciprocal scale (broadcast)."""
    import torch

    return torch.clamp(torch.floor(w * recip + 0.5) + 8, 0, 15)


def pack_int4(q: Any, block: int) -> np.ndarray:
    """MatMulNBits' B layout from q [N, K_pad] (ints 0..15): [N, K_pad / block, block / 2]
    uint8, two values per byte, the even K index in the low nibble."""
    q = np.asarray(q, dtype=np.uint8)
    n, k = q.shape
    q = q.reshape(n, k // block, block)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def gptq_int4(
    weight: np.ndarray, hessian: np.ndarray, block: int, percdamp: float = 0.01
) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ (Frantar et al. 2022) of one MatMul weight on MatMulNBits' symmetric int4 grid.

    Columns of W^T are quantized in input order; each one's rounding error, scaled by the
    inverse Hessian's Cholesky factor, is pushed onto the columns not yet quantized, so the
    layer's output on the calibration inputs changes least. A block's scale is set from its
    (error-updated) weights when the block starts, as RTN would set it.

    Args:
        weight: [K, N] float32 (the MatMul's B).
        hessian: [K, K] sum of x^T x over the calibration inputs x [tokens, K].
        block: the quantization block along K.
        percdamp: damping added to the diagonal, a fraction of its mean.

    Returns:
        (B [N, K_pad / block, block / 2] uint8, scales [N * K_pad / block] float32), the
        MatMulNBits initializers (no zero points: symmetric).
    """
    import torch

    k, n = weight.shape
    k_pad = -(-k // block) * block
    w = torch.zeros(n, k_pad, dtype=torch.float32)
    w[:, :k] = torch.from_numpy(np.ascontiguousarray(weight.T, dtype=np.float32))
    h = torch.eye(k_pad, dtype=torch.float64)
    h[:k, :k] = torch.from_numpy(np.asarray(hessian, dtype=np.float64))
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += percdamp * torch.mean(torch.diag(h)) * torch.eye(k_pad, dtype=torch.float64)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    hinv = hinv.float()
    q = torch.zeros(n, k_pad, dtype=torch.float32)
    scales = torch.zeros(n, k_pad // block, dtype=torch.float32)
    lazy = max(block, (128 // block) * block)
    recip = None
    for i1 in range(0, k_pad, lazy):
        i2 = min(i1 + lazy, k_pad)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % block == 0:
                scale, recip = rtn_sym_grid(w1[:, i : i + block])
                scales[:, col // block] = scale
            qc = quantize_sym(w1[:, i], recip)
            q[:, col] = qc
            deq = (qc - 8) * scales[:, col // block]
            e = (w1[:, i] - deq) / h1[i, i]
            w1[:, i:].addr_(e, h1[i, i:], alpha=-1.0)
            err1[:, i] = e
        if i2 < k_pad:
            w[:, i2:].addmm_(err1, hinv[i1:i2, i2:], alpha=-1.0)
    return pack_int4(q.numpy(), block), scales.reshape(-1).numpy()


def calibration_hessians(
    fp32_path: Path, inputs: Sequence[str], feeds: Sequence[dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """{tensor: sum of x^T x [K, K] float64} of the given MatMul input tensors of the fp32
    graph over the calibration runs ``feeds`` (each a full feed dict), from one run each
    with those tensors added as graph outputs (the augmented graph is written next to
    ``fp32_path`` and removed)."""
    import onnx

    from ._io import save_model
    from .session import ort_session

    model = onnx.load(str(fp32_path))
    del model.graph.output[:]
    for name in inputs:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    path = fp32_path.parent / f".calib.{fp32_path.name}"
    files, _ = save_model(model, path, external_data=True)
    del model
    try:
        session = ort_session(path)
        sums: dict[str, np.ndarray] = {}
        for feed in feeds:
            for name, x in zip(inputs, session.run(list(inputs), feed)):
                x = x.reshape(-1, x.shape[-1]).astype(np.float64)
                sums[name] = sums.get(name, 0.0) + x.T @ x
        del session
    finally:
        for f in files:
            f.unlink(missing_ok=True)
    return sums


def gptq_layers(
    int4_path: Path,
    fp32_path: Path,
    feeds: Sequence[dict[str, np.ndarray]],
    block: int,
    lm_head: bool = False,
) -> int:
    """GPTQ in place of RTN in a symmetric int4 graph (the builder's or ours): every 4-bit
    ``MatMulNBits`` node (the LM head's, the one writing ``logits``, only with ``lm_head``;
    with tied embeddings the builder's embedding reads that same table) gets new B and
    scales, the same shapes, from the fp32 graph's MatMul writing the same tensor,
    calibrated on ``feeds`` (prefill runs of the fp32 graph). The file's layout and size do
    not change. Returns the number of MatMuls re-quantized.

    Raises:
        ValueError: a node has zero points (asymmetric: not this grid), another block size,
            or no fp32 MatMul writing its output.
    """
    import onnx
    from onnx import numpy_helper

    from ._io import save_model

    fp32 = onnx.load(str(fp32_path), load_external_data=False)
    by_output = {n.output[0]: n for n in fp32.graph.node if n.op_type == "MatMul"}
    model = onnx.load(str(int4_path))
    graph = model.graph
    targets = []
    for node in graph.node:
        if node.op_type != "MatMulNBits" or (node.output[0] == "logits" and not lm_head):
            continue
        attrs = {a.name: a.i for a in node.attribute}
        if attrs.get("bits") != 4:  # an int8 LM head (lm_head_int8) stays as it is
            continue
        if len(node.input) > 3 and node.input[3]:
            raise ValueError(f"{node.name}: has zero points; GPTQ here needs symmetric int4")
        if attrs.get("block_size") != block:
            raise ValueError(f"{node.name}: block {attrs.get('block_size')}, need {block}")
        src = by_output.get(node.output[0])
        if src is None:
            raise ValueError(f"fp32_path: no MatMul writes {node.output[0]!r}; not the same model")
        targets.append((node, src))
    del fp32
    hessians = calibration_hessians(fp32_path, sorted({s.input[0] for _, s in targets}), feeds)
    fp32 = onnx.load(str(fp32_path))
    weights = {t.name: t for t in fp32.graph.initializer}
    inits = {t.name: t for t in graph.initializer}
    for node, src in targets:
        w = numpy_helper.to_array(weights[src.input[1]])
        b, scales = gptq_int4(w, hessians[src.input[0]], block)
        old_b, old_s = inits[node.input[1]], inits[node.input[2]]
        if tuple(old_b.dims) != b.shape or int(np.prod(old_s.dims)) != scales.size:
            raise ValueError(f"{node.name}: GPTQ's B {b.shape} does not fit {list(old_b.dims)}")
        old_b.CopyFrom(numpy_helper.from_array(b, old_b.name))
        old_s.CopyFrom(numpy_helper.from_array(scales.reshape(tuple(old_s.dims)), old_s.name))
    del fp32, weights
    (int4_path.parent / (int4_path.name + ".data")).unlink(missing_ok=True)
    save_model(model, int4_path, external_data=True)
    return len(targets)
