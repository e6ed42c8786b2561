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
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_ext.config import Task
from lora_ext.training import data as D
from lora_ext.training.checkpoints import (
    CHECKPOINT_FORMAT,
    _rng_state,
    _set_rng_state,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from lora_ext.training.config import TrainConfig, TrainError
from lora_ext.training.distributed import (
    Dist,
    _autocast,
    all_true,
    autocast_dtype,
    full,
    gradient_sync,
    init_distributed,
    is_sharded,
    local,
    pick_device,
    unshard_for_saving,
    wrap_model,
)
from lora_ext.training.heads import (
    TaskSpec,
    add_lora,
    load_model,
    load_trained_adapter,
    quiet_transformers,
    save_trained_adapter,
)
from lora_ext.training.plots import plot_loss
from lora_ext.training.run_dir import (
    RUN_FILE,
    check_out_dir,
    clear_out_dir,
    locked_out_dir,
    write_json_atomic,
)


def lr_lambda(cfg: TrainConfig):
    """Linear warm-up over warmup_ratio*steps, then cosine down to min_lr_ratio."""
    warmup = int(cfg.warmup_ratio * cfg.steps)

    def f(step: int) -> float:  # step = number of optimizer steps taken so far
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, cfg.steps - warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


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


class Diverged(Exception):
    """Training produced a non-finite loss, gradient or update: the run stops there, with
    the last checkpoint (written before that step) kept as the last good state."""

    def __init__(self, step: int, what: str) -> None:
        super().__init__(f"diverged at step {step}: {what}")
        self.step = step
        self.what = what
        self.checkpoint: Path | None = None


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


@dataclass
class Run:
    """The state of one training run, passed through the stages of :func:`train`."""

    cfg: TrainConfig
    dist: Dist
    device: torch.device
    amp: torch.dtype | None
    out: Path
    mode: str  # "fresh", "resume" or "overwrite" (check_out_dir)
    split: D.Split
    model: nn.Module
    tokenizer: Any
    task: TaskSpec
    train_enc: D.Encoded
    val_enc: D.Encoded
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    ddp_model: nn.Module
    run_info: dict[str, Any]
    lengths: list[int] | None
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    train_time: float = 0.0

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"

    @property
    def trainable(self) -> list[nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    @property
    def stop_at(self) -> int:
        return min(self.cfg.stop_at or self.cfg.steps, self.cfg.steps)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a fine-tuning run; returns the final metrics dict.

    Stages: :func:`set_up` (check everything, load data and model, build the optimizer),
    :func:`resume` (restore the last checkpoint), :func:`start_run_dir`, then
    :func:`train_step` until the last step, and :func:`finish` (evaluate, save, export).

    Raises:
        TrainError / DataError: bad arguments, data or --out, before any training step.
        Interrupted: SIGINT/SIGTERM arrived; a checkpoint of the last whole step was written.
        Diverged: a non-finite loss, gradient or update; nothing of that step is saved.

    --out is locked for the whole run (:func:`~lora_ext.training.run_dir.locked_out_dir`):
    a second run into the same folder is refused, and a run refused before it wrote
    anything leaves no --out behind.
    """
    cfg.validate()
    with locked_out_dir(Path(cfg.out), enabled=int(os.environ.get("RANK", "0")) == 0):
        return _train(cfg)


def _train(cfg: TrainConfig) -> dict[str, Any]:
    run = set_up(cfg)
    resume(run)
    start_run_dir(run)
    progress = _progress(cfg, run.dist, run.step)
    with _StopFlag() as stop:
        while run.step < run.stop_at:
            try:
                record, interrupted = train_step(run, stop.set)
            except Diverged as exc:
                progress.close()
                exc.checkpoint = find_checkpoint(run.ckpt_dir) if run.dist.is_main else None
                _set_status(run, str(exc))
                raise
            progress.update(1)
            progress.set_postfix(
                loss=f"{record['loss']:.4f}",
                lr=f"{record['lr']:.2e}",
                tok_s=f"{record['tokens'] / record['time_s']:.0f}",
            )
            if run.step % cfg.eval_every == 0 and run.step < cfg.steps:
                result = evaluate(
                    run.model, run.val_enc, run.task, run.device, run.dist,
                    cfg.eval_batch_size, run.amp,
                )  # fmt: skip
                run.evals.append({"step": run.step} | result)
                if run.dist.is_main:
                    progress.write(_format_eval(run.step, result))
            if run.step % cfg.save_every == 0 or run.step == run.stop_at or interrupted:
                try:
                    write_checkpoint(run)
                except OSError as exc:  # disk full...: run.json must not say "running"
                    progress.close()
                    with contextlib.suppress(OSError):
                        _set_status(run, f"failed at step {run.step}: {exc.strerror}")
                    raise
            if interrupted:
                progress.close()
                path = find_checkpoint(run.ckpt_dir) if run.dist.is_main else None
                _set_status(run, f"interrupted at step {run.step}")
                raise Interrupted(run.step, path)
    progress.close()
    if run.step < cfg.steps:  # --stop-at: a checkpoint was written; --resume continues
        _set_status(run, f"stopped at step {run.step} (--stop-at)")
        if run.dist.is_main:
            print(
                f"stopped after step {run.step} of {cfg.steps}; continue with --resume",
                file=sys.stderr,
            )
        return {"step": run.step, "status": "stopped"}
    metrics = finish(run)
    if run.dist.is_main:  # the same figures as metrics.json (steps only: no eval, no saving)
        print(
            f"trained {metrics['steps']} steps in {metrics['train_time_s']:.1f} s "
            f"({metrics['tokens_per_s']:.0f} tokens/s); {run.out / 'metrics.json'}",
            file=sys.stderr,
        )
    return metrics


def set_up(cfg: TrainConfig) -> Run:
    """Check the arguments, the data and --out, then load the model, inject LoRA and build
    the optimizer, scheduler and (under torchrun) the DDP wrapper. Nothing is written."""
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
    model, tokenizer, task = load_model(cfg, task_kind, split.train.classes)
    groups = add_lora(cfg, model, task)
    train_enc, val_enc = _encode(cfg, split, tokenizer, task)
    if len(train_enc) < cfg.batch_size:
        raise TrainError(
            f"--batch-size: got {cfg.batch_size}, more than the {len(train_enc)} training "
            f"{'examples' if task.kind == Task.SEQ_CLS else 'blocks'}"
        )
    if cfg.grad_checkpointing:
        _enable_grad_checkpointing(model)
    model.to(device)
    model.train()
    # FSDP2 replaces the parameters with sharded ones: the optimizer is built after wrapping,
    # from the groups' parameter names
    names = {id(p): n for n, p in model.named_parameters()}
    group_names = [[names[id(p)] for p in g["params"]] for g in groups]
    wrapped = wrap_model(model, dist, device, cfg.fsdp)
    params = dict(model.named_parameters())
    optimizer = torch.optim.AdamW(
        [g | {"params": [params[n] for n in pn]} for g, pn in zip(groups, group_names)],
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    # Length-grouped batches pad less (classification; causal-LM blocks are all full).
    lengths = (
        [len(x) for x in train_enc.input_ids]
        if cfg.group_by_length and task.kind == Task.SEQ_CLS
        else None
    )
    return Run(
        cfg=cfg,
        dist=dist,
        device=device,
        amp=amp,
        out=Path(cfg.out),
        mode=mode,
        split=split,
        model=model,
        tokenizer=tokenizer,
        task=task,
        train_enc=train_enc,
        val_enc=val_enc,
        optimizer=optimizer,
        scheduler=scheduler,
        ddp_model=wrapped,
        run_info=_run_info(cfg, split, model, task, dist, device, amp),
        lengths=lengths,
    )


def _encode(
    cfg: TrainConfig, split: D.Split, tokenizer: Any, task: TaskSpec
) -> tuple[D.Encoded, D.Encoded]:
    """(train, validation) token ids: one example per row (classifier) or full blocks of
    --max-length tokens (causal LM)."""
    if task.kind == Task.SEQ_CLS:
        encode = D.encode_classification
    else:
        encode = D.encode_causal_lm
    return encode(split.train, tokenizer, cfg.max_length), encode(
        split.val, tokenizer, cfg.max_length
    )


def _enable_grad_checkpointing(model: nn.Module) -> None:
    # Non-reentrant checkpointing: works with frozen inputs, and it stashes and restores the
    # RNG state, so the op's seeded dropout draws the same mask when recomputing.
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _run_info(
    cfg: TrainConfig,
    split: D.Split,
    model: nn.Module,
    task: TaskSpec,
    dist: Dist,
    device: torch.device,
    amp: torch.dtype | None,
) -> dict[str, Any]:
    """What run.json records (the config digest and data fingerprint tie checkpoints to it)."""
    return {
        "config": dataclasses.asdict(cfg),
        "config_digest": _config_digest(cfg.identity()),
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
        "exported": [],  # the ONNX files written (relative to --out), whoever wrote them
        "adapted_layers": sum(1 for n, _ in model.named_parameters() if ".lora_A." in n),
        "data_fingerprint": _fingerprint(split),
    }


def resume(run: Run) -> None:
    """--resume: restore the trainable tensors, optimizer, scheduler, RNG states, history and
    step from the newest whole checkpoint, after checking it belongs to this run."""
    if run.mode != "resume":
        return
    path = find_checkpoint(run.ckpt_dir)
    if path is None:
        if run.dist.is_main:
            print(
                f"--resume: no checkpoint in {run.ckpt_dir}; starting from step 0",
                file=sys.stderr,
            )
        return
    state = load_checkpoint(path, expected=_trainable_shapes(run))
    if state["config_digest"] != run.run_info["config_digest"]:
        raise TrainError(f"--resume: {path} belongs to another configuration")
    if state.get("data_fingerprint") != run.run_info["data_fingerprint"]:
        raise TrainError(
            f"--resume: the data of {run.cfg.data!r} differ from those {path} was trained "
            "on (the file changed?); resuming would not continue the same run"
        )
    if state["world_size"] != run.dist.world_size:
        raise TrainError(
            f"--resume: {path} was written by {state['world_size']} processes, this run "
            f"has {run.dist.world_size} (the per-rank RNG states would not line up)"
        )
    _restore_trainable(run, state)
    run.scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"][run.dist.rank])
    run.step = state["step"]
    run.history, run.evals = state["history"], state["evals"]
    run.train_time = sum(h.get("time_s", 0.0) for h in run.history)


def _trainable_shapes(run: Run) -> dict[str, tuple[int, ...]]:
    names = {id(p): n for n, p in run.model.named_parameters()}
    return {names[id(p)]: tuple(p.shape) for p in run.trainable}


def start_run_dir(run: Run) -> None:
    """Create --out (clearing our own entries on --overwrite), write run.json, and seed the
    dropout streams of a run that starts at step 0."""
    if run.dist.is_main:
        run.out.mkdir(parents=True, exist_ok=True)
        if run.mode == "overwrite":
            clear_out_dir(run.out)
        write_json_atomic(run.out / RUN_FILE, run.run_info)
    run.dist.barrier()
    if run.mode != "resume" or run.step == 0:
        torch.manual_seed(run.cfg.seed * 7919 + 17 + run.dist.rank)  # dropout streams, per rank


def accumulate_gradients(run: Run) -> tuple[float, int]:
    """Forward and backward of this step's --grad-accum micro-batches (this rank's shard of
    each global batch); under DDP the gradients are all-reduced on the last micro-batch only.

    Returns:
        (this rank's mean loss over the micro-batches, its non-padding tokens).
    """
    cfg, dist, device = run.cfg, run.dist, run.device
    loss_sum = 0.0
    tokens = 0
    for micro in range(cfg.grad_accum):
        index = run.step * cfg.grad_accum + micro
        global_idx = D.global_batch_indices(
            len(run.train_enc), cfg.batch_size, cfg.seed, index, run.lengths
        )
        batch = D.collate(run.train_enc, D.shard(global_idx, dist.rank, dist.world_size))
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        sync = micro == cfg.grad_accum - 1 or not dist.enabled
        with gradient_sync(run.ddp_model, sync):
            with _autocast(device, run.amp):
                loss, _ = compute_loss(run.ddp_model, batch, run.task)
            (loss / cfg.grad_accum).backward()
        loss_sum += loss.detach().float().item()
        tokens += int(batch["attention_mask"].sum())
    return loss_sum / cfg.grad_accum, tokens


def train_step(run: Run, stop_requested: bool) -> tuple[dict[str, Any], bool]:
    """One optimizer step: :func:`accumulate_gradients`, clipping, the update.

    Returns:
        (the step's record {step, loss, lr, tokens, time_s}, whether any rank was asked to
        stop: one small all-reduce carries the global loss, tokens and the stop flags).
    """
    cfg, dist, device = run.cfg, run.dist, run.device
    t0 = time.perf_counter()
    loss, tokens = accumulate_gradients(run)
    # the norm is computed either way (max_norm inf: a multiply by exactly 1): a non-finite
    # gradient must never reach the weights. Gradients are all-reduced, so every rank agrees.
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else math.inf
    grad_norm = float(full(torch.nn.utils.clip_grad_norm_(run.trainable, max_norm)))
    if not math.isfinite(grad_norm):
        raise Diverged(run.step + 1, f"the gradient norm is {grad_norm}")
    lr = run.optimizer.param_groups[0]["lr"]
    run.optimizer.step()
    finite = all(bool(torch.isfinite(local(p)).all()) for p in run.trainable)
    if not all_true(finite, dist, device):  # FSDP2: each rank checks its own shards
        raise Diverged(run.step + 1, "the update made a trainable tensor non-finite")
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    stats = torch.tensor([loss, tokens, float(stop_requested)], dtype=torch.float64)
    if dist.enabled:
        stats = stats.to(device)
        torch.distributed.all_reduce(stats)
        stats = stats.cpu()
        stats[0] /= dist.world_size
    if not math.isfinite(stats[0].item()):
        raise Diverged(run.step, f"the loss is {stats[0].item()}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    run.train_time += dt
    record = {"step": run.step, "loss": stats[0].item(), "lr": lr, "tokens": int(stats[1])}
    record["time_s"] = dt
    run.history.append(record)
    return record, stats[2].item() > 0


def checkpoint_state(run: Run) -> dict[str, Any]:
    """What a checkpoint holds (collective under torchrun: every rank's RNG state)."""
    dist = run.dist
    rngs: list[Any] = [None] * dist.world_size
    if dist.enabled:
        torch.distributed.all_gather_object(rngs, _rng_state())
    else:
        rngs = [_rng_state()]
    names = {id(p): n for n, p in run.model.named_parameters()}
    return {
        "format": CHECKPOINT_FORMAT,
        "step": run.step,
        "config_digest": run.run_info["config_digest"],
        "data_fingerprint": run.run_info["data_fingerprint"],
        "world_size": dist.world_size,
        # FSDP2 shards are gathered (collective): a checkpoint always holds whole tensors
        "trainable": {names[id(p)]: full(p.detach()).cpu().clone() for p in run.trainable},
        "optimizer": _optimizer_state(run),
        "scheduler": run.scheduler.state_dict(),
        "rng": rngs,
        "history": run.history,
        "evals": run.evals,
        # the data order is a function of these (and of the example lengths when grouping):
        # micro-batch k of the run is global_batch_indices(n_train, batch_size, seed, k, lengths)
        "data": {
            "seed": run.cfg.seed,
            "n_train": len(run.train_enc),
            "next_micro_batch": run.step * run.cfg.grad_accum,
        },
    }


def _optimizer_state(run: Run) -> dict[str, Any]:
    """The optimizer's state dict; under FSDP2 the whole (gathered, collective) one, keyed
    by parameter name (torch.distributed.checkpoint's full state dict)."""
    if not is_sharded(run.model):
        return run.optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(run.model, run.optimizer, options=options)


def _restore_trainable(run: Run, state: dict[str, Any]) -> None:
    """Load a checkpoint's trainable tensors and optimizer state into the model (sharding
    them again under FSDP2)."""
    if not is_sharded(run.model):
        params = dict(run.model.named_parameters())
        with torch.no_grad():
            for name, tensor in state["trainable"].items():
                params[name].copy_(tensor)
        run.optimizer.load_state_dict(state["optimizer"])
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(run.model, state["trainable"], options=options)
    set_optimizer_state_dict(
        run.model, run.optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True)
    )


def write_checkpoint(run: Run) -> Path | None:
    """Write a checkpoint of the current step (rank 0 writes; every rank takes part)."""
    state = checkpoint_state(run)
    path = None
    if run.dist.is_main:
        path = save_checkpoint(run.ckpt_dir, run.step, state, run.cfg.keep_checkpoints)
    run.dist.barrier()
    return path


def _set_status(run: Run, status: str) -> None:
    run.run_info["status"] = status
    if run.dist.is_main:
        write_json_atomic(run.out / RUN_FILE, run.run_info)


def finish(run: Run) -> dict[str, Any]:
    """Evaluate, save the adapter, metrics.json and loss.png, and export with --export."""
    cfg, dist, device = run.cfg, run.dist, run.device
    final = evaluate(run.model, run.val_enc, run.task, device, dist, cfg.eval_batch_size, run.amp)
    if not run.evals or run.evals[-1]["step"] != run.step:
        run.evals.append({"step": run.step} | final)
    total_tokens = sum(h["tokens"] for h in run.history)
    metrics = {
        "task": run.task.kind,
        "steps": run.step,
        "final": final,
        "train_time_s": run.train_time,
        "tokens_per_s": total_tokens / max(run.train_time, 1e-9),
        "step_time_s_median": _median([h["time_s"] for h in run.history]),
        "history": run.history,
        "evals": run.evals,
        "device": str(device),
        "world_size": dist.world_size,
    }
    if device.type == "cuda":
        metrics["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    if is_sharded(run.model):
        unshard_for_saving(run.model)  # collective: rank 0 then saves whole tensors
    if dist.is_main:
        run.model.eval()
        save_trained_adapter(run.model, run.out / "adapter", run.task)
        write_json_atomic(run.out / "metrics.json", metrics)
        plot_loss(run.history, run.evals, run.task.kind, run.out / "loss.png")
        print(_format_eval(run.step, final, final=True), file=sys.stderr)
        run.run_info["status"] = "done"
        if cfg.export:
            _export(run, metrics)
            write_json_atomic(run.out / "metrics.json", metrics)
        write_json_atomic(run.out / RUN_FILE, run.run_info)
    dist.barrier()
    return metrics


def _export(run: Run, metrics: dict[str, Any]) -> None:
    """--export after training; a failure is reported, never loses the saved adapter."""
    try:
        model = run.model
        if is_sharded(model):  # FSDP2 hooks would reshard it while tracing: a fresh copy
            model, _, _ = load_model(run.cfg, run.task.kind, run.task.classes)
            load_trained_adapter(model, run.out / "adapter")
        metrics["export"] = export_run(
            run.out,
            model,
            run.tokenizer,
            run.task,
            run.val_enc,
            run.split.train.texts,
            run.cfg.max_length,
        )
    except Exception as e:  # the trained adapter is safe on disk: report, don't lose it
        metrics["export_error"] = f"{type(e).__name__}: {e}"
        run.run_info["status"] = "done; export failed"
        _log(
            f"export failed ({metrics['export_error']}); the adapter is saved in "
            f"{run.out / 'adapter'}: retry with `lora-ext export --adapter {run.out / 'adapter'}`"
        )
    run.run_info["exported"] = exported_files(run.out) if "export" in metrics else []


def exported_files(out: Path) -> list[str]:
    """The ONNX files under ``out/onnx``, relative to ``out`` (what run.json's "exported"
    lists)."""
    return sorted(str(p.relative_to(out)) for p in (out / "onnx").glob("*.onnx"))


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


class _LineProgress:
    """Progress for a log file (stderr is not a terminal): one plain line every 5% of the
    steps (and at least every ``interval`` seconds), never a carriage-return bar. The same
    methods as the tqdm bar the loop drives."""

    def __init__(self, total: int, initial: int, interval: float = 60.0) -> None:
        self.total, self.n = total, initial
        self.every = max(1, total // 20)
        self.interval = interval
        self.t0 = self.last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, **fields: Any) -> None:
        now = time.perf_counter()
        if self.n % self.every and self.n != self.total and now - self.last < self.interval:
            return
        self.last = now
        values = " ".join(f"{k}={v}" for k, v in fields.items())
        print(
            f"train: step {self.n}/{self.total} ({100 * self.n // self.total}%) {values} "
            f"[{now - self.t0:.0f} s]",
            file=sys.stderr,
            flush=True,
        )

    def write(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def _progress(cfg: TrainConfig, dist: Dist, initial: int):
    """A tqdm bar on a terminal; plain lines (:class:`_LineProgress`) in a log; nothing
    with --no-progress or on ranks other than 0 (evaluation lines are still printed)."""
    from tqdm.auto import tqdm

    show = cfg.progress and dist.is_main
    if show and not sys.stderr.isatty():
        return _LineProgress(cfg.steps, initial)
    return tqdm(
        total=cfg.steps,
        initial=initial,
        desc="train",
        unit="step",
        disable=not show,
        dynamic_ncols=True,
    )


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
    "Diverged",
    "Interrupted",
    "Run",
    "TrainConfig",
    "TrainError",
    "load_trained_adapter",
    "quiet_transformers",
    "save_trained_adapter",
    "train",
]
