"""`lora-ext train --dora`: the magnitude vectors train, are saved in PEFT's format, and a
resumed run equals an uninterrupted one bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_ext import cli
from lora_ext.training.config import TrainConfig, TrainError

TINY = [
    "--model", "minilm", "--data", "rotten-tomatoes", "--max-train", "32", "--max-val", "8",
    "--batch-size", "4", "--max-length", "16", "--r", "4", "--alpha", "8",
    "--targets", "query,value", "--lr", "5e-3", "--eval-every", "2", "--save-every", "2",
    "--no-progress", "--threads", "1", "--dora", "--steps", "4",
]  # fmt: skip


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def test_dora_run_trains_saves_and_resumes(tmp_path):
    import lora_ext
    from lora_ext.training import models

    full = tmp_path / "full"
    assert cli.main(["train", *TINY, "--out", str(full)]) == 0
    tensors = _adapter(full)
    config = json.loads((full / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    mags = {k: v for k, v in tensors.items() if k.endswith("lora_magnitude_vector")}
    assert len(mags) == 2 * 6  # query and value of 6 layers

    # the magnitudes moved away from their initial row norms ||W + sBA||
    model, _ = models.load_minilm_classifier(num_labels=2)
    lora_ext.load_adapter(model, full / "adapter")
    moved = 0.0
    for _, layer in lora_ext.inject.lora_layers(model):
        init = lora_ext.dora.weight_norm(layer, "default")
        moved = max(
            moved, float((layer.lora_magnitude_vector["default"].detach() - init).abs().max())
        )
    assert moved > 1e-4

    part = tmp_path / "part"
    assert cli.main(["train", *TINY, "--stop-at", "2", "--out", str(part)]) == 0
    assert cli.main(["train", *TINY, "--resume", "--out", str(part)]) == 0
    again = _adapter(part)
    assert again.keys() == tensors.keys()
    for key in tensors:
        assert torch.equal(again[key], tensors[key]), key


def test_dora_flag_is_checked_before_any_work(tmp_path):
    with pytest.raises(TrainError, match="--dora with --fsdp"):
        TrainConfig(out=str(tmp_path / "x"), dora=True, fsdp=True).validate()
    with pytest.raises(TrainError, match="dora"):
        TrainConfig(out=str(tmp_path / "x"), dora="yes").validate()
