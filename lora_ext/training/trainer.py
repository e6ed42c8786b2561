"""Fine-tune a model with LoRA: ``python -m lora_ext.cli train`` / ``lora-ext train``, also under
``torchrun`` (DistributedDataParallel).

    lora-ext train --model minilm --data rotten-tomatoes --r 8 --alpha 16 --dropout 0.05 \\
                   --targets query,key,value --steps 300 --lr 1e-3 --batch-size 16 --out runs/rt

What trains: the LoRA tensors, and for a sequence classifier also its new classification
head (PEFT's ``modules_to_save``: a freshly initialised head has to learn, and an adapter
without it would be useless). The head is saved inside the adapter under PEFT's key names
(``base_model.model.classifier.weight``) with ``modules_to_save: ["classifier"]`` in
``adapter_config.json``, so ``peft.PeftModel.from_pretrained`` restores it too.

The output directory ``--out``::

    run.json            the configuration used, the data split, versions, status
    adapter/            the adapter in PEFT's format (+ the head for classifiers)
    metrics.json        loss/lr/tokens per step, validation results, timings
    loss.png            the loss curve with the validation metric
    checkpoints/        step-NNNNNNN/state.pt (atomic), ``latest`` names the newest
    onnx/               model.onnx and model.int8.onnx with --export

Determinism: the data order is a function of (seed, step), the split of (seed,
val_fraction), and a checkpoint holds the LoRA tensors, optimizer, scheduler and every
rank's RNG state, so ``--resume`` continues bit for bit like an uninterrupted run.

Distributed: under ``torchrun`` each process takes an equal slice of every global batch
(``--batch-size`` is the global batch of one micro-step, so the same command gives the same
training on 1 or N processes); DDP all-reduces the gradients of the trainable tensors only
(the frozen base is neither broadcast nor reduced); rank 0 alone writes files.

Several nodes: the same command on every node with torchrun's rendezvous, e.g.
``torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500
--rdzv-id=JOB -m lora_ext.cli train ...``; --out must be on a shared file system (rank 0 writes
it, every rank reads it on --resume). Under torchrun spell the rank ``--rank`` (torchrun's own
parser reads ``--r`` as an ambiguous abbreviation of its ``--rdzv-*`` flags). A base model
too big for one GPU needs FSDP instead of DDP: shard the frozen base weights (FSDP2's
``fully_shard`` per transformer block, ``ignored_params`` or a separate unsharded group for the
small LoRA tensors), gather the full weight per block in the forward, and save the adapter
from a full state dict on rank 0; the op itself is unchanged, it sees the gathered weight.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import platform
import random
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_ext.config import Task
from lora_ext.training import data as D

CHECKPOINT_FORMAT = 1
RUN_FILE = "run.json"
OUR_ENTRIES = ("run.json", "adapter", "metrics.json", "loss.png", "checkpoints", "onnx")

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

# Settings that steer a run without changing what it computes: they may differ between a
# run and its --resume. Every other field must match.
CONTROL_FIELDS = frozenset(
    {
        "out",
        "resume",
        "overwrite",
        "export",
        "stop_at",
        "progress",
        "eval_every",
        "save_every",
        "keep_checkpoints",
        "device",
        "threads",
        "eval_batch_size",
    }
)


class TrainError(ValueError):
    """A bad argument or a state of --out that forbids training (raised before any step)."""


@dataclass
class TrainConfig:
    """Everything a run depends on (saved in run.json; the CLI flags have the same names)."""

    out: str
    model: str = "minilm"
    data: str = "rotten-tomatoes"
    text_column: str = "text"
    label_column: str = "label"
    classes: list[str] | None = None
    val_fraction: float = 0.1
    max_train: int | None = None
    max_val: int | None = None
    max_length: int = 128
    group_by_length: bool = True
    # LoRA
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: list[str] | None = None
    rslora: bool = False
    init: str = "kaiming"
    model_dropout: float | None = None
    # optimisation
    steps: int = 300
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    head_lr: float | None = None
    loraplus_ratio: float | None = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    grad_checkpointing: bool = False
    precision: str = "auto"
    seed: int = 0
    # run control
    eval_every: int = 100
    eval_batch_size: int = 64
    save_every: int = 100
    keep_checkpoints: int = 2
    device: str = "auto"
    threads: int | None = None
    export: bool = False
    resume: bool = False
    overwrite: bool = False
    stop_at: int | None = None
    progress: bool = True

    def identity(self) -> dict[str, Any]:
        """The fields that define what the run computes (compared on --resume)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in CONTROL_FIELDS}

    def validate(self) -> None:
        """Check every value; raise TrainError naming the flag, the value and the need."""

        def need(cond: bool, flag: str, value: Any, what: str) -> None:
            if not cond:
                raise TrainError(f"--{flag.replace('_', '-')}: got {value!r}; need {what}")

        positive_ints = ("r", "steps", "batch_size", "grad_accum", "max_length", "eval_every")
        positive_ints += ("save_every", "keep_checkpoints", "eval_batch_size")
        for name in positive_ints:
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 1, name, value, "an integer >= 1")
        for name in ("max_train", "max_val", "threads", "stop_at"):
            value = getattr(self, name)
            need(
                value is None or (isinstance(value, int) and value >= 1),
                name,
                value,
                "an integer >= 1",
            )
        need(self.alpha > 0, "alpha", self.alpha, "a positive number")
        need(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "a probability in [0, 1)")
        md = self.model_dropout
        need(md is None or 0.0 <= md < 1.0, "model_dropout", md, "a probability in [0, 1)")
        need(0.0 < self.val_fraction < 1.0, "val_fraction", self.val_fraction, "a number in (0, 1)")
        for name in ("lr", "head_lr", "loraplus_ratio"):
            value = getattr(self, name)
            need(
                value is None or (math.isfinite(value) and value > 0),
                name,
                value,
                "a positive number",
            )
        need(self.weight_decay >= 0, "weight_decay", self.weight_decay, "a number >= 0")
        need(
            0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", self.warmup_ratio, "a number in [0, 1)"
        )
        need(
            0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", self.min_lr_ratio, "a number in [0, 1]"
        )
        mgn = self.max_grad_norm
        need(mgn is None or mgn > 0, "max_grad_norm", mgn, "a positive number (or none)")
        need(
            self.precision in ("auto", "fp32", "bf16"),
            "precision",
            self.precision,
            "auto, fp32 or bf16",
        )
        need(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            "device",
            self.device,
            "auto, cpu or cuda[:N]",
        )
        need(
            self.init in ("kaiming", "gaussian", "pissa"),
            "init",
            self.init,
            "kaiming, gaussian or pissa",
        )
        if self.targets is not None:
            need(bool(self.targets) and all(self.targets), "targets", self.targets, "module names")
        if self.resume and self.overwrite:
            raise TrainError(
                "--resume and --overwrite: got both; pass one (continue, or start over)"
            )


# ------------------------------------------------------------------------------ distributed


@dataclass
class Dist:
    """This process's place in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()


def init_distributed(device: torch.device) -> Dist:
    """Join the process group torchrun describes (WORLD_SIZE/RANK/LOCAL_RANK), gloo on CPU,
    nccl on CUDA; a plain single-process Dist otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    dist = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"backend": backend}
        if device.type == "cuda":
            kwargs["device_id"] = device
        torch.distributed.init_process_group(**kwargs)
    return dist


def pick_device(cfg: TrainConfig, local_rank: int) -> torch.device:
    """--device auto: the local rank's CUDA device when there is one, else the CPU."""
    if cfg.device == "auto":
        if torch.cuda.is_available():
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
            torch.cuda.set_device(device)  # NCCL and all_gather_object use the current device
            return device
        return torch.device("cpu")
    device = torch.device(cfg.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainError(f"--device: got {cfg.device!r} but CUDA is not available here")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA by default (fp32 master weights: the LoRA tensors stay fp32)."""
    if cfg.precision == "fp32":
        return None
    if cfg.precision == "bf16" or device.type == "cuda":
        return torch.bfloat16
    return None


# ------------------------------------------------------------------------------------ model


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
        groups = [
            {
                "name": "lora",
                "params": lora_ext.lora_parameters(model),
                "lr": cfg.lr,
                "weight_decay": cfg.weight_decay,
            }
        ]
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


# -------------------------------------------------------------------------- adapter + head


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


def load_trained_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load an adapter saved by :func:`save_trained_adapter` (or by PEFT for SEQ_CLS) into a
    base model: ``lora_ext.load_adapter`` reads the LoRA tensors and the head (PEFT's
    ``modules_to_save``), all checked before the model changes; the class names of
    ``lora_ext_task.json``, when present, become the model's id2label / label2id."""
    import lora_ext

    path = Path(path)
    lora_ext.load_adapter(model, path)
    task_file = path / "lora_ext_task.json"
    if task_file.is_file() and hasattr(model, "config"):
        classes = json.loads(task_file.read_text()).get("classes")
        if classes:  # label names travel into exported files and the runner's output
            model.config.id2label = dict(enumerate(classes))
            model.config.label2id = {c: i for i, c in enumerate(classes)}
    return model


# ------------------------------------------------------------------------------ schedule


def lr_lambda(cfg: TrainConfig):
    """Linear warm-up over warmup_ratio*steps, then cosine down to min_lr_ratio."""
    warmup = int(cfg.warmup_ratio * cfg.steps)

    def f(step: int) -> float:  # step = number of optimizer steps taken so far
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, cfg.steps - warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


# -------------------------------------------------------------------------- out directory


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def check_out_dir(cfg: TrainConfig) -> str:
    """Decide what to do with --out before any work: "fresh", "resume" or "overwrite".

    Refuses an --out that holds a different run (or files that are not a run) unless
    --overwrite, and a run with the same config unless --resume or --overwrite.
    """
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out: {str(out)!r} exists and is not a directory")
    run_file = out / RUN_FILE
    if run_file.is_file():
        try:
            old = json.loads(run_file.read_text())["config"]
        except (json.JSONDecodeError, KeyError) as e:
            raise TrainError(f"--out: {run_file} is unreadable ({e}); use --overwrite") from None
        old_identity = {k: v for k, v in old.items() if k not in CONTROL_FIELDS}
        diffs = _differences(old_identity, cfg.identity())
        if cfg.overwrite:
            return "overwrite"
        if cfg.resume:
            if diffs:
                raise TrainError(
                    f"--resume: {out} holds a run with a different configuration ("
                    + "; ".join(diffs)
                    + "); resume with the same settings, or pass --overwrite to start over"
                )
            return "resume"
        what = (
            "a different run (" + "; ".join(diffs) + ")"
            if diffs
            else "a run with this configuration"
        )
        raise TrainError(
            f"--out: {out} already holds {what}; pass --resume to continue it or "
            f"--overwrite to replace it"
        )
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise TrainError(
            f"--out: {out} is not empty and holds no lora-ext run; choose an empty directory "
            f"or pass --overwrite (only lora-ext's own files would be replaced)"
        )
    return "overwrite" if cfg.overwrite else "fresh"


def clear_out_dir(out: Path) -> None:
    """Remove lora-ext's own entries from --out (other files are left alone)."""
    for name in OUR_ENTRIES:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- checkpoints


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(ckpt_dir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``step-NNNNNNN/state.pt`` atomically (temporary directory, fsync, rename), then
    point ``latest`` at it and delete all but the ``keep`` newest. An interruption at any
    moment leaves the previous checkpoint whole."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step-{step:07d}"
    tmp = ckpt_dir / f".tmp-step-{step:07d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    with open(tmp / "state.pt", "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest_tmp = ckpt_dir / ".latest.tmp"
    latest_tmp.write_text(final.name + "\n")
    os.replace(latest_tmp, ckpt_dir / "latest")
    _fsync_dir(ckpt_dir)
    for old in sorted(ckpt_dir.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_dir.glob(".tmp-step-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    return final


def find_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest whole checkpoint: the one ``latest`` names, else the highest step-*."""
    latest = ckpt_dir / "latest"
    if latest.is_file():
        candidate = ckpt_dir / latest.read_text().strip() / "state.pt"
        if candidate.is_file():
            return candidate
    found = sorted(ckpt_dir.glob("step-*/state.pt"))
    return found[-1] if found else None


def load_checkpoint(path: Path) -> dict[str, Any]:
    # weights_only: tensors, numbers, strings and containers only; nothing is unpickled
    # into code.
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(
            f"--resume: {path} has format {state.get('format')}, need {CHECKPOINT_FORMAT}"
        )
    return state


# ---------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model: nn.Module,
    enc: D.Encoded,
    task: TaskSpec,
    device: torch.device,
    dist: Dist,
    batch_size: int,
    amp: torch.dtype | None,
) -> dict[str, float]:
    """Validation accuracy (classifier) or perplexity (causal LM) over ``enc``, the examples
    split across ranks and the sums all-reduced.

    Returns: {"val_loss", "accuracy"} or {"val_loss", "perplexity"}, plus "n".
    """
    was_training = model.training
    model.eval()
    mine = list(range(dist.rank, len(enc), dist.world_size))
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct = torch.zeros((), dtype=torch.float64)
    count = torch.zeros((), dtype=torch.float64)
    for start in range(0, len(mine), batch_size):
        batch = {
            k: v.to(device) for k, v in D.collate(enc, mine[start : start + batch_size]).items()
        }
        with _autocast(device, amp):
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
        logits = logits.float()
        if task.kind == "seq-cls":
            labels = batch["labels"]
            loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").double().cpu()
            correct += (logits.argmax(-1) == labels).sum().double().cpu()
            count += labels.numel()
        else:
            labels = batch["labels"][:, 1:]
            loss = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                labels.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
            loss_sum += loss.double().cpu()
            count += (labels != -100).sum().double().cpu()
    if dist.enabled:
        totals = torch.stack([loss_sum, correct, count])
        if device.type == "cuda":
            totals = totals.to(device)
        torch.distributed.all_reduce(totals)
        loss_sum, correct, count = totals.cpu().unbind()
    model.train(was_training)
    n = max(count.item(), 1.0)
    result = {"val_loss": loss_sum.item() / n, "n": int(count.item())}
    if task.kind == "seq-cls":
        result["accuracy"] = correct.item() / n
    else:
        result["perplexity"] = math.exp(min(result["val_loss"], 50.0))
    return result


def _autocast(device: torch.device, amp: torch.dtype | None):
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp)


def compute_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], task: TaskSpec
) -> tuple[torch.Tensor, int]:
    """Mean loss of a batch and the number of items it averages over (examples or tokens)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if task.kind == "seq-cls":
        return nn.functional.cross_entropy(logits.float(), batch["labels"]), batch["labels"].numel()
    labels = batch["labels"][:, 1:]
    loss = nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
    )
    return loss, int((labels != -100).sum())


# ------------------------------------------------------------------------------ the run


class _StopFlag:
    """SIGINT/SIGTERM set a flag the loop checks between steps (it then checkpoints and
    exits); a second Ctrl-C interrupts at once (the last checkpoint is whole either way)."""

    def __init__(self) -> None:
        self.set = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.set and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.set = True

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class Interrupted(Exception):
    """Training stopped by a signal after writing a checkpoint."""

    def __init__(self, step: int, checkpoint: Path | None) -> None:
        super().__init__(
            f"interrupted after step {step}; checkpoint {checkpoint}; rerun with --resume"
        )
        self.step = step
        self.checkpoint = checkpoint


def prepare_data(cfg: TrainConfig) -> tuple[D.Split, str]:
    """Load and split the data (every data error surfaces here, before any model loads)."""
    ds = D.load_dataset(cfg.data, cfg.text_column, cfg.label_column, cfg.classes)
    split = D.split_dataset(ds, cfg.val_fraction, cfg.seed, cfg.max_train)
    if cfg.max_val is not None:
        split.val = split.val.subset(range(min(cfg.max_val, len(split.val))))
    return split, ds.task


def _config_digest(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _fingerprint(split: D.Split) -> str:
    """sha256 of the split's texts and labels: a resumed run must see the same data."""
    h = hashlib.sha256()
    for part in (split.train, split.val):
        for i, text in enumerate(part.texts):
            h.update(text.encode())
            h.update(b"\x00" + (str(part.labels[i]).encode() if part.labels else b"") + b"\x01")
    return h.hexdigest()[:16]


def _versions() -> dict[str, str]:
    import transformers

    import lora_ext

    return {
        "lora_ext": lora_ext.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a fine-tuning run; returns the final metrics dict.

    Raises:
        TrainError / DataError: bad arguments, data or --out, before any training step.
        Interrupted: SIGINT/SIGTERM arrived; a checkpoint of the last whole step was written.
    """
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    split, task_kind = prepare_data(cfg)
    mode = check_out_dir(cfg)
    device = pick_device(cfg, int(os.environ.get("LOCAL_RANK", "0")))
    dist = init_distributed(device)
    if cfg.batch_size % dist.world_size:
        raise TrainError(
            f"--batch-size: got {cfg.batch_size}, the global batch of a micro-step; it must "
            f"divide evenly among {dist.world_size} processes"
        )
    amp = autocast_dtype(cfg, device)
    out = Path(cfg.out)

    model, tokenizer, task = load_model(cfg, task_kind, split.train.classes)
    groups = add_lora(cfg, model, task)
    if task.kind == "seq-cls":
        train_enc = D.encode_classification(split.train, tokenizer, cfg.max_length)
        val_enc = D.encode_classification(split.val, tokenizer, cfg.max_length)
    else:
        train_enc = D.encode_causal_lm(split.train, tokenizer, cfg.max_length)
        val_enc = D.encode_causal_lm(split.val, tokenizer, cfg.max_length)
    if len(train_enc) < cfg.batch_size:
        raise TrainError(
            f"--batch-size: got {cfg.batch_size}, more than the {len(train_enc)} training "
            f"{'examples' if task.kind == 'seq-cls' else 'blocks'}"
        )
    if cfg.grad_checkpointing:
        # Non-reentrant checkpointing: works with frozen inputs, and it stashes and restores
        # the RNG state, so the op's seeded dropout draws the same mask when recomputing.
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
    model.to(device)
    model.train()
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(
        [{k: v for k, v in g.items() if k != "name"} | {"name": g["name"]} for g in groups],
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))

    ddp_model: nn.Module = model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # Only trainable tensors are synchronised: frozen ones are excluded from the initial
        # broadcast too (every rank loaded the same base weights from disk).
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        frozen += [n for n, _ in model.named_buffers()]
        DDP._set_params_and_buffers_to_ignore_for_model(model, frozen)
        ddp_model = DDP(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False,
        )

    identity = cfg.identity()
    run_info = {
        "config": dataclasses.asdict(cfg),
        "config_digest": _config_digest(identity),
        "task": task.kind,
        "classes": task.classes,
        "head": task.head,
        "split": split.info | {"seed": split.seed, "val_fraction": split.val_fraction},
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_parameters": sum(p.numel() for p in model.parameters()),
        "world_size": dist.world_size,
        "device": str(device),
        "precision": str(amp).replace("torch.", "") if amp else "fp32",
        "versions": _versions(),
        "status": "running",
    }
    run_info["adapted_layers"] = sum(1 for n, _ in model.named_parameters() if ".lora_A." in n)
    run_info["data_fingerprint"] = _fingerprint(split)

    start_step = 0
    history: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    ckpt_dir = out / "checkpoints"
    if mode == "resume":
        path = find_checkpoint(ckpt_dir)
        if path is None:
            if dist.is_main:
                print(
                    f"--resume: no checkpoint in {ckpt_dir}; starting from step 0", file=sys.stderr
                )
        else:
            state = load_checkpoint(path)
            if state["config_digest"] != run_info["config_digest"]:
                raise TrainError(f"--resume: {path} belongs to another configuration")
            if state.get("data_fingerprint") != run_info["data_fingerprint"]:
                raise TrainError(
                    f"--resume: the data of {cfg.data!r} differ from those {path} was trained "
                    "on (the file changed?); resuming would not continue the same run"
                )
            if state["world_size"] != dist.world_size:
                raise TrainError(
                    f"--resume: {path} was written by {state['world_size']} processes, this run "
                    f"has {dist.world_size} (the per-rank RNG states would not line up)"
                )
            params = dict(model.named_parameters())
            with torch.no_grad():
                for name, tensor in state["trainable"].items():
                    params[name].copy_(tensor)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            _set_rng_state(state["rng"][dist.rank])
            start_step = state["step"]
            history, evals = state["history"], state["evals"]
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if mode == "overwrite":
            clear_out_dir(out)
        write_json_atomic(out / RUN_FILE, run_info)
    dist.barrier()
    if mode != "resume" or start_step == 0:
        torch.manual_seed(cfg.seed * 7919 + 17 + dist.rank)  # dropout streams, per rank

    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    # Length-grouped batches pad less (classification; causal-LM blocks are all full).
    lengths = (
        [len(x) for x in train_enc.input_ids]
        if cfg.group_by_length and task.kind == "seq-cls"
        else None
    )

    def checkpoint_state(step: int) -> dict[str, Any]:
        rngs = [None] * dist.world_size
        if dist.enabled:
            torch.distributed.all_gather_object(rngs, _rng_state())
        else:
            rngs = [_rng_state()]
        return {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "config_digest": run_info["config_digest"],
            "data_fingerprint": run_info["data_fingerprint"],
            "world_size": dist.world_size,
            "trainable": {names[id(p)]: p.detach().cpu().clone() for p in trainable},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rngs,
            "history": history,
            "evals": evals,
            # the data order is a function of these (and of the example lengths when
            # grouping): micro-batch k of the run is global_batch_indices(n_train,
            # batch_size, seed, k, lengths)
            "data": {
                "seed": cfg.seed,
                "n_train": len(train_enc),
                "next_micro_batch": step * cfg.grad_accum,
            },
        }

    def write_checkpoint(step: int) -> Path | None:
        state = checkpoint_state(step)  # collective: every rank takes part
        path = None
        if dist.is_main:
            path = save_checkpoint(ckpt_dir, step, state, cfg.keep_checkpoints)
        dist.barrier()
        return path

    stop_at = min(cfg.stop_at or cfg.steps, cfg.steps)
    progress = _progress(cfg, dist, start_step)
    train_time = sum(h.get("time_s", 0.0) for h in history)
    step = start_step
    with _StopFlag() as stop:
        while step < stop_at:
            t0 = time.perf_counter()
            loss_sum = 0.0
            tokens = 0
            for micro in range(cfg.grad_accum):
                index = step * cfg.grad_accum + micro
                global_idx = D.global_batch_indices(
                    len(train_enc), cfg.batch_size, cfg.seed, index, lengths
                )
                batch = D.collate(train_enc, D.shard(global_idx, dist.rank, dist.world_size))
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                sync = micro == cfg.grad_accum - 1 or not dist.enabled
                ctx = contextlib.nullcontext() if sync else ddp_model.no_sync()
                with ctx:
                    with _autocast(device, amp):
                        loss, _ = compute_loss(ddp_model, batch, task)
                    (loss / cfg.grad_accum).backward()
                loss_sum += loss.detach().float().item()
                tokens += int(batch["attention_mask"].sum())
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            # one small all-reduce per step: the global loss, tokens and the stop flag
            stats = torch.tensor(
                [loss_sum / cfg.grad_accum, tokens, float(stop.set)], dtype=torch.float64
            )
            if dist.enabled:
                stats = stats.to(device)
                torch.distributed.all_reduce(stats)
                stats = stats.cpu()
                stats[0] /= dist.world_size
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            train_time += dt
            record = {
                "step": step,
                "loss": stats[0].item(),
                "lr": lr,
                "tokens": int(stats[1]),
                "time_s": dt,
            }
            history.append(record)
            progress.update(1)
            progress.set_postfix(
                loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens'] / dt:.0f}"
            )
            if step % cfg.eval_every == 0 and step < cfg.steps:
                result = evaluate(model, val_enc, task, device, dist, cfg.eval_batch_size, amp)
                evals.append({"step": step} | result)
                if dist.is_main:
                    progress.write(_format_eval(step, result))
            interrupted = stats[2].item() > 0
            if step % cfg.save_every == 0 or step == stop_at or interrupted:
                write_checkpoint(step)
            if interrupted:
                progress.close()
                path = find_checkpoint(ckpt_dir) if dist.is_main else None
                if dist.is_main:
                    run_info["status"] = f"interrupted at step {step}"
                    write_json_atomic(out / RUN_FILE, run_info)
                raise Interrupted(step, path)
    progress.close()

    if step < cfg.steps:  # --stop-at: a checkpoint was written; --resume continues
        if dist.is_main:
            run_info["status"] = f"stopped at step {step} (--stop-at)"
            write_json_atomic(out / RUN_FILE, run_info)
            print(
                f"stopped after step {step} of {cfg.steps}; continue with --resume", file=sys.stderr
            )
        return {"step": step, "status": "stopped"}

    final = evaluate(model, val_enc, task, device, dist, cfg.eval_batch_size, amp)
    if not evals or evals[-1]["step"] != step:
        evals.append({"step": step} | final)
    total_tokens = sum(h["tokens"] for h in history)
    metrics = {
        "task": task.kind,
        "steps": step,
        "final": final,
        "train_time_s": train_time,
        "tokens_per_s": total_tokens / max(train_time, 1e-9),
        "step_time_s_median": _median([h["time_s"] for h in history]),
        "history": history,
        "evals": evals,
        "device": str(device),
        "world_size": dist.world_size,
    }
    if device.type == "cuda":
        metrics["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    if dist.is_main:
        model.eval()
        save_trained_adapter(model, out / "adapter", task)
        write_json_atomic(out / "metrics.json", metrics)
        plot_loss(history, evals, task, out / "loss.png")
        print(_format_eval(step, final, final=True), file=sys.stderr)
        run_info["status"] = "done"
        if cfg.export:
            try:
                metrics["export"] = export_run(
                    out, model, tokenizer, task, val_enc, split.train.texts, cfg.max_length
                )
            except Exception as e:  # the trained adapter is safe on disk: report, don't lose it
                metrics["export_error"] = f"{type(e).__name__}: {e}"
                run_info["status"] = "done; export failed"
                _log(
                    f"export failed ({metrics['export_error']}); the adapter is saved in "
                    f"{out / 'adapter'}: retry with `lora-ext export --adapter {out / 'adapter'}`"
                )
            write_json_atomic(out / "metrics.json", metrics)
        write_json_atomic(out / RUN_FILE, run_info)
    dist.barrier()
    return metrics


def _median(values: Sequence[float]) -> float:
    s = sorted(values)
    return s[len(s) // 2] if s else float("nan")


def _format_eval(step: int, result: dict[str, Any], final: bool = False) -> str:
    what = "final validation" if final else "validation"
    if "accuracy" in result:
        return f"step {step}: {what} accuracy {result['accuracy']:.4f} loss {result['val_loss']:.4f} (n={result['n']})"
    return (
        f"step {step}: {what} perplexity {result['perplexity']:.3f} loss {result['val_loss']:.4f}"
    )


def _progress(cfg: TrainConfig, dist: Dist, initial: int):
    from tqdm.auto import tqdm

    return tqdm(
        total=cfg.steps,
        initial=initial,
        desc="train",
        unit="step",
        disable=not (cfg.progress and dist.is_main),
        dynamic_ncols=True,
    )


def plot_loss(
    history: list[dict[str, Any]], evals: list[dict[str, Any]], task: TaskSpec, path: Path
) -> None:
    """Training loss per step (and its moving average), validation metric on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    losses = [h["loss"] for h in history]
    window = max(1, len(losses) // 20)
    smooth = [
        sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
        for i in range(len(losses))
    ]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="train loss")
    ax.plot(
        steps, smooth, color="tab:blue", linewidth=1.5, label=f"train loss ({window}-step mean)"
    )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    if evals:
        key = "accuracy" if task.kind == "seq-cls" else "perplexity"
        ax2 = ax.twinx()
        ax2.plot(
            [e["step"] for e in evals],
            [e[key] for e in evals],
            "o-",
            color="tab:orange",
            label=f"validation {key}",
        )
        ax2.set_ylabel(f"validation {key}")
        ax2.legend(loc="upper right")
    ax.legend(loc="upper left" if evals else "best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def export_run(
    out: Path,
    model: nn.Module,
    tokenizer: Any,
    task: TaskSpec,
    val_enc: D.Encoded,
    calibration_texts: Sequence[str] = (),
    max_length: int = 128,
) -> dict[str, Any]:
    """--export: merged fp32 and int8 ONNX files under out/onnx, verified by onnxruntime; int8
    is calibrated on the first training examples (never on the held-out ones)."""
    from lora_ext.export import export_onnx

    onnx_dir = out / "onnx"
    onnx_dir.mkdir(exist_ok=True)
    example = D.collate(val_enc, range(min(2, len(val_enc))))
    inputs = {"input_ids": example["input_ids"], "attention_mask": example["attention_mask"]}
    calibration = None
    if calibration_texts:
        from lora_ext.export.quantize import CALIBRATION_SAMPLES, calibration_runs

        # extra tokenizer outputs (token_type_ids) are ignored: export_onnx reads the example's
        texts = list(calibration_texts)[:CALIBRATION_SAMPLES]
        calibration = calibration_runs(tokenizer, texts, max_length=max_length)
    cpu_model = model.to("cpu").eval()
    reports = {}
    for name, quantize in (("fp32", None), ("int8", "int8")):
        path = onnx_dir / ("model.onnx" if name == "fp32" else "model.int8.onnx")
        # export_onnx merges a copy, checks the file in onnxruntime against PyTorch (fp32 to
        # 1e-4 relative) and leaves no file behind when that check fails.
        report = export_onnx(
            cpu_model,
            inputs,
            path,
            quantize=quantize,
            calibration=calibration if quantize == "int8" else None,
            task=task.kind,
            log=_log,
        )
        reports[name] = _jsonable(report.to_dict())
        _log(report.table())
    tokenizer.save_pretrained(onnx_dir)  # the runner and `lora-ext infer` read it from here
    return reports


def _log(message: str) -> None:
    print(message, file=sys.stderr)


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, Path):
        return str(obj)
    return repr(obj)


__all__ = [
    "Interrupted",
    "TrainConfig",
    "TrainError",
    "load_trained_adapter",
    "save_trained_adapter",
    "train",
]
