"""Exact clean-ups of the traced ONNX graph that onnxruntime does not do itself.

``constant_reshapes``: the TorchScript exporter turns every ``x.view(*h.shape[:-1], -1, d)``
of a transformers model into a Reshape whose target shape is computed at run time
(Shape -> Gather -> Unsqueeze -> Concat, about 4 tiny ops per Reshape, ~15 per attention
layer). ONNX's Reshape copies a dimension from its input when the target says 0, so where
symbolic shape inference shows that the output's leading dimensions *are* the input's (the
same "batch" / "sequence" symbols), the target becomes a constant such as [0, 0, 12, 32] and
the shape arithmetic disappears. Nothing numeric changes; the export's verification runs
the rewritten graph on inputs of other batch and sequence sizes as always.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import numpy_helper

logger = logging.getLogger("lora_ext.export")


def _dims(value: onnx.ValueInfoProto) -> list[int | str | None]:
    """A value's dimensions: int, symbol, or None where unknown."""
    out: list[int | str | None] = []
    for d in value.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append(None)
    return out


def _constant_target(src: list[int | str | None], dst: list[int | str | None]) -> list[int] | None:
    """A constant Reshape target (0 = copy the input's dim, -1 = infer) that turns a tensor
    of dims ``src`` into one of dims ``dst``, or None if the dims do not pin one down."""
    target: list[int] = []
    inferred = False
    for i, d in enumerate(dst):
        if isinstance(d, int) and d > 0:
            target.append(d)
        elif isinstance(d, str) and i < len(src) and src[i] == d:
            target.append(0)
        elif not inferred:
            target.append(-1)
            inferred = True
        else:
            return None
    return target


def _names_read(graph: onnx.GraphProto) -> set[str]:
    """Every value a node of ``graph`` or of its subgraphs (If/Loop bodies, which may read
    outer values by name) reads, and the graph's outputs."""
    used = {o.name for o in graph.output}
    for node in graph.node:
        used.update(node.input)
        for attr in node.attribute:
            for sub in (*([attr.g] if attr.HasField("g") else []), *attr.graphs):
                used |= _names_read(sub)
    return used


def _remove_dead_nodes(model: onnx.ModelProto) -> int:
    """Drop top-level nodes none of whose outputs is read (by a node, a subgraph or a graph
    output)."""
    graph = model.graph
    removed = 0
    while True:
        used = _names_read(graph)
        dead = [n for n in graph.node if not any(o in used for o in n.output if o)]
        if not dead:
            return removed
        for node in dead:
            graph.node.remove(node)
        removed += len(dead)


def symbolic_shapes(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """``model`` with symbolic shapes inferred by onnxruntime's SymbolicShapeInference, as
    far as it gets (None if it fails outright).

    Its public ``infer_shapes`` saves the model (weights included) to
    ``sym_shape_infer_temp.onnx`` in the current directory whenever some shape stays
    unknown, so the same steps are run here without that: a partial result still gives the
    shapes it found. ``auto_merge``: dims that must match for an op to be valid (e.g.
    "sequence" and the position table's "Min(512, sequence)") are taken as equal, as they
    are at run time.
    """
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        inference = SymbolicShapeInference(2**31 - 1, True, False, 0)
        inference._preprocess(model)
        while inference.run_:
            inference._infer_impl()
        inference._update_output_from_vi()
        return inference.out_mp_
    except Exception as exc:  # an op or a version it does not know: keep the graph as is
        logger.debug("constant_reshapes: symbolic shape inference failed: %s", exc)
        return None


def constant_reshapes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Replace run-time-computed Reshape targets by constants where symbolic shapes allow
    (see the module docstring). Returns (the model, how many Reshapes were rewritten); the
    model is returned unchanged when shape inference fails on it."""
    inferred = symbolic_shapes(model)
    if inferred is None:
        return model, 0
    g = inferred.graph
    shapes = {v.name: _dims(v) for v in (*g.value_info, *g.input, *g.output)}
    constant = {i.name for i in model.graph.initializer}
    constant |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    rewritten = 0
    for node in model.graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2 or node.input[1] in constant:
            continue
        if any(a.name == "allowzero" and a.i for a in node.attribute):
            continue
        src, dst = shapes.get(node.input[0]), shapes.get(node.output[0])
        if not src or not dst:
            continue
        target = _constant_target(src, dst)
        # only when something is copied from the input: a fully constant target would
        # mean the shape inference pinned a dynamic axis to one size
        if target is None or 0 not in target:
            continue
        name = f"{node.name or node.output[0]}/constant_shape"
        model.graph.initializer.append(
            numpy_helper.from_array(np.array(target, dtype=np.int64), name)
        )
        node.input[1] = name
        rewritten += 1
    if rewritten:
        _remove_dead_nodes(model)
    return model, rewritten


def share_tied_weights(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Store a tied embedding once: torch.onnx writes a tied LM head as a second initializer
    ``Wᵀ`` [hidden, vocab] beside the embedding table ``W`` [vocab, hidden] its Gather reads.
    A MatMul whose weight equals, bit for bit, the transpose of a Gather's table reads
    ``Transpose(table)`` instead and the copy is dropped (onnxruntime folds the Transpose of a
    constant when the session loads, so the runtime cost is unchanged). Exact; in place.

    Returns:
        (model, number of weights now shared).
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    tables = {
        n.input[0]
        for n in graph.node
        if n.op_type == "Gather"
        and n.input
        and n.input[0] in inits
        and len(inits[n.input[0]].dims) == 2
    }
    by_shape: dict[tuple[int, int], list[str]] = {}
    for name in tables:
        rows, cols = inits[name].dims
        by_shape.setdefault((cols, rows), []).append(name)  # the transposed shape
    shared = 0
    transposed: dict[str, str] = {}
    for node in list(graph.node):
        if node.op_type != "MatMul" or len(node.input) != 2 or node.input[1] not in inits:
            continue
        weight = inits[node.input[1]]
        candidates = by_shape.get(tuple(weight.dims), []) if len(weight.dims) == 2 else []
        if not candidates:
            continue
        w = numpy_helper.to_array(weight)
        for table in candidates:
            if inits[table].data_type != weight.data_type:
                continue
            if not np.array_equal(numpy_helper.to_array(inits[table]).T, w):
                continue
            if table not in transposed:
                out = f"{table}.transposed"
                graph.node.insert(
                    0, onnx.helper.make_node("Transpose", [table], [out], perm=[1, 0], name=out)
                )
                transposed[table] = out
            node.input[1] = transposed[table]
            shared += 1
            break
    if shared:
        used = _names_read(graph)
        for t in [t for t in graph.initializer if t.name not in used]:
            graph.initializer.remove(t)
    return model, shared
