"""TrainConfig: everything a run depends on, checked before any work (TrainError names the flag)."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from typing import Any

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
    dora: bool = False
    quantize_base: str | None = None  # QLoRA: the frozen base in bitsandbytes "nf4" / "int8"
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
    fsdp: bool = False
    threads: int | None = None
    export: bool = False
    resume: bool = False
    overwrite: bool = False
    stop_at: int | None = None
    progress: bool = True

    def identity(self) -> dict[str, Any]:
        """The fields that define what the run computes (compared on --resume)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in CONTROL_FIELDS}

    def _check_quantize_base(self) -> None:
        """--quantize-base: the combinations a bitsandbytes base does not support, and
        bitsandbytes itself, checked before any work."""
        q = self.quantize_base
        for flag, on, why in (
            ("--dora", self.dora, "DoRA's norm ||W + sBA|| needs the float weight"),
            ("--init pissa", self.init == "pissa", "PiSSA rewrites W from its SVD"),
            ("--fsdp", self.fsdp, "FSDP2 cannot shard bitsandbytes' packed weights"),
        ):
            if on:
                raise TrainError(
                    f"--quantize-base {q} with {flag}: not supported ({why}); drop one of them"
                )
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise TrainError(
                f"--quantize-base {q}: needs bitsandbytes (pip install bitsandbytes, or "
                'pip install "lora_ext[train]")'
            ) from None

    def validate(self) -> None:
        """Check every value; raise TrainError naming the flag, the value and the need."""

        def need(cond: bool, flag: str, value: Any, what: str) -> None:
            if not cond:
                raise TrainError(f"--{flag.replace('_', '-')}: got {value!r}; need {what}")

        def is_int(value: Any) -> bool:  # bool is an int to Python, never to a flag
            return isinstance(value, int) and not isinstance(value, bool)

        def is_number(value: Any) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        positive_ints = ("r", "steps", "batch_size", "grad_accum", "max_length", "eval_every")
        positive_ints += ("save_every", "keep_checkpoints", "eval_batch_size")
        for name in positive_ints:
            value = getattr(self, name)
            need(is_int(value) and value >= 1, name, value, "an integer >= 1")
        for name in ("max_train", "max_val", "stop_at"):
            value = getattr(self, name)
            need(value is None or (is_int(value) and value >= 1), name, value, "an integer >= 1")
        cores = os.cpu_count() or 1
        need(
            self.threads is None or (is_int(self.threads) and 1 <= self.threads <= 4 * cores),
            "threads",
            self.threads,
            f"an integer from 1 to {4 * cores} (4x the {cores} CPUs here)",
        )
        need(
            is_int(self.seed) and 0 <= self.seed < 2**32,
            "seed",
            self.seed,
            "an integer in [0, 2**32)",
        )
        for name in ("alpha", "dropout", "val_fraction", "weight_decay", "warmup_ratio"):
            value = getattr(self, name)
            need(is_number(value), name, value, "a number")
        need(
            math.isfinite(self.alpha) and self.alpha > 0,
            "alpha",
            self.alpha,
            "a positive finite number",
        )
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
        need(
            math.isfinite(self.weight_decay) and self.weight_decay >= 0,
            "weight_decay",
            self.weight_decay,
            "a finite number >= 0",
        )
        need(
            0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", self.warmup_ratio, "a number in [0, 1)"
        )
        need(
            0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", self.min_lr_ratio, "a number in [0, 1]"
        )
        mgn = self.max_grad_norm
        need(
            mgn is None or mgn > 0, "max_grad_norm", mgn, "a positive number (or none: no clipping)"
        )
        need(
            self.precision in ("auto", "fp32", "bf16"),
            "precision",
            self.precision,
            "auto, fp32 or bf16",
        )
        need(
            isinstance(self.device, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device),
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
        need(isinstance(self.dora, bool), "dora", self.dora, "True or False")
        if self.dora and self.fsdp:
            raise TrainError(
                "--dora with --fsdp: not supported (DoRA's row norm ||W + sBA|| needs each "
                "layer's whole weight and magnitude vector); use DDP (no --fsdp) or drop --dora"
            )
        need(
            self.quantize_base in (None, "nf4", "int8"),
            "quantize_base",
            self.quantize_base,
            "nf4 or int8 (or none: a float base)",
        )
        if self.quantize_base is not None:
            self._check_quantize_base()
        if self.targets is not None:
            need(bool(self.targets) and all(self.targets), "targets", self.targets, "module names")
        if self.resume and self.overwrite:
            raise TrainError(
                "--resume and --overwrite: got both; pass one (continue, or start over)"
            )
