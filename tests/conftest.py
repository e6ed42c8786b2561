"""Shared fixtures: the real models, loaded once per test session.

The session-scoped models are shared by every test: never mutate them. Take a private copy
with ``copy.deepcopy`` (or ``RealModel.fresh()``) in any test that injects, merges or trains.

    def test_something(real_model):          # parametrised over minilm / smollm2 / gpt2
        model = real_model.fresh()
        lora_ext.inject_(model, lora_ext.LoraConfig(target_modules=real_model.targets))
        out = real_model.run(model)           # float32 logits / hidden states, no grad needed
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from lora_ext.training import models  # noqa: E402

try:  # profiles of the property-based tests (tests/core/test_properties.py)
    from hypothesis import HealthCheck, settings

    # CI: a fixed seed (derandomize) and a modest count; `--hypothesis-profile=long` goes deep
    _slow_ok = [HealthCheck.too_slow, HealthCheck.data_too_large]
    settings.register_profile(
        "ci", max_examples=30, deadline=None, derandomize=True, suppress_health_check=_slow_ok
    )
    settings.register_profile(
        "long", max_examples=2000, deadline=None, suppress_health_check=_slow_ok
    )
    settings.load_profile("ci")
except ImportError:  # hypothesis missing: test_properties.py skips itself
    pass


@dataclass
class RealModel:
    """A loaded real model with a small input batch and the layer names LoRA targets."""

    name: str
    model: nn.Module  # shared by the session: do not mutate, use fresh()
    inputs: dict[str, torch.Tensor]
    targets: list[str]
    output: Callable[[Any], torch.Tensor] = field(repr=False)
    tokenizer: Any = field(default=None, repr=False)

    def fresh(self) -> nn.Module:
        """A private deep copy to mutate."""
        return copy.deepcopy(self.model)

    def run(self, model: nn.Module) -> torch.Tensor:
        """The model's main output tensor (hidden states or logits) on ``inputs``."""
        return self.output(model(**self.inputs))


@pytest.fixture(scope="session")
def minilm() -> RealModel:
    """MiniLM-L6 BertModel (22.7M params), two short sentences."""
    from transformers import AutoTokenizer, BertModel

    path = models.minilm_dir()
    model = BertModel.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    inputs = dict(
        tokenizer(
            ["LoRA adds a low-rank update.", "A short second sentence here!"],
            padding=True,
            return_tensors="pt",
        )
    )
    return RealModel(
        "minilm",
        model,
        inputs,
        ["query", "key", "value", "dense"],
        lambda out: out.last_hidden_state,
        tokenizer,
    )


@pytest.fixture(scope="session")
def minilm_classifier() -> RealModel:
    """MiniLM-L6 with a seeded 2-label classification head (BertForSequenceClassification)."""
    model, tokenizer = models.load_minilm_classifier(num_labels=2)
    inputs = dict(tokenizer(["good film", "bad, slow film"], padding=True, return_tensors="pt"))
    return RealModel(
        "minilm_classifier",
        model,
        inputs,
        ["query", "value"],
        lambda out: out.logits,
        tokenizer,
    )


@pytest.fixture(scope="session")
def smollm2() -> RealModel:
    """SmolLM2-135M-Instruct (LlamaForCausalLM, float32), one short prompt (~10 s to load)."""
    model, tokenizer = models.load_smollm2()
    inputs = dict(tokenizer(["The capital of France is"], return_tensors="pt"))
    return RealModel(
        "smollm2",
        model,
        inputs,
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        lambda out: out.logits,
        tokenizer,
    )


@pytest.fixture(scope="session")
def gpt2() -> RealModel:
    """Tiny random GPT-2 (2 layers, 64 wide, Conv1D projections), a 2 x 8 token batch."""
    model = models.tiny_gpt2(seed=0)
    ids = torch.randint(
        0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0)
    )
    return RealModel(
        "gpt2",
        model,
        {"input_ids": ids},
        ["c_attn", "c_proj", "c_fc"],
        lambda out: out.logits,
    )


# SmolLM2 takes ~10 s to load (GGUF dequantisation) and a few seconds per test: marked slow
REAL_MODELS = ("minilm", pytest.param("smollm2", marks=pytest.mark.slow), "gpt2")


@pytest.fixture(params=REAL_MODELS)
def real_model(request: pytest.FixtureRequest) -> RealModel:
    """Each real model in turn (session-loaded; use .fresh() before mutating)."""
    return request.getfixturevalue(request.param)


def model_snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything a failed call must leave untouched: parameter/buffer values, requires_grad
    flags, module types and extra attributes of the root."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "types": [(n, type(m).__name__) for n, m in model.named_modules()],
        "attrs": sorted(k for k in vars(model) if k.startswith("_lora")),
    }


def assert_unchanged(model: nn.Module, snapshot: dict[str, Any]) -> None:
    """Assert ``model`` is bit-for-bit as in ``snapshot``."""
    now = model_snapshot(model)
    assert now["types"] == snapshot["types"]
    assert now["attrs"] == snapshot["attrs"]
    assert now["grad"] == snapshot["grad"]
    assert now["state"].keys() == snapshot["state"].keys()
    for key, value in snapshot["state"].items():
        assert torch.equal(now["state"][key], value), key


@pytest.fixture
def snapshot() -> Callable[[nn.Module], Callable[[], None]]:
    """snap = snapshot(model); ...; snap() asserts the model is exactly as when snapped."""

    def take(model: nn.Module) -> Callable[[], None]:
        saved = model_snapshot(model)
        return lambda: assert_unchanged(model, saved)

    return take


def randomize_lora(model: nn.Module, seed: int = 0, std: float = 0.05) -> None:
    """Fill every adapter's A and B with seeded normal values (B is zero after the default
    init, which would make most comparisons trivial)."""
    from lora_ext.inject import lora_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for name in layer.lora_A:
                for table in (layer.lora_A, layer.lora_B):
                    p = table[name]
                    p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * std)


@pytest.fixture
def randomize() -> Callable[..., None]:
    """randomize(model, seed=0, std=0.05): seeded non-zero A and B in every adapter."""
    return randomize_lora


def peft_twin_of(
    base: nn.Module,
    ours: nn.Module,
    adapter_names: list[str] | None = None,
    copy_values: bool = True,
    loaded_in_4bit: bool = False,
) -> nn.Module:
    """A PEFT PeftModel built from a deep copy of ``base`` with the same config(s) as the
    adapters on ``ours`` (same names), and, with copy_values, the same A and B values (and
    DoRA magnitudes). ``loaded_in_4bit``: ``base`` holds bitsandbytes 4-bit layers (what PEFT
    reads to pick its bnb LoRA layer)."""
    import peft

    from lora_ext.inject import adapter_configs, lora_layers

    configs = adapter_configs(ours)
    names = list(configs) if adapter_names is None else adapter_names
    fan_in_fan_out = any(layer.fan_in_fan_out for _, layer in lora_layers(ours))
    twin = None
    for name in names:
        fields = configs[name].to_peft_dict(fan_in_fan_out=fan_in_fan_out, inference_mode=False)
        fields.pop("peft_type")
        peft_config = peft.LoraConfig(**fields)
        if twin is None:
            copied = copy.deepcopy(base)
            if loaded_in_4bit:
                copied.__dict__["is_loaded_in_4bit"] = True
            twin = peft.get_peft_model(copied, peft_config, adapter_name=name)
        else:
            twin.add_adapter(name, peft_config)
    if copy_values:
        with torch.no_grad():
            for module_name, layer in lora_layers(ours):
                theirs = twin.base_model.model.get_submodule(module_name)
                for name in names:
                    if name in layer.lora_A:
                        theirs.lora_A[name].weight.copy_(layer.lora_A[name])
                        theirs.lora_B[name].weight.copy_(layer.lora_B[name])
                    if name in layer.lora_magnitude_vector:
                        theirs.lora_magnitude_vector[name].weight.copy_(
                            layer.lora_magnitude_vector[name]
                        )
    return twin.eval()


@pytest.fixture
def peft_twin() -> Callable[..., nn.Module]:
    """peft_twin(base, ours, adapter_names=None, copy_values=True, loaded_in_4bit=False)
    -> PEFT model twin."""
    return peft_twin_of


def peft_lora_modules(twin: nn.Module) -> dict[str, nn.Module]:
    """{module path in the base model: PEFT LoRA layer} of a PeftModel."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {n[len(prefix) :]: m for n, m in twin.named_modules() if isinstance(m, LoraLayer)}


@pytest.fixture
def peft_modules() -> Callable[[nn.Module], dict[str, nn.Module]]:
    """peft_modules(twin) -> {module path: PEFT LoRA layer}."""
    return peft_lora_modules
