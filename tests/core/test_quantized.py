"""QLoRA (lora_ext/quantized.py): LoRA over a bitsandbytes nf4 / int8 base.

PEFT is the oracle: the same bitsandbytes base (built once, deep-copied for PEFT and for us),
tiny BERT (MiniLM-shaped), tiny GPT-2 (Conv1D, transposed into Linear4bit as transformers
does) and tiny Llama; outputs and LoRA gradients within 1e-5 of the magnitude in float32.
Merging dequantizes (one rounding); merging back into 4 bits only on request; bad inputs
leave the model bit-identical.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn

import lora_ext
from lora_ext import quantized
from lora_ext.inject import lora_layers

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

warnings.filterwarnings("ignore", module="bitsandbytes")


def _tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=120,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=32,
    )
    model = BertModel(cfg).eval()
    ids = torch.randint(0, 120, (2, 7), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids}, ["query", "value", "dense"], lambda o: o.last_hidden_state


def _tiny_gpt2():
    from lora_ext.training import models

    model = models.tiny_gpt2(seed=0)
    ids = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids}, ["c_attn", "c_proj", "c_fc"], lambda o: o.logits


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids}, ["q_proj", "v_proj", "down_proj"], lambda o: o.logits


MODELS = {"bert": _tiny_bert, "gpt2": _tiny_gpt2, "llama": _tiny_llama}


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == before.keys() and all(
        now[k].dtype == v.dtype and torch.equal(now[k], v) for k, v in before.items()
    )


def _close(got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    err = (got.double() - want.double()).abs().max().item()
    mag = want.double().abs().max().item()
    assert err <= rel * mag, f"max |delta| {err:.3g} > {rel:g} x max |value| {mag:.3g}"


def _randomise_b(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for b in layer.lora_B.values():
                b.copy_(torch.randn(b.shape, generator=g) * 0.05)


def _peft_twin(base: nn.Module, ours: nn.Module, targets, r: int, alpha: float, kind: str):
    """PEFT's model over a copy of the same bitsandbytes base, with our A and B."""
    twin = copy.deepcopy(base)
    twin.__dict__[f"is_loaded_in_{4 if kind == 'nf4' else 8}bit"] = True  # what PEFT looks at
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0)
    pm = peft.get_peft_model(twin, cfg)
    cls = peft.tuners.lora.bnb.Linear4bit if kind == "nf4" else peft.tuners.lora.bnb.Linear8bitLt
    with torch.no_grad():
        for name, layer in lora_layers(ours):
            theirs = pm.base_model.model.get_submodule(name)
            assert isinstance(theirs, cls), (name, type(theirs))
            theirs.lora_A["default"].weight.copy_(layer.lora_A["default"])
            theirs.lora_B["default"].weight.copy_(layer.lora_B["default"])
    return pm


# -- config ----------------------------------------------------------------------------------
def test_config_checks_the_field_and_keeps_it_out_of_peft_files(tmp_path):
    with pytest.raises(ValueError, match="base_quantization: got 'nf8'"):
        lora_ext.LoraConfig(target_modules=["q"], base_quantization="nf8")
    with pytest.raises(ValueError, match="base_quantization='nf4' with init='pissa'"):
        lora_ext.LoraConfig(target_modules=["q"], base_quantization="nf4", init="pissa")
    cfg = lora_ext.LoraConfig(target_modules=["q"], base_quantization="int8")
    assert "base_quantization" not in cfg.to_peft_dict()
    assert lora_ext.LoraConfig.from_peft_dict(cfg.to_peft_dict()).base_quantization is None


def test_dora_with_a_quantized_base_is_refused():
    if "use_dora" not in lora_ext.LoraConfig.__dataclass_fields__:
        pytest.skip("LoraConfig has no use_dora field (DoRA not in this build)")
    with pytest.raises(ValueError, match="use_dora=True"):
        lora_ext.LoraConfig(target_modules=["q"], base_quantization="nf4", use_dora=True)


# -- quantizing, dequantizing ------------------------------------------------------------------
def test_inject_quantizes_every_linear_but_heads_and_wraps_targets():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=50, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=128, max_position_embeddings=16, num_labels=3,
    )  # fmt: skip
    model = BertForSequenceClassification(cfg).eval()
    lora_ext.inject_(model, lora_ext.LoraConfig(target_modules=["query"], base_quantization="nf4"))
    assert type(model.classifier) is nn.Linear  # the head stays float (and trains)
    assert model.classifier.weight.requires_grad
    q = model.bert.encoder.layer[0].attention.self.query
    assert isinstance(q, lora_ext.LoraLinear) and isinstance(q.base_layer, bnb.nn.Linear4bit)
    assert q.base_layer.compute_dtype == torch.float32
    assert isinstance(model.bert.encoder.layer[0].output.dense, bnb.nn.Linear4bit)
    assert isinstance(model.bert.pooler.dense, bnb.nn.Linear4bit)
    assert q.lora_A["default"].dtype == torch.float32
    assert lora_ext.LoraLinear.__module__ and lora_ext.inject.is_supported(q.base_layer)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_tiled_dequantization_is_bitsandbytes_own(kind, monkeypatch):
    """Row tiles (in_features 40: tiles start inside a 64-element block) give exactly the weight
    bitsandbytes' whole-tensor dequantization gives."""
    lin = nn.Linear(40, 70)
    layer = quantized.quantize_linear(lin, kind)
    if kind == "nf4":
        want = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    else:
        want = bnb.functional.int8_vectorwise_dequant(layer.weight.data, layer.weight.SCB).float()
    monkeypatch.setattr(quantized, "_TILE_ELEMENTS", 200)
    assert len(list(quantized._row_tiles(70, 40, 64))) > 3
    assert torch.equal(quantized.dequantized_weight(layer), want)
    assert (want - lin.weight).abs().max() < 0.25 * lin.weight.abs().max()  # nf4 is coarse


# -- parity with PEFT --------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["fused", "separate"])
@pytest.mark.parametrize("name", list(MODELS))
def test_outputs_and_lora_gradients_equal_peft(name, path):
    model, inputs, targets, out = MODELS[name]()
    base = quantized.quantize_base_(model, "nf4")
    ours = copy.deepcopy(base)
    lora_ext.inject_(ours, lora_ext.LoraConfig(r=4, alpha=8, target_modules=targets))
    _randomise_b(ours)
    pm = _peft_twin(base, ours, targets, 4, 8, "nf4")
    with quantized.qlora_path(path):  # the path is chosen in forward; backward follows it
        y_ours = out(ours(**inputs))
    y_peft = out(pm(**inputs))
    _close(y_ours, y_peft, 1e-5)
    y_ours.square().mean().backward()
    y_peft.square().mean().backward()
    compared = 0
    for lname, layer in lora_layers(ours):
        theirs = pm.base_model.model.get_submodule(lname)
        if theirs.lora_A["default"].weight.grad is None:  # e.g. BERT's pooler: not in the loss
            assert layer.lora_A["default"].grad is None
            continue
        _close(layer.lora_A["default"].grad, theirs.lora_A["default"].weight.grad, 1e-5)
        _close(layer.lora_B["default"].grad, theirs.lora_B["default"].weight.grad, 1e-5)
        compared += 1
    assert compared >= 4
    # merged (dequantized, float32, one rounding) equals the unmerged model within rounding
    merged = lora_ext.merge_and_unload(copy.deepcopy(ours))
    assert not any(quantized.is_quantized(m) for m in merged.modules())
    with torch.no_grad():
        _close(out(merged(**inputs)), y_ours.detach(), 1e-5)


def test_int8_base_matches_peft():
    model, inputs, targets, out = _tiny_bert()
    base = quantized.quantize_base_(model, "int8")
    ours = copy.deepcopy(base)
    lora_ext.inject_(ours, lora_ext.LoraConfig(r=4, alpha=8, target_modules=targets))
    _randomise_b(ours)
    pm = _peft_twin(base, ours, targets, 4, 8, "int8")
    with torch.no_grad():
        _close(out(ours(**inputs)), out(pm(**inputs)), 1e-5)
        merged = lora_ext.merge_and_unload(copy.deepcopy(ours))
        # LLM.int8 also rounds the activations to int8 in its matmul; the merged float layer
        # does not, so they agree to that rounding (~1e-3), not to float rounding
        _close(out(merged(**inputs)), out(ours(**inputs)), 5e-3)


@pytest.mark.parametrize("path", ["separate", "fused"])
def test_dropout_in_train_mode_uses_lora_deltas_mask(path):
    """Both forward paths draw one seed and apply the op's mask: the separate path is exactly
    base(x) + lora_delta(x); the fused one (dequantized W through lora_linear) equals it to
    float rounding, gradients included."""
    lin = nn.Linear(64, 32)
    layer = lora_ext.LoraLinear(quantized.quantize_linear(lin, "nf4"))
    layer.add_adapter("default", r=4, alpha=8, dropout=0.3)
    layer.set_adapter("default")
    _randomise_b(nn.ModuleDict({"l": layer}))
    layer.train()
    x = torch.randn(5, 64, requires_grad=True)
    with quantized.qlora_path(path):
        torch.manual_seed(3)
        y = layer(x)
    torch.manual_seed(3)
    seed = lora_ext.ops.make_seed(None)
    a, b = layer.lora_A["default"], layer.lora_B["default"]
    xr = x.detach().clone().requires_grad_()
    with quantized.qlora_path("separate"):
        want = layer.base_layer(xr) + lora_ext.ops.lora_delta(xr, a, b, 2.0, 0.3, seed=seed)
    if path == "separate":
        assert torch.equal(y, want)
    else:
        _close(y, want, 1e-6)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(4))
    grads = torch.autograd.grad(y, (x, a, b), g)
    wants = torch.autograd.grad(want, (xr, a, b), g)
    for got, ref in zip(grads, wants, strict=True):
        _close(got, ref, 1e-6)


def test_qlora_path_switch_and_when_fused_applies(monkeypatch):
    layer = quantized.quantize_linear(nn.Linear(64, 32), "nf4")
    x = torch.randn(3, 64, requires_grad=True)
    assert quantized._use_fused(layer, x)  # auto on the CPU: fused for training
    with torch.no_grad():
        assert not quantized._use_fused(layer, x)  # inference: bitsandbytes' own kernel
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not quantized._use_fused(layer, x)
    with quantized.qlora_path("separate"):
        assert not quantized._use_fused(layer, x)
    int8 = quantized.quantize_linear(nn.Linear(64, 32), "int8")
    assert not quantized._use_fused(int8, x)  # LLM.int8 also rounds x: never fused
    with pytest.raises(ValueError, match="path must be one of"), quantized.qlora_path("fast"):
        pass
    monkeypatch.setattr(quantized, "_path", "fsued")  # as a typo in LORA_EXT_QLORA_PATH
    with pytest.raises(ValueError, match="LORA_EXT_QLORA_PATH must be one of .* got 'fsued'"):
        quantized._use_fused(layer, x)


# -- save / load ---------------------------------------------------------------------------------
def test_adapter_round_trips_to_peft_over_the_same_base(tmp_path):
    model, inputs, targets, out = _tiny_llama()
    base = quantized.quantize_base_(model, "nf4")
    ours = copy.deepcopy(base)
    lora_ext.inject_(ours, lora_ext.LoraConfig(r=4, alpha=8, target_modules=targets))
    _randomise_b(ours)
    lora_ext.save_adapter(ours, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert "base_quantization" not in cfg
    twin = copy.deepcopy(base)
    twin.__dict__["is_loaded_in_4bit"] = True
    pm = peft.PeftModel.from_pretrained(twin, tmp_path / "ad")
    assert isinstance(
        pm.base_model.model.model.layers[0].self_attn.q_proj, peft.tuners.lora.bnb.Linear4bit
    )
    with torch.no_grad():
        want = out(ours(**inputs))
        _close(out(pm(**inputs)), want, 1e-5)
        again = copy.deepcopy(base)
        lora_ext.load_adapter(again, tmp_path / "ad")
        assert torch.equal(out(again(**inputs)), want)
        for _, layer in lora_layers(again):
            assert layer.lora_A["default"].dtype == torch.float32


# -- merge -----------------------------------------------------------------------------------
def test_merge_into_4bit_needs_the_flag_and_reports_the_error():
    model, inputs, targets, out = _tiny_bert()
    lora_ext.inject_(
        model, lora_ext.LoraConfig(r=4, alpha=8, target_modules=targets, base_quantization="nf4")
    )
    _randomise_b(model)
    before = _state(model)
    with pytest.raises(
        ValueError, match=r"layer 'encoder.layer.0.attention.self.query'.*requantize=True"
    ):
        lora_ext.merge_(model)
    assert _same_state(model, before)
    assert not any(layer.merged for _, layer in lora_layers(model))
    with torch.no_grad():
        float_merge = out(lora_ext.merge_and_unload(copy.deepcopy(model))(**inputs))
        lora_ext.merge_(model, requantize=True)
        errors = [layer.requantize_error for _, layer in lora_layers(model)]
        assert all(e > 0 for e in errors)  # 4 bits cannot hold W + s B A exactly
        y = out(model(**inputs))
    assert (y - float_merge).abs().max() > 0
    _close(y, float_merge, 0.2)  # re-quantization error, not garbage
    before = _state(model)
    with pytest.raises(ValueError, match="re-quantized"):
        lora_ext.unmerge_(model)
    assert _same_state(model, before)


def test_merge_and_unload_dtype_rounds_once():
    """A bf16 merge equals the float64 merge of the same dequantized weight rounded once."""
    lin = nn.Linear(64, 48)
    layer = lora_ext.LoraLinear(quantized.quantize_linear(lin, "nf4"))
    layer.add_adapter("default", r=4, alpha=8)
    layer.set_adapter("default")
    _randomise_b(nn.ModuleDict({"l": layer}))
    plain = quantized.dequantize_merged(layer, "l", torch.bfloat16)
    w64 = quantized.dequantized_weight(layer.base_layer).double()
    w64 += layer.scaling["default"] * (
        layer.lora_B["default"].double() @ layer.lora_A["default"].double()
    )
    exact = w64.to(torch.bfloat16)
    # float32 accumulation may flip a rounding at a bf16 tie, never by more than one ulp
    diff = (plain.weight.double() - exact.double()).abs()
    ulp = exact.double().abs() * 2.0**-7
    assert (diff <= ulp).all() and (diff > 0).float().mean() < 0.01
    assert plain.weight.dtype == torch.bfloat16 and plain.bias.dtype == torch.bfloat16


# -- bad input --------------------------------------------------------------------------------
def test_a_layer_bitsandbytes_cannot_quantize_leaves_the_model_unchanged():
    model, _, targets, _ = _tiny_bert()
    model = model.double()
    before = _state(model)
    kinds = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=r"base_quantization='nf4': layer '.*' has torch.float64"):
        lora_ext.inject_(
            model, lora_ext.LoraConfig(target_modules=targets, base_quantization="nf4")
        )
    assert _same_state(model, before) and kinds == [type(m) for m in model.modules()]
    model = model.float()
    before = _state(model)
    with pytest.raises(TypeError, match="'embeddings.word_embeddings' is a Embedding"):
        lora_ext.inject_(
            model,
            lora_ext.LoraConfig(target_modules=["word_embeddings"], base_quantization="nf4"),
        )
    assert _same_state(model, before) and kinds == [type(m) for m in model.modules()]


def test_a_failing_inject_rolls_the_quantization_back(monkeypatch):
    model, _, targets, _ = _tiny_bert()
    before = _state(model)
    kinds = [type(m) for m in model.modules()]

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(lora_ext.LoraLinear, "add_adapter", boom)
    with pytest.raises(RuntimeError, match="boom"):
        lora_ext.inject_(
            model, lora_ext.LoraConfig(target_modules=targets, base_quantization="nf4")
        )
    assert _same_state(model, before) and kinds == [type(m) for m in model.modules()]


# -- export --------------------------------------------------------------------------------
@pytest.mark.slow
def test_nf4_trained_bert_exports_to_onnx_and_verifies(tmp_path):
    pytest.importorskip("onnxruntime")
    from transformers import BertConfig, BertForSequenceClassification

    from lora_ext.export import export_onnx

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=32, num_labels=2,
    )  # fmt: skip
    model = BertForSequenceClassification(cfg).eval()
    ids = torch.randint(0, 120, (2, 7), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    lora_ext.inject_(
        model,
        lora_ext.LoraConfig(
            r=4, alpha=8, target_modules=["query", "value", "dense"], base_quantization="nf4"
        ),
    )
    opt = torch.optim.AdamW(lora_ext.lora_parameters(model), lr=1e-2)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(**inputs).logits.square().mean().backward()
        opt.step()
    model.eval()
    before = _state(model)
    report = export_onnx(model, inputs, tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").exists() and report.checks and report.merged_layers == 11
    assert _same_state(model, before)  # the model is untouched (merged on a copy)


def test_a_dora_adapter_over_a_quantized_base_is_refused():
    model, _, targets, _ = _tiny_bert()
    quantized.quantize_base_(model, "nf4")
    before = _state(model)
    with pytest.raises(ValueError, match=r"use_dora=True: '.*query' is a Linear4bit"):
        lora_ext.inject_(model, lora_ext.LoraConfig(target_modules=targets, use_dora=True))
    assert _same_state(model, before) and not lora_layers(model)
