"""Property-based tests (hypothesis) of config parsing and module-name matching.

Matching is compared with PEFT itself (``check_target_module_exists``, ``get_pattern_key``)
and with Python's ``re``: the bounded-work matcher must give PEFT's answers. Parsing must
round-trip and never coerce. The example count and seed come from the profiles in
tests/conftest.py (CI: "ci", fixed seed; ``--hypothesis-profile=long`` goes deep).
"""

from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import pytest

pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lora_ext import LoraConfig  # noqa: E402
from lora_ext.config import NameMatcher, check_pattern, names_match  # noqa: E402

SETTINGS = settings(deadline=None)  # the rest from the loaded profile

SEGMENTS = ["a", "b", "q", "layer", "0", "1", "12", "attn", "c_attn", "query", "q_proj", "x.y"]
segment = st.sampled_from([s for s in SEGMENTS if "." not in s])
module_name = st.lists(segment, min_size=1, max_size=6).map(".".join)
entry = st.lists(segment, min_size=1, max_size=3).map(".".join)


# -- regexes from a small grammar over module-name characters ------------------------------
def _regex() -> st.SearchStrategy[str]:
    atom = st.one_of(
        st.sampled_from(["a", "b", "q", "0", "1", "_", "attn", "c_attn", "layer"]),
        st.sampled_from([".", r"\.", r"\d", r"\w", "[a-c]", "[^.]", "[0-9]", r"\b"]),
    )

    def extend(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        return st.one_of(
            st.tuples(inner, inner).map("".join),
            st.tuples(inner, inner).map(lambda t: f"{t[0]}|{t[1]}"),
            inner.map(lambda s: f"({s})"),
            inner.map(lambda s: f"(?:{s})"),
            st.tuples(inner, st.sampled_from(["*", "+", "?", "{2}", "{1,3}", "*?", "+?"])).map(
                lambda t: f"(?:{t[0]}){t[1]}"
            ),
            inner.map(lambda s: f"(?!{s})"),
            inner.map(lambda s: f"(?={s})"),
        )

    return st.recursive(atom, extend, max_leaves=8) | st.sampled_from(
        [r".*\.(q_proj|query)", r".*attn", r"^(?!.*layer\.1).*c_attn", "a.*"]
    )


regex = _regex()


def _peft_config(**fields):
    base = {
        "exclude_modules": None,
        "modules_to_save": None,
        "target_parameters": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    return SimpleNamespace(**{**base, **fields})


@SETTINGS
@given(name=module_name, data=st.data())
def test_name_lists_match_as_peft(name, data):
    from peft.tuners.tuners_utils import check_target_module_exists

    # entries drawn from the name's own suffixes (dotted or not) and from elsewhere
    suffixes = st.sampled_from([name[i:] for i in range(len(name))])
    names = data.draw(st.lists(st.one_of(entry, suffixes), min_size=1, max_size=5))
    theirs = bool(check_target_module_exists(_peft_config(target_modules=names), name))
    assert names_match(names, name, NameMatcher(), "target_modules") == theirs
    excluded = check_target_module_exists(
        _peft_config(target_modules=[name], exclude_modules=names), name
    )
    assert names_match(names, name, NameMatcher(), "exclude_modules") == (excluded is not True)


@SETTINGS
@given(pattern=regex, name=module_name)
def test_regex_target_matches_as_re(pattern, name):
    try:
        expected = re.fullmatch(pattern, name) is not None
    except re.error:
        with pytest.raises(ValueError, match="target_modules: the regex"):
            names_match(pattern, name, NameMatcher(), "target_modules")
        return
    assert names_match(pattern, name, NameMatcher(), "target_modules") == expected


@SETTINGS
@given(
    keys=st.lists(st.one_of(entry, regex), min_size=1, max_size=4, unique=True), name=module_name
)
def test_rank_pattern_key_as_peft(keys, name):
    from peft.utils.other import get_pattern_key

    try:
        for key in keys:
            re.compile(rf"(.*\.)?({key})$")
    except re.error:
        return  # an invalid key: refused when the config is built (next test)
    theirs = get_pattern_key(keys, name)
    ours = NameMatcher().pattern_key("rank_pattern", dict.fromkeys(keys, 2), name)
    assert ours == (None if theirs == name and name not in keys else theirs)


@SETTINGS
@given(pattern=regex)
def test_invalid_regexes_are_refused_naming_the_field(pattern):
    broken = pattern + "("
    with pytest.raises(ValueError, match=r"target_modules: the regex .* is not a valid regex"):
        LoraConfig(target_modules=broken)
    with pytest.raises(ValueError, match=r"rank_pattern\[.*\]: the regex"):
        LoraConfig(target_modules=["q"], rank_pattern={broken: 2})
    assert check_pattern("target_modules", pattern) >= 1


# -- parsing: round trip, no coercion, only ValueError ------------------------------------
configs = st.builds(
    LoraConfig,
    r=st.integers(1, 512),
    alpha=st.one_of(st.integers(1, 1024), st.floats(1e-3, 1e3)),
    dropout=st.floats(0.0, 0.99),
    target_modules=st.one_of(st.lists(entry, min_size=1, max_size=4, unique=True), regex),
    use_rslora=st.booleans(),
    init=st.sampled_from(["kaiming", "gaussian", "pissa"]),
    bias=st.sampled_from(["none", "all", "lora_only"]),
    rank_pattern=st.dictionaries(entry, st.integers(1, 64), max_size=3),
    alpha_pattern=st.dictionaries(entry, st.floats(0.5, 64.0), max_size=3),
    exclude_modules=st.one_of(st.none(), st.lists(entry, min_size=1, max_size=3)),
    modules_to_save=st.one_of(st.just([]), st.lists(entry, min_size=1, max_size=2)),
)


@SETTINGS
@given(cfg=configs)
def test_peft_dict_round_trip(cfg):
    text = json.dumps(cfg.to_peft_dict())
    assert LoraConfig.from_peft_dict(json.loads(text)) == cfg


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
FIELDS = ["r", "lora_alpha", "lora_dropout", "use_rslora", "bias", "target_modules"]
FIELDS += ["rank_pattern", "alpha_pattern", "exclude_modules", "modules_to_save", "peft_type"]
FIELDS += ["init_lora_weights", "use_dora"]


@SETTINGS
@given(
    changes=st.dictionaries(st.sampled_from(FIELDS), json_values, min_size=1, max_size=3),
)
def test_parsing_never_coerces_and_fails_with_valueerror(changes):
    data = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q"], **changes}
    try:
        cfg = LoraConfig.from_peft_dict(data)
    except ValueError as exc:
        assert str(exc).startswith("adapter_config.json: ")
        return
    # accepted: every value is exactly what the file says, of the type it says
    assert type(cfg.r) is int and cfg.r == data["r"]
    assert cfg.alpha == data["lora_alpha"] and not isinstance(cfg.alpha, bool)
    assert math.isfinite(cfg.alpha)
    if data.get("lora_dropout") is not None:
        assert cfg.dropout == data["lora_dropout"]
    if data.get("use_rslora") is not None:
        assert cfg.use_rslora is data["use_rslora"]
    assert cfg.bias == data.get("bias", "none")
    assert cfg.rank_pattern == (data.get("rank_pattern") or {})
    for value in cfg.rank_pattern.values():
        assert type(value) is int
