"""Save the gradients of one `lora-ext train` step: ``python grads_of_one_step.py OUT.pt
TRAIN_FLAGS...``, plain or under torchrun. The run is set up exactly as ``lora-ext train``
does (``trainer.set_up``: data, model, LoRA, the DDP wrapper), then ``accumulate_gradients``
runs the first step's forward and backward (DDP all-reduces); rank 0 saves the trainable
tensors' gradients in float64. Nothing is written to --out.

The DDP test compares these files: gradients are deterministic and rounding-level close,
where adapters after several Adam steps are not (Adam divides by sqrt(v), turning a
rounding-level gradient difference of a near-zero element into an update of up to ~lr).
"""

from __future__ import annotations

import argparse
import sys

import torch

from lora_ext.cli.train import add_train_arguments, config_from_args
from lora_ext.training import trainer


def main(argv: list[str]) -> int:
    out_file, flags = argv[0], argv[1:]
    args = add_train_arguments(argparse.ArgumentParser()).parse_args(flags)
    run = trainer.set_up(config_from_args(args))
    trainer.accumulate_gradients(run)
    grads = {}
    for name, p in run.model.named_parameters():
        if p.requires_grad:
            grad = p.grad
            if hasattr(grad, "full_tensor"):  # a DTensor shard (FSDP2): gather it
                grad = grad.full_tensor()
            grads[name] = grad.detach().to("cpu", torch.float64)
    if run.dist.is_main:
        torch.save(grads, out_file)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
