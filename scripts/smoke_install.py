"""Smoke test of an installed lora_ext wheel (run by scripts/ci_wheel.sh from outside the
source tree, so only the installed package can be imported).

    python smoke_install.py core     the bare install: op, inject/merge, and a CLI command
                                     whose extra is missing exits 2 naming the pip line
    python smoke_install.py export   with [export]: a tiny BERT classifier exported to ONNX,
                                     verified in onnxruntime
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from tempfile import TemporaryDirectory

import torch


def check_core() -> None:
    import lora_ext
    from lora_ext import ops, reference

    assert "site-packages" in lora_ext.__file__, lora_ext.__file__
    torch.manual_seed(0)
    x, w, b = torch.randn(5, 8), torch.randn(6, 8), torch.randn(6)
    a, bb = torch.randn(2, 8), torch.randn(6, 2)
    y = ops.lora_linear(x, w, b, a, bb, 2.0)
    ref = reference.lora_linear(x.double(), w.double(), b.double(), a.double(), bb.double(), 2.0)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    before = model(x)
    lora_ext.inject_(model, lora_ext.LoraConfig(r=2, target_modules=["0", "2"]))
    with torch.no_grad():
        for p in lora_ext.lora_parameters(model):
            p.normal_()
    adapted = model(x)
    assert not torch.allclose(adapted, before)
    plain = lora_ext.merge_and_unload(model)
    torch.testing.assert_close(plain(x), adapted, rtol=1e-5, atol=1e-5)
    proc = subprocess.run(
        [sys.executable, "-m", "lora_ext.cli", "export", "--model", "minilm", "--out", "m.onnx"],
        capture_output=True,
        text=True,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert 'pip install "lora_ext[export]"' in lines[0], lines[0]
    print(f"core install: op, inject/merge ok ({lora_ext.__version__}); {lines[0]}")


def check_export() -> None:
    from transformers import BertConfig, BertForSequenceClassification

    import lora_ext
    from lora_ext.export import export_onnx

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32, num_labels=2,
    )  # fmt: skip
    model = BertForSequenceClassification(config).eval()
    lora_ext.inject_(model, lora_ext.LoraConfig(r=2, target_modules=["query", "value"]))
    with torch.no_grad():
        for p in lora_ext.lora_parameters(model):
            p.normal_(std=0.1)
    ids = torch.randint(0, 64, (2, 7))
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with TemporaryDirectory() as tmp:
        report = export_onnx(model, example, Path(tmp) / "tiny.onnx")
        assert report.max_rel <= 1e-4, report.max_rel
        print(f"export install: tiny BERT exported and verified (max rel {report.max_rel:.1e})")


if __name__ == "__main__":
    {"core": check_core, "export": check_export}[sys.argv[1]]()
