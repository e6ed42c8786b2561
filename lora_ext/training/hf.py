"""transformers' ``Trainer`` on a model with lora_ext adapters: save the adapter, as Trainer
does for PEFT models.

A plain ``Trainer`` saves a lora_ext model's whole state dict under lora_ext's module names
(``...query.base_layer.weight``, ``...query.lora_A.default.weight``), which ``from_pretrained``
cannot map back: the adapted weights come back MISSING. :class:`LoraTrainer` writes what
``save_pretrained`` writes for a ``PeftModel`` instead, in ``save_model()`` and in every
checkpoint::

    import lora_ext
    from lora_ext.training.hf import LoraTrainer

    lora_ext.inject_(model, lora_ext.LoraConfig(r=8, alpha=16, target_modules=["query", "value"]))
    model.classifier.requires_grad_(True)            # a fresh head trains, and is saved too
    trainer = LoraTrainer(model=model, args=TrainingArguments(...), train_dataset=...)
    trainer.train()
    trainer.save_model("out")                        # adapter_config.json + adapter_model.safetensors

    base = AutoModelForSequenceClassification.from_pretrained(BASE)
    lora_ext.load_adapter(base, "out")               # or peft.PeftModel.from_pretrained(base, "out")

``resume_from_checkpoint`` reads the adapter of a checkpoint back into the model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer

import lora_ext
from lora_ext.inject import active_adapters

TRAINING_ARGS_NAME = "training_args.bin"  # what Trainer writes next to a model


def trained_modules(model: nn.Module) -> list[str]:
    """Names of the modules, other than LoRA layers, whose parameters train (e.g. a
    classifier head unfrozen for fine-tuning): PEFT's ``modules_to_save``."""
    names = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or ".lora_" in name or ".base_layer." in name:
            continue
        names.add(name.rsplit(".", 1)[0])
    # keep the outermost: "classifier" rather than "classifier.dense" and "classifier.out_proj"
    return sorted(n for n in names if not any(n.startswith(m + ".") for m in names))


class LoraTrainer(Trainer):
    """``transformers.Trainer`` that saves a lora_ext model as PEFT saves a ``PeftModel``:
    the adapter (``adapter_config.json`` + ``adapter_model.safetensors``, PEFT's key names)
    with the trained non-LoRA modules (a classifier head) as ``modules_to_save``.

    Args:
        modules_to_save: whole modules saved with the adapter; default: every module with
            trainable parameters outside the LoRA layers (:func:`trained_modules`).
        *args, **kwargs: as for ``transformers.Trainer``.
    """

    def __init__(self, *args: Any, modules_to_save: list[str] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.modules_to_save = modules_to_save

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        modules = self.modules_to_save
        if modules is None:
            modules = trained_modules(model)
        lora_ext.save_adapter(model, output_dir, modules_to_save=modules)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None):
        """Copy a checkpoint's adapter (and modules_to_save) into the model's own tensors."""
        from safetensors.torch import load_file

        model = self.model if model is None else model
        model = self.accelerator.unwrap_model(model, keep_torch_compile=False)
        path = Path(resume_from_checkpoint) / "adapter_model.safetensors"
        if not path.is_file():
            raise ValueError(
                f"resume_from_checkpoint: {path} is missing (not a LoraTrainer checkpoint)"
            )
        saved = load_file(str(path))
        params = dict(model.named_parameters())
        adapter = active_adapters(model)[0]
        with torch.no_grad():
            for key, tensor in saved.items():
                name = key.removeprefix("base_model.model.")
                for part in ("lora_A", "lora_B"):  # PEFT's X.lora_A.weight: our X.lora_A.<name>
                    if name.endswith(f".{part}.weight"):
                        name = name.removesuffix(".weight") + f".{adapter}"
                if name not in params:
                    raise ValueError(
                        f"resume_from_checkpoint: {path} holds {key!r}, which this model lacks"
                    )
                params[name].copy_(tensor)
