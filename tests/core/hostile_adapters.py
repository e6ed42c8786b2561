"""A corpus of hostile adapter folders, generated here (no committed blobs), and a runner.

Each case is a PEFT-format adapter folder (``adapter_config.json`` +
``adapter_model.safetensors``) broken in one way, for a tiny GPT-2 (Conv1D layers) or a
tiny BERT sequence classifier (LoRA on query/value, the head in ``modules_to_save``). A case
is *clean* when ``lora_ext.load_adapter`` raises ValueError / FileNotFoundError / TypeError
whose message matches the case's pattern (it names the field, key or file), within
``TIME_BOUND_S``, and leaves the model bit-identical (values, trainable flags, module types,
bookkeeping); a pickle case also checks that the pickle never ran. Positive controls (class
``valid``) must load. Every case runs in a child process (forkserver) so that a hang is
recorded as a failure instead of blocking the run.

    python tests/core/hostile_adapters.py --report        # table per class, failures listed
    python tests/core/hostile_adapters.py --write OUT     # just write the folders

tests/core/test_hostile_adapters.py runs the corpus in the test suite.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

TIME_BOUND_S = 5.0  # wall seconds for one load_adapter call (2 loaded cores: generous)
# a child still running after HANG_S is killed and its case counted as a hang
HANG_S = float(os.environ.get("HOSTILE_HANG_S", "60"))
CLEAN_ERRORS = ("ValueError", "FileNotFoundError", "TypeError")
PREFIX = "base_model.model."
R = 4
CATASTROPHIC = r"((\w|\.)+)+!"  # the pattern: exponential in Python's re
LOADS = "<loads>"  # a case whose right outcome is loading (quickly)


# -- the two tiny models ---------------------------------------------------------------------
def tiny_model(kind: str) -> torch.nn.Module:
    """'gpt2': GPT2LMHeadModel, 2 layers, 64 wide (Conv1D); 'bert': BertForSequenceClassification,
    2 layers, 32 wide, 2 labels. Seeded, eval mode."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
    )

    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = GPT2Config(
            n_layer=2,
            n_embd=64,
            n_head=4,
            n_positions=32,
            vocab_size=128,
            bos_token_id=0,
            eos_token_id=0,
        )
        return GPT2LMHeadModel(cfg).eval()
    cfg = BertConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=2,
    )
    return BertForSequenceClassification(cfg).eval()


TARGETS = {"gpt2": ["c_attn", "c_fc"], "bert": ["query", "value"]}


def valid_adapter(kind: str, path: Path, seed: int = 0) -> Path:
    """A valid PEFT adapter folder for ``tiny_model(kind)``, written without lora_ext."""
    model = tiny_model(kind)
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in TARGETS[kind]:
            continue
        w = module.weight
        out_f, in_f = (w.shape[1], w.shape[0]) if kind == "gpt2" else tuple(w.shape)
        tensors[f"{PREFIX}{name}.lora_A.weight"] = torch.randn(R, in_f, generator=g) * 0.05
        tensors[f"{PREFIX}{name}.lora_B.weight"] = torch.randn(out_f, R, generator=g) * 0.05
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if kind == "gpt2" else "SEQ_CLS",
        "r": R,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "target_modules": TARGETS[kind],
        "fan_in_fan_out": kind == "gpt2",
        "bias": "none",
        "use_rslora": False,
        "init_lora_weights": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
        "inference_mode": True,
    }
    if kind == "bert":
        config["modules_to_save"] = ["classifier"]
        for key, value in model.classifier.state_dict().items():
            tensors[f"{PREFIX}classifier.{key}"] = value + torch.randn(value.shape, generator=g)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return path


# -- edits -------------------------------------------------------------------------------------
DEL = object()


def cfg(**changes: Any) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        file = path / "adapter_config.json"
        config = json.loads(file.read_text())
        for key, value in changes.items():
            if value is DEL:
                config.pop(key, None)
            else:
                config[key] = value
        file.write_text(json.dumps(config))

    return edit


def cfg_text(text: str | bytes) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        file = path / "adapter_config.json"
        if isinstance(text, bytes):
            file.write_bytes(text)
        else:
            file.write_text(text)

    return edit


def cfg_sub(old: str, new: str) -> Callable[[Path], None]:
    """Replace text in the JSON (for literals json.dumps would not write, e.g. NaN)."""

    def edit(path: Path) -> None:
        file = path / "adapter_config.json"
        text = json.dumps(json.loads(file.read_text()))
        assert old in text, old
        file.write_text(text.replace(old, new, 1))

    return edit


def tens(fn: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        file = path / "adapter_model.safetensors"
        tensors = load_file(str(file))
        fn(tensors)
        save_file(tensors, str(file))

    return edit


def both(*edits: Callable[[Path], None]) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        for e in edits:
            e(path)

    return edit


def _first(t: dict[str, torch.Tensor], part: str) -> str:
    return sorted(k for k in t if part in k)[0]


def setval(part: str, value: float, where: str = "one") -> Callable[[Path], None]:
    def fn(t: dict[str, torch.Tensor]) -> None:
        key = _first(t, part)
        if where == "all":
            t[key] = torch.full_like(t[key], value)
        else:
            t[key] = t[key].clone()
            t[key].view(-1)[1] = value

    return tens(fn)


def retype(part: str, dtype: torch.dtype) -> Callable[[Path], None]:
    def fn(t: dict[str, torch.Tensor]) -> None:
        key = _first(t, part)
        t[key] = (t[key] * 100).to(dtype)

    return tens(fn)


def reshape(part: str, make: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Path], None]:
    def fn(t: dict[str, torch.Tensor]) -> None:
        key = _first(t, part)
        t[key] = make(t[key]).contiguous()

    return tens(fn)


def drop(part: str) -> Callable[[Path], None]:
    return tens(lambda t: t.pop(_first(t, part)))


def add(key: str, value: torch.Tensor) -> Callable[[Path], None]:
    return tens(lambda t: t.update({key: value}))


def weights_bytes(data: bytes) -> Callable[[Path], None]:
    return lambda p: (p / "adapter_model.safetensors").write_bytes(data)


def header_lie(path: Path) -> None:
    """A safetensors header whose offsets point past the end of the file."""
    file = path / "adapter_model.safetensors"
    data = file.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    key = sorted(k for k in header if k != "__metadata__")[0]
    header[key]["data_offsets"] = [0, 10**12]
    raw = json.dumps(header).encode()
    file.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n :])


def header_overlap(path: Path) -> None:
    """Two tensors sharing bytes (offsets overlap)."""
    file = path / "adapter_model.safetensors"
    data = file.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    keys = sorted(k for k in header if k != "__metadata__" and "lora_A" in k)
    header[keys[1]]["data_offsets"] = header[keys[0]]["data_offsets"]
    raw = json.dumps(header).encode()
    file.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n :])


def truncate(path: Path) -> None:
    file = path / "adapter_model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])


class _Evil:
    """Pickles to a call that writes ``MARKER``: proof that a pickle ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def pickle_instead(name: str) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        (path / "adapter_model.safetensors").unlink()
        (path / name).write_bytes(pickle.dumps({"x": _Evil(str(path / "MARKER"))}))

    return edit


def pickle_as_safetensors(path: Path) -> None:
    data = pickle.dumps({"x": _Evil(str(path / "MARKER"))})
    (path / "adapter_model.safetensors").write_bytes(data)


def symlink(name: str, target: str | Callable[[Path], str]) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        link = path / name
        dest = target(path) if callable(target) else target
        link.unlink(missing_ok=True)
        os.symlink(dest, link)

    return edit


def fifo(name: str) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        (path / name).unlink(missing_ok=True)
        os.mkfifo(path / name)

    return edit


def to_dir(name: str) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        (path / name).unlink()
        (path / name).mkdir()

    return edit


def move_valid_elsewhere(path: Path) -> str:
    """Move the valid weights next to the folder and return that path (a symlink target)."""
    dest = path.parent / f"{path.name}.blob"
    shutil.move(str(path / "adapter_model.safetensors"), dest)
    return str(dest)


def other_base(path: Path) -> None:
    """The BERT classifier's adapter in place of GPT-2's (another base model)."""
    shutil.rmtree(path)
    valid_adapter("bert", path, seed=1)


def wider_base(path: Path) -> None:
    """An adapter for a GPT-2 twice as wide (same names, other shapes)."""
    tensors = load_file(str(path / "adapter_model.safetensors"))
    wide = {
        k: torch.zeros(v.shape[0], 128) if "lora_A" in k else torch.zeros(v.shape[0] * 2, R)
        for k, v in tensors.items()
    }
    save_file(wide, str(path / "adapter_model.safetensors"))


def empty_dir(path: Path) -> None:
    shutil.rmtree(path)
    path.mkdir()


# -- the corpus ------------------------------------------------------------------------------
@dataclass
class Case:
    cls: str
    name: str
    model: str  # "gpt2" or "bert"
    edit: Callable[[Path], None] | None
    expect: str  # regex the error message must match ("" for valid cases)
    target: str = ""  # load this file inside the folder instead of the folder

    @property
    def ident(self) -> str:
        return f"{self.cls}:{self.name}"


LA = "lora_A"
LB = "lora_B"


def cases() -> list[Case]:
    g, b = "gpt2", "bert"
    out = [
        # positive controls: these must load
        Case("valid", "gpt2", g, None, ""),
        Case("valid", "bert-with-head", b, None, ""),
        Case(
            "valid",
            "weights-symlinked-elsewhere",
            g,
            symlink("adapter_model.safetensors", move_valid_elsewhere),
            "",
        ),
        Case(
            "valid", "r-as-json-int-with-rank-pattern", g, cfg(rank_pattern={"h.1.mlp.c_fc": 4}), ""
        ),
        # JSON
        Case("json", "not-json", g, cfg_text("{not json"), "not valid JSON"),
        Case("json", "empty", g, cfg_text(""), "not valid JSON"),
        Case("json", "array", g, cfg_text("[1, 2]"), "need a JSON object, got list"),
        Case("json", "string", g, cfg_text('"LORA"'), "need a JSON object, got str"),
        Case("json", "null", g, cfg_text("null"), "need a JSON object, got NoneType"),
        Case(
            "json",
            "deeply-nested",
            g,
            cfg_text('{"r": ' + "[" * 100_000 + "]" * 100_000 + "}"),
            "adapter_config.json",
        ),
        Case("json", "not-utf8", g, cfg_text(b'{"r": "\xff\xfe"}'), "not UTF-8|not valid JSON"),
        Case("json", "nan-literal-r", g, cfg_sub('"r": 4', '"r": NaN'), r"\bNaN\b|\br\b"),
        Case(
            "json",
            "infinity-alpha",
            g,
            cfg_sub('"lora_alpha": 8', '"lora_alpha": Infinity'),
            "Infinity|lora_alpha",
        ),
        Case(
            "json",
            "huge-int-literal",
            g,
            cfg_sub('"r": 4', '"r": ' + "9" * 5000),
            r"\br\b|integer|digits",
        ),
        Case(
            "json",
            "two-megabytes",
            g,
            cfg_text('{"r": 4, "pad": "' + "x" * 2_000_000 + '"}'),
            "larger than",
        ),
        # wrong types
        Case("types", "r-float-4.9", g, cfg(r=4.9), r"\br: got 4\.9"),
        Case("types", "r-float-4.0", g, cfg(r=4.0), r"\br: got 4\.0"),
        Case("types", "r-string", g, cfg(r="4"), r"\br: got '4'"),
        Case("types", "r-bool", g, cfg(r=True), r"\br: got True"),
        Case("types", "r-list", g, cfg(r=[4]), r"\br: got \[4\]"),
        Case("types", "r-null", g, cfg(r=None), r"\br: got None"),
        Case("types", "alpha-string", g, cfg(lora_alpha="16"), "lora_alpha: got '16'"),
        Case("types", "alpha-bool", g, cfg(lora_alpha=True), "lora_alpha: got True"),
        Case("types", "dropout-string", g, cfg(lora_dropout="0.1"), "lora_dropout: got '0.1'"),
        Case("types", "rslora-string", g, cfg(use_rslora="false"), "use_rslora: got 'false'"),
        Case("types", "rslora-int", g, cfg(use_rslora=1), "use_rslora: got 1"),
        Case("types", "bias-null", g, cfg(bias=None), "bias: got None"),
        Case("types", "bias-int", g, cfg(bias=5), "bias: got 5"),
        Case("types", "bias-unknown", g, cfg(bias="some"), "bias: got 'some'"),
        Case("types", "targets-int", g, cfg(target_modules=5), "target_modules: got 5"),
        Case("types", "targets-dict", g, cfg(target_modules={"c_attn": 1}), "target_modules"),
        Case(
            "types",
            "targets-int-entry",
            g,
            cfg(target_modules=["c_attn", 3]),
            "target_modules: entry 3",
        ),
        Case(
            "types",
            "targets-empty-entry",
            g,
            cfg(target_modules=["c_attn", ""]),
            "target_modules: entry ''",
        ),
        Case("types", "targets-null", g, cfg(target_modules=None), "target_modules: got None"),
        Case("types", "targets-missing", g, cfg(target_modules=DEL), "target_modules: got None"),
        Case("types", "rank-pattern-list", g, cfg(rank_pattern=["c_attn"]), "rank_pattern: got"),
        Case(
            "types",
            "rank-pattern-float",
            g,
            cfg(rank_pattern={"c_attn": 4.5}),
            r"rank_pattern\['c_attn'\]: got 4\.5",
        ),
        Case(
            "types",
            "rank-pattern-string",
            g,
            cfg(rank_pattern={"c_attn": "4"}),
            r"rank_pattern\['c_attn'\]: got '4'",
        ),
        Case(
            "types",
            "alpha-pattern-string",
            g,
            cfg(alpha_pattern={"c_attn": "x"}),
            r"alpha_pattern\['c_attn'\]: got 'x'",
        ),
        Case("types", "exclude-int", g, cfg(exclude_modules=3), "exclude_modules: got 3"),
        Case(
            "types",
            "modules-to-save-string",
            b,
            cfg(modules_to_save="classifier"),
            "modules_to_save: got 'classifier'",
        ),
        Case(
            "types",
            "modules-to-save-int-entry",
            b,
            cfg(modules_to_save=[3]),
            "modules_to_save: entry 3",
        ),
        Case("types", "peft-type-int", g, cfg(peft_type=5), "peft_type is 5"),
        Case(
            "types", "init-unknown", g, cfg(init_lora_weights="olora"), "init_lora_weights='olora'"
        ),
        Case(
            "types",
            "init-string-true",
            g,
            cfg(init_lora_weights="true"),
            "init_lora_weights='true'",
        ),
        Case("types", "task-type-int", b, cfg(task_type=3), "task_type: got 3"),
        # numeric range
        Case("range", "r-zero", g, cfg(r=0), r"\br: got 0"),
        Case("range", "r-negative", g, cfg(r=-4), r"\br: got -4"),
        Case("range", "r-huge", g, cfg(r=2**40), "rank for .*got r=1099511627776, need r <= 64"),
        Case("range", "r-2000000", g, cfg(r=2_000_000), "rank for .*got r=2000000, need r <= 64"),
        Case("range", "r-too-big-for-layer", g, cfg(r=65), "got r=65, need r <= 64"),
        Case("range", "alpha-zero", g, cfg(lora_alpha=0), "lora_alpha: got 0"),
        Case("range", "alpha-negative", g, cfg(lora_alpha=-8), "lora_alpha: got -8"),
        Case("range", "alpha-1e308", g, cfg(lora_alpha=1e308), "lora_alpha.*overflows float32"),
        Case("range", "alpha-2e39", g, cfg(lora_alpha=2e39), "lora_alpha.*overflows float32"),
        Case(
            "range",
            "alpha-pattern-1e300",
            g,
            cfg(alpha_pattern={"c_fc": 1e300}),
            "overflows float32",
        ),
        Case("range", "alpha-30-gain", g, cfg(lora_alpha=4e16), "can multiply an input by up to"),
        Case("range", "dropout-1.5", g, cfg(lora_dropout=1.5), "lora_dropout: got 1.5"),
        Case("range", "dropout-negative", g, cfg(lora_dropout=-0.1), "lora_dropout: got -0.1"),
        Case(
            "range",
            "rank-pattern-zero",
            g,
            cfg(rank_pattern={"c_fc": 0}),
            r"rank_pattern\['c_fc'\]: got 0",
        ),
        Case(
            "range", "rank-pattern-huge", g, cfg(rank_pattern={"c_fc": 10**9}), "got r=1000000000"
        ),
        # non-finite and overflowing values
        Case(
            "values",
            "nan-in-lora-A",
            g,
            setval(LA, float("nan")),
            "lora_A.weight' has 1 non-finite",
        ),
        Case(
            "values",
            "nan-in-lora-B",
            g,
            setval(LB, float("nan")),
            "lora_B.weight' has 1 non-finite",
        ),
        Case(
            "values",
            "inf-in-lora-B",
            g,
            setval(LB, float("inf")),
            "lora_B.weight' has 1 non-finite",
        ),
        Case(
            "values",
            "minus-inf-in-lora-A",
            g,
            setval(LA, float("-inf")),
            "lora_A.weight' has 1 non-finite",
        ),
        Case(
            "values",
            "all-nan-lora-B",
            g,
            setval(LB, float("nan"), "all"),
            "lora_B.weight' has 768 non-finite",
        ),
        Case("values", "3e38-in-lora-B", g, setval(LB, 3e38), "can multiply an input by up to"),
        Case(
            "values",
            "all-3e38-lora-B",
            g,
            setval(LB, 3e38, "all"),
            "can multiply an input by up to",
        ),
        Case("values", "1e20-in-lora-A", g, setval(LA, 1e20), "can multiply an input by up to"),
        Case(
            "values",
            "float64-1e300",
            g,
            both(retype(LB, torch.float64), setval(LB, 1e300)),
            "overflows torch.float32",
        ),
        Case(
            "values",
            "float16-inf",
            g,
            both(retype(LA, torch.float16), setval(LA, float("inf"))),
            "non-finite",
        ),
        Case(
            "values",
            "bfloat16-nan",
            g,
            both(retype(LB, torch.bfloat16), setval(LB, float("nan"))),
            "non-finite",
        ),
        Case(
            "values",
            "nan-in-head",
            b,
            setval("classifier.weight", float("nan")),
            "classifier.weight' has 1 non-finite",
        ),
        Case(
            "values",
            "inf-in-head-bias",
            b,
            setval("classifier.bias", float("inf")),
            "classifier.bias' has 1 non-finite",
        ),
        # shapes
        Case(
            "shapes",
            "lora-A-wrong-rank",
            g,
            reshape(LA, lambda t: t[:3]),
            r"has shape \[3, 64\] but the model needs \[4, 64\]",
        ),
        Case(
            "shapes", "lora-A-wrong-in", g, reshape(LA, lambda t: t[:, :32]), r"has shape \[4, 32\]"
        ),
        Case(
            "shapes", "lora-B-transposed", g, reshape(LB, lambda t: t.t()), r"has shape \[4, 192\]"
        ),
        Case(
            "shapes",
            "one-dimensional",
            g,
            reshape(LA, lambda t: t.reshape(-1)),
            r"has shape \[256\]",
        ),
        Case(
            "shapes",
            "three-dimensional",
            g,
            reshape(LA, lambda t: t[None]),
            r"has shape \[1, 4, 64\]",
        ),
        Case("shapes", "scalar", g, reshape(LA, lambda t: t[0, 0]), r"has shape \[\]"),
        Case("shapes", "zero-size", g, reshape(LA, lambda t: t[:0]), r"has shape \[0, 64\]"),
        Case(
            "shapes",
            "head-3-labels",
            b,
            reshape("classifier.weight", lambda t: torch.zeros(3, 32)),
            r"classifier.weight' has shape \[3, 32\]",
        ),
        Case(
            "shapes",
            "config-r-disagrees",
            g,
            cfg(r=2),
            r"has shape \[4, 64\] but the model needs \[2, 64\]",
        ),
        # dtypes
        Case("dtypes", "int32", g, retype(LA, torch.int32), "dtype I32, need floating point"),
        Case("dtypes", "int8", g, retype(LB, torch.int8), "dtype I8, need floating point"),
        Case("dtypes", "bool", g, retype(LA, torch.bool), "dtype BOOL, need floating point"),
        Case("dtypes", "uint8", g, retype(LA, torch.uint8), "dtype U8, need floating point"),
        Case(
            "dtypes",
            "int-head",
            b,
            retype("classifier.weight", torch.int64),
            "classifier.weight' has dtype I64",
        ),
        # keys
        Case("keys", "missing-lora-B", g, drop(LB), "missing key .*lora_B.weight"),
        Case(
            "keys",
            "missing-head-bias",
            b,
            drop("classifier.bias"),
            "missing key 'base_model.model.classifier.bias'",
        ),
        Case("keys", "no-tensors", g, tens(lambda t: t.clear()), "missing key"),
        Case(
            "keys",
            "unknown-tensor",
            g,
            add(PREFIX + "foo", torch.zeros(2)),
            "'base_model.model.foo' does not fit",
        ),
        Case(
            "keys",
            "lora-for-absent-layer",
            g,
            add(PREFIX + "transformer.h.7.attn.c_attn.lora_A.weight", torch.zeros(R, 64)),
            "h.7.attn.c_attn.lora_A.weight' does not fit",
        ),
        Case(
            "keys",
            "lora-for-untargeted-layer",
            g,
            add(PREFIX + "transformer.h.0.attn.c_proj.lora_A.weight", torch.zeros(R, 64)),
            "c_proj.lora_A.weight' does not fit",
        ),
        Case(
            "keys",
            "adapter-name-in-key",
            g,
            tens(
                lambda t: t.update(
                    {
                        k.replace("lora_A.weight", "lora_A.default.weight"): t.pop(k)
                        for k in [_first(t, LA)]
                    }
                )
            ),
            "lora_A.default.weight' does not fit",
        ),
        Case(
            "keys",
            "base-weight-overwrite",
            g,
            add(PREFIX + "transformer.h.0.attn.c_attn.weight", torch.zeros(64, 192)),
            "c_attn.weight' does not fit",
        ),
        Case(
            "keys",
            "bias-when-bias-none",
            g,
            add(PREFIX + "transformer.h.0.attn.c_attn.bias", torch.zeros(192)),
            "c_attn.bias' does not fit",
        ),
        Case(
            "keys",
            "same-tensor-twice",
            g,
            tens(lambda t: t.update({_first(t, LA)[len(PREFIX) :]: t[_first(t, LA)].clone()})),
            "names the same tensor",
        ),
        Case(
            "keys",
            "extra-embedding",
            g,
            add(PREFIX + "transformer.wte.lora_embedding_A", torch.zeros(R, 128)),
            "lora_embedding_A' does not fit",
        ),
        # files
        Case(
            "files",
            "no-config",
            g,
            lambda p: (p / "adapter_config.json").unlink(),
            "no adapter_config.json",
        ),
        Case(
            "files",
            "no-weights",
            g,
            lambda p: (p / "adapter_model.safetensors").unlink(),
            "no adapter_model.safetensors",
        ),
        Case("files", "empty-folder", g, empty_dir, "no adapter_model.safetensors"),
        Case(
            "files",
            "config-is-a-dir",
            g,
            to_dir("adapter_config.json"),
            "adapter_config.json: is a dir",
        ),
        Case(
            "files",
            "weights-is-a-dir",
            g,
            to_dir("adapter_model.safetensors"),
            "adapter_model.safetensors: is a dir",
        ),
        Case("files", "weights-empty", g, weights_bytes(b""), "not a readable safetensors"),
        Case(
            "files",
            "weights-garbage",
            g,
            weights_bytes(b"not a safetensors file" * 10),
            "not a readable safetensors",
        ),
        Case("files", "weights-truncated", g, truncate, "not a readable safetensors"),
        Case(
            "files",
            "header-size-huge",
            g,
            weights_bytes((2**60).to_bytes(8, "little") + b"{}"),
            "not a readable safetensors",
        ),
        Case("files", "header-offsets-past-end", g, header_lie, "not a readable safetensors"),
        Case("files", "header-offsets-overlap", g, header_overlap, "not a readable safetensors"),
        Case(
            "files",
            "config-json-file-given",
            g,
            None,
            "need an adapter directory or a .safetensors",
            target="adapter_config.json",
        ),
        Case("files", "missing-path", g, None, "does not exist", target="nothing-here"),
        # symlinks and special files
        Case(
            "symlinks",
            "config-to-dev-zero",
            g,
            symlink("adapter_config.json", "/dev/zero"),
            "adapter_config.json: is a special file",
        ),
        Case(
            "symlinks",
            "weights-to-dev-zero",
            g,
            symlink("adapter_model.safetensors", "/dev/zero"),
            "adapter_model.safetensors: is a special file",
        ),
        Case(
            "symlinks",
            "config-loop",
            g,
            both(
                lambda p: (p / "adapter_config.json").unlink(),
                symlink("adapter_config.json", "adapter_config.json"),
            ),
            "no adapter_config.json",
        ),
        Case(
            "symlinks",
            "weights-dangling",
            g,
            symlink("adapter_model.safetensors", "/nonexistent/file"),
            "no adapter_model.safetensors",
        ),
        Case(
            "symlinks",
            "config-to-dir",
            g,
            symlink("adapter_config.json", "/"),
            "adapter_config.json: is a dir",
        ),
        Case(
            "symlinks",
            "config-fifo",
            g,
            fifo("adapter_config.json"),
            "adapter_config.json: is a special file",
        ),
        Case(
            "symlinks",
            "weights-fifo",
            g,
            fifo("adapter_model.safetensors"),
            "adapter_model.safetensors: is a special file",
        ),
        Case(
            "symlinks",
            "config-to-etc-passwd",
            g,
            symlink("adapter_config.json", "/etc/passwd"),
            "adapter_config.json: not valid JSON",
        ),
        # pickles: refused, never run
        Case("pickles", "bin-only", g, pickle_instead("adapter_model.bin"), "pickle file"),
        Case("pickles", "pt-only", g, pickle_instead("adapter.pt"), "pickle file"),
        Case(
            "pickles",
            "pkl-given-directly",
            g,
            pickle_instead("adapter.pkl"),
            "pickle file",
            target="adapter.pkl",
        ),
        Case(
            "pickles",
            "pickle-named-safetensors",
            g,
            pickle_as_safetensors,
            "not a readable safetensors",
        ),
        # regexes
        Case(
            "regex",
            "target-catastrophic",
            g,
            cfg(target_modules=CATASTROPHIC),
            r"target_modules: .*matches no module",
        ),
        Case(
            "regex",
            "target-catastrophic-digit",
            g,
            cfg(target_modules=r"(.|..)+\d$"),
            "target_modules: .*took more than",
        ),
        Case(
            "regex",
            "exclude-catastrophic",
            g,
            cfg(exclude_modules=CATASTROPHIC),
            LOADS,  # matches nothing, so excludes nothing (PEFT's result), in milliseconds
        ),
        Case(
            "regex",
            "exclude-backtracking",
            g,
            cfg(exclude_modules=r"((.|..)+)+\d$"),
            "exclude_modules: .*took more than",
        ),
        Case(
            "regex",
            "rank-pattern-backtracking",
            g,
            cfg(rank_pattern={r"((.|..)+)+\d": 2}),
            r"rank_pattern\[.*took more than",
        ),
        Case(
            "regex",
            "alpha-pattern-backtracking",
            g,
            cfg(alpha_pattern={r"(\w|.)+@?\d": 2}),
            r"alpha_pattern\[.*took more than",
        ),
        Case(
            "regex",
            "rank-pattern-catastrophic",
            g,
            cfg(rank_pattern={CATASTROPHIC: 2}),
            LOADS,
        ),
        Case(
            "regex",
            "alpha-pattern-catastrophic",
            g,
            cfg(alpha_pattern={CATASTROPHIC: 2}),
            LOADS,
        ),
        Case(
            "regex",
            "compile-bomb",
            g,
            cfg(target_modules="(a{1000}){1000}"),
            "target_modules: the regex .* too complex",
        ),
        Case(
            "regex",
            "compile-bomb-nested",
            g,
            cfg(rank_pattern={"((a{100}){100}){100}": 2}),
            r"rank_pattern\[.*too complex",
        ),
        Case(
            "regex",
            "deep-nesting",
            g,
            cfg(target_modules="(" * 5000 + "a" + ")" * 5000),
            "target_modules: the regex",
        ),
        Case(
            "regex",
            "invalid",
            g,
            cfg(target_modules="(c_attn"),
            "target_modules: the regex '\\(c_attn' is not a valid regex",
        ),
        Case(
            "regex",
            "invalid-rank-key",
            g,
            cfg(rank_pattern={"c_[": 2}),
            r"rank_pattern\['c_\['\]: the regex",
        ),
        Case(
            "regex",
            "many-rank-keys",
            g,
            cfg(rank_pattern={f"x{i}(a|b)*c": 2 for i in range(40_000)}),
            r"rank_pattern",
        ),
        Case(
            "regex",
            "huge-alternation",
            g,
            cfg(target_modules="|".join(f"m{i}" for i in range(50_000))),
            "target_modules",
        ),
        Case("regex", "backref-catastrophe", g, cfg(target_modules=r"(.*)*\1\d"), "target_modules"),
        Case("regex", "no-match", g, cfg(target_modules=r".*\.c_atn"), "matches no module"),
        # unsupported PEFT features and another base model
        Case("peft", "dora-without-magnitudes", g, cfg(use_dora=True), "needs a DoRA magnitude"),
        Case("peft", "dora-not-a-bool", g, cfg(use_dora="yes"), "use_dora: got 'yes'"),
        Case(
            "peft",
            "layers-to-transform",
            g,
            cfg(layers_to_transform=[0]),
            "layers_to_transform=\\[0\\]",
        ),
        Case("peft", "ia3", g, cfg(peft_type="IA3"), "peft_type is 'IA3'"),
        Case(
            "peft",
            "modules-to-save-absent",
            b,
            cfg(modules_to_save=["nohead"]),
            r"modules_to_save: \['nohead'\] matches no module",
        ),
        Case(
            "peft",
            "modules-to-save-is-target",
            b,
            cfg(modules_to_save=["query"]),
            "which target_modules also adapts",
        ),
        Case(
            "peft",
            "head-but-config-says-none",
            b,
            cfg(modules_to_save=None),
            "classifier.bias' does not fit",
        ),
        Case("base", "bert-adapter-on-gpt2", g, other_base, "'query' matches no module"),
        Case(
            "base",
            "wider-gpt2",
            g,
            wider_base,
            r"has shape \[4, 128\] but the model needs \[4, 64\]",
        ),
        Case(
            "base",
            "target-typo",
            g,
            cfg(target_modules=["c_atn"]),
            r"'c_atn' matches no module.*'c_attn'",
        ),
        Case(
            "base",
            "target-embedding",
            g,
            cfg(target_modules=["wte"]),
            "'transformer.wte' is a Embedding",
        ),
        Case(
            "base",
            "fewer-layers",
            g,
            tens(lambda t: [t.pop(k) for k in list(t) if ".h.1." in k]),
            "missing key",
        ),
    ]
    return out


# -- running one case in a child -----------------------------------------------------------
def _snapshot(model: torch.nn.Module) -> Any:
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {k: p.requires_grad for k, p in model.named_parameters()},
        [(n, type(m).__name__) for n, m in model.named_modules()],
        {k: repr(v) for k, v in vars(model).items() if k.startswith("_lora")},
    )


def _same(a: Any, b: Any) -> bool:
    if a[1:] != b[1:] or a[0].keys() != b[0].keys():
        return False
    return all(torch.equal(a[0][k], b[0][k]) for k in a[0])


_MODELS: dict[str, torch.nn.Module] = {}


def run_case(path: str, model_kind: str, marker: str) -> dict[str, Any]:
    """Load ``path`` into a fresh copy of the tiny model (this runs in the child)."""
    import copy

    import lora_ext

    if model_kind not in _MODELS:
        _MODELS[model_kind] = tiny_model(model_kind)
    model = copy.deepcopy(_MODELS[model_kind])
    before = _snapshot(model)
    start = time.perf_counter()
    try:
        lora_ext.load_adapter(model, path)
        error, message = None, ""
    except BaseException as exc:  # noqa: BLE001 - what kind of error is the point
        error, message = type(exc).__name__, str(exc)
    seconds = time.perf_counter() - start
    return {
        "error": error,
        "message": message[:2000],
        "seconds": seconds,
        "unchanged": _same(before, _snapshot(model)),
        "pickle_ran": os.path.exists(marker),
    }


def _child(conn: Any, jobs: list[tuple[str, str, str]]) -> None:
    torch.set_num_threads(1)
    for path, model_kind, marker in jobs:
        try:
            result = run_case(path, model_kind, marker)
        except BaseException as exc:  # noqa: BLE001
            result = {"error": "runner:" + type(exc).__name__, "message": str(exc)[:2000]}
        conn.send(result)
    conn.close()


_CTX: Any = None


def _context() -> Any:
    global _CTX
    if _CTX is None:
        _CTX = multiprocessing.get_context("forkserver")
        _CTX.set_forkserver_preload(["torch", "transformers", "safetensors", "lora_ext"])
    return _CTX


def _marker(path: Path) -> str:
    return str(path.parent / "MARKER") if path.is_file() else str(path / "MARKER")


def run_all(jobs: list[tuple[Path, str]], hang_s: float = HANG_S) -> list[dict[str, Any]]:
    """run_case for each (path, model kind), in order, in one forkserver child; a case
    still running after ``hang_s`` is recorded as a hang, its child killed, and a new child
    takes the remaining cases."""
    ctx = _context()
    results: list[dict[str, Any]] = []
    while len(results) < len(jobs):
        todo = [(str(p), kind, _marker(p)) for p, kind in jobs[len(results) :]]
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(child, todo))
        proc.start()
        child.close()
        for _ in todo:
            if not parent.poll(hang_s):
                results.append(
                    {
                        "error": "hang",
                        "message": f"still running after {hang_s:.0f} s",
                        "seconds": hang_s,
                    }
                )
                break
            try:
                results.append(parent.recv())
            except EOFError:  # the child died (e.g. killed by the OOM killer)
                results.append({"error": "child died", "message": "", "seconds": 0.0})
                break
        proc.kill()
        proc.join()
    return results


def build(case: Case, root: Path) -> Path:
    """Write the case's folder under ``root``; return the path to load."""
    folder = root / case.cls / case.name
    if folder.exists():
        shutil.rmtree(folder)
    valid_adapter(case.model, folder)
    if case.edit is not None:
        case.edit(folder)
    return folder / case.target if case.target else folder


def verdict(case: Case, result: dict[str, Any]) -> str | None:
    """None if the case is clean, else why not."""
    import re

    if result.get("pickle_ran"):
        return "the pickle ran"
    if case.cls == "valid" or case.expect == LOADS:
        if result["error"] is not None:
            return f"refused a valid adapter: {result['error']}: {result['message'][:300]}"
        if result["seconds"] > TIME_BOUND_S:
            return f"took {result['seconds']:.1f} s"
        return None
    if result["error"] is None:
        return "loaded"
    if result["error"] not in CLEAN_ERRORS:
        return f"{result['error']}: {result['message'][:300]}"
    if not result.get("unchanged", False):
        return "model changed"
    if result["seconds"] > TIME_BOUND_S:
        return f"took {result['seconds']:.1f} s"
    if not re.search(case.expect, result["message"], flags=re.S):
        return f"message does not match {case.expect!r}: {result['message'][:300]}"
    return None


def report(root: Path) -> int:
    all_cases = cases()
    results = run_all([(build(c, root), c.model) for c in all_cases])
    rows: dict[str, list[int]] = {}
    failures = []
    for case, result in zip(all_cases, results):
        why = verdict(case, result)
        row = rows.setdefault(case.cls, [0, 0, 0])
        row[0] += 1
        row[1 if why is None else 2] += 1
        if why:
            failures.append(f"  {case.ident}: {why}")
    print(f"{'class':<10} {'tried':>6} {'clean':>6} {'failed':>7}")
    for cls, (tried, clean, failed) in rows.items():
        print(f"{cls:<10} {tried:>6} {clean:>6} {failed:>7}")
    total = [sum(r[i] for r in rows.values()) for i in range(3)]
    print(f"{'total':<10} {total[0]:>6} {total[1]:>6} {total[2]:>7}")
    print("\n".join(["", "failures:", *failures]) if failures else "\nno failures")
    return 1 if failures else 0


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--write":
        out = Path(sys.argv[2])
        for c in cases():
            build(c, out)
        print(f"wrote {len(cases())} cases under {out}")
    elif len(sys.argv) >= 2 and sys.argv[1] == "--report":
        with tempfile.TemporaryDirectory() as tmp:
            sys.exit(report(Path(tmp)))
    else:
        print(__doc__)
