"""Weight-only int4 (lora_ext/export/weight_only.py): our symmetric grid and packing against
the builder's own bytes, GPTQ against RTN, and GPTQ folders end to end (tiny models)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime_genai")

import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402
from test_decoder import PROMPTS, WORDS, tiny_decoder, with_lora, word_tokenizer  # noqa: E402

from lora_ext.export import decoder as D  # noqa: E402
from lora_ext.export import weight_only as W  # noqa: E402
from lora_ext.export.decoder import DecoderExportError, export_decoder  # noqa: E402
from lora_ext.export.runner import DecoderRunner  # noqa: E402


def _rtn(weight: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Our RTN of a [K, N] weight: (B, scales) in MatMulNBits' layout."""
    k, n = weight.shape
    groups = torch.from_numpy(np.ascontiguousarray(weight.T)).reshape(n, k // block, block)
    scale, recip = W.rtn_sym_grid(groups)
    q = W.quantize_sym(groups, recip[..., None]).reshape(n, k)
    return W.pack_int4(q.numpy(), block), scale.reshape(-1).numpy()


def _dequant(b: np.ndarray, scales: np.ndarray, k: int) -> np.ndarray:
    """[K, N] float32 from MatMulNBits' B [N, blocks, block/2] and scales (symmetric)."""
    n, blocks, half = b.shape
    q = np.stack([b & 15, b >> 4], -1).reshape(n, blocks, 2 * half).astype(np.float32)
    return ((q - 8) * scales.reshape(n, blocks, 1)).reshape(n, -1)[:, :k].T


def _initializers(path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_grid_and_packing_reproduce_the_builders_bytes(tmp_path):
    """The builder's int4 MatMulNBits B and scales are, byte for byte, our RTN of the
    weights of its fp32 graph: GPTQ writes on exactly the grid the kernels expect."""
    model, tok = tiny_decoder("llama"), word_tokenizer()
    model.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    D.run_builder(tmp_path / "hf", tmp_path / "fp32", "fp32", {})
    D.run_builder(tmp_path / "hf", tmp_path / "int4", "int4",
                  D._builder_options("int4", 32, True, "rtn", False, 4))  # fmt: skip
    f32 = onnx.load(str(tmp_path / "fp32" / "model.onnx"), load_external_data=False).graph
    q4 = onnx.load(str(tmp_path / "int4" / "model.onnx"), load_external_data=False).graph
    w32, w4 = (
        _initializers(tmp_path / "fp32" / "model.onnx"),
        _initializers(tmp_path / "int4" / "model.onnx"),
    )
    by_output = {n.output[0]: n for n in f32.node if n.op_type == "MatMul"}
    checked = 0
    for node in q4.node:
        if node.op_type != "MatMulNBits":
            continue
        b, scales = _rtn(w32[by_output[node.output[0]].input[1]], 32)
        assert np.array_equal(b, w4[node.input[1]]), node.name
        assert np.array_equal(scales, w4[node.input[2]].reshape(-1)), node.name
        checked += 1
    assert checked == 2 * 5 + 1  # qkv, o, gate, up, down per layer, and the LM head


def test_gptq_lowers_the_output_error_on_its_calibration_distribution():
    """One correlated-input layer: GPTQ's int4 weight changes x W less than RTN's, on the
    calibration inputs and on fresh inputs of the same distribution."""
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((128, 128))
    x_cal, x_new = (rng.standard_normal((n, 128)) @ mix for n in (512, 512))
    w = (rng.standard_normal((128, 48)) * 0.05).astype(np.float32)
    b, scales = W.gptq_int4(w, x_cal.T @ x_cal, 32)
    gptq = _dequant(b, scales, 128)
    rtn = _dequant(*_rtn(w, 32), 128)
    for x in (x_cal, x_new):
        err_rtn = np.linalg.norm(x @ (rtn - w))
        err_gptq = np.linalg.norm(x @ (gptq - w))
        assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)
    assert b.shape == (48, 4, 16) and b.dtype == np.uint8  # RTN's layout


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gptq_folder_same_size_closer_to_fp32(arch, tmp_path):
    """export_decoder(int4_method="gptq"): the folder loads and generates in genai (the
    export verifies), has RTN's size, and its logits on held-out text are closer to fp32
    PyTorch's than RTN's folder's."""
    tok = word_tokenizer()
    model = with_lora(tiny_decoder(arch))
    calib = [" ".join(WORDS[i : i + 30]) for i in range(0, 80, 6)]
    held = [" ".join(WORDS[i + 5 : i + 35]) for i in range(1, 80, 7)]
    common = dict(tokenizer=tok, quantize="int4", prompts=PROMPTS[:1], new_tokens=8,
                  eval_texts=held)  # fmt: skip
    # int4_method left to its default: GPTQ, since calibration texts are given
    gptq = export_decoder(model, tmp_path / "gptq", calibration_texts=calib, **common)
    rtn = export_decoder(model, tmp_path / "rtn", verify=False, **common)
    assert rtn.options["int4_method"] == "rtn"  # no calibration texts: RTN
    assert all(c.genai_equal for c in gptq.checks)
    assert gptq.size_bytes == pytest.approx(rtn.size_bytes, rel=1e-3)
    assert gptq.options["int4_method"] == "gptq" and gptq.options["calibration_texts"] == "14"
    merged = D._plain_fp32(model)
    import lora_ext

    lora_ext.merge_and_unload(merged)
    rows = D.encode_texts(tok, held)
    errors = {}
    for name in ("gptq", "rtn"):
        runner = DecoderRunner(tmp_path / name)
        err = 0.0
        for row in rows:
            ids = np.asarray([row])
            with torch.no_grad():
                ref = merged(torch.from_numpy(ids)).logits[0].numpy()
            err += float(np.square(runner.score(ids)[0] - ref).mean())
        errors[name] = err
    assert errors["gptq"] < errors["rtn"], errors


def test_gptq_bad_input(tmp_path):
    tok = word_tokenizer()
    model = tiny_decoder("qwen2")
    with pytest.raises(DecoderExportError, match="calibration_texts: int4_method='gptq' needs"):
        export_decoder(model, tmp_path / "a", tokenizer=tok, quantize="int4", int4_method="gptq")
    with pytest.raises(DecoderExportError, match="symmetric int4 grid"):
        export_decoder(model, tmp_path / "a", tokenizer=tok, quantize="int4", int4_method="gptq",
                       symmetric=False, calibration_texts=["the time of day"])  # fmt: skip
    with pytest.raises(DecoderExportError, match="applies to quantize='int4'"):
        export_decoder(model, tmp_path / "a", tokenizer=tok, int4_method="gptq",
                       calibration_texts=["the time of day"])  # fmt: skip
    assert list(tmp_path.iterdir()) == []
