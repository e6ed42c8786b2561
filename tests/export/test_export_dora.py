"""A merged DoRA model exports to ONNX and verifies in onnxruntime like any other; the hot-swap
export, which cannot express DoRA's row scaling, refuses it naming the option."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import lora_ext
from lora_ext.export import export_onnx
from lora_ext.inject import lora_layers

pytest.importorskip("onnxruntime")


def _dora_gpt2():
    from lora_ext.training.models import tiny_gpt2

    model = tiny_gpt2(seed=0).eval()
    cfg = lora_ext.LoraConfig(r=4, alpha=8, target_modules=["c_attn", "c_fc"], use_dora=True)
    lora_ext.inject_(model, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B["default"].copy_(
                torch.randn(layer.lora_B["default"].shape, generator=g) * 0.1
            )
            m = layer.lora_magnitude_vector["default"]
            m.mul_(1 + 0.2 * torch.randn(m.shape, generator=g))
    ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=g)
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_merged_dora_model_exports_and_verifies(tmp_path):
    import onnxruntime as ort

    model, example = _dora_gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = export_onnx(model, example, tmp_path / "dora.onnx")
    assert report.merged_layers == len(lora_layers(model)) > 0
    assert report.max_rel is not None and report.max_rel < 1e-4
    for key, value in model.state_dict().items():  # the model itself is untouched
        assert torch.equal(value, before[key]), key
    session = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {k: v.numpy() for k, v in example.items()})
    with torch.no_grad():
        want = model(**example).logits.numpy()
    base = lora_ext.merge_and_unload(copy.deepcopy(model))  # same as the file
    assert np.abs(logits - want).max() <= 1e-4 * np.abs(want).max()
    with torch.no_grad():
        assert not torch.equal(base(**example).logits, _plain_logits(example))


def _plain_logits(example):
    from lora_ext.training.models import tiny_gpt2

    with torch.no_grad():
        return tiny_gpt2(seed=0).eval()(**example).logits


def test_hot_swap_export_refuses_dora(tmp_path):
    model, example = _dora_gpt2()
    with pytest.raises(ValueError, match=r"merge=False \(hot-swap.*--hot-swap.*DoRA"):
        export_onnx(model, example, tmp_path / "hot.onnx", merge=False)
    assert not list(tmp_path.iterdir())
