"""LoraConfig: what to adapt and how, with PEFT's semantics and field mapping.

The field names are ours (``alpha``, ``dropout``, ``init``); ``to_peft_dict`` and
``from_peft_dict`` translate to and from the ``adapter_config.json`` that PEFT writes, so
adapters move between PEFT and lora_ext in both directions.
"""

from __future__ import annotations

import functools
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

import regex


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
# LoraConfig.base_quantization: the frozen base in bitsandbytes 4-bit nf4 or 8-bit (QLoRA)
BASE_QUANTIZATIONS = ("nf4", "int8")
BIASES = ("none", "all", "lora_only")

# our init name <-> PEFT's init_lora_weights value
_INIT_TO_PEFT: dict[str, Any] = {"kaiming": True, "gaussian": "gaussian", "pissa": "pissa"}

# PEFT LoraConfig fields whose non-default values would change what the adapter computes in
# ways lora_ext does not implement: refuse them instead of loading something different.
_PEFT_UNSUPPORTED: dict[str, Any] = {
    "lora_bias": False,
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


# -- module-name patterns, safe against configs from strangers -----------------------------
# PEFT matches with Python's `re`, which can backtrack for ever (`((\w|\.)+)+!`), blocking
# the interpreter where no timer can interrupt it. Here every pattern is parsed by `re`'s own
# parser (exactly the syntax PEFT accepts), its unrolled size is bounded before it is compiled
# (the `regex` engine unrolls counted repeats: `(a{1000}){1000}` costs 2 s and 275 MB), and it
# is run by `regex` (Python-`re` semantics, lookarounds and back-references included) with a
# CPU-time budget shared by all the matching of one inject_ / load_adapter.
MATCH_TIME_LIMIT_S = 1.0  # CPU seconds for all the regex matching of one inject_/load_adapter
MAX_PATTERN_COST = 20_000  # unrolled size of one pattern (characters, repeats multiplied out)
MAX_CONFIG_PATTERN_COST = 200_000  # the same, summed over every pattern of one config
MAX_PATTERN_KEYS = 1_000  # keys of rank_pattern / alpha_pattern (real configs: a few dozen)

_REPEATS = ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT")


def _unrolled_cost(parsed: Any, cap: int) -> int:
    """Size of a parsed `re` pattern with every counted repeat multiplied out (what `regex`
    compiles), stopping early once it exceeds ``cap``."""
    total = 0
    for op, av in parsed:
        if str(op) in _REPEATS:
            lo, hi, sub = av
            times = lo if hi == re._constants.MAXREPEAT else hi
            total += 1 + _unrolled_cost(sub, cap) * max(int(times), 1)
        else:
            total += 1 + sum(_unrolled_cost(sp, cap) for sp in _subpatterns(av))
        if total > cap:
            return total
    return total


def _subpatterns(av: Any) -> list[Any]:
    if isinstance(av, re._parser.SubPattern):
        return [av]
    if isinstance(av, (tuple, list)):
        return [sp for item in av for sp in _subpatterns(item)]
    return []


@functools.lru_cache(maxsize=1024)
def _compile(pattern: str) -> tuple[Any, int]:
    """(compiled `regex` pattern, unrolled cost), or ValueError with the reason (no name)."""
    try:
        parsed = re._parser.parse(pattern)
    except re.error as exc:
        raise ValueError(f"is not a valid regex ({exc})") from None
    except RecursionError:
        raise ValueError("is not a valid regex (nested too deeply)") from None
    try:
        cost = _unrolled_cost(parsed, MAX_PATTERN_COST)
    except RecursionError:
        raise ValueError("is too complex (nested too deeply)") from None
    if cost > MAX_PATTERN_COST:
        raise ValueError(
            f"is too complex: its repeats unroll to more than {MAX_PATTERN_COST:,} items "
            "(a nested counted repeat such as (a{1000}){1000}?)"
        )
    try:
        return regex.compile(pattern, flags=regex.VERSION0), cost
    except (regex.error, RecursionError, OverflowError) as exc:  # re accepted it; regex not
        raise ValueError(f"is not supported by the regex engine ({exc})") from None


def _suffix_pattern(key: str) -> str:
    r"""PEFT's rank_pattern/alpha_pattern rule, as a regex: ``key`` matches the end of the
    dotted module name (``get_pattern_key``: ``re.match(rf"(.*\.)?({key})$", name)``)."""
    return rf"(.*\.)?({key})$"


def check_pattern(arg: str, pattern: str, *, suffix: bool = False) -> int:
    """Validate one module-name regex as PEFT would use it (``suffix``: a rank/alpha_pattern
    key) and return its unrolled cost. ValueError names ``arg`` and the pattern."""
    try:
        return _compile(_suffix_pattern(pattern) if suffix else pattern)[1]
    except ValueError as exc:
        raise ValueError(f"{arg}: the regex {_short(pattern)} {exc}") from None


class NameMatcher:
    """Matches module names against a config's patterns with PEFT's rules and bounded work.

    One matcher serves one inject_ / load_adapter: all its regex matching together gets
    ``time_limit`` CPU seconds (``MATCH_TIME_LIMIT_S``); past that ValueError names the
    field and the pattern that was running (``where`` prefixes the field, e.g. the file).
    """

    def __init__(self, time_limit: float | None = None, where: str = "") -> None:
        self.time_limit = MATCH_TIME_LIMIT_S if time_limit is None else float(time_limit)
        self.where = where
        self._start = time.thread_time()

    def _timeout(self, arg: str, pattern: str) -> ValueError:
        return ValueError(
            f"{self.where}{arg}: matching module names against the regex {_short(pattern)} took more "
            f"than {self.time_limit:g} s of CPU (catastrophic backtracking, or too many "
            "patterns); simplify it, e.g. list the module names instead"
        )

    def _run(self, arg: str, pattern: str, compiled: Any, name: str, how: str) -> bool:
        left = self.time_limit - (time.thread_time() - self._start)
        if left <= 0:
            raise self._timeout(arg, pattern)
        try:
            found = getattr(compiled, how)(name, timeout=left)
        except TimeoutError:
            raise self._timeout(arg, pattern) from None
        return found is not None

    def fullmatch(self, arg: str, pattern: str, name: str) -> bool:
        """``re.fullmatch(pattern, name)`` (PEFT's rule for a regex target_modules string)."""
        try:
            compiled = _compile(pattern)[0]
        except ValueError as exc:
            raise ValueError(f"{self.where}{arg}: the regex {_short(pattern)} {exc}") from None
        return self._run(arg, pattern, compiled, name, "fullmatch")

    def pattern_key(self, arg: str, patterns: Mapping[str, Any], name: str) -> str | None:
        """PEFT's rule for rank_pattern/alpha_pattern: the first key that matches the end of
        the dotted module name (as a regex) wins; None if none does."""
        for key in patterns:
            try:
                compiled = _compile(_suffix_pattern(key))[0]
            except ValueError as exc:
                raise ValueError(f"{self.where}{arg}: the regex {_short(key)} {exc}") from None
            if self._run(f"{arg}[{_short(key)}]", key, compiled, name, "match"):
                return key
        return None


def names_match(names: Sequence[str] | str, name: str, matcher: NameMatcher, arg: str) -> bool:
    """PEFT's check_target_module_exists for one module name: a string is a regex for the
    full name; a list matches the exact name or a dotted suffix (``name.endswith("." + n)``)."""
    if isinstance(names, str):
        return matcher.fullmatch(arg, names, name)
    return bool(matched_entries(names, name))


def matched_entries(names: Sequence[str], name: str) -> set[str]:
    """The entries of a name list that select module ``name`` (exact name or dotted suffix),
    found in O(depth) set look-ups instead of one ``endswith`` per entry."""
    wanted = names if isinstance(names, (set, frozenset)) else set(names)
    suffixes = {name} | {name[i + 1 :] for i, ch in enumerate(name) if ch == "."}
    return suffixes & wanted


@dataclass
class LoraConfig:
    """How to adapt a model with LoRA.

    Args:
        r: rank of the update B A (A is [r, in], B is [out, r]); at most min(in, out) of
            each adapted layer (a larger rank adds parameters but no expressiveness).
        alpha: scale numerator: the update is scaled by alpha / r (alpha / sqrt(r) with
            ``use_rslora``); the scale must be finite in float32.
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
        modules_to_save: whole modules trained and saved with the adapter (PEFT's
            ``modules_to_save``: a module whose dotted name ends with an entry). None (the
            default) does what PEFT's SEQ_CLS task does: on a sequence classifier
            (``*ForSequenceClassification``) its task head, ``classifier`` or ``score``, a
            freshly initialised layer that has to learn, is trained and saved; on other
            models nothing. ``[]``: none (the head stays frozen, as the base model).
        use_dora: DoRA (weight-decomposed LoRA, PEFT's ``use_dora``): each adapted layer
            also trains a magnitude vector m [out]; y = (m / ||W + sBA||_row) (x W^T +
            s drop(x) A^T B^T) + b (see ``lora_ext.dora``).
        base_quantization: None, "nf4" or "int8" (QLoRA): inject_ first quantizes the frozen
            base's linear layers with bitsandbytes (``Linear4bit`` nf4 with the model's float
            dtype as compute dtype, or ``Linear8bitLt``), all but the output heads
            (lm_head / classifier / score) and modules_to_save, then wraps the targets. A
            property of the base, not of the adapter: not written to adapter_config.json
            (PEFT keeps it in the base model's quantization_config); a loaded adapter reads
            None and wraps whatever layers the model has. See ``lora_ext/quantized.py``.

    Regexes (a target_modules / exclude_modules string, rank_pattern and alpha_pattern
    keys) are parsed as Python's ``re`` does (PEFT's semantics) and matched without
    unbounded backtracking: see ``NameMatcher``.
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
    modules_to_save: list[str] | None = None
    use_dora: bool = False
    base_quantization: str | None = None

    def __post_init__(self) -> None:
        if not _positive_int(self.r):
            raise ValueError(f"r: got {_short(self.r)}, need a positive int")
        if not _positive_number(self.alpha):
            raise ValueError(f"alpha: got {_short(self.alpha)}, need a positive finite number")
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, (int, float))
            or not 0.0 <= self.dropout < 1.0
        ):
            raise ValueError(f"dropout: got {_short(self.dropout)}, need a float in [0, 1)")
        self.dropout = float(self.dropout)
        self.target_modules = _names("target_modules", self.target_modules, required=True)
        self.exclude_modules = _names("exclude_modules", self.exclude_modules, required=False)
        if self.init not in INITS:
            raise ValueError(f"init: got {_short(self.init)}, need one of {INITS}")
        if not isinstance(self.bias, str) or self.bias not in BIASES:
            raise ValueError(f"bias: got {_short(self.bias)}, need one of {BIASES}")
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"use_rslora: got {_short(self.use_rslora)}, need True or False")
        if not isinstance(self.use_dora, bool):
            raise ValueError(f"use_dora: got {_short(self.use_dora)}, need True or False")
        for name in ("rank_pattern", "alpha_pattern"):
            value = getattr(self, name)
            if value is None:
                value = {}
            if not isinstance(value, Mapping):
                raise ValueError(f"{name}: got {_short(value)}, need a dict {{regex: value}}")
            setattr(self, name, dict(value))
        for key, value in self.rank_pattern.items():
            if not _positive_int(value):
                raise ValueError(
                    f"rank_pattern[{_short(key)}]: got {_short(value)}, need a positive int"
                )
        for key, value in self.alpha_pattern.items():
            if not _positive_number(value):
                raise ValueError(
                    f"alpha_pattern[{_short(key)}]: got {_short(value)}, need a positive finite number"
                )
        if self.modules_to_save is not None:
            self.modules_to_save = _module_list("modules_to_save", self.modules_to_save)
        self._check_base_quantization()
        self._check_patterns()

    def _check_base_quantization(self) -> None:
        q = self.base_quantization
        if q is None:
            return
        if not isinstance(q, str) or q not in BASE_QUANTIZATIONS:
            raise ValueError(
                f"base_quantization: got {_short(q)}, need None or one of {BASE_QUANTIZATIONS}"
            )
        if self.init == "pissa":
            raise ValueError(
                f"base_quantization={q!r} with init='pissa': PiSSA rewrites the base weight "
                "from its SVD, which a quantized base cannot hold; use init='kaiming' or "
                "base_quantization=None"
            )
        if getattr(self, "use_dora", False):  # DoRA needs W + sBA's column norms in float
            raise ValueError(
                f"base_quantization={q!r} with use_dora=True: DoRA over a quantized base is "
                "not supported; set use_dora=False or base_quantization=None"
            )

    def _check_patterns(self) -> None:
        """Every regex valid and of bounded size, and all of them together too."""
        total = 0
        for arg in ("target_modules", "exclude_modules"):
            value = getattr(self, arg)
            if isinstance(value, str):
                total += check_pattern(arg, value)
        for arg in ("rank_pattern", "alpha_pattern"):
            if len(getattr(self, arg)) > MAX_PATTERN_KEYS:
                raise ValueError(
                    f"{arg}: got {len(getattr(self, arg)):,} keys, need at most "
                    f"{MAX_PATTERN_KEYS:,} (each is a regex tried on every adapted module)"
                )
            for key in getattr(self, arg):
                if not isinstance(key, str) or not key:
                    raise ValueError(f"{arg}: key {_short(key)} is not a non-empty string")
                total += check_pattern(f"{arg}[{_short(key)}]", key, suffix=True)
                if total > MAX_CONFIG_PATTERN_COST:
                    raise ValueError(
                        f"{arg}: the regexes of this config unroll to more than "
                        f"{MAX_CONFIG_PATTERN_COST:,} items in total; use fewer or simpler keys"
                    )
        if total > MAX_CONFIG_PATTERN_COST:
            raise ValueError(
                f"target_modules/exclude_modules: the regexes unroll to more than "
                f"{MAX_CONFIG_PATTERN_COST:,} items in total"
            )

    # -- per-module values -------------------------------------------------------------
    def rank_for(self, module_name: str, matcher: NameMatcher | None = None) -> int:
        """The rank for a module (rank_pattern first, then r)."""
        matcher = matcher or NameMatcher()
        key = matcher.pattern_key("rank_pattern", self.rank_pattern, module_name)
        return self.r if key is None else self.rank_pattern[key]

    def alpha_for(self, module_name: str, matcher: NameMatcher | None = None) -> float:
        """The alpha for a module (alpha_pattern first, then alpha)."""
        matcher = matcher or NameMatcher()
        key = matcher.pattern_key("alpha_pattern", self.alpha_pattern, module_name)
        return self.alpha if key is None else self.alpha_pattern[key]

    def scale_for(self, module_name: str, matcher: NameMatcher | None = None) -> float:
        """alpha / r, or alpha / sqrt(r) with use_rslora, for a module."""
        r = self.rank_for(module_name, matcher)
        alpha = self.alpha_for(module_name, matcher)
        return scale_of(alpha, r, self.use_rslora)

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
            "modules_to_save": self.modules_to_save or None,
            "use_dora": self.use_dora,
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
        implement (lora_bias, layers_to_transform, ...), and for values of the wrong type or
        range, naming the field: nothing is coerced (``r: 4.9`` is refused, not read as 4).
        A missing field takes PEFT's default. ``modules_to_save: null`` means none.
        """
        where = "adapter_config.json: "
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}need a JSON object, got {type(data).__name__}")
        peft_type = data.get("peft_type", "LORA")
        if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
            raise ValueError(f"{where}peft_type is {peft_type!r}, need 'LORA'")
        for key, default in _PEFT_UNSUPPORTED.items():
            value = data.get(key, default)
            unset = value is None or value is False or value == [] or value == {}
            if not unset and not (type(value) is type(default) and value == default):
                raise ValueError(
                    f"{where}{key}={_short(value)} is a PEFT feature lora_ext does not "
                    f"implement (need {default!r})"
                )
        init_value = data.get("init_lora_weights", True)
        init = next(
            (
                ours
                for ours, peft in _INIT_TO_PEFT.items()
                if init_value is peft or (isinstance(init_value, str) and init_value == peft)
            ),
            None,
        )
        if init is None:
            raise ValueError(
                f"{where}init_lora_weights={_short(init_value)} is not supported "
                f"(need one of {list(_INIT_TO_PEFT.values())})"
            )
        fields: dict[str, Any] = {
            "r": data.get("r", 8),
            "alpha": data.get("lora_alpha", 8),
            "dropout": data.get("lora_dropout", 0.0),
            "target_modules": data.get("target_modules"),
            "use_rslora": data.get("use_rslora", False),
            "init": init,
            "bias": data.get("bias", "none"),
            "rank_pattern": data.get("rank_pattern"),
            "alpha_pattern": data.get("alpha_pattern"),
            "exclude_modules": data.get("exclude_modules"),
            "modules_to_save": data.get("modules_to_save") or [],
            "use_dora": data.get("use_dora", False),
        }
        if fields["dropout"] is None:  # PEFT writes null for "no dropout" in old files
            fields["dropout"] = 0.0
        if fields["use_rslora"] is None:
            fields["use_rslora"] = False
        if fields["use_dora"] is None:
            fields["use_dora"] = False
        try:
            return cls(**fields)
        except ValueError as exc:  # name the field as the file spells it
            msg = str(exc)
            for ours, theirs in (("alpha:", "lora_alpha:"), ("dropout:", "lora_dropout:")):
                if msg.startswith(ours):
                    msg = theirs + msg[len(ours) :]
            raise ValueError(where + msg) from None

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


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


FLOAT32_MAX = 3.4028234663852886e38


def scale_of(alpha: float, r: int, use_rslora: bool) -> float:
    """alpha / r (alpha / sqrt(r) with rsLoRA)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _module_list(arg: str, value: Any) -> list[str]:
    """A modules_to_save value: a list of non-empty strings."""
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ValueError(
            f"{arg}: got {_short(value)}, need a list of module names such as ['classifier']"
        )
    for name in value:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{arg}: entry {_short(name)} is not a non-empty string")
    return list(value)


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
        return value  # checked as a regex by LoraConfig._check_patterns
    if isinstance(value, (set, frozenset)):
        if not all(isinstance(v, str) for v in value):
            raise ValueError(f"{arg}: got {_short(value)}, need module names (strings)")
        value = sorted(value)
    if not isinstance(value, Sequence) or not value:
        if not required and isinstance(value, Sequence):
            return None
        raise ValueError(
            f"{arg}: got {_short(value)}, need a non-empty list of module names or a regex"
        )
    names = list(value)
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{arg}: entry {_short(name)} is not a non-empty string")
    return names
