"""DoRA (use_dora=True): the compiled norm / merge ops, parity with PEFT (the oracle) on tiny
BERT, GPT-2 (Conv1D) and Llama models, merge precision, adapter files both ways, bad input."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora_ext
from lora_ext import LoraConfig, ops
from lora_ext import reference as R
from lora_ext.inject import lora_layers
from lora_ext.layer import LoraLinear

# PEFT and ours form the same products in other orders: 1e-5 relative to the magnitude
REL = 1e-5


def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    ours, theirs = ours.detach(), theirs.detach()
    return float((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-30))


# -- tiny models (all dropouts 0: train mode is then deterministic) -------------------------
def tiny_bert() -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertModel(cfg).eval()


def tiny_gpt2() -> torch.nn.Module:
    from lora_ext.training.models import tiny_gpt2 as build

    model = build(seed=0)
    model.config.resid_pdrop = model.config.embd_pdrop = model.config.attn_pdrop = 0.0
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model.eval()


def tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(cfg).eval()


MODELS = {
    "bert": (
        tiny_bert,
        ["query", "value", "dense"],  # "dense" includes the pooler: its output counts too
        lambda out: torch.cat([out.last_hidden_state.flatten(1), out.pooler_output], 1),
    ),
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj", "c_fc"], lambda out: out.logits),
    "llama": (tiny_llama, ["q_proj", "v_proj", "down_proj"], lambda out: out.logits),
}


def randomize_dora(model: torch.nn.Module, seed: int = 1) -> None:
    """Non-zero B and a magnitude moved off its initial norm, so every term matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for name in layer.lora_A:
                for table in (layer.lora_A, layer.lora_B):
                    p = table[name]
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                if name in layer.lora_magnitude_vector:
                    m = layer.lora_magnitude_vector[name]
                    m.mul_(1 + 0.2 * torch.randn(m.shape, generator=g))


def peft_dora_twin(base: torch.nn.Module, ours: torch.nn.Module) -> torch.nn.Module:
    """PEFT model with the same config and the same A, B, m as ``ours`` (adapter "default")."""
    import peft

    cfg = lora_ext.inject.adapter_configs(ours)["default"]
    fan = any(layer.fan_in_fan_out for _, layer in lora_layers(ours))
    fields = cfg.to_peft_dict(fan_in_fan_out=fan, inference_mode=False)
    fields.pop("peft_type")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**fields))
    with torch.no_grad():
        for name, layer in lora_layers(ours):
            theirs = twin.base_model.model.get_submodule(name)
            theirs.lora_A["default"].weight.copy_(layer.lora_A["default"])
            theirs.lora_B["default"].weight.copy_(layer.lora_B["default"])
            theirs.lora_magnitude_vector["default"].weight.copy_(
                layer.lora_magnitude_vector["default"]
            )
    return twin


def dora_model(kind: str, **cfg_kwargs) -> tuple[torch.nn.Module, torch.nn.Module]:
    build, targets, _ = MODELS[kind]
    base = build()
    cfg = LoraConfig(r=4, alpha=8, target_modules=targets, use_dora=True, **cfg_kwargs)
    ours = lora_ext.inject_(copy.deepcopy(base), cfg)
    return base, ours


# -- the compiled ops ------------------------------------------------------------------------
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("transposed", [False, True])
def test_norm_and_merge_ops_match_float64(dtype, transposed, device):
    g = torch.Generator().manual_seed(0)
    out, inp, r = 37, 300, 5  # several row tiles on the CPU, ragged last tile
    w = torch.randn(inp, out, generator=g).to(dtype).t() if transposed else None
    if w is None:
        w = torch.randn(out, inp, generator=g).to(dtype)
    a = torch.randn(r, inp, generator=g) * 0.1
    b = torch.randn(out, r, generator=g) * 0.1
    m = torch.rand(out, generator=g) + 0.5
    w, a, b, m = (t.to(device) for t in (w, a, b, m))
    n = ops.dora_norm(w, a, b, 1.5)
    assert n.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert rel_err(n.double(), R.dora_norm(w, a, b, 1.5)) < 1e-6
    exact = R.dora_merge(w, a, b, 1.5, m)
    merged = w.clone()
    ops.dora_merge_(merged, a, b, 1.5, m / n)
    # one rounding: at most the rounding of the exact value (plus float32 noise)
    rounded_once = exact.to(dtype).double()
    slack = 1e-6 * float(exact.abs().max())
    assert (
        float((merged.double() - exact).abs().max())
        <= float((rounded_once - exact).abs().max()) + slack
    )
    back = merged.clone()
    ops.dora_merge_(back, a, b, 1.5, m / n, inverse=True)
    ulp = float(torch.finfo(dtype).eps) * float(w.double().abs().max())
    assert float((back.double() - w.double()).abs().max()) <= 2 * ulp + 1e-12


def test_merge_check_and_argument_errors():
    w = torch.randn(6, 8)
    a, b = torch.randn(2, 8), torch.randn(6, 2)
    f = torch.ones(6)
    assert ops.dora_merge_is_safe(w, a, b, 1.0, f)
    assert not ops.dora_merge_is_safe(w, a, b, 1.0, f * float("inf"))
    assert not ops.dora_merge_is_safe(w.half(), a, b, 1.0, f * 1e6)  # float16 overflow
    before = w.clone()
    with pytest.raises(RuntimeError, match="factor must have shape"):
        ops.dora_merge_(w, a, b, 1.0, torch.ones(5))
    with pytest.raises(RuntimeError, match="lora_b must have shape"):
        ops.dora_norm(w, a, torch.randn(5, 2), 1.0)
    assert torch.equal(w, before)


def test_opcheck():
    w = torch.randn(6, 8)
    a, b = torch.randn(2, 8), torch.randn(6, 2)
    ops.load_library()
    torch.library.opcheck(torch.ops.lora_ext.dora_norm.default, (w, a, b, 0.5))
    torch.library.opcheck(
        torch.ops.lora_ext.dora_merge_.default, (w.clone(), a, b, 0.5, torch.ones(6), False)
    )
    torch.library.opcheck(
        torch.ops.lora_ext.dora_merge_check.default, (w, a, b, 0.5, torch.ones(6), False)
    )


# -- layer ---------------------------------------------------------------------------------
@pytest.mark.parametrize("conv1d", [False, True])
def test_magnitude_starts_at_row_norm_and_layer_unchanged(conv1d):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = Conv1D(12, 16) if conv1d else torch.nn.Linear(16, 12)
    x = torch.randn(3, 16)
    layer = LoraLinear(copy.deepcopy(base))
    layer.add_adapter("d", r=4, alpha=8, use_dora=True)
    layer.set_adapter("d")
    w = layer.base_weight()  # [out, in]
    torch.testing.assert_close(
        layer.lora_magnitude_vector["d"], torch.linalg.vector_norm(w, dim=1), rtol=1e-6, atol=0
    )
    torch.testing.assert_close(layer(x), base(x), rtol=1e-6, atol=1e-6)


def test_bf16_base_keeps_float32_magnitude():
    layer = LoraLinear(torch.nn.Linear(16, 12).to(torch.bfloat16))
    layer.add_adapter("d", r=4, alpha=8, use_dora=True)
    assert layer.lora_magnitude_vector["d"].dtype == torch.float32
    layer.set_adapter("d")
    assert layer(torch.randn(2, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16


# -- parity with PEFT ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(MODELS))
def test_outputs_and_gradients_match_peft(kind):
    base, ours = dora_model(kind)
    randomize_dora(ours)
    twin = peft_dora_twin(base, ours)
    ours.train()
    twin.train()  # every dropout is 0: the same function as eval
    hidden = 32 if kind != "gpt2" else base.config.n_embd
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 6, hidden, generator=g)
    results = []
    for model in (ours, twin):
        xi = x.clone().requires_grad_()
        y = MODELS[kind][2](model(inputs_embeds=xi))
        weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
        (y * weights).sum().backward()
        results.append((y.detach(), xi.grad))
    assert rel_err(results[0][0], results[1][0]) < REL
    assert rel_err(results[0][1], results[1][1]) < REL
    for name, layer in lora_layers(ours):
        theirs = twin.base_model.model.get_submodule(name)
        pairs = {
            "A": (layer.lora_A["default"], theirs.lora_A["default"].weight),
            "B": (layer.lora_B["default"], theirs.lora_B["default"].weight),
            "m": (
                layer.lora_magnitude_vector["default"],
                theirs.lora_magnitude_vector["default"].weight,
            ),
        }
        for what, (p_ours, p_theirs) in pairs.items():
            assert p_ours.grad is not None, (name, what)
            assert rel_err(p_ours.grad, p_theirs.grad) < REL, (name, what)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_merged_equals_unmerged_and_unmerge_restores(kind):
    base, ours = dora_model(kind)
    randomize_dora(ours)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    out = MODELS[kind][2]
    weights = {n: p.detach().clone() for n, p in ours.named_parameters() if "base_layer" in n}
    y = out(ours(input_ids=ids))
    lora_ext.merge_(ours, safe=True)
    assert rel_err(out(ours(input_ids=ids)), y) < REL
    lora_ext.unmerge_(ours)
    for n, p in ours.named_parameters():
        if n in weights:  # float32: within a few roundings of the weight
            torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-6)
    plain = lora_ext.merge_and_unload(copy.deepcopy(ours))
    assert not lora_layers(plain)
    assert rel_err(out(plain(input_ids=ids)), y) < REL


def test_bf16_merge_rounds_once_and_beats_peft():
    """Ours: the merge in float32 rounded once to bfloat16, so within about half a bf16 ulp of
    the float64 merge, and no worse than PEFT's bf16 merge of the same weights (PEFT, with its
    float32 adapters, also computes in float32: the two tie on max |delta|)."""
    import peft

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(256, 192)).to(torch.bfloat16)
    cfg = LoraConfig(r=8, alpha=16, target_modules=["0"], use_dora=True)
    ours = lora_ext.inject_(copy.deepcopy(base), cfg)
    randomize_dora(ours)
    layer = ours[0]
    w0 = layer.base_weight().detach().clone()
    a, b, m = (
        t.detach().clone()
        for t in (
            layer.lora_A["default"],
            layer.lora_B["default"],
            layer.lora_magnitude_vector["default"],
        )
    )
    exact = R.dora_merge(w0, a, b, layer.scaling["default"], m)
    layer.merge()
    ours_err = float((layer.base_weight().double() - exact).abs().max())
    once_err = float((exact.to(torch.bfloat16).double() - exact).abs().max())
    float32_merge = R.dora_merge_float32(w0, a, b, layer.scaling["default"], m)
    f32_err = float((float32_merge.to(torch.bfloat16).double() - exact).abs().max())
    assert ours_err <= max(once_err, f32_err)
    _, e = torch.frexp(exact)
    ulps = (layer.base_weight().double() - exact).abs() / torch.ldexp(torch.ones_like(exact), e - 8)
    assert float(ulps.max()) < 0.6  # 0.5: correctly rounded; float32 arithmetic adds a little

    fields = cfg.to_peft_dict(inference_mode=False)
    fields.pop("peft_type")
    twin = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**fields))
    t = twin.base_model.model[0]
    with torch.no_grad():
        t.lora_A["default"].weight.copy_(a)
        t.lora_B["default"].weight.copy_(b)
        t.lora_magnitude_vector["default"].weight.copy_(m)
    t.merge()
    peft_err = float((t.base_layer.weight.double() - exact).abs().max())
    assert ours_err <= peft_err


# -- several adapters, merging -------------------------------------------------------------
def test_dora_with_other_adapters_is_refused(snapshot):
    base, ours = dora_model("llama")
    lora_ext.inject_(ours, LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="plain")
    snap = snapshot(ours)
    with pytest.raises(ValueError, match="DoRA adapter.*runs alone"):
        lora_ext.set_adapter(ours, ["default", "plain"])
    snap()
    layer = dict(lora_layers(ours))["model.layers.0.self_attn.q_proj"]
    with pytest.raises(ValueError, match="runs alone"):
        layer.merge(["default", "plain"])
    snap()


def test_safe_merge_refuses_non_finite_factor(snapshot):
    base, ours = dora_model("llama")
    with torch.no_grad():
        next(iter(lora_layers(ours)))[1].lora_magnitude_vector["default"][0] = float("inf")
    snap = snapshot(ours)
    with pytest.raises(ValueError, match="safe merge.*DoRA"):
        lora_ext.merge_(ours, safe=True)
    snap()


def test_pissa_with_dora_leaves_model_unchanged():
    base, ours = dora_model("llama", init="pissa")
    ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(0))
    assert rel_err(ours(input_ids=ids).logits, base(input_ids=ids).logits) < 1e-5


def test_training_parameters_include_magnitude():
    _, ours = dora_model("llama")
    mags = [layer.lora_magnitude_vector["default"] for _, layer in lora_layers(ours)]
    params = lora_ext.lora_parameters(ours)
    assert all(any(p is m for p in params) for m in mags)
    assert {id(p) for p in params} == {id(p) for p in ours.parameters() if p.requires_grad}
    groups = {g["name"]: g for g in lora_ext.lora_param_groups(ours, lr=1e-3)}
    assert groups["lora_magnitude"]["lr"] == 1e-3 and groups["lora_magnitude"]["weight_decay"] == 0


# -- adapter files -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_peft_file_loads_into_ours_and_back(kind, tmp_path):
    import peft

    base, ours = dora_model(kind)
    randomize_dora(ours)
    twin = peft_dora_twin(base, ours)
    twin.save_pretrained(tmp_path / "peft")
    keys = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert any(k.endswith("lora_magnitude_vector") for k in keys)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    out = MODELS[kind][2]
    loaded = lora_ext.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    y_peft = out(twin.eval()(input_ids=ids))
    assert rel_err(out(loaded(input_ids=ids)), y_peft) < REL
    # ours -> PEFT
    lora_ext.save_adapter(loaded, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["use_dora"] is True
    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == set(keys)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert rel_err(out(theirs(input_ids=ids)), y_peft) < REL


def _dora_file(tmp_path):
    base, ours = dora_model("llama")
    randomize_dora(ours)
    lora_ext.save_adapter(ours, tmp_path)
    return base


def _edit(path, edit):
    tensors = load_file(path / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, path / "adapter_model.safetensors")


MAG = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"


@pytest.mark.parametrize(
    "edit_config,edit_tensors,match",
    [
        (lambda c: c.update(use_dora=False), None, "DoRA magnitude vector, but.*use_dora=false"),
        (None, lambda t: t.pop(MAG), "missing key.*lora_magnitude_vector.*use_dora=true"),
        (None, lambda t: t.update({MAG: torch.ones(7)}), "lora_magnitude_vector.*shape"),
        (None, lambda t: t[MAG].__setitem__(0, float("nan")), "lora_magnitude_vector.*non-finite"),
        (None, lambda t: t[MAG].__setitem__(0, 1e30), "lora_magnitude_vector.*row scaling"),
    ],
    ids=["dora-file-lora-config", "missing-m", "m-shape", "m-nan", "m-huge"],
)
def test_bad_dora_files_are_refused(tmp_path, snapshot, edit_config, edit_tensors, match):
    base = _dora_file(tmp_path)
    if edit_config:
        path = tmp_path / "adapter_config.json"
        cfg = json.loads(path.read_text())
        edit_config(cfg)
        path.write_text(json.dumps(cfg))
    if edit_tensors:
        _edit(tmp_path, edit_tensors)
    model = copy.deepcopy(base)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        lora_ext.load_adapter(model, tmp_path)
    snap()


def test_lora_file_with_dora_config_is_refused(tmp_path, snapshot):
    base, ours = dora_model("llama")
    plain = lora_ext.inject_(
        copy.deepcopy(base),
        LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    lora_ext.save_adapter(plain, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    model = copy.deepcopy(base)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="use_dora=true, which needs a DoRA magnitude"):
        lora_ext.load_adapter(model, tmp_path)
    snap()


def test_dora_on_a_quantized_base_is_refused(snapshot):
    bnb = pytest.importorskip("bitsandbytes")
    model = torch.nn.Sequential(bnb.nn.Linear4bit(64, 32, quant_type="nf4")).to("cpu")
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"use_dora=True: '0' is a Linear4bit.*Params4bit"):
        lora_ext.inject_(model, LoraConfig(r=2, target_modules=["0"], use_dora=True))
    snap()
