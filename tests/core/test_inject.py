"""inject_ and the model-level API on the real models, with PEFT 0.21 as the oracle."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lora_ext
from lora_ext import LoraConfig, LoraLinear
from lora_ext.inject import adapter_configs, lora_layers

# float32. Against PEFT with the same A and B: the same products (on CPU today the outputs are
# bit-identical); 1e-5 leaves room for another BLAS's summation order. Merged against unmerged:
# W + s B A is rounded to float32 once, then multiplied: a few ulps per layer over depth.
PEFT_TOL = {"rtol": 1e-5, "atol": 1e-5}
TOL = {"rtol": 1e-4, "atol": 1e-4}


def test_matches_peft_forward_and_grads(real_model, randomize, peft_twin, peft_modules):
    cfg = LoraConfig(r=4, alpha=8, target_modules=real_model.targets)
    ours = lora_ext.inject_(real_model.fresh(), cfg)
    randomize(ours, seed=1)
    twin = peft_twin(real_model.model, ours)
    theirs = peft_modules(twin)
    assert set(dict(lora_layers(ours))) == set(theirs)  # PEFT's target matching

    y = real_model.run(ours)
    y_peft = real_model.run(twin)
    y_base = real_model.run(real_model.model)
    assert (y - y_base).abs().max() > 1e-3  # the adapters do change the output
    # Both run the same float32 maths but through different GEMM calls (ours fused, PEFT's
    # three nn.Linear), so rounding differs by a few ulps of the output's magnitude; measured
    # against that magnitude, not absolutely (SmolLM2's logits reach ~30 after 30 layers).
    out_scale = y_peft.abs().max().item()
    torch.testing.assert_close(y / out_scale, y_peft / out_scale, **PEFT_TOL)

    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    (y * g).sum().backward()
    (y_peft * g).sum().backward()
    for name, layer in lora_layers(ours):
        for ours_p, theirs_p in (
            (layer.lora_A["default"], theirs[name].lora_A["default"].weight),
            (layer.lora_B["default"], theirs[name].lora_B["default"].weight),
        ):
            if theirs_p.grad is None:  # e.g. BERT's pooler.dense: not on last_hidden_state
                assert ours_p.grad is None, name
                continue
            scale = theirs_p.grad.abs().max().item() + 1e-12
            torch.testing.assert_close(
                ours_p.grad / scale, theirs_p.grad / scale, rtol=1e-4, atol=1e-5
            )


def test_only_lora_tensors_train(minilm):
    model = lora_ext.inject_(minilm.fresh(), LoraConfig(r=2, target_modules=["query", "value"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 2 * 6  # A and B, query and value, 6 layers
    assert {id(p) for p in lora_ext.lora_parameters(model)} == {
        id(p) for p in model.parameters() if p.requires_grad
    }
    # bias="lora_only": the adapted layers' biases train too, and are listed
    model = lora_ext.inject_(
        minilm.fresh(), LoraConfig(r=2, target_modules=["query"], bias="lora_only")
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if n.endswith("bias")} == {
        f"encoder.layer.{i}.attention.self.query.base_layer.bias" for i in range(6)
    }
    assert len(lora_ext.lora_parameters(model)) == len(trainable)


@pytest.mark.parametrize(
    "targets,exclude",
    [
        (["query", "value"], None),
        (r".*layer\.[02]\.attention\.self\.(query|key)", None),
        (["encoder.layer.3.attention.self.value", "dense"], None),
        (["dense"], ["output.dense"]),
        (["dense"], r".*attention.*"),
    ],
)
def test_target_matching_as_peft(minilm, peft_twin, peft_modules, targets, exclude):
    model = lora_ext.inject_(
        minilm.fresh(), LoraConfig(r=2, target_modules=targets, exclude_modules=exclude)
    )
    twin = peft_twin(minilm.model, model, copy_values=False)
    assert set(dict(lora_layers(model))) == set(peft_modules(twin))


def test_rank_and_alpha_patterns_as_peft(minilm, peft_twin, peft_modules):
    cfg = LoraConfig(
        r=4,
        alpha=8,
        target_modules=["query", "key", "value"],
        rank_pattern={"key": 2, r"layer\.1\.attention\.self\.value": 6},
        alpha_pattern={"query": 3},
    )
    model = lora_ext.inject_(minilm.fresh(), cfg)
    twin = peft_modules(peft_twin(minilm.model, model, copy_values=False))
    layers = dict(lora_layers(model))
    assert layers["encoder.layer.1.attention.self.value"].r["default"] == 6
    assert layers["encoder.layer.0.attention.self.key"].r["default"] == 2
    for name, layer in layers.items():
        assert layer.r["default"] == twin[name].r["default"], name
        assert layer.scaling["default"] == pytest.approx(twin[name].scaling["default"]), name
        assert layer.lora_A["default"].shape == twin[name].lora_A["default"].weight.shape


def test_rslora_matches_peft(gpt2, randomize, peft_twin):
    cfg = LoraConfig(r=16, alpha=4, use_rslora=True, target_modules=["c_attn"])
    model = lora_ext.inject_(gpt2.fresh(), cfg)
    randomize(model)
    assert lora_layers(model)[0][1].scaling["default"] == pytest.approx(1.0)
    torch.testing.assert_close(gpt2.run(model), gpt2.run(peft_twin(gpt2.model, model)), **PEFT_TOL)


@pytest.mark.parametrize("init", ["kaiming", "gaussian", "pissa"])
def test_init_keeps_model_output(gpt2, init):
    model = lora_ext.inject_(gpt2.fresh(), LoraConfig(r=4, target_modules=gpt2.targets, init=init))
    torch.testing.assert_close(gpt2.run(model), gpt2.run(gpt2.model), rtol=1e-5, atol=1e-5)


def test_pissa_matches_peft(gpt2, peft_twin, peft_modules):
    cfg = LoraConfig(r=4, alpha=8, target_modules=["c_attn", "c_fc"], init="pissa")
    model = lora_ext.inject_(gpt2.fresh(), cfg)
    twin = peft_twin(gpt2.model, model, copy_values=False)  # PEFT runs its own PiSSA init
    theirs = peft_modules(twin)
    for name, layer in lora_layers(model):
        delta = layer.get_delta_weight("default")
        their_delta = theirs[name].get_delta_weight("default").t()  # fan_in_fan_out layout
        torch.testing.assert_close(delta, their_delta, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            layer.base_layer.weight, theirs[name].base_layer.weight, rtol=1e-4, atol=1e-5
        )


def test_merge_unmerge_round_trip_and_idempotent(minilm, randomize):
    model = lora_ext.inject_(
        minilm.fresh(), LoraConfig(r=4, alpha=8, target_modules=minilm.targets)
    )
    randomize(model)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    y = minilm.run(model)
    lora_ext.merge_(model, safe=True)  # finite: safe merges like the plain one
    merged_w = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    assert any(not torch.equal(merged_w[n], w0[n]) for n in w0)
    torch.testing.assert_close(minilm.run(model), y, **TOL)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lora_ext.merge_(model)  # already merged: no-op, one warning for the whole model
    assert len(caught) == 1 and "already merged" in str(caught[0].message)
    for n, p in model.named_parameters():
        if "base_layer" in n:
            assert torch.equal(p, merged_w[n]), n
    lora_ext.unmerge_(model)
    for n, p in model.named_parameters():
        if "base_layer" in n:
            torch.testing.assert_close(p, w0[n], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(minilm.run(model), y, **TOL)
    with pytest.warns(UserWarning, match="nothing is merged"):
        lora_ext.unmerge_(model)


def test_safe_merge_refuses_and_keeps_every_weight(minilm, randomize, snapshot):
    model = lora_ext.inject_(minilm.fresh(), LoraConfig(r=2, target_modules=["query", "value"]))
    randomize(model)
    last = lora_layers(model)[-1][1]
    with torch.no_grad():
        last.lora_B["default"][0, 0] = float("inf")
    snap = snapshot(model)
    with pytest.raises(ValueError, match="non-finite.*encoder.layer.5.attention.self.value"):
        lora_ext.merge_(model, safe=True)
    snap()  # no layer merged, not even the ones before the bad one
    assert not any(layer.merged for _, layer in lora_layers(model))


@pytest.mark.parametrize("which", ["minilm", "gpt2"])
def test_merge_and_unload_is_plain_and_equal(request, randomize, which):
    real = request.getfixturevalue(which)
    model = lora_ext.inject_(real.fresh(), LoraConfig(r=4, alpha=8, target_modules=real.targets))
    randomize(model)
    y = real.run(model)
    plain = lora_ext.merge_and_unload(model)
    assert plain is model
    torch.testing.assert_close(real.run(plain), y, **TOL)
    # no LoRA code left: the same module types and parameter names as the base model
    assert [(n, type(m)) for n, m in plain.named_modules()] == [
        (n, type(m)) for n, m in real.model.named_modules()
    ]
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in real.model.named_parameters()]
    assert not any(type(m).__module__.startswith("lora_ext") for m in plain.modules())
    assert not [k for k in vars(plain) if "lora" in k]
    kinds = {type(m) for n, m in plain.named_modules() if n.endswith(tuple(real.targets))}
    assert kinds <= {nn.Linear, Conv1D}


def test_several_adapters_match_peft(gpt2, randomize, peft_twin):
    model = gpt2.fresh()
    lora_ext.inject_(model, LoraConfig(r=4, alpha=8, target_modules=["c_attn", "c_fc"]), "one")
    lora_ext.inject_(model, LoraConfig(r=2, alpha=2, target_modules=["c_attn", "c_proj"]), "two")
    randomize(model, seed=3)
    assert lora_ext.inject.active_adapters(model) == ["one"]  # later adapters start inactive
    two_params = {
        id(layer.lora_A["two"]) for _, layer in lora_layers(model) if "two" in layer.lora_A
    }
    assert not two_params & {id(p) for p in lora_ext.lora_parameters(model)}
    twin = peft_twin(gpt2.model, model)
    for active in ("one", "two", ["one", "two"]):
        lora_ext.set_adapter(model, active)
        twin.base_model.set_adapter(active)
        torch.testing.assert_close(gpt2.run(model), gpt2.run(twin), **PEFT_TOL)
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        assert trainable == {id(p) for p in lora_ext.lora_parameters(model)}
    # several active adapters merge to the same function
    y = gpt2.run(model)
    lora_ext.merge_(model)
    torch.testing.assert_close(gpt2.run(model), y, **TOL)
    with pytest.warns(UserWarning, match="unmerging"):
        lora_ext.set_adapter(model, "two")
    assert not any(layer.merged for _, layer in lora_layers(model))


def test_delete_adapter_unwraps_and_restores(gpt2, randomize):
    model = gpt2.fresh()
    lora_ext.inject_(model, LoraConfig(r=4, target_modules=["c_attn", "c_fc"]), "one")
    lora_ext.inject_(model, LoraConfig(r=2, target_modules=["c_attn"]), "two")
    randomize(model)
    lora_ext.delete_adapter(model, "one")
    assert list(adapter_configs(model)) == ["two"]
    assert lora_ext.inject.active_adapters(model) == ["two"]  # the remaining one takes over
    assert isinstance(model.transformer.h[0].mlp.c_fc, Conv1D)  # only "one" was there: unwrapped
    assert isinstance(model.transformer.h[0].attn.c_attn, LoraLinear)
    lora_ext.delete_adapter(model, "two")
    assert not lora_layers(model) and not adapter_configs(model)
    torch.testing.assert_close(gpt2.run(model), gpt2.run(gpt2.model), rtol=0, atol=0)
    with pytest.raises(ValueError, match="'two' is not on this model"):
        lora_ext.delete_adapter(model, "two")


def test_state_dict_round_trip(minilm, randomize):
    cfg = LoraConfig(r=4, alpha=8, target_modules=minilm.targets)
    model = lora_ext.inject_(minilm.fresh(), cfg)
    randomize(model, seed=5)
    state = model.state_dict()
    assert "encoder.layer.0.attention.self.query.lora_A.default" in state
    assert "encoder.layer.0.attention.self.query.base_layer.weight" in state
    other = lora_ext.inject_(minilm.fresh(), cfg)
    other.load_state_dict(state)
    torch.testing.assert_close(minilm.run(other), minilm.run(model), rtol=0, atol=0)


def test_param_groups_lora_plus(gpt2):
    model = lora_ext.inject_(gpt2.fresh(), LoraConfig(r=4, target_modules=["c_attn"], bias="all"))
    groups = lora_ext.lora_param_groups(model, lr=1e-3, lr_ratio=8)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"lora_A", "lora_B", "bias"}
    assert by_name["lora_B"]["lr"] == pytest.approx(8e-3) and by_name["lora_A"]["lr"] == 1e-3
    layers = [layer for _, layer in lora_layers(model)]
    assert [id(p) for p in by_name["lora_A"]["params"]] == [id(x.lora_A["default"]) for x in layers]
    assert [id(p) for p in by_name["lora_B"]["params"]] == [id(x.lora_B["default"]) for x in layers]
    grouped = {id(p) for g in groups for p in g["params"]}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}
    opt = torch.optim.AdamW(groups)  # a torch optimizer takes the groups as they are
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in groups]
    with pytest.raises(ValueError, match="lr_ratio"):
        lora_ext.lora_param_groups(model, lr=1e-3, lr_ratio=0)


def test_summary_and_repr(minilm):
    model = lora_ext.inject_(
        minilm.fresh(), LoraConfig(r=8, alpha=16, target_modules=["query", "value"])
    )
    text = lora_ext.summary(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert "12 LoRA layers" in text
    assert f"{trainable:,} / {total:,}" in text
    assert trainable == 12 * 8 * (384 + 384)
    assert "default" in text and "active" in text
    assert "adapters=[default(r=8, alpha=16, scale=2" in repr(
        model.encoder.layer[0].attention.self.query
    )


# -- bad input: a clear error and the model exactly as before -----------------------------
@pytest.mark.parametrize(
    "cfg,error,match",
    [
        (LoraConfig(target_modules=["querry"]), ValueError, r"'querry' matches no module.*'query'"),
        (LoraConfig(target_modules=["query", "vlaue"]), ValueError, r"'vlaue'.*'value'"),
        (LoraConfig(target_modules=r"encoder\.layer\.9\..*"), ValueError, "matches no module"),
        (LoraConfig(target_modules=["LayerNorm"]), TypeError, "is a LayerNorm.*nn.Linear"),
        (LoraConfig(target_modules=["word_embeddings"]), TypeError, "is a Embedding"),
        (LoraConfig(r=400, target_modules=["query"], init="pissa"), ValueError, "r <= 384"),
        (LoraConfig(target_modules=["query"]), ValueError, "already in use"),
    ],
)
def test_bad_inject_leaves_model_unchanged(minilm, snapshot, cfg, error, match):
    model = minilm.fresh()
    if match == "already in use":
        lora_ext.inject_(model, LoraConfig(r=2, target_modules=["value"]))
    snap = snapshot(model)
    with pytest.raises(error, match=match):
        lora_ext.inject_(model, cfg)
    snap()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"r": 0, "target_modules": ["q"]}, "r: got 0"),
        ({"alpha": -1, "target_modules": ["q"]}, "alpha: got -1"),
        ({"dropout": 1.0, "target_modules": ["q"]}, r"dropout: got 1.0"),
        ({}, "target_modules: got None"),
        ({"target_modules": []}, "target_modules"),
        ({"target_modules": ["q"], "init": "xavier"}, "init: got 'xavier'"),
        ({"target_modules": ["q"], "bias": "some"}, "bias: got 'some'"),
        ({"target_modules": "("}, "not a valid regex"),
        ({"target_modules": ["q"], "rank_pattern": {"q": 0}}, r"rank_pattern\['q'\]"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraConfig(**kwargs)


def test_api_errors(gpt2):
    model = gpt2.fresh()
    with pytest.raises(ValueError, match="no LoRA layers"):
        lora_ext.merge_(model)
    with pytest.raises(TypeError, match="need lora_ext.LoraConfig"):
        lora_ext.inject_(model, {"r": 4})
    lora_ext.inject_(model, LoraConfig(r=2, target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="'nope' is not on this model"):
        lora_ext.set_adapter(model, "nope")
    with pytest.raises(ValueError, match="adapter_name"):
        lora_ext.inject_(model, LoraConfig(r=2, target_modules=["c_fc"]), adapter_name="a.b")
    lora_ext.merge_(model)
    with pytest.raises(ValueError, match="unmerge_"):
        lora_ext.delete_adapter(model, "default")


# -- a sequence classifier's head: trained and saved by default, as PEFT's SEQ_CLS --------
def test_seq_cls_head_trains_and_is_saved_by_default(minilm_classifier, tmp_path):
    import copy

    import peft
    from safetensors.torch import load_file

    model = lora_ext.inject_(minilm_classifier.fresh(), LoraConfig(r=2, target_modules=["query"]))
    head = dict(model.classifier.named_parameters())
    assert all(p.requires_grad for p in head.values())
    groups = {g["name"]: g for g in lora_ext.lora_param_groups(model, lr=1e-2)}
    assert {id(p) for p in groups["modules_to_save"]["params"]} == {id(p) for p in head.values()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in lora_ext.lora_parameters(model)}
    # one step moves the head (it was frozen and random before this fix)
    before = model.classifier.weight.detach().clone()
    opt = torch.optim.SGD(lora_ext.lora_param_groups(model, lr=1e-1), lr=1e-1)
    model.train()
    out = model(**minilm_classifier.inputs, labels=torch.tensor([0, 1]))
    out.loss.backward()
    opt.step()
    assert not torch.equal(model.classifier.weight, before)
    model.eval()
    # saved as PEFT saves a SEQ_CLS adapter, and PEFT reproduces our logits
    lora_ext.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"] and config["task_type"] == "SEQ_CLS"
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(minilm_classifier.model), tmp_path)
    torch.testing.assert_close(
        minilm_classifier.run(theirs.eval()), minilm_classifier.run(model), rtol=1e-5, atol=1e-5
    )


def test_seq_cls_head_opt_out_and_unnamed_head(minilm_classifier, tmp_path):
    model = lora_ext.inject_(
        minilm_classifier.fresh(), LoraConfig(r=2, target_modules=["query"], modules_to_save=[])
    )
    assert not any(p.requires_grad for p in model.classifier.parameters())
    lora_ext.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] is None

    class TinyForSequenceClassification(torch.nn.Module):  # a head PEFT's names miss
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(4, 4)
            self.head = torch.nn.Linear(4, 2)

    other = TinyForSequenceClassification()
    with pytest.raises(ValueError, match=r"without a head named.*modules_to_save=\['my_head'\]"):
        lora_ext.inject_(other, LoraConfig(r=2, target_modules=["body"]))
    assert isinstance(other.body, torch.nn.Linear)  # unchanged
    lora_ext.inject_(other, LoraConfig(r=2, target_modules=["body"], modules_to_save=["head"]))
    assert all(p.requires_grad for p in other.head.parameters())
