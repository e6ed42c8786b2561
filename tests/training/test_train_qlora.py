"""`lora-ext train --quantize-base nf4|int8` (QLoRA): the frozen base in bitsandbytes 4/8 bits,
the adapter trained and saved in float32, gradient checkpointing, and the run's export step
(merged by dequantizing, verified in onnxruntime)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_ext import cli
from lora_ext.training.config import TrainConfig, TrainError

pytest.importorskip("bitsandbytes")

TINY = [
    "--data", "rotten-tomatoes", "--max-train", "16", "--max-val", "8",
    "--batch-size", "4", "--max-length", "16", "--r", "4", "--alpha", "8",
    "--lr", "5e-3", "--eval-every", "2", "--save-every", "2",
    "--no-progress", "--threads", "1", "--steps", "2", "--grad-checkpointing",
]  # fmt: skip


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow  # ~30 s on 2 cores: MiniLM, two steps, fp32 + int8 export verified
def test_minilm_nf4_trains_saves_float32_and_exports(tmp_path):
    out = tmp_path / "nf4"
    args = ["train", "--model", "minilm", *TINY, "--targets", "query,value"]
    assert cli.main([*args, "--quantize-base", "nf4", "--export", "--out", str(out)]) == 0
    tensors = _adapter(out)
    lora = {k: v for k, v in tensors.items() if ".lora_" in k}
    assert len(lora) == 2 * 2 * 6 and all(v.dtype == torch.float32 for v in lora.values())
    assert max(float(v.abs().max()) for k, v in lora.items() if "lora_B" in k) > 0  # trained
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert "base_quantization" not in config and config["peft_type"] == "LORA"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["export"]["fp32"]["max_rel"] < 1e-4  # merged (dequantized) vs the nf4 model
    assert (out / "onnx" / "model.onnx").exists()
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["quantize_base"] == "nf4"


@pytest.mark.slow  # ~7 s: a tiny Llama directory, two steps
def test_causal_lm_int8_with_grad_checkpointing(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_ext.training import data as D
    from lora_ext.training import models

    tok = models.load_tokenizer("smollm2")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
    )  # fmt: skip
    model_dir = tmp_path / "tiny_llama"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    text = tmp_path / "reviews.txt"
    text.write_text("\n\n".join(D.load_rotten_tomatoes().texts[:200]))
    out = tmp_path / "lm"
    args = ["train", "--model", str(model_dir), "--data", str(text), "--steps", "2"]
    args += ["--batch-size", "4", "--max-length", "16", "--no-progress", "--threads", "1"]
    for kind in ("int8", "nf4"):
        run_out = out.with_name(f"lm-{kind}")
        assert (
            cli.main(
                [*args, "--quantize-base", kind, "--grad-checkpointing", "--out", str(run_out)]
            )
            == 0
        )
        metrics = json.loads((run_out / "metrics.json").read_text())
        assert torch.isfinite(torch.tensor(metrics["final"]["val_loss"]))
        assert all(v.dtype == torch.float32 for v in _adapter(run_out).values())


def test_quantize_base_is_checked_before_any_work(tmp_path):
    out = str(tmp_path / "x")
    with pytest.raises(TrainError, match="--quantize-base: got 'nf5'"):
        TrainConfig(out=out, quantize_base="nf5").validate()
    with pytest.raises(TrainError, match="--quantize-base nf4 with --dora"):
        TrainConfig(out=out, quantize_base="nf4", dora=True).validate()
    with pytest.raises(TrainError, match="--quantize-base int8 with --init pissa"):
        TrainConfig(out=out, quantize_base="int8", init="pissa").validate()
    with pytest.raises(TrainError, match="--quantize-base nf4 with --fsdp"):
        TrainConfig(out=out, quantize_base="nf4", fsdp=True).validate()
    assert not (tmp_path / "x").exists()
