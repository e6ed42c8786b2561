"""The model a run trains: the base loaded for its task, LoRA injected, the classification
head made trainable, and the trained adapter (+ head) saved and loaded in PEFT's format."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_ext.config import Task
from lora_ext.training.config import TrainConfig, TrainError

# Layers adapted when --targets is not given, by transformers model_type.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "key", "value"],
    "roberta": ["query", "key", "value"],
    "distilbert": ["q_lin", "k_lin", "v_lin"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gpt2": ["c_attn"],
}


# Classification heads PEFT saves with a SEQ_CLS adapter (its modules_to_save default).
HEAD_NAMES = ("classifier", "score")


@dataclass
class TaskSpec:
    kind: Task
    classes: list[str] | None
    head: str | None  # name of the classification head module (trained, saved with the adapter)


def load_model(
    cfg: TrainConfig, task_kind: str, classes: list[str] | None
) -> tuple[nn.Module, Any, TaskSpec]:
    """The base model for the task, in float32 on the CPU, and its tokenizer.

    minilm -> BertForSequenceClassification (fresh seeded head); smollm2 -> LlamaForCausalLM;
    a directory -> AutoModelForSequenceClassification or AutoModelForCausalLM by task.
    """
    from lora_ext.training import models

    try:
        kind, _ = models.resolve_model(cfg.model)
    except (ValueError, FileNotFoundError) as e:
        raise TrainError(f"--model: {e}") from None
    if kind == "minilm" and task_kind != "seq-cls":
        raise TrainError(
            f"--model minilm is a sequence classifier; --data {cfg.data!r} is plain text "
            "(give a labelled CSV/JSONL or a bundled data set)"
        )
    if kind == "smollm2" and task_kind != "causal-lm":
        raise TrainError(
            f"--model smollm2 trains as a causal LM; --data {cfg.data!r} is labelled "
            "(give a plain .txt file)"
        )
    with quiet_transformers():
        model, tokenizer = models.load_model(
            cfg.model, task_kind, num_labels=len(classes) if classes else None, seed=cfg.seed
        )
    head = None
    if task_kind == "seq-cls":
        model.config.id2label = dict(enumerate(classes))
        model.config.label2id = {c: i for i, c in enumerate(classes)}
        head = next((h for h in HEAD_NAMES if isinstance(getattr(model, h, None), nn.Module)), None)
        if head is None:
            raise TrainError(
                f"--model: {type(model).__name__} has no classification head named {HEAD_NAMES}"
            )
    if cfg.model_dropout is not None:
        # The base model's own dropout (e.g. BERT's hidden_dropout_prob), not LoRA's.
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = cfg.model_dropout
        for attr in ("attention_dropout", "attention_probs_dropout_prob"):
            if hasattr(model.config, attr):
                setattr(model.config, attr, cfg.model_dropout)
    return model, tokenizer, TaskSpec(Task(task_kind), classes, head)


@contextlib.contextmanager
def quiet_transformers():
    """Hide transformers' load report: a fresh classification head is expected to be
    "MISSING" from the checkpoint, which is the point of training it."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # "Loading weights" bars: ours is the training bar
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def resolve_targets(cfg: TrainConfig, model: nn.Module) -> list[str]:
    """--targets, or the usual attention projections of the model type."""
    if cfg.targets:
        return list(cfg.targets)
    model_type = getattr(model.config, "model_type", "")
    if model_type not in DEFAULT_TARGETS:
        raise TrainError(
            f"--targets: not given, and there is no default for model_type {model_type!r}; "
            f"name the layers to adapt, e.g. --targets q_proj,v_proj"
        )
    return DEFAULT_TARGETS[model_type]


def add_lora(cfg: TrainConfig, model: nn.Module, task: TaskSpec) -> list[dict[str, Any]]:
    """Inject LoRA, make the head trainable, and return the optimizer parameter groups."""
    import lora_ext

    lcfg = lora_ext.LoraConfig(
        r=cfg.r,
        alpha=cfg.alpha,
        dropout=cfg.dropout,
        target_modules=resolve_targets(cfg, model),
        use_rslora=cfg.rslora,
        init=cfg.init,
        use_dora=cfg.dora,
        base_quantization=cfg.quantize_base,
        modules_to_save=[],  # the head is trained and saved below, in its own param group
    )
    try:
        layers = lora_ext.inject.resolve_targets(model, lcfg)
    except (ValueError, TypeError) as e:
        raise TrainError(f"--targets: {e}") from None
    # checked before any LoRA tensor is allocated (--r 2000000 would exhaust the memory)
    smallest = min(min(m.weight.shape) for _, m in layers)
    if cfg.r > smallest:
        raise TrainError(
            f"--r: got {cfg.r}; need at most {smallest}, the smaller dimension of the "
            f"adapted layers ({', '.join(lcfg.target_modules)}): a larger rank adds "
            "parameters, not capacity"
        )
    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and cfg.max_length > limit:
        raise TrainError(
            f"--max-length: got {cfg.max_length}; need at most {limit}, the model's "
            "max_position_embeddings"
        )
    torch.manual_seed(cfg.seed + 1)  # LoRA A init: the same on every rank and every resume
    try:
        lora_ext.inject_(model, lcfg)
    except (ValueError, TypeError) as e:
        raise TrainError(f"--targets: {e}") from None
    # Groups are read before the head is unfrozen: lora_ext counts every trainable tensor
    # that is not a LoRA matrix as a bias.
    if cfg.loraplus_ratio is not None:
        groups = lora_ext.lora_param_groups(
            model, cfg.lr, lr_ratio=cfg.loraplus_ratio, weight_decay=cfg.weight_decay
        )
    else:
        # DoRA's magnitude vectors get no weight decay (it would shrink the layers' outputs)
        magnitudes = {
            id(p)
            for _, layer in lora_ext.inject.lora_layers(model)
            for p in layer.lora_magnitude_vector.values()
        }
        params = lora_ext.lora_parameters(model)
        groups = [
            {
                "name": "lora",
                "params": [p for p in params if id(p) not in magnitudes],
                "lr": cfg.lr,
                "weight_decay": cfg.weight_decay,
            }
        ]
        if magnitudes:
            groups.append(
                {
                    "name": "lora_magnitude",
                    "params": [p for p in params if id(p) in magnitudes],
                    "lr": cfg.lr,
                    "weight_decay": 0.0,
                }
            )
    if task.head is not None:
        head_params = list(getattr(model, task.head).parameters())
        for p in head_params:
            p.requires_grad_(True)
        groups.append(
            {
                "name": "head",
                "params": head_params,
                "lr": cfg.head_lr or cfg.lr,
                "weight_decay": cfg.weight_decay,
            }
        )
    return groups


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: tensor} of every trainable parameter (what a checkpoint keeps)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_trained_adapter(model: nn.Module, path: Path, task: TaskSpec) -> Path:
    """Save the adapter in PEFT's format; for a classifier add the trained head as PEFT does
    for SEQ_CLS (``modules_to_save``). Written to a temporary directory, then renamed."""
    from safetensors.torch import load_file, save_file

    import lora_ext

    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    lora_ext.save_adapter(model, tmp)
    if task.head is not None:
        weights = tmp / "adapter_model.safetensors"
        tensors = load_file(str(weights))
        head = getattr(model, task.head)
        for name, p in head.named_parameters():
            tensors[f"base_model.model.{task.head}.{name}"] = p.detach().to("cpu").contiguous()
        save_file(tensors, str(weights), metadata={"format": "pt"})
        config_path = tmp / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["modules_to_save"] = [task.head]
        config["task_type"] = "SEQ_CLS"
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (tmp / "lora_ext_task.json").write_text(
        json.dumps({"task": task.kind, "classes": task.classes, "head": task.head}, indent=2) + "\n"
    )
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


TASK_FILE = "lora_ext_task.json"
_TASK_FILE_LIMIT = 1 << 20  # bytes: a task file is a few lines


def read_task_file(path: Path) -> list[str] | None:
    """The class names of an adapter's ``lora_ext_task.json`` (None without the file or
    without classes), checked: a JSON object whose ``task`` is a Task value and whose
    ``classes`` is null or a list of distinct strings.

    Raises:
        ValueError: naming the file and what is wrong with it.
    """
    task_file = path / TASK_FILE
    if not task_file.exists():
        return None
    if not task_file.is_file() or task_file.stat().st_size > _TASK_FILE_LIMIT:
        raise ValueError(f"adapter: {task_file} is not a regular file under 1 MiB")
    try:
        info = json.loads(task_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"adapter: {task_file} is not valid UTF-8 JSON ({exc})") from None
    if not isinstance(info, dict):
        raise ValueError(f"adapter: {task_file} holds a {type(info).__name__}, need an object")
    task = info.get("task")
    if task is not None and task not in {t.value for t in Task}:
        raise ValueError(
            f"adapter: {task_file} task {task!r}; need one of {[t.value for t in Task]}"
        )
    classes = info.get("classes")
    if classes is None:
        return None
    if (
        not isinstance(classes, list)
        or not classes
        or not all(isinstance(c, str) and c for c in classes)
        or len(set(classes)) != len(classes)
    ):
        raise ValueError(
            f"adapter: {task_file} classes {str(classes)[:80]}; need a list of distinct "
            "non-empty names"
        )
    return classes


def _head_size(model: nn.Module) -> int | None:
    head = next((getattr(model, h) for h in HEAD_NAMES if hasattr(model, h)), None)
    weight = getattr(head, "weight", None) if head is not None else None
    if weight is None:
        for module in getattr(head, "modules", lambda: [])():
            if isinstance(module, nn.Linear):
                weight = module.weight  # the head's last linear layer (e.g. RoBERTa's out_proj)
    return int(weight.shape[0]) if weight is not None else None


def load_trained_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load an adapter saved by :func:`save_trained_adapter` (or by PEFT for SEQ_CLS) into a
    base model, all or nothing: ``lora_ext_task.json`` is read and checked against the
    model's head first, then ``lora_ext.load_adapter`` reads the LoRA tensors and the head
    (PEFT's ``modules_to_save``), all checked before the model changes; the class names
    become the model's id2label / label2id.

    Raises:
        ValueError: a malformed task file, or class names that do not fit the head (the
            model is left unchanged).
    """
    import lora_ext

    path = Path(path)
    classes = read_task_file(path)
    if classes is not None:
        size = _head_size(model)
        if size is not None and size != len(classes):
            raise ValueError(
                f"adapter: {path / TASK_FILE} names {len(classes)} classes, but the model's "
                f"head has {size} outputs; load the model with num_labels={len(classes)}"
            )
    lora_ext.load_adapter(model, path)
    if classes and hasattr(model, "config"):  # label names travel into exports and the runner
        model.config.id2label = dict(enumerate(classes))
        model.config.label2id = {c: i for i, c in enumerate(classes)}
    return model
