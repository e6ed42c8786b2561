"""save_adapter / load_adapter: PEFT's on-disk format both ways, safetensors only, and
all-or-nothing loading."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora_ext
from lora_ext import LoraConfig
from lora_ext.inject import adapter_configs, lora_layers

# same A, B and products as PEFT: equal up to summation order (see test_inject.py)
TOL = {"rtol": 1e-5, "atol": 1e-5}


def peft_model(base, **kwargs):
    import copy

    import peft

    return peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs)).eval()


def randomize_peft(twin, seed: int = 0, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.mark.parametrize(
    "which,kwargs",
    [
        ("minilm", {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value", "dense"]}),
        (
            "minilm",
            {
                "r": 4,
                "lora_alpha": 8,
                "target_modules": ["key"],
                "use_rslora": True,
                "rank_pattern": {"layer.1.attention.self.key": 2},
                "alpha_pattern": {"layer.2.attention.self.key": 3},
            },
        ),
        (
            "gpt2",
            {
                "r": 4,
                "lora_alpha": 16,
                "target_modules": ["c_attn", "c_proj"],
                "fan_in_fan_out": True,
            },
        ),
        (
            "gpt2",
            {
                "r": 2,
                "lora_alpha": 2,
                "target_modules": ["c_fc"],
                "fan_in_fan_out": True,
                "bias": "lora_only",
            },
        ),
    ],
)
def test_peft_saved_adapter_loads_into_ours(request, tmp_path, which, kwargs):
    real = request.getfixturevalue(which)
    twin = peft_model(real.model, **kwargs)
    randomize_peft(twin, seed=1)
    if kwargs.get("bias") == "lora_only":
        with torch.no_grad():
            for name, p in twin.named_parameters():
                if name.endswith("base_layer.bias"):
                    p.add_(0.1)
    twin.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()

    ours = lora_ext.load_adapter(real.fresh(), tmp_path)
    assert list(adapter_configs(ours)) == ["default"]
    assert len(lora_layers(ours)) == sum(
        1 for n in load_file(tmp_path / "adapter_model.safetensors") if "lora_A" in n
    )
    y = real.run(ours)
    assert (y - real.run(real.model)).abs().max() > 1e-3
    torch.testing.assert_close(y, real.run(twin), **TOL)


@pytest.mark.parametrize(
    "which,cfg",
    [
        (
            "minilm",
            LoraConfig(r=4, alpha=8, target_modules=["query", "value"], alpha_pattern={"value": 2}),
        ),
        ("gpt2", LoraConfig(r=4, alpha=8, target_modules=r".*\.(c_attn|c_fc)", bias="lora_only")),
    ],
)
def test_our_adapter_loads_into_peft(request, tmp_path, randomize, which, cfg):
    import peft

    real = request.getfixturevalue(which)
    ours = lora_ext.inject_(real.fresh(), cfg, adapter_name="mine")
    randomize(ours, seed=2)
    if cfg.bias != "none":
        with torch.no_grad():
            for name, p in ours.named_parameters():
                if p.requires_grad and name.endswith("bias"):
                    p.add_(0.1)
    lora_ext.save_adapter(ours, tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.") for k in keys)
    assert not any("mine" in k for k in keys)  # no adapter name in the keys, as PEFT
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (
        config["peft_type"] == "LORA" and config["r"] == cfg.r and config["lora_alpha"] == cfg.alpha
    )

    import copy

    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(real.model), tmp_path).eval()
    torch.testing.assert_close(real.run(theirs), real.run(ours), **TOL)
    # and back into ours
    again = lora_ext.load_adapter(real.fresh(), tmp_path, adapter_name="again")
    torch.testing.assert_close(real.run(again), real.run(ours), rtol=0, atol=0)


def test_pissa_adapter_round_trip(gpt2, tmp_path, randomize):
    import copy

    import peft

    ours = lora_ext.inject_(
        gpt2.fresh(), LoraConfig(r=4, alpha=4, target_modules=["c_attn"], init="pissa")
    )
    with torch.no_grad():  # "train": move A and B away from their SVD init
        for _, layer in lora_layers(ours):
            layer.lora_B["default"].mul_(1.5)
    lora_ext.save_adapter(ours, tmp_path)
    assert (
        json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    )
    # onto the original base model: W is residualised again, as PEFT does, then A, B load
    again = lora_ext.load_adapter(gpt2.fresh(), tmp_path)
    torch.testing.assert_close(gpt2.run(again), gpt2.run(ours), **TOL)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(gpt2.model), tmp_path).eval()
    torch.testing.assert_close(gpt2.run(theirs), gpt2.run(ours), **TOL)


def test_second_adapter_and_set_adapter(gpt2, tmp_path, randomize):
    first = lora_ext.inject_(gpt2.fresh(), LoraConfig(r=4, target_modules=["c_attn"]))
    randomize(first, seed=7)
    lora_ext.save_adapter(first, tmp_path / "a")
    model = lora_ext.inject_(gpt2.fresh(), LoraConfig(r=2, target_modules=["c_attn", "c_fc"]))
    randomize(model, seed=8)
    y_default = gpt2.run(model)
    lora_ext.load_adapter(model, tmp_path / "a", adapter_name="other")
    torch.testing.assert_close(gpt2.run(model), y_default, rtol=0, atol=0)  # loaded inactive
    lora_ext.set_adapter(model, "other")
    torch.testing.assert_close(gpt2.run(model), gpt2.run(first), rtol=0, atol=0)
    lora_ext.set_adapter(model, ["default", "other"])
    with pytest.raises(ValueError, match="name the one to save"):
        lora_ext.save_adapter(model, tmp_path / "b")
    lora_ext.save_adapter(model, tmp_path / "b", adapter_name="other")
    assert (
        load_file(tmp_path / "b" / "adapter_model.safetensors").keys()
        == load_file(tmp_path / "a" / "adapter_model.safetensors").keys()
    )


# -- bad input: a clear error and the model exactly as before -----------------------------
@pytest.fixture
def saved(gpt2, tmp_path, randomize):
    """A valid adapter directory for the tiny GPT-2 (c_attn and c_fc, r=4)."""
    model = lora_ext.inject_(gpt2.fresh(), LoraConfig(r=4, target_modules=["c_attn", "c_fc"]))
    randomize(model)
    return lora_ext.save_adapter(model, tmp_path / "adapter")


def _edit_tensors(path, edit):
    file = path / "adapter_model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)


def _edit_config(path, edit):
    file = path / "adapter_config.json"
    config = json.loads(file.read_text())
    edit(config)
    file.write_text(json.dumps(config))


KEY = "base_model.model.transformer.h.1.mlp.c_fc.lora_B.weight"


@pytest.mark.parametrize(
    "edit,match",
    [
        (
            lambda p: _edit_tensors(p, lambda t: t.update({KEY: torch.zeros(256, 3)})),
            r"'base_model.model.transformer.h.1.mlp.c_fc.lora_B.weight' has shape \[256, 3\] but the model needs \[256, 4\]",
        ),
        (lambda p: _edit_tensors(p, lambda t: t.pop(KEY)), f"missing key '{KEY}'"),
        (
            lambda p: _edit_tensors(
                p,
                lambda t: t.update(
                    {
                        "base_model.model.transformer.h.7.attn.c_attn.lora_A.weight": torch.zeros(
                            4, 64
                        )
                    }
                ),
            ),
            "h.7.attn.c_attn.lora_A.weight' does not fit the model",
        ),
        (
            lambda p: _edit_config(p, lambda c: c.update(r=8)),
            r"has shape \[4, 64\] but the model needs \[8, 64\]",
        ),
        (
            lambda p: _edit_config(p, lambda c: c.update(target_modules=["c_atn"])),
            r"'c_atn' matches no module.*'c_attn'",
        ),
        (
            lambda p: _edit_config(p, lambda c: c.update(use_dora=True)),
            "use_dora=true, which needs a DoRA magnitude vector",
        ),
        (lambda p: _edit_config(p, lambda c: c.update(peft_type="IA3")), "peft_type is 'IA3'"),
        (lambda p: (p / "adapter_config.json").unlink(), "no adapter_config.json"),
        (
            lambda p: (p / "adapter_model.safetensors").write_bytes(b"not a safetensors file"),
            "not a readable safetensors",
        ),
    ],
)
def test_bad_adapter_leaves_model_unchanged(gpt2, saved, snapshot, edit, match):
    edit(saved)
    model = lora_ext.inject_(gpt2.fresh(), LoraConfig(r=2, target_modules=["c_proj"]), "kept")
    snap = snapshot(model)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        lora_ext.load_adapter(model, saved, adapter_name="new")
    snap()
    plain = gpt2.fresh()
    snap = snapshot(plain)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        lora_ext.load_adapter(plain, saved)
    snap()


def test_duplicate_adapter_name_on_load(gpt2, saved, snapshot):
    model = lora_ext.load_adapter(gpt2.fresh(), saved)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="'default' is already in use"):
        lora_ext.load_adapter(model, saved)
    snap()


@pytest.mark.parametrize("name", ["adapter_model.bin", "adapter.pt"])
def test_pickles_are_refused(gpt2, saved, snapshot, name):
    tensors = load_file(saved / "adapter_model.safetensors")
    (saved / "adapter_model.safetensors").unlink()
    torch.save(tensors, saved / name)
    model = gpt2.fresh()
    snap = snapshot(model)
    for target in (saved, saved / name):
        with pytest.raises(ValueError, match="pickle file.*safetensors only.*arbitrary code"):
            lora_ext.load_adapter(model, target)
    snap()


# -- modules_to_save: a SEQ_CLS adapter's trained head, in PEFT's layout -------------------
HEAD_KEYS = {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}


def _perturb_head(model, seed: int) -> None:
    """Give the classifier head values no base model has (stand-in for a trained head)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.classifier.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.fixture
def peft_seq_cls(minilm_classifier, tmp_path):
    """A PEFT SEQ_CLS adapter (query/value, r=4, head in modules_to_save) with random B and a
    changed head, saved by save_pretrained: (PEFT model, directory)."""
    import peft

    twin = peft_model(
        minilm_classifier.model,
        task_type="SEQ_CLS",
        r=4,
        lora_alpha=8,
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
    )
    randomize_peft(twin, seed=3)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if "classifier.modules_to_save.default." in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    twin.save_pretrained(tmp_path / "peft")
    assert isinstance(twin.base_model.model.classifier, peft.utils.other.ModulesToSaveWrapper)
    return twin, tmp_path / "peft"


def test_peft_seq_cls_adapter_loads_into_ours(minilm_classifier, peft_seq_cls, tmp_path):
    twin, path = peft_seq_cls
    keys = set(load_file(path / "adapter_model.safetensors"))
    assert keys >= HEAD_KEYS  # PEFT drops "modules_to_save.default." from the key
    ours = lora_ext.load_adapter(minilm_classifier.fresh(), path)
    head = twin.base_model.model.classifier.modules_to_save["default"]
    torch.testing.assert_close(ours.classifier.weight, head.weight, rtol=0, atol=0)
    torch.testing.assert_close(minilm_classifier.run(ours), minilm_classifier.run(twin), **TOL)
    # saved again by us (modules_to_save remembered from the load): same keys, same logits
    lora_ext.save_adapter(ours, tmp_path / "again")
    assert set(load_file(tmp_path / "again" / "adapter_model.safetensors")) == keys
    config = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "classifier" in config["modules_to_save"]
    again = lora_ext.load_adapter(minilm_classifier.fresh(), tmp_path / "again")
    torch.testing.assert_close(
        minilm_classifier.run(again), minilm_classifier.run(ours), rtol=0, atol=0
    )


@pytest.mark.parametrize("task_type", ["SEQ_CLS", None])
def test_our_adapter_with_head_loads_into_peft(minilm_classifier, tmp_path, randomize, task_type):
    import copy

    import peft

    ours = lora_ext.inject_(
        minilm_classifier.fresh(), LoraConfig(r=4, alpha=8, target_modules=["query", "value"])
    )
    randomize(ours, seed=5)
    _perturb_head(ours, seed=6)
    lora_ext.save_adapter(ours, tmp_path, modules_to_save=["classifier"], task_type=task_type)
    assert set(load_file(tmp_path / "adapter_model.safetensors")) >= HEAD_KEYS
    base = copy.deepcopy(minilm_classifier.model)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    assert isinstance(theirs.base_model.model.classifier, peft.utils.other.ModulesToSaveWrapper)
    torch.testing.assert_close(minilm_classifier.run(theirs), minilm_classifier.run(ours), **TOL)
    # the base model's own head played no part: PEFT used its saved copy
    assert not torch.equal(
        minilm_classifier.run(minilm_classifier.model), minilm_classifier.run(ours)
    )


HEAD_W = "base_model.model.classifier.weight"


@pytest.mark.parametrize(
    "edit,match",
    [
        (
            lambda p: _edit_tensors(p, lambda t: t.update({HEAD_W: torch.zeros(3, 384)})),
            rf"'{HEAD_W}' has shape \[3, 384\] but the model needs \[2, 384\]",
        ),
        (
            lambda p: _edit_tensors(p, lambda t: t.pop("base_model.model.classifier.bias")),
            "missing key 'base_model.model.classifier.bias'.*modules_to_save",
        ),
        (
            lambda p: _edit_config(p, lambda c: c.update(modules_to_save=["nohead"])),
            r"modules_to_save: \['nohead'\] matches no module",
        ),
        (
            lambda p: _edit_config(p, lambda c: c.update(modules_to_save=None)),
            "'base_model.model.classifier.bias' does not fit the model",
        ),
        (
            lambda p: _edit_config(p, lambda c: c.update(modules_to_save=["query"])),
            "which target_modules also adapts",
        ),
    ],
)
def test_bad_head_leaves_model_unchanged(minilm_classifier, peft_seq_cls, snapshot, edit, match):
    _, path = peft_seq_cls
    edit(path)
    for model in (
        minilm_classifier.fresh(),
        lora_ext.inject_(
            minilm_classifier.fresh(), LoraConfig(r=2, target_modules=["key"]), "kept"
        ),
    ):
        snap = snapshot(model)
        with pytest.raises(ValueError, match=match):
            lora_ext.load_adapter(model, path, adapter_name="new")
        snap()


# -- all or nothing, also when something fails while the model is being changed ------------
@pytest.mark.parametrize("fail_at", ["third layer", "after every tensor was written"])
@pytest.mark.parametrize("init", ["kaiming", "pissa"])
def test_failure_while_loading_rolls_everything_back(
    gpt2, tmp_path, randomize, snapshot, monkeypatch, fail_at, init
):
    import lora_ext.inject as inject
    from lora_ext.layer import LoraLinear

    cfg = LoraConfig(r=4, target_modules=["c_attn", "c_fc"], bias="lora_only", init=init)
    source = lora_ext.inject_(gpt2.fresh(), cfg)
    randomize(source)
    path = lora_ext.save_adapter(source, tmp_path / "adapter")
    model = lora_ext.inject_(gpt2.fresh(), LoraConfig(r=2, target_modules=["c_attn"]), "kept")
    snap = snapshot(model)
    if fail_at == "third layer":
        calls = []
        real = LoraLinear.add_adapter

        def add_adapter(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                raise MemoryError("simulated")
            return real(self, *args, **kwargs)

        monkeypatch.setattr(LoraLinear, "add_adapter", add_adapter)
    else:  # the LoRA tensors, biases and (PiSSA) residualised weights are all written

        def boom(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(inject, "_apply_active", boom)
    with pytest.raises((MemoryError, KeyboardInterrupt)):
        lora_ext.load_adapter(model, path, adapter_name="new")
    snap()
    monkeypatch.undo()  # and the model still works: the same adapter now loads
    lora_ext.load_adapter(model, path, adapter_name="new")
    lora_ext.set_adapter(model, "new")
    assert len(lora_layers(model)) == 4


def test_head_write_is_rolled_back(minilm_classifier, peft_seq_cls, snapshot, monkeypatch):
    import lora_ext.inject as inject

    _, path = peft_seq_cls
    model = minilm_classifier.fresh()
    snap = snapshot(model)

    def boom(*args, **kwargs):
        raise RuntimeError("simulated")

    monkeypatch.setattr(inject, "_apply_active", boom)
    with pytest.raises(RuntimeError):
        lora_ext.load_adapter(model, path)
    snap()  # the classifier head the file carries was written, then restored


def test_save_adapter_replaces_files_atomically(tmp_path, monkeypatch):
    """A failure while writing leaves the previous adapter whole and no temporary file."""
    import lora_ext
    from lora_ext import io as lio

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    lora_ext.inject_(model, lora_ext.LoraConfig(r=2, target_modules=["0"]))
    out = lora_ext.save_adapter(model, tmp_path / "a")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with torch.no_grad():
        for p in lora_ext.lora_parameters(model):
            p.add_(1.0)

    def failing_write(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lio.Path, "write_text", failing_write)
    with pytest.raises(OSError, match="No space"):
        lora_ext.save_adapter(model, out)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
