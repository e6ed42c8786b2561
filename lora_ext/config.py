"""LoraConfig: what to adapt and how, with PEFT's semantics and field mapping.

The field names are ours (``alpha``, ``dropout``, ``init``); ``to_peft_dict`` and
``from_peft_dict`` translate to and from the ``adapter_config.json`` that PEFT writes, so
adapters move between PEFT and lora_ext in both directions.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


class Task(StrEnum):
    """What a model computes, the one home of the task names (a str: ``Task.SEQ_CLS ==
    "seq-cls"``, so JSON files and CLI flags carry the plain value)."""

    SEQ_CLS = "seq-cls"  # [batch, seq] tokens -> [batch, labels] logits
    CAUSAL_LM = "causal-lm"  # [batch, seq] tokens -> [batch, seq, vocab] next-token logits

    @classmethod
    def from_architecture(cls, architecture: str) -> Task | None:
        """The task of a transformers class name (``BertForSequenceClassification``,
        ``LlamaForCausalLM``, ``GPT2LMHeadModel``), or None for another head."""
        if architecture.endswith("ForSequenceClassification"):
            return cls.SEQ_CLS
        if architecture.endswith(("ForCausalLM", "LMHeadModel")):
            return cls.CAUSAL_LM
        return None

    @classmethod
    def of_model(cls, model: Any) -> Task | None:
        """The task of a model object (by its class), or None."""
        return cls.from_architecture(type(model).__name__)


INITS = ("kaiming", "gaussian", "pissa")
BIASES = ("none", "all", "lora_only")

# our init name <-> PEFT's init_lora_weights value
_INIT_TO_PEFT: dict[str, Any] = {"kaiming": True, "gaussian": "gaussian", "pissa": "pissa"}

# PEFT LoraConfig fields whose non-default values would change what the adapter computes in
# ways lora_ext does not implement: refuse them instead of loading something different.
_PEFT_UNSUPPORTED: dict[str, Any] = {
    "use_dora": False,
    "lora_bias": False,
    "modules_to_save": None,
    "layers_to_transform": None,
    "layers_pattern": None,
    "layer_replication": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "use_bdlora": None,
    "arrow_config": None,
    "monteclora_config": None,
    "megatron_config": None,
}


def _pattern_key(patterns: Mapping[str, Any], name: str) -> str | None:
    """PEFT's rule for rank_pattern/alpha_pattern: the first key that matches the end of the
    dotted module name (as a regex) wins."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


@dataclass
class LoraConfig:
    """How to adapt a model with LoRA.

    Args:
        r: rank of the update B A (A is [r, in], B is [out, r]).
        alpha: scale numerator: the update is scaled by alpha / r (alpha / sqrt(r) with
            ``use_rslora``).
        dropout: dropout probability applied to the LoRA branch input in train mode.
        target_modules: module names matched as PEFT does: a list of names, each matching a
            module whose full dotted name equals it or ends with ``"." + name``; or one
            regex string that must match the full module name.
        use_rslora: rank-stabilised scaling alpha / sqrt(r).
        init: "kaiming" (A kaiming-uniform, B = 0: the model is unchanged at start),
            "gaussian" (A ~ N(0, std 1/r) as PEFT, B = 0), or "pissa" (A, B from the top-r
            SVD of W, with W replaced by its residual: the model is unchanged at start).
        bias: "none", "all" (every bias of the model trains) or "lora_only" (biases of the
            adapted layers train), as PEFT.
        rank_pattern: per-module rank overrides, {regex matched at the end of the name: r}.
        alpha_pattern: per-module alpha overrides, same matching.
        exclude_modules: names (same rules as target_modules) never adapted.
    """

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    use_rslora: bool = False
    init: str = "kaiming"
    bias: str = "none"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    exclude_modules: list[str] | str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r: got {self.r!r}, need a positive int")
        if not _positive_number(self.alpha):
            raise ValueError(f"alpha: got {self.alpha!r}, need a positive finite number")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: got {self.dropout!r}, need a float in [0, 1)")
        self.dropout = float(self.dropout)
        self.target_modules = _names("target_modules", self.target_modules, required=True)
        self.exclude_modules = _names("exclude_modules", self.exclude_modules, required=False)
        if self.init not in INITS:
            raise ValueError(f"init: got {self.init!r}, need one of {INITS}")
        if self.bias not in BIASES:
            raise ValueError(f"bias: got {self.bias!r}, need one of {BIASES}")
        self.use_rslora = bool(self.use_rslora)
        self.rank_pattern = dict(self.rank_pattern or {})
        self.alpha_pattern = dict(self.alpha_pattern or {})
        for key, value in self.rank_pattern.items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"rank_pattern[{key!r}]: got {value!r}, need a positive int")
        for key, value in self.alpha_pattern.items():
            if not _positive_number(value):
                raise ValueError(f"alpha_pattern[{key!r}]: got {value!r}, need a positive number")
        for name, patterns in (
            ("rank_pattern", self.rank_pattern),
            ("alpha_pattern", self.alpha_pattern),
        ):
            for key in patterns:
                try:
                    re.compile(key)
                except re.error as exc:
                    raise ValueError(f"{name}: key {key!r} is not a valid regex ({exc})") from None

    # -- per-module values -------------------------------------------------------------
    def rank_for(self, module_name: str) -> int:
        """The rank for a module (rank_pattern first, then r)."""
        key = _pattern_key(self.rank_pattern, module_name)
        return self.r if key is None else self.rank_pattern[key]

    def alpha_for(self, module_name: str) -> float:
        """The alpha for a module (alpha_pattern first, then alpha)."""
        key = _pattern_key(self.alpha_pattern, module_name)
        return self.alpha if key is None else self.alpha_pattern[key]

    def scale_for(self, module_name: str) -> float:
        """alpha / r, or alpha / sqrt(r) with use_rslora, for a module."""
        r = self.rank_for(module_name)
        alpha = self.alpha_for(module_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    # -- PEFT adapter_config.json --------------------------------------------------------
    def to_peft_dict(self, *, fan_in_fan_out: bool = False, **extra: Any) -> dict[str, Any]:
        """The ``adapter_config.json`` content PEFT expects for this config (PEFT's names)."""
        target = self.target_modules
        out: dict[str, Any] = {
            "peft_type": "LORA",
            "task_type": None,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": target if isinstance(target, str) else list(target),
            "exclude_modules": self.exclude_modules,
            "use_rslora": self.use_rslora,
            "init_lora_weights": _INIT_TO_PEFT[self.init],
            "bias": self.bias,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "fan_in_fan_out": fan_in_fan_out,
            "inference_mode": True,
            "modules_to_save": None,
            "use_dora": False,
            "lora_bias": False,
            "layers_to_transform": None,
            "layers_pattern": None,
        }
        out.update(extra)
        return out

    @classmethod
    def from_peft_dict(cls, data: Mapping[str, Any]) -> LoraConfig:
        """Build a config from PEFT's ``adapter_config.json`` content.

        Raises ValueError for adapters that are not LoRA or use features lora_ext does not
        implement (DoRA, layers_to_transform, ...), naming the field. ``modules_to_save``
        (e.g. a classifier head) is handled by ``lora_ext.io``, not by the config.
        """
        peft_type = data.get("peft_type", "LORA")
        if str(peft_type).upper() != "LORA":
            raise ValueError(f"adapter_config.json: peft_type is {peft_type!r}, need 'LORA'")
        for key, default in _PEFT_UNSUPPORTED.items():
            value = data.get(key, default)
            if value not in (default, None, False, [], {}):
                raise ValueError(
                    f"adapter_config.json: {key}={value!r} is a PEFT feature lora_ext does not "
                    f"implement (need {default!r})"
                )
        init_value = data.get("init_lora_weights", True)
        inits = {str(v).lower(): k for k, v in _INIT_TO_PEFT.items()}
        init = inits.get(str(init_value).lower())
        if init is None:
            raise ValueError(
                f"adapter_config.json: init_lora_weights={init_value!r} is not supported "
                f"(need one of {list(_INIT_TO_PEFT.values())})"
            )
        return cls(
            r=int(data.get("r", 8)),
            alpha=data.get("lora_alpha", 8),
            dropout=float(data.get("lora_dropout", 0.0) or 0.0),
            target_modules=data.get("target_modules"),
            use_rslora=bool(data.get("use_rslora", False)),
            init=init,
            bias=data.get("bias", "none") or "none",
            rank_pattern=dict(data.get("rank_pattern") or {}),
            alpha_pattern=dict(data.get("alpha_pattern") or {}),
            exclude_modules=data.get("exclude_modules"),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (our names)."""
        return asdict(self)


def _positive_number(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def _names(arg: str, value: Any, *, required: bool) -> list[str] | str | None:
    """Normalise target/exclude names: a regex string stays a string; a sequence becomes a
    list of non-empty strings (sets are sorted so configs compare and serialise stably)."""
    if value is None:
        if required:
            raise ValueError(
                f"{arg}: got None; name the layers to adapt, e.g. ['query', 'value'] "
                f"(BERT), ['q_proj', 'v_proj'] (Llama) or ['c_attn'] (GPT-2)"
            )
        return None
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{arg}: got an empty string, need a regex or a list of names")
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"{arg}: {value!r} is not a valid regex ({exc})") from None
        return value
    if isinstance(value, (set, frozenset)):
        value = sorted(value)
    if not isinstance(value, Sequence) or not value:
        if not required and isinstance(value, Sequence):
            return None
        raise ValueError(f"{arg}: got {value!r}, need a non-empty list of module names or a regex")
    names = list(value)
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{arg}: entry {name!r} is not a non-empty string")
    return names
