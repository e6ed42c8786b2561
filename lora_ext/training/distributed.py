"""Where a run executes: its device, its place among torchrun's processes, autocast.

DDP is torch's own (lora_ext writes no distributed layer): the process group comes from the
environment torchrun sets (WORLD_SIZE, RANK, LOCAL_RANK), gloo on the CPU, nccl on CUDA.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch

from lora_ext.training.config import TrainConfig, TrainError


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


def _autocast(device: torch.device, amp: torch.dtype | None):
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp)
