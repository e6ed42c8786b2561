"""The exported classifier in runtimes nobody here wrote: onnxruntime, onnx's
ReferenceEvaluator, OpenVINO (PyPI ``openvino``) and tract (PyPI ``tract``) load the default
fp32 and int8 exports of the MiniLM classifier and agree with onnxruntime's argmax on real
sentences; onnxruntime's own ``quantize_dynamic(per_channel=True)`` quantizes the fp32
export into a file that runs.

The two files are exported once per module, with the inputs ``lora-ext export`` and
``lora-ext train --export`` trace (input_ids, attention_mask).
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch

import lora_ext
from lora_ext.cli.export import example_inputs
from lora_ext.export import export_onnx

SENTENCES = [
    "A gripping, beautifully shot film with a terrific lead performance.",
    "Dull and far too long.",
    "The plot goes nowhere, but the actors seem to be having fun.",
    "I laughed, I cried, I bought the soundtrack.",
    "An utterly forgettable sequel.",
    "Not bad at all",
]


# the sentiment of SENTENCES (1 = positive): the head is fitted to it below
LABELS = [1, 0, 1, 1, 0, 1]


@pytest.fixture(scope="module")
def model_and_tokenizer(minilm_classifier):
    """MiniLM with a seeded LoRA adapter (non-zero B) and a head fitted (least squares on
    the pooled outputs) to give SENTENCES their labels with logits +-3: both labels occur
    and every row is decided, so argmax comparisons mean something (a fresh random head
    gives near-ties and one label)."""
    model = copy.deepcopy(minilm_classifier.model)
    tok = minilm_classifier.tokenizer
    lora_ext.inject_(model, lora_ext.LoraConfig(r=4, alpha=8, target_modules=["query", "value"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in lora_ext.inject.lora_layers(model):
            for table in (layer.lora_A, layer.lora_B):
                p = table["default"]
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        enc = dict(tok(SENTENCES, padding=True, return_tensors="pt"))
        pooled = model.bert(**enc).pooler_output.double()  # [6, hidden]
        target = torch.tensor([[-3.0, 3.0] if y else [3.0, -3.0] for y in LABELS]).double()
        gram = pooled @ pooled.T + 1e-6 * torch.eye(len(SENTENCES), dtype=torch.float64)
        weight = (pooled.T @ torch.linalg.solve(gram, target)).T  # [2, hidden]
        model.classifier.weight.copy_(weight.float())
        model.classifier.bias.zero_()
    return model.eval(), tok


@pytest.fixture(scope="module")
def exports(model_and_tokenizer, tmp_path_factory):
    """{"fp32": path, "int8": path}: the default exports (opset 17, first-token last layer)."""
    model, tok = model_and_tokenizer
    example = example_inputs(tok)
    out = tmp_path_factory.mktemp("runtimes")
    fp32 = export_onnx(model, example, out / "model.onnx")
    int8 = export_onnx(model, example, out / "model.int8.onnx", quantize="int8")
    assert fp32.first_token_only and int8.first_token_only
    return {"fp32": fp32.path, "int8": int8.path}


@pytest.fixture(scope="module")
def feeds(model_and_tokenizer):
    _, tok = model_and_tokenizer
    enc = tok(SENTENCES, padding=True, return_tensors="np")
    return {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask")}


@pytest.fixture(scope="module")
def ort_logits(exports, feeds):
    import onnxruntime as ort

    out = {}
    for variant, path in exports.items():
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        out[variant] = session.run(None, feeds)[0]
    return out


def _reference(path, feeds):
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(str(path)).run(None, feeds)[0]


def _openvino(path, feeds):
    ov = pytest.importorskip("openvino")
    # f32: OpenVINO's CPU plugin otherwise runs bf16 where the CPU has it (this one does)
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return np.asarray(compiled(feeds)[0])


def _tract(path, feeds):
    tract = pytest.importorskip("tract")
    model = tract.onnx().load(str(path)).into_model().into_runnable()
    return model.run([feeds["input_ids"], feeds["attention_mask"]])[0].to_numpy()


RUNTIMES = {"reference": _reference, "openvino": _openvino, "tract": _tract}


def test_onnxruntime_agrees_with_pytorch(model_and_tokenizer, ort_logits, feeds):
    model, _ = model_and_tokenizer
    with torch.no_grad():
        ref = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
    spread = np.abs(ref).max()
    assert np.abs(ort_logits["fp32"] - ref).max() / spread <= 1e-4
    assert (ort_logits["fp32"].argmax(-1) == ref.argmax(-1)).all()
    assert (ort_logits["int8"].argmax(-1) == ref.argmax(-1)).all()
    assert ref.argmax(-1).tolist() == LABELS  # both labels occur: argmax can disagree


@pytest.mark.parametrize("variant", ["fp32", "int8"])
@pytest.mark.parametrize("runtime", list(RUNTIMES))
def test_runtime_loads_and_agrees_with_onnxruntime(exports, feeds, ort_logits, runtime, variant):
    got = RUNTIMES[runtime](exports[variant], feeds)
    ref = ort_logits[variant]
    assert got.shape == ref.shape
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    # same graph, other kernels: fp32 to float rounding; int8 to its quantization noise
    tol = 1e-3 if variant == "fp32" else 0.1
    assert np.abs(got - ref).max() / np.abs(ref).max() <= tol


def test_quantize_dynamic_of_the_fp32_export_runs(exports, feeds, ort_logits, tmp_path):
    """What users run on exported files: onnxruntime's own dynamic quantization, per
    channel. Every MatMul keeps a 2-D weight (the first-token layer's per-head products
    are Mul + ReduceSum), so the quantized model runs and agrees."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(exports["fp32"]))
    inits = {i.name: len(i.dims) for i in graph.graph.initializer}
    weights = [
        inits[n.input[1]] for n in graph.graph.node if n.op_type == "MatMul" and n.input[1] in inits
    ]
    assert weights and set(weights) == {2}
    out = tmp_path / "quantized.onnx"
    quantize_dynamic(str(exports["fp32"]), str(out), per_channel=True, weight_type=QuantType.QInt8)
    quantized = onnx.load(str(out))
    assert sum(n.op_type == "MatMulInteger" for n in quantized.graph.node) >= 30
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert (got.argmax(-1) == ort_logits["fp32"].argmax(-1)).all()


def test_int8_file_has_no_leftover_value_info(exports):
    for path in exports.values():
        assert len(onnx.load(str(path)).graph.value_info) == 0
