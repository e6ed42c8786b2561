"""lora_ext.export: merged and hot-swap ONNX export of real models, checked in onnxruntime.

The MiniLM classifier carries a LoRA adapter with non-zero B (seeded), so every comparison
below would fail if the adapter were dropped, merged twice or fed to the wrong layer. The
exports are made once per module and shared by the tests that read them.
"""

from __future__ import annotations

import argparse
import copy
import os
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import lora_ext
from lora_ext.cli.export import add_export_command
from lora_ext.cli.infer import add_infer_command
from lora_ext.export import (
    OnnxRunner,
    UnsupportedModuleError,
    VerificationError,
    export_onnx,
    read_onnx_adapter,
    save_onnx_adapter,
)
from lora_ext.export.graph_passes import _constant_target
from lora_ext.export.rewrite import (
    FirstTokenLayer,
    first_token_reason,
    fold_attention_biases,
    prune_to_first_token,
)

SENTENCES = [
    "A gripping, beautifully shot film with a terrific lead performance.",
    "Dull and far too long.",
    "The plot goes nowhere, but the actors seem to be having fun.",
    "I laughed, I cried, I bought the soundtrack.",
    "An utterly forgettable sequel.",
    "Not bad at all",
]
TARGETS = ["query", "value"]


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    """max |got - ref| / max |ref|, the measure export_onnx reports."""
    ref64 = np.asarray(ref, np.float64)
    return float(np.abs(np.asarray(got, np.float64) - ref64).max() / np.abs(ref64).max())


def torch_logits(model: nn.Module, enc: dict[str, torch.Tensor]) -> np.ndarray:
    with torch.no_grad():
        return model(**enc).logits.numpy()


def adapted_classifier(base: nn.Module, seed: int, r: int = 4) -> nn.Module:
    """A copy of ``base`` with a LoRA adapter on query/value whose A and B are seeded
    non-zero; the head is scaled so the two logits are well separated (a freshly initialised
    head gives near-ties, which would make argmax comparisons meaningless)."""
    model = copy.deepcopy(base)
    lora_ext.inject_(model, lora_ext.LoraConfig(r=r, alpha=2 * r, target_modules=TARGETS))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_ext.inject.lora_layers(model):
            for table in (layer.lora_A, layer.lora_B):
                p = table["default"]
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        model.classifier.weight.mul_(30.0)
    return model.eval()


@pytest.fixture(scope="module")
def clf(minilm_classifier):
    """(adapted model, tokenizer, example inputs [2, seq])."""
    model = adapted_classifier(minilm_classifier.model, seed=0)
    tok = minilm_classifier.tokenizer
    example = dict(tok(SENTENCES[:2], padding=True, return_tensors="pt"))
    return model, tok, example


@pytest.fixture(scope="module")
def merged(clf, tmp_path_factory):
    """The merged fp32 export, with a snapshot of the model taken before it."""
    model, _, example = clf
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m).__name__ for m in model.modules()]
    path = tmp_path_factory.mktemp("merged") / "model.onnx"
    report = export_onnx(model, example, path)
    return report, before, types


@pytest.fixture(scope="module")
def hot(clf, tmp_path_factory):
    """The hot-swap export of the same model (adapter written next to it)."""
    model, _, example = clf
    path = tmp_path_factory.mktemp("hot") / "base.onnx"
    return export_onnx(model, example, path, merge=False)


@pytest.fixture(scope="module")
def encoded(clf):
    """Six sentences: another batch size and sequence length than the example."""
    _, tok, _ = clf
    return dict(tok(SENTENCES, padding=True, return_tensors="pt"))


# -- merged fp32 -----------------------------------------------------------------------
def test_merged_fp32_matches_pytorch_on_other_shapes(clf, merged, encoded):
    model, tok, example = clf
    report, _, _ = merged
    assert report.max_rel is not None and report.max_rel <= 1e-4
    shapes = {(c.batch, c.seq) for c in report.checks}
    assert len(shapes) >= 3 and tuple(example["input_ids"].shape) in shapes
    # independently of the report: a batch of 6 longer sentences through the runner
    got = OnnxRunner(report.path, tok, providers=["CPUExecutionProvider"])(SENTENCES)
    ref = torch_logits(model, encoded)
    assert got.logits.shape == (6, 2)
    assert rel_err(got.logits, ref) <= 1e-4
    assert got.labels == [model.config.id2label[int(i)] for i in ref.argmax(-1)]


def test_merged_graph_is_plain_onnx_with_named_dynamic_io(merged):
    report, _, _ = merged
    graph = onnx.load(str(report.path))
    onnx.checker.check_model(graph)
    assert {n.domain for n in graph.graph.node} <= {""}
    inputs = {
        i.name: [d.dim_param for d in i.type.tensor_type.shape.dim] for i in graph.graph.input
    }
    assert inputs == {
        n: ["batch", "sequence"] for n in ("input_ids", "token_type_ids", "attention_mask")
    }
    (out,) = graph.graph.output
    assert out.name == "logits" and out.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert not any("lora" in i.name for i in graph.graph.initializer)
    meta = {p.key: p.value for p in graph.metadata_props}
    assert meta["lora_ext.lora"] == "merged" and meta["lora_ext.task"] == "seq-cls"


def test_callers_model_is_unchanged(clf, merged):
    model, _, _ = clf
    _, before, types = merged
    assert [type(m).__name__ for m in model.modules()] == types  # still LoraLinear, unmerged
    assert all(not layer.merged for _, layer in lora_ext.inject.lora_layers(model))
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def test_the_adapter_is_in_the_merged_file(minilm_classifier, clf, merged, encoded):
    # guards the comparisons above against a no-op adapter: the base model differs clearly
    report, _, _ = merged
    base = copy.deepcopy(minilm_classifier.model)
    with torch.no_grad():
        base.classifier.weight.mul_(30.0)
    got = OnnxRunner(report.path, providers=["CPUExecutionProvider"]).run(
        {k: v.numpy() for k, v in encoded.items()}
    )
    assert rel_err(got, torch_logits(base, encoded)) > 1e-2


# -- first-token pruning of the last layer -------------------------------------------------
def _weight_shapes(path, op: str = "MatMul") -> Counter:
    """How many ``op`` nodes read a constant second input of each shape."""
    graph = onnx.load(str(path))
    dims = {i.name: tuple(i.dims) for i in graph.graph.initializer}
    return Counter(
        dims[n.input[1]] for n in graph.graph.node if n.op_type == op and n.input[1] in dims
    )


def test_merged_export_computes_the_last_layer_for_token_0_only(clf, merged, encoded, tmp_path):
    model, tok, example = clf
    report, _, _ = merged
    assert report.first_token_only
    graph = onnx.load(str(report.path))
    assert {p.key: p.value for p in graph.metadata_props}["lora_ext.first_token_only"] == "1"
    full = export_onnx(model, example, tmp_path / "full.onnx", first_token_only=False)
    assert not full.first_token_only and full.max_rel <= 1e-4
    # MiniLM-L6: 6 layers x (Q, K, V, O) [384, 384] and FFN weights in the full graph; the
    # pruned last layer keeps Q and O (one row each) and folds K and V into per-head products
    # with [12, 32, 384] weights (broadcast Mul + ReduceSum, so that every MatMul keeps a 2-D
    # weight, as int8 quantizers need), so no projection of the whole sequence is left in it
    shapes_full, shapes_pruned = _weight_shapes(full.path), _weight_shapes(report.path)
    assert shapes_full[(384, 384)] == 24 and shapes_pruned[(384, 384)] == 22
    assert {len(s) for s in shapes_pruned} == {len(s) for s in shapes_full} == {2}
    assert shapes_pruned[(384, 1536)] == shapes_full[(384, 1536)] == 6
    per_head = (12, 32, 384)
    assert _weight_shapes(full.path, "Mul")[per_head] == 0
    assert _weight_shapes(report.path, "Mul")[per_head] == 2
    # same logits on padded batches, both against PyTorch
    runs = [
        OnnxRunner(r.path, tok, providers=["CPUExecutionProvider"])(SENTENCES)
        for r in (report, full)
    ]
    ref = torch_logits(model, encoded)
    assert rel_err(runs[0].logits, ref) <= 1e-4 and rel_err(runs[1].logits, ref) <= 1e-4
    assert rel_err(runs[0].logits, runs[1].logits) <= 1e-5


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_prune_to_first_token_is_exact_with_padding(clf, encoded, attn):
    model, _, _ = clf
    work = copy.deepcopy(model)
    lora_ext.inject.merge_and_unload(work)
    work.set_attn_implementation(attn)  # eager: additive float mask; sdpa: boolean mask
    forward = lambda m, inputs: m(**inputs).logits  # noqa: E731
    reason = prune_to_first_token(work, [encoded], forward)
    assert reason is None
    assert isinstance(work.bert.encoder.layer[-1], FirstTokenLayer)
    assert work.bert.encoder.layer[-1].reassociate  # merged: plain nn.Linear K and V
    with torch.no_grad():
        got = work(**encoded)
    assert got.logits.shape == (6, 2)
    assert rel_err(got.logits.numpy(), torch_logits(model, encoded)) <= 1e-5
    # once pruned, the model no longer qualifies
    assert first_token_reason(work) == "already pruned"


def test_pruning_that_changes_the_output_is_undone(clf, encoded, tmp_path, monkeypatch):
    model, _, example = clf
    work = copy.deepcopy(model)
    original = work.bert.encoder.layer[-1]
    real_forward = FirstTokenLayer.forward
    monkeypatch.setattr(
        FirstTokenLayer, "forward", lambda self, *a, **k: real_forward(self, *a, **k) * 1.01
    )
    forward = lambda m, inputs: m(**inputs).logits  # noqa: E731
    reason = prune_to_first_token(work, [encoded], forward)
    assert reason is not None and "differ" in reason
    assert work.bert.encoder.layer[-1] is original
    with pytest.raises(ValueError, match="first_token_only=True: pruned outputs differ"):
        export_onnx(model, example, tmp_path / "m.onnx", first_token_only=True)
    assert list(tmp_path.iterdir()) == []


def test_attention_biases_fold_exactly(clf, encoded):
    model, _, _ = clf
    work = copy.deepcopy(model)
    lora_ext.inject.merge_and_unload(work)
    assert fold_attention_biases(work) == 6
    for layer in work.bert.encoder.layer:
        assert layer.attention.self.key.bias is None and layer.attention.self.value.bias is None
    assert fold_attention_biases(work) == 0  # nothing left to fold
    with torch.no_grad():
        got = work(**encoded).logits.numpy()
    assert rel_err(got, torch_logits(model, encoded)) <= 1e-5


def test_merged_graph_has_constant_reshape_targets(merged):
    graph = onnx.load(str(merged[0].path))
    inits = {i.name for i in graph.graph.initializer}
    inits |= {o for n in graph.graph.node if n.op_type == "Constant" for o in n.output}
    reshapes = [n for n in graph.graph.node if n.op_type == "Reshape" and "encoder" in n.name]
    # per attention layer: Q, K, V into heads and the context back, for the 5 full layers
    assert len(reshapes) >= 20 and all(n.input[1] in inits for n in reshapes)
    # shape arithmetic is left only outside the layers (embeddings, mask construction)
    assert not any(n.op_type == "Shape" and "/encoder/" in n.name for n in graph.graph.node)


@pytest.mark.parametrize(
    "src,dst,target",
    [
        (["batch", "sequence", 384], ["batch", "sequence", 12, 32], [0, 0, 12, 32]),
        (["batch", "sequence", 12, 32], ["batch", "sequence", 384], [0, 0, 384]),
        (["batch", "sequence", 384], ["batch*sequence", 384], [-1, 384]),
        (["batch", "sequence", 384], ["sequence", "batch", 384], None),  # two unknowns
        (["batch", None, 384], ["batch", None, 12, 32], [0, -1, 12, 32]),
    ],
)
def test_constant_reshape_target(src, dst, target):
    assert _constant_target(src, dst) == target


def test_export_writes_nothing_into_the_working_directory(clf, tmp_path, monkeypatch):
    # onnxruntime's symbolic shape inference saves sym_shape_infer_temp.onnx and a copy of
    # the weights into the current directory when a shape stays unknown (as in the hot-swap
    # graph, whose LoRA inputs have a dynamic rank)
    model, _, example = clf
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    report = export_onnx(model, example, tmp_path / "hot.onnx", merge=False)
    assert report.max_rel <= 1e-4
    assert list(cwd.iterdir()) == []


@pytest.mark.parametrize(
    "family,prunes",
    [
        ("Bert", True),
        ("Roberta", True),
        ("XLMRoberta", True),
        ("Camembert", True),
        ("Electra", True),
        ("DistilBert", False),  # other layer structure: exported in full
    ],
)
def test_first_token_pruning_across_encoder_families(family, prunes, tmp_path):
    """Tiny random models of each family (built from a config, nothing downloaded), padded
    batch: pruned where the family qualifies, verified against PyTorch either way."""
    import transformers

    torch.manual_seed(0)
    config_cls = getattr(transformers, f"{family}Config")
    if family == "DistilBert":
        config = config_cls(vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64)
    else:
        config = config_cls(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
            **({"embedding_size": 32} if family == "Electra" else {}),
        )
    config.num_labels = 3
    model = getattr(transformers, f"{family}ForSequenceClassification")(config).eval()
    ids = torch.randint(3, 100, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    report = export_onnx(model, {"input_ids": ids, "attention_mask": mask}, tmp_path / "m.onnx")
    assert report.first_token_only == prunes
    assert report.max_rel <= 1e-5


def test_first_token_only_true_needs_a_qualifying_model(minilm_classifier, tmp_path):
    progress: list[str] = []
    with pytest.raises(ValueError, match="does not qualify: BertModel is not a classifier"):
        export_onnx(
            minilm_classifier.model.bert,
            minilm_classifier.inputs,
            tmp_path / "m.onnx",
            first_token_only=True,
            log=progress.append,
        )
    assert progress == []  # refused before any work


# -- fp16 / int8 ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,max_size_ratio",
    [({"dtype": "fp16"}, 0.55), ({"quantize": "int8", "ort_format": True}, 0.29)],
    ids=["fp16", "int8+ort"],
)
def test_fp16_int8_run_and_agree(clf, merged, encoded, tmp_path, kwargs, max_size_ratio):
    model, tok, example = clf
    fp32, _, _ = merged
    report = export_onnx(model, example, tmp_path / "m.onnx", **kwargs)
    assert report.path.is_file()
    assert report.size_bytes <= max_size_ratio * fp32.size_bytes
    feeds = {k: v.numpy() for k, v in encoded.items()}
    ref = OnnxRunner(fp32.path, providers=["CPUExecutionProvider"]).run(feeds)
    files = [report.path]
    if "ort_format" in kwargs:
        assert report.ort_path is not None and report.ort_path.suffix == ".ort"
        files.append(report.ort_path)
    for path in files:
        got = OnnxRunner(path, providers=["CPUExecutionProvider"]).run(feeds)
        assert np.isfinite(got).all()
        err = np.abs(got - ref).max()
        margin = np.abs(ref[:, 0] - ref[:, 1])
        # argmax must agree wherever fp32's margin exceeds twice the variant's error
        decided = margin > 2 * err
        assert decided.sum() >= 4, f"{path.name}: too few decided sentences for a real check"
        assert (got.argmax(-1) == ref.argmax(-1))[decided].all(), path.name


# -- int8: smoothing calibrated on real text, embeddings per column ------------------------
@pytest.fixture(scope="module")
def rt_texts():
    """(64 training-split, 48 validation-split) Rotten Tomatoes snippets, lora_ext.training.trainer's
    split: calibration never sees the sentences the int8 error is measured on."""
    from lora_ext.training import data as D

    split = D.split_dataset(D.load_rotten_tomatoes(), val_fraction=0.1, seed=0)
    return split.train.texts[:64], split.val.texts[:48]


def _one_by_one(tok, texts):
    return [dict(tok(t, truncation=True, max_length=128, return_tensors="pt")) for t in texts]


def _margins(path, tok, texts):
    """logit[1] - logit[0] per text, one run each (as the benchmark runs them)."""
    runner = OnnxRunner(path, providers=["CPUExecutionProvider"])
    out = [runner.run({k: v.numpy() for k, v in enc.items()}) for enc in _one_by_one(tok, texts)]
    logits = np.concatenate(out)
    return logits[:, 1] - logits[:, 0]


def test_int8_calibration_smooths_and_cuts_the_error(clf, merged, rt_texts, tmp_path):
    model, tok, example = clf
    calib_texts, held_out = rt_texts
    calibrated = export_onnx(
        model,
        example,
        tmp_path / "cal.onnx",
        quantize="int8",
        calibration=_one_by_one(tok, calib_texts),
    )
    plain = export_onnx(model, example, tmp_path / "plain.onnx", quantize="int8")
    info = calibrated.int8
    assert info["calibration_runs"] == len(calib_texts) and plain.int8["calibration_runs"] == 0
    assert info["smoothed"] and not plain.int8["smoothed"]
    # MiniLM's outlier channels sit in every FFN input: each of the five full layers' must
    # have been smoothed (the last layer's, one row of token 0, is smoothed where that pays),
    # and each smoothing must at least halve its simulated error
    ffn_in = [
        k
        for k in info["smoothed"]
        if k.endswith("attention/output/LayerNorm/LayerNormalization_output_0")
    ]
    assert {f"layer.{i}/" for i in range(5)} <= {k.split("/")[4] + "/" for k in ffn_in}
    assert all(v["error"] * 2 <= v["error_unsmoothed"] for v in info["smoothed"].values())
    graph = onnx.load(str(calibrated.path))
    smooth_muls = [n for n in graph.graph.node if n.op_type == "Mul" and n.name.endswith("_smooth")]
    assert len(smooth_muls) == len(info["smoothed"])
    assert {p.key: p.value for p in graph.metadata_props}["lora_ext.variant"] == "int8"
    # on held-out validation snippets: calibrated int8 is clearly closer to fp32
    ref = _margins(merged[0].path, tok, held_out)
    err_cal = np.abs(_margins(calibrated.path, tok, held_out) - ref).mean()
    err_plain = np.abs(_margins(plain.path, tok, held_out) - ref).mean()
    assert err_cal <= 0.8 * err_plain, (err_cal, err_plain)  # measured: 0.040 vs 0.062
    assert calibrated.size_bytes <= 0.29 * merged[0].size_bytes


def test_fused_int8_smooths_attention_and_keeps_embeddings_per_column(
    clf, merged, rt_texts, tmp_path
):
    model, tok, example = clf
    calib_texts, held_out = rt_texts
    report = export_onnx(
        model,
        example,
        tmp_path / "fused8.onnx",
        quantize="int8",
        optimize="bert",
        calibration=_one_by_one(tok, calib_texts[:16]),
    )
    # every layer's attention but the last's (token 0 only)
    assert report.fused_ops["Attention"] == 5 and not report.fused_ops.get(
        "EmbedLayerNormalization"
    )
    graph = onnx.load(str(report.path))
    producers = {o: n for n in graph.graph.node for o in n.output}
    qattn = [n for n in graph.graph.node if n.op_type == "QAttention"]
    assert len(qattn) == 5  # the fused QKV weights in int8 ...
    # QAttention reads DynamicQuantizeLinear(x); x comes from the smoothing Mul
    quantized_from = [producers[producers[n.input[0]].input[0]] for n in qattn]
    smoothed = [n for n in quantized_from if n.op_type == "Mul" and n.name.endswith("_smooth")]
    assert smoothed  # ... fed through a smoothing Mul where calibration asked for one
    assert len(report.int8["embeddings"]) == 2  # words and positions, per column
    ref = _margins(merged[0].path, tok, held_out[:24])
    got = _margins(report.path, tok, held_out[:24])
    decided = np.abs(ref) > 2 * np.abs(got - ref).max()
    assert decided.sum() >= 12 and (np.sign(got) == np.sign(ref))[decided].all()


def test_smoothing_is_exact_in_float(clf, merged, rt_texts, tmp_path):
    from lora_ext.export.quantize import smooth_activations

    _, tok, _ = clf
    calib_texts, held_out = rt_texts
    graph = onnx.load(str(merged[0].path))
    before = {i.name: onnx.numpy_helper.to_array(i) for i in graph.graph.initializer}
    feeds = [{k: v.numpy() for k, v in enc.items()} for enc in _one_by_one(tok, calib_texts[:16])]
    smoothed, done = smooth_activations(graph, feeds, tmp_path)
    assert done
    changed = [
        i.name
        for i in smoothed.graph.initializer
        if i.name in before and not np.array_equal(onnx.numpy_helper.to_array(i), before[i.name])
    ]
    assert len(changed) >= len(done)  # every smoothed input rescaled its MatMul weights
    onnx.save(smoothed, str(tmp_path / "smoothed.onnx"))
    # X W = (X / s)(s W): in float the smoothed graph computes the same logits
    enc = {
        k: v.astype(np.int64)
        for k, v in tok(held_out[:8], padding=True, return_tensors="np").items()
    }
    ref = OnnxRunner(merged[0].path, providers=["CPUExecutionProvider"]).run(enc)
    got = OnnxRunner(tmp_path / "smoothed.onnx", providers=["CPUExecutionProvider"]).run(enc)
    assert rel_err(got, ref) <= 1e-5


def test_embeddings_are_int8_per_column(merged, tmp_path):
    from lora_ext.export.quantize import quantize_embeddings

    graph = onnx.load(str(merged[0].path))
    table = next(
        onnx.numpy_helper.to_array(i)
        for i in graph.graph.initializer
        if i.name.endswith("word_embeddings.weight")
    )
    done = quantize_embeddings(graph)
    # the word (30522 x 384) and position (512 x 384) tables; token types (2 x 384) stay
    assert sorted(n.rsplit(".", 2)[-2] for n in done) == ["position_embeddings", "word_embeddings"]
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.graph.initializer}
    name = next(n for n in done if "word" in n)
    assert name not in inits and inits[f"{name}_int8"].dtype == np.int8
    scale = inits[f"{name}_scale"]
    assert scale.shape == (table.shape[1],)  # one scale per hidden dimension
    restored = inits[f"{name}_int8"].astype(np.float32) * scale
    assert (np.abs(restored - table) <= scale / 2 + 1e-7).all()
    # dequantized after the lookup by Cast + Mul with the [hidden] scale (DequantizeLinear
    # with zero point 0, in ops every runtime and opset has)
    dq = [n for n in graph.graph.node if n.op_type == "Mul" and n.input[1].endswith("_scale")]
    assert len(dq) == 2 and all(inits[n.input[1]].shape == scale.shape for n in dq)
    producers = {o: n for n in graph.graph.node for o in n.output}
    assert all(producers[n.input[0]].op_type == "Cast" for n in dq)


def test_calibration_arguments_are_checked(minilm_classifier, tmp_path):
    model, inputs = minilm_classifier.model, minilm_classifier.inputs
    path = tmp_path / "m.onnx"
    with pytest.raises(ValueError, match="calibration: only used by quantize='int8'"):
        export_onnx(model, inputs, path, calibration=[inputs])
    with pytest.raises(TypeError, match="calibration: got one mapping"):
        export_onnx(model, inputs, path, quantize="int8", calibration=inputs)
    partial = {"input_ids": inputs["input_ids"]}
    with pytest.raises(
        ValueError, match=r"calibration\[0\]: missing input\(s\) \['token_type_ids'"
    ):
        export_onnx(model, inputs, path, quantize="int8", calibration=[partial])
    assert list(tmp_path.iterdir()) == []


def test_cli_calibration_comes_from_the_adapters_run(clf, tmp_path):
    from lora_ext.cli.export import calibration_inputs
    from lora_ext.training import data as D

    _, tok, _ = clf
    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    assert calibration_inputs(tok, None, str(adapter), 4, say=lambda m: None) is None
    (tmp_path / "run" / "run.json").write_text(
        '{"config": {"data": "rotten-tomatoes", "val_fraction": 0.1, "seed": 0}}'
    )
    feeds = calibration_inputs(tok, None, str(adapter), 4, say=lambda m: None)
    train = D.split_dataset(D.load_rotten_tomatoes(), val_fraction=0.1, seed=0).train.texts
    assert [len(f["input_ids"]) for f in feeds] == [1, 1, 2]  # 2 single runs, 1 padded batch
    for enc, text in zip(feeds, train[:2]):  # the training split, one unpadded run per text
        assert (
            enc["input_ids"][0].tolist() == tok(text, truncation=True, max_length=128)["input_ids"]
        )
    with pytest.raises(ValueError, match="--calibration-samples: got 0"):
        calibration_inputs(tok, "rotten-tomatoes", None, 0)


@pytest.mark.parametrize(
    "n_texts,batch,sizes",
    [(1, 16, [1]), (5, 2, [1, 1, 1, 2]), (8, 16, [1, 1, 1, 1, 4]), (40, 16, [1] * 20 + [16, 4])],
)
def test_calibration_runs_mix_single_and_padded_batches(clf, n_texts, batch, sizes):
    from lora_ext.export import calibration_runs

    _, tok, _ = clf
    texts = [f"review number {i} " + "good " * i for i in range(n_texts)]
    runs = calibration_runs(tok, texts, batch=batch)
    assert [r["input_ids"].shape[0] for r in runs] == sizes
    for run in runs:
        assert run["input_ids"].shape == run["attention_mask"].shape
    padded = [r for r in runs if r["input_ids"].shape[0] > 1]
    assert all((r["attention_mask"] == 0).any() for r in padded)  # ragged texts: real padding


def test_calibration_runs_bad_input(clf):
    from lora_ext.export import calibration_runs

    _, tok, _ = clf
    with pytest.raises(ValueError, match="calibration texts: got none"):
        calibration_runs(tok, ["", "  "])
    with pytest.raises(ValueError, match="batch: got 0"):
        calibration_runs(tok, ["a film"], batch=0)


# -- fused (optimize="bert") ---------------------------------------------------------------
def test_optimize_bert_fuses_verifies_and_agrees(clf, merged, encoded, tmp_path):
    model, tok, example = clf
    attn = model.config._attn_implementation
    report = export_onnx(model, example, tmp_path / "fused.onnx", optimize="bert")
    assert model.config._attn_implementation == attn  # only the copy went eager
    assert report.max_rel is not None and report.max_rel <= 1e-4
    # MiniLM-L6: the attention of every layer but the last (token 0 only, not the fused
    # pattern), both residual LayerNorms and the FFN GELU fused
    assert report.first_token_only
    assert report.fused_ops == {
        "EmbedLayerNormalization": 1,
        "Attention": 5,
        "BiasGelu": 6,
        "SkipLayerNormalization": 12,
    }
    graph = onnx.load(str(report.path))
    ops = {(n.domain, n.op_type) for n in graph.graph.node}
    assert ("com.microsoft", "Attention") in ops
    assert sum(n.op_type == "Softmax" for n in graph.graph.node) == 1  # the last layer's
    assert {p.key: p.value for p in graph.metadata_props}["lora_ext.optimize"] == "bert"
    # independently of the report: 6 longer sentences, vs PyTorch and the plain export
    got = OnnxRunner(report.path, tok, providers=["CPUExecutionProvider"])(SENTENCES)
    ref = torch_logits(model, encoded)
    assert rel_err(got.logits, ref) <= 1e-4
    assert (got.logits.argmax(-1) == ref.argmax(-1)).all()
    plain = OnnxRunner(merged[0].path, tok, providers=["CPUExecutionProvider"])(SENTENCES)
    assert got.labels == plain.labels


# -- adapter hot-swap ----------------------------------------------------------------------
def test_hot_swap_equals_merged_export(clf, merged, hot, encoded):
    _, tok, _ = clf
    assert hot.adapter_path is not None and hot.adapter_path.suffix == ".onnx_adapter"
    assert len(hot.lora_inputs) == 2 * 6 * len(TARGETS)
    runner = OnnxRunner(hot.path, tok, providers=["CPUExecutionProvider"], adapter=hot.adapter_path)
    merged_out = OnnxRunner(merged[0].path, tok, providers=["CPUExecutionProvider"])(SENTENCES)
    assert rel_err(runner(SENTENCES).logits, merged_out.logits) <= 1e-4


def test_hot_swap_inputs_follow_ort_naming_and_default_to_base(
    minilm_classifier, clf, hot, encoded
):
    graph = onnx.load(str(hot.path))
    inits = {i.name: list(i.dims) for i in graph.graph.initializer}
    name_a = "bert.encoder.layer.0.attention.self.query.lora_A.weight"
    name_b = "bert.encoder.layer.0.attention.self.query.lora_B.weight"
    shapes = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
        for i in graph.graph.input
    }
    assert shapes[name_a] == [384, "lora_r"] and shapes[name_b] == ["lora_r", 384]
    assert inits[name_a] == [384, 0] and inits[name_b] == [0, 384]  # rank-0 defaults
    # no adapter fed: the base model
    base = copy.deepcopy(minilm_classifier.model)
    with torch.no_grad():
        base.classifier.weight.mul_(30.0)
    runner = OnnxRunner(hot.path, providers=["CPUExecutionProvider"])
    got = runner.run({k: v.numpy() for k, v in encoded.items()})
    assert rel_err(got, torch_logits(base, encoded)) <= 1e-4


def test_hot_swap_serves_another_adapter_of_another_rank(
    minilm_classifier, clf, hot, encoded, tmp_path
):
    _, tok, _ = clf
    other = adapted_classifier(minilm_classifier.model, seed=1, r=8)
    path = save_onnx_adapter(other, tmp_path / "other.onnx_adapter")
    tensors = read_onnx_adapter(path)
    assert tensors["bert.encoder.layer.0.attention.self.value.lora_A.weight"].shape == (384, 8)
    runner = OnnxRunner(hot.path, tok, providers=["CPUExecutionProvider"], adapter=path)
    assert rel_err(runner(SENTENCES).logits, torch_logits(other, encoded)) <= 1e-4
    runner.set_adapter(hot.adapter_path)  # swap back without reloading the model
    first = torch_logits(clf[0], encoded)
    assert rel_err(runner(SENTENCES).logits, first) <= 1e-4


def test_runner_rejects_an_adapter_for_other_layers(minilm_classifier, hot, tmp_path):
    model = copy.deepcopy(minilm_classifier.model)
    lora_ext.inject_(model, lora_ext.LoraConfig(r=2, target_modules=["key"]))
    path = save_onnx_adapter(model, tmp_path / "key.onnx_adapter")
    with pytest.raises(
        ValueError,
        match=r"'bert\.encoder\.layer\.0\.attention\.self\.key\.lora_A\.weight', which is not a LoRA input",
    ):
        OnnxRunner(hot.path, providers=["CPUExecutionProvider"], adapter=path)


# -- atomic write and bad input ----------------------------------------------------------
def test_failed_verify_leaves_no_file_and_keeps_an_earlier_one(clf, tmp_path):
    model, _, example = clf
    earlier = tmp_path / "kept.onnx"
    earlier.write_bytes(b"earlier export")
    fresh = tmp_path / "fresh.onnx"
    for path in (earlier, fresh):
        # merged fp32 is ~1e-6 off the unmerged PyTorch model: a 1e-9 tolerance must fail,
        # and say by how much
        with pytest.raises(
            VerificationError, match=r"max relative error \d\.\d+e-0[5-8] .* > tolerance 1\.0e-09"
        ):
            export_onnx(model, example, path, tolerance=1e-9)
    assert earlier.read_bytes() == b"earlier export"
    assert not fresh.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.onnx"]  # no temp files left


@pytest.mark.parametrize("case", ["missing", "not-a-dir", "read-only"])
def test_bad_output_dir_fails_before_any_work(clf, tmp_path, case):
    model, _, example = clf
    if case == "missing":
        path, error = tmp_path / "nope" / "m.onnx", FileNotFoundError
    elif case == "not-a-dir":
        (tmp_path / "file").write_text("x")
        path, error = tmp_path / "file" / "m.onnx", NotADirectoryError
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only directories")
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        path, error = ro / "m.onnx", PermissionError
    progress: list[str] = []
    with pytest.raises(error, match=str(path.parent)):
        export_onnx(model, example, path, log=progress.append)
    assert progress == []  # nothing was copied, traced or exported


class _Twice(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.lora_ext_test.twice(x)


@torch.library.custom_op("lora_ext_test::twice", mutates_args=())
def _twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


def test_unsupported_module_is_named(clf, tmp_path):
    model, _, example = clf
    model = copy.deepcopy(model)
    model.bert.encoder.layer[1].intermediate.intermediate_act_fn = _Twice()
    with pytest.raises(
        UnsupportedModuleError,
        match=r"'bert\.encoder\.layer\.1\.intermediate\.intermediate_act_fn' \(_Twice\) calls lora_ext_test::twice",
    ):
        export_onnx(model, example, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_hot_swap_needs_lora_layers(minilm_classifier, tmp_path):
    with pytest.raises(ValueError, match="merge=False: the model has no LoRA layers"):
        export_onnx(
            minilm_classifier.model, minilm_classifier.inputs, tmp_path / "m.onnx", merge=False
        )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"dtype": "bf16"}, "dtype: got 'bf16'"),
        ({"quantize": "int4"}, "quantize: got 'int4'"),
        ({"dtype": "fp16", "quantize": "int8"}, "needs dtype='fp32'"),
        ({"optimize": "gpt2"}, "optimize: got 'gpt2'"),
        ({"optimize": "bert", "dtype": "fp16"}, "optimize='bert' needs dtype='fp32'"),
        ({"first_token_only": "yes"}, "first_token_only: got 'yes'"),
    ],
)
def test_bad_arguments_are_named(minilm_classifier, tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        export_onnx(
            minilm_classifier.model, minilm_classifier.inputs, tmp_path / "m.onnx", **kwargs
        )


def test_external_data_plain_model(minilm_classifier, tmp_path):
    report = export_onnx(
        minilm_classifier.model,
        minilm_classifier.inputs,
        tmp_path / "base.onnx",
        external_data=True,
    )
    assert report.external_data and report.max_rel <= 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.onnx", "base.onnx.data"]
    assert (tmp_path / "base.onnx").stat().st_size < 1_000_000  # weights are in the .data file


# -- SmolLM2 causal LM -------------------------------------------------------------------
def _truncated_smollm2(smollm2, layers: int) -> nn.Module:
    model = copy.deepcopy(smollm2.model)
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    return model.eval()


def test_smollm2_one_layer_causal_lm_logits(smollm2, tmp_path):
    """SmolLM2's real weights, first decoder layer only (keeps the test fast): merged LoRA on
    q/v, logits [batch, seq, vocab] with dynamic batch and sequence."""
    model = _truncated_smollm2(smollm2, 1)
    lora_ext.inject_(model, lora_ext.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in lora_ext.inject.lora_layers(model):
            layer.lora_B["default"].copy_(
                torch.randn(layer.lora_B["default"].shape, generator=g) * 0.05
            )
    tok = smollm2.tokenizer
    example = dict(tok(["The capital of France is", "Hi"], padding=True, return_tensors="pt"))
    report = export_onnx(model, example, tmp_path / "lm.onnx")
    assert report.max_rel <= 1e-4
    graph = onnx.load(str(report.path), load_external_data=False)
    (out,) = graph.graph.output
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == [
        "batch",
        "sequence",
        model.config.vocab_size,
    ]
    runner = OnnxRunner(report.path, tok, providers=["CPUExecutionProvider"])
    enc = dict(tok(["Once upon a time there was", "A"], padding=True, return_tensors="pt"))
    with torch.no_grad():
        ref = model(**enc, use_cache=False).logits.numpy()
    got = runner(["Once upon a time there was", "A"])
    assert rel_err(got.logits, ref) <= 1e-4
    last = enc["attention_mask"].sum(1) - 1
    assert got.labels == [int(ref[i, last[i]].argmax()) for i in range(2)]


@pytest.mark.slow
def test_smollm2_full_causal_lm_export(smollm2, tmp_path):
    tok = smollm2.tokenizer
    example = dict(tok(["The capital of France is", "Hi"], padding=True, return_tensors="pt"))
    report = export_onnx(smollm2.model, example, tmp_path / "lm.onnx", verify_shapes=[(1, 7)])
    assert report.max_rel <= 1e-4
    runner = OnnxRunner(report.path, tok, providers=["CPUExecutionProvider"])
    assert "Paris" in runner.generate("The capital of France is", max_new_tokens=4)


# -- CLI ---------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-ext")
    sub = parser.add_subparsers(dest="command", required=True)
    add_export_command(sub)
    add_infer_command(sub)
    return parser


def test_cli_export_and_infer(clf, tmp_path, capsys):
    model, tok, _ = clf
    adapter = lora_ext.save_adapter(model, tmp_path / "adapter")
    # the head is part of what the adapter changes: keep it with the model dir instead
    model_dir = tmp_path / "base"
    base = copy.deepcopy(model)
    for name, layer in lora_ext.inject.lora_layers(base):
        parent, _, child = name.rpartition(".")
        setattr(base.get_submodule(parent), child, layer.base_layer)
    base.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = tmp_path / "onnx" / "model.onnx"
    out.parent.mkdir()
    args = _parser().parse_args(
        ["export", "--model", str(model_dir), "--adapter", str(adapter), "--out", str(out)]
    )
    assert args.func(args) == 0
    table = capsys.readouterr().out
    assert "verify vs PyTorch" in table and "merged LoRA layers: 12" in table
    assert "last layer computes token 0 only" in table
    full = tmp_path / "onnx" / "full.onnx"
    args = _parser().parse_args(
        ["export", "--model", str(model_dir), "--adapter", str(adapter), "--out", str(full)]
        + ["--all-positions"]
    )
    assert args.func(args) == 0
    assert "token 0 only" not in capsys.readouterr().out
    args = _parser().parse_args(["infer", "--onnx", str(out), *SENTENCES[:3]])
    assert args.func(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    ref = torch_logits(model, dict(tok(SENTENCES[:3], padding=True, return_tensors="pt")))
    assert [line.split()[-2] for line in lines] == [
        model.config.id2label[int(i)] for i in ref.argmax(-1)
    ]


def test_cli_export_bad_out_dir_fails_fast(tmp_path, capsys):
    # a missing directory is created (test_export_hardening.py); a file in the way is not
    (tmp_path / "x").write_text("a file")
    args = _parser().parse_args(
        ["export", "--model", "minilm", "--out", str(tmp_path / "x" / "m.onnx")]
    )
    assert args.func(args) == 1
    err = capsys.readouterr().err
    assert "--out: " in err and "is not a directory" in err and "loading" not in err


def test_tied_embedding_is_stored_once(tmp_path):
    """GPT-2 ties its LM head to the token embedding: the fp32 file stores the table once
    (the head reads Transpose(table)) and still matches PyTorch (export_onnx verifies)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from lora_ext.training import models

    model = models.tiny_gpt2()
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    ids = torch.randint(0, 512, (2, 9))
    report = export_onnx(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                         tmp_path / "lm.onnx")  # fmt: skip
    assert report.max_rel <= 1e-4
    graph = onnx.load(str(report.path)).graph
    table = model.transformer.wte.weight.detach().numpy()
    copies = [
        t.name for t in graph.initializer
        if sorted(t.dims) == sorted(table.shape)
        and (np.array_equal(numpy_helper.to_array(t), table)
             or np.array_equal(numpy_helper.to_array(t), table.T))
    ]  # fmt: skip
    assert len(copies) == 1, copies
    assert any(n.op_type == "Transpose" and n.input[0] == copies[0] for n in graph.node)
