"""transformers.Trainer on a lora_ext model: LoraTrainer saves the adapter as PEFT does, and
it loads back (lora_ext.load_adapter, PEFT, resume_from_checkpoint); the plain Trainer's
full state dict does not, which is why LoraTrainer exists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lora_ext

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A small random BERT classifier directory with MiniLM's tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification

    from lora_ext.training import models

    tok = models.load_tokenizer("minilm")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, num_labels=2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("tiny_bert")
    BertForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _model(path: Path, seed: int):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)  # a different fresh head each time
    return AutoModelForSequenceClassification.from_pretrained(path).eval()


def _dataset(path: Path) -> list[dict]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    texts = [f"review number {i} {'great' if i % 2 else 'awful'}" for i in range(16)]
    enc = tok(texts, padding="max_length", max_length=12, truncation=True)
    return [
        {"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": i % 2}
        for i in range(len(texts))
    ]  # fmt: skip


def _train(path: Path, out: Path, trainer_cls, steps: int = 2, **train_kwargs):
    from transformers import TrainingArguments

    model = _model(path, seed=1)
    lora_ext.inject_(model, lora_ext.LoraConfig(r=4, alpha=8, target_modules=["query", "value"]))
    model.classifier.requires_grad_(True)
    args = TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=5e-2,
        save_steps=2, report_to=[], use_cpu=True, disable_tqdm=True, logging_strategy="no",
        seed=0, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = trainer_cls(model=model, args=args, train_dataset=_dataset(path))
    trainer.train(**train_kwargs)
    return trainer, model


def _logits(model, path: Path) -> torch.Tensor:
    batch = _dataset(path)[:4]
    feed = {k: torch.tensor([b[k] for b in batch]) for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        return model.eval()(**feed).logits


def test_lora_trainer_saves_an_adapter_that_loads_back(tiny_bert, tmp_path):
    from peft import PeftModel

    from lora_ext.training.hf import LoraTrainer

    trainer, model = _train(tiny_bert, tmp_path / "run", LoraTrainer)
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"]
    expected = _logits(model, tiny_bert)
    assert not torch.allclose(expected, _logits(_model(tiny_bert, seed=1), tiny_bert))  # trained

    ours = _model(tiny_bert, seed=2)
    lora_ext.load_adapter(ours, out)
    torch.testing.assert_close(_logits(ours, tiny_bert), expected, rtol=0, atol=0)
    peft_model = PeftModel.from_pretrained(_model(tiny_bert, seed=3), out)
    torch.testing.assert_close(_logits(peft_model, tiny_bert), expected, rtol=1e-5, atol=1e-6)
    # the step-2 checkpoint is an adapter too
    assert (tmp_path / "run" / "checkpoint-2" / "adapter_model.safetensors").is_file()


def test_plain_trainer_state_dict_does_not_load_back(tiny_bert, tmp_path):
    """Why LoraTrainer: from_pretrained of a plain Trainer's save misses the adapted weights."""
    from transformers import AutoModelForSequenceClassification, Trainer

    trainer, model = _train(tiny_bert, tmp_path / "run", Trainer)
    trainer.save_model(str(tmp_path / "saved"))
    _, info = AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "saved", output_loading_info=True
    )
    assert any("query.weight" in k for k in info["missing_keys"])


def test_resume_from_checkpoint_continues_the_adapter(tiny_bert, tmp_path):
    """Resuming a 4-step run from its step-2 checkpoint ends where the run ended."""
    from lora_ext.training.hf import LoraTrainer

    _, full = _train(tiny_bert, tmp_path / "full", LoraTrainer, steps=4)
    _, resumed = _train(
        tiny_bert,
        tmp_path / "resumed",
        LoraTrainer,
        steps=4,
        resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"),
    )
    expected = _logits(full, tiny_bert)
    torch.testing.assert_close(_logits(resumed, tiny_bert), expected, rtol=1e-5, atol=1e-6)
    _, fresh = _train(tiny_bert, tmp_path / "fresh", LoraTrainer, steps=2)  # not a no-op
    assert not torch.allclose(_logits(fresh, tiny_bert), expected, rtol=1e-3, atol=1e-4)
