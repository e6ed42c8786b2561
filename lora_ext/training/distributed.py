"""Where a run executes: its device, its place among torchrun's processes, autocast.

DDP and FSDP2 are torch's own (lora_ext writes no distributed layer): the process group comes
from the environment torchrun sets (WORLD_SIZE, RANK, LOCAL_RANK), gloo on the CPU, nccl on
CUDA; :func:`wrap_model` applies DDP, or FSDP2 (``fully_shard``) with ``--fsdp``.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

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


# -- DDP and FSDP2: torch's own engines; these functions only choose and apply them ----------


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformers model (BERT's ``encoder.layer``, Llama's
    ``model.layers``, GPT-2's ``transformer.h``): the children of the largest ModuleList
    whose entries are all of one class."""
    best: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best):
            kinds = {type(child) for child in module}
            if len(kinds) == 1 and any(True for _ in module[0].parameters()):
                best = list(module)
    return best


def wrap_model(model: nn.Module, dist: Dist, device: torch.device, fsdp: bool) -> nn.Module:
    """Make ``model`` data-parallel across torchrun's processes; return what to call forward on.

    - One process: the model itself.
    - DDP (default): trainable tensors replicated and all-reduced; the frozen base is neither
      broadcast nor reduced (every rank loaded the same weights from disk).
    - FSDP2 (``fsdp``): ``fully_shard`` per transformer block, then on the root: every
      parameter, frozen base and LoRA alike, is sharded across the ranks and all-gathered
      block by block in the forward, so a base that does not fit one device trains; gradients
      of the trainable tensors are reduce-scattered. The op sees the gathered weight.
    """
    if not dist.enabled:
        return model
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (dist.world_size,))
        blocks = transformer_blocks(model)
        if not blocks:
            raise TrainError(
                f"--fsdp: found no transformer blocks in {type(model).__name__} to shard"
            )
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    frozen += [n for n, _ in model.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(model, frozen)
    return DDP(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        broadcast_buffers=False,
    )


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` was sharded with FSDP2."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def gradient_sync(wrapped: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """A context in which backward all-reduces (DDP) / reduce-scatters (FSDP2) the gradients
    only when ``sync``: gradient accumulation communicates on the last micro-step only."""
    if sync:
        return contextlib.nullcontext()
    if hasattr(wrapped, "no_sync"):  # DDP
        return wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        return _fsdp_no_sync(wrapped)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly FSDP2-sharded, DTensor) tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole of a (possibly sharded) tensor; collective for a DTensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def all_true(flag: bool, dist: Dist, device: torch.device) -> bool:
    """``flag`` and-ed over the ranks (a per-shard check must not let one rank stop alone)."""
    if not dist.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item() > 0)


def unshard_for_saving(model: nn.Module) -> None:
    """FSDP2: all-gather every parameter for good (collective), so the trained adapter can be
    read and saved like an unsharded model's. A no-op otherwise."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.unshard()
