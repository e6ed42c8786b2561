"""``lora-ext train``: the flags, and the call into :mod:`lora_ext.training.trainer`.

    lora-ext train --model minilm --data rotten-tomatoes --r 8 --alpha 16 --dropout 0.05 \\
                   --targets query,key,value --steps 300 --lr 1e-3 --batch-size 16 --out runs/rt

Under torchrun: ``torchrun --nproc_per_node=2 -m lora_ext.cli train --rank 8 ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import sys
from typing import Any

import torch

from lora_ext.cli import HelpFormatter
from lora_ext.training.data import DataError
from lora_ext.training.trainer import Diverged, Interrupted, TrainConfig, TrainError, train


def _csv_list(text: str) -> list[str]:
    """'a,b,c' -> ['a', 'b', 'c']; an empty name ('a,,b', 'a,') is an error, not dropped
    (a dropped class name would shift every label after it)."""
    names = [t.strip() for t in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"got {text!r}; need comma-separated non-empty names")
    return names


def _optional_float(text: str) -> float | None:
    # "none"/"off" turn clipping off; 0 is not a spelling of "off" (it is refused as a norm)
    return None if text.lower() in ("none", "off") else float(text)


def _default_targets_help() -> str:
    """'bert, roberta: query,key,value; llama, ...: q_proj,...' from heads.DEFAULT_TARGETS."""
    from lora_ext.training.heads import DEFAULT_TARGETS

    by_targets: dict[str, list[str]] = {}
    for model_type, targets in DEFAULT_TARGETS.items():
        by_targets.setdefault(",".join(targets), []).append(model_type)
    return "; ".join(f"{'/'.join(types)}: {t}" for t, types in by_targets.items())


def add_train_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``lora-ext train`` flags; defaults come from :class:`TrainConfig`."""
    d = TrainConfig(out="")
    g = p.add_argument_group("model and data")
    g.add_argument(
        "--model",
        default=d.model,
        help="minilm (a BERT sequence classifier), smollm2 (a Llama causal LM) or a "
        "transformers model directory",
    )
    g.add_argument(
        "--data",
        default=d.data,
        help="rotten-tomatoes, bbc-news, a UTF-8 .csv/.jsonl file (text + label columns) "
        "or a .txt file (causal LM; paragraphs split at blank lines)",
    )
    g.add_argument("--text-column", default=d.text_column, help="text column of a CSV/JSONL file")
    g.add_argument(
        "--label-column", default=d.label_column, help="label column of a CSV/JSONL file"
    )
    g.add_argument(
        "--classes",
        type=_csv_list,
        default=None,
        help="declared class names, comma-separated (label i = i-th; default: the sorted "
        "labels found in the data)",
    )
    g.add_argument(
        "--no-group-by-length",
        dest="group_by_length",
        action="store_false",
        help="batches in plain random order (default: grouped by length, less padding)",
    )
    g.add_argument(
        "--val-fraction",
        type=float,
        default=d.val_fraction,
        help="share of the data held out for validation (per class)",
    )
    g.add_argument(
        "--max-train",
        type=int,
        default=None,
        help="use only this many training examples (default: all)",
    )
    g.add_argument(
        "--max-val",
        type=int,
        default=None,
        help="evaluate on this many validation examples (default: all)",
    )
    g.add_argument(
        "--max-length",
        type=int,
        default=d.max_length,
        help="tokens per example (block size for text); at most the model's "
        "max_position_embeddings",
    )
    g = p.add_argument_group("LoRA")
    # --rank: the spelling to use under torchrun, whose own parser takes "--r" for an
    # ambiguous abbreviation of its --rdzv-* options
    g.add_argument(
        "--r",
        "--rank",
        dest="r",
        type=int,
        default=d.r,
        help="LoRA rank (at most the smaller dimension of the adapted layers); spell it "
        "--rank under torchrun",
    )
    g.add_argument(
        "--alpha", type=float, default=d.alpha, help="LoRA scale numerator: scale = alpha/r"
    )
    g.add_argument(
        "--dropout", type=float, default=d.dropout, help="LoRA dropout on the adapter's input"
    )
    g.add_argument(
        "--targets",
        type=_csv_list,
        default=None,
        help="layers to adapt, comma-separated names or suffixes (default, by model type: "
        + _default_targets_help()
        + "; minilm is bert, smollm2 is llama)",
    )
    g.add_argument("--rslora", action="store_true", help="scale alpha/sqrt(r) instead of alpha/r")
    g.add_argument(
        "--dora",
        action="store_true",
        help="DoRA: also train a magnitude vector per adapted layer, y = m/||W + sBA|| * "
        "(x W^T + s drop(x) A^T B^T) + b (PEFT's use_dora; saved in PEFT's format)",
    )
    g.add_argument(
        "--quantize-base",
        default=d.quantize_base,
        choices=["nf4", "int8"],
        help="QLoRA: quantize the frozen base's linear layers (not the head) with bitsandbytes "
        "4-bit nf4 or 8-bit int8 before adding LoRA; the adapter stays float32 and the "
        "export dequantizes and merges with one rounding",
    )
    g.add_argument(
        "--init",
        default=d.init,
        choices=["kaiming", "gaussian", "pissa"],
        help="adapter initialisation: kaiming or gaussian A with B = 0 (training starts "
        "from the base model); pissa: A and B from the weight's principal singular vectors",
    )
    g.add_argument(
        "--model-dropout",
        type=float,
        default=None,
        help="override the base model's own dropout (default: the model's)",
    )
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=d.steps, help="optimizer steps")
    g.add_argument(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help="global examples per micro-step (split across processes)",
    )
    g.add_argument(
        "--grad-accum", type=int, default=d.grad_accum, help="micro-steps per optimizer step"
    )
    g.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (AdamW)")
    g.add_argument(
        "--head-lr",
        type=float,
        default=None,
        help="learning rate of the classifier head (default: --lr)",
    )
    g.add_argument(
        "--loraplus-ratio",
        type=float,
        default=None,
        help="LoRA+: B learns this many times faster than A (default: off)",
    )
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    g.add_argument(
        "--warmup-ratio",
        type=float,
        default=d.warmup_ratio,
        help="share of the steps spent warming the learning rate up linearly",
    )
    g.add_argument(
        "--min-lr-ratio",
        type=float,
        default=d.min_lr_ratio,
        help="the cosine decay ends at this fraction of --lr",
    )
    g.add_argument(
        "--max-grad-norm",
        type=_optional_float,
        default=d.max_grad_norm,
        help="clip the gradient norm to this (none: no clipping)",
    )
    g.add_argument(
        "--grad-checkpointing",
        action="store_true",
        help="recompute activations in the backward (less memory, same adapter)",
    )
    g.add_argument(
        "--precision",
        default=d.precision,
        choices=["auto", "fp32", "bf16"],
        help="auto: bf16 autocast on CUDA, fp32 on the CPU",
    )
    g.add_argument(
        "--seed", type=int, default=d.seed, help="seed of the split, data order, init, dropout"
    )
    g.add_argument(
        "--bf16",
        dest="precision",
        action="store_const",
        const="bf16",
        help="shorthand for --precision bf16 (autocast: the GEMMs in bf16, fp32 LoRA masters)",
    )
    g = p.add_argument_group("run")
    g.add_argument(
        "--out",
        required=True,
        help="run directory (locked while a run uses it; see --resume / --overwrite)",
    )
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="validate every N steps")
    g.add_argument(
        "--eval-batch-size", type=int, default=d.eval_batch_size, help="validation batch size"
    )
    g.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint every N steps")
    g.add_argument(
        "--keep-checkpoints",
        type=int,
        default=d.keep_checkpoints,
        help="how many of the newest checkpoints to keep",
    )
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    g.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun: shard the model with FSDP2 (fully_shard per transformer block) "
        "instead of replicating it with DDP, for a base too big for one device",
    )
    g.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (torch.set_num_threads; default: torch's choice)",
    )
    g.add_argument("--export", action="store_true", help="also write merged fp32 and int8 ONNX")
    g.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last checkpoint"
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run in --out (only lora-ext's own files are removed)",
    )
    g.add_argument(
        "--stop-at",
        type=int,
        default=None,
        help="stop after this step with a checkpoint (continue with --resume)",
    )
    g.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress output (default: a bar on a terminal, a line every 5%% of the "
        "steps otherwise)",
    )
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})


def run_from_args(args: argparse.Namespace) -> int:
    """Run ``train`` for parsed arguments; errors become a message and exit status 2
    (bad input), 3 (diverged) or 130 (interrupted)."""
    try:
        metrics = train(config_from_args(args))
    except (TrainError, DataError) as e:
        print(f"lora-ext train: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, a read-only or vanished --out, ...: the file and why
        print(f"lora-ext train: error: {_os_error(e)}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(f"lora-ext train: {e}", file=sys.stderr)
        return 130
    except Diverged as e:
        kept = f"the last good checkpoint is {e.checkpoint}" if e.checkpoint else "no checkpoint"
        print(
            f"lora-ext train: error: {e}; {kept}; no adapter was saved (lower --lr, or set "
            "--max-grad-norm)",
            file=sys.stderr,
        )
        return 3
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 1 if "export_error" in metrics else 0


def _os_error(e: OSError) -> str:
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{e.strerror or e}" + (
        " (disk full? free space, then continue with --resume)"
        if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
        else ""
    )


def add_train_command(subparsers: Any) -> None:
    """Register ``train`` on an argparse subparsers object (``func``: args -> exit status)."""
    parser = subparsers.add_parser(
        "train",
        help="fine-tune a model with LoRA (also under torchrun)",
        description="Fine-tune a model with LoRA; see lora_ext/training/trainer.py for the "
        "output layout.",
        formatter_class=HelpFormatter,
    )
    add_train_arguments(parser)
    parser.set_defaults(func=run_from_args)
