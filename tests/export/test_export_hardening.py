"""export_onnx and ``lora-ext export`` under faults and bad input: killed exports, missing
output directories, the quality gate of quantized files, opsets, one-line CLI errors.

Tiny random BERT classifiers (built from a config, MiniLM's tokenizer and vocabulary size)
keep these fast; the runtime matrix on the real MiniLM is in test_runtimes.py.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from lora_ext.cli.export import add_export_command, example_inputs
from lora_ext.cli.infer import add_infer_command
from lora_ext.export import VerificationError, export_onnx
from lora_ext.export._io import remove_stale_staging
from lora_ext.training import models

ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["A gripping, beautifully shot film.", "Dull and far too long.", "Not bad at all"]


def tiny_classifier(num_labels: int = 2, seed: int = 0, vocab_size: int = 30522):
    """A random 2-layer BERT classifier, 32 wide, MiniLM's vocabulary size; its head is
    scaled so that PyTorch decides its rows (a random head gives near-ties, which the
    quality gate does not count)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    model = BertForSequenceClassification(config).eval()
    with torch.no_grad():
        model.classifier.weight.mul_(30.0)
    return model


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(models.minilm_dir())


@pytest.fixture(scope="module")
def tiny(tok):
    model = tiny_classifier()
    return model, dict(tok(TEXTS[:2], padding=True, return_tensors="pt"))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tok):
    """A model directory (config, weights, tokenizer) of a tiny 2-label classifier."""
    path = tmp_path_factory.mktemp("tiny") / "model"
    tiny_classifier().save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-ext")
    sub = parser.add_subparsers(dest="command", required=True)
    add_export_command(sub)
    add_infer_command(sub)
    return parser


def _cli(argv: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "lora_ext.cli", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def _hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# -- staging left by killed exports ------------------------------------------------------
KILLED_EXPORT = textwrap.dedent(
    """
    import sys, time, torch
    sys.path.insert(0, {root!r})
    sys.path.insert(0, {tests!r})
    from test_export_hardening import tiny_classifier
    from lora_ext.export import export_onnx
    from lora_ext.export import exporter

    def hang(ctx):  # stands for a long export: the staging directory exists, work goes on
        print("staged", flush=True)
        time.sleep(600)

    exporter._STAGES = (exporter._STAGES[0], hang)
    ids = torch.randint(3, 1000, (2, 7))
    export_onnx(tiny_classifier(), {{"input_ids": ids, "attention_mask": torch.ones_like(ids)}},
                {target!r})
    """
)


def test_kill_9_during_export_leaves_staging_that_the_next_export_removes(tiny, tmp_path):
    target = tmp_path / "model.onnx"
    script = KILLED_EXPORT.format(
        root=str(ROOT), tests=str(Path(__file__).parent), target=str(target)
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline()
        assert line.strip() == "staged", proc.stderr.read()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    left = _hidden(tmp_path)
    assert len(left) == 1 and left[0].startswith(f".model.onnx.tmp-{proc.pid}@")
    # staging of a live process (this one's parent), of another host, and named otherwise
    # must survive the clean-up
    host = socket.gethostname()
    keep = [
        f".model.onnx.tmp-{os.getppid()}@{host}-abcd1234",
        f".model.onnx.tmp-{proc.pid}@another-host-abcd1234",
        ".model.onnx.tmp-abcd1234",
    ]
    for name in keep:
        (tmp_path / name).mkdir()
    model, example = tiny
    report = export_onnx(model, example, target)
    assert report.path == target and target.is_file()
    assert _hidden(tmp_path) == sorted(keep)


def test_remove_stale_staging_only_touches_dead_owners_of_this_host(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    stale = tmp_path / f".m.onnx.tmp-{dead.pid}@{host}-x1y2z3w4"
    stale.mkdir()
    (stale / "model.onnx").write_bytes(b"half")
    other = tmp_path / f".other.onnx.tmp-{dead.pid}@{host}-x1y2z3w4"  # another target
    other.mkdir()
    assert remove_stale_staging(tmp_path, "m.onnx") == [stale]
    assert not stale.exists() and other.exists()


# -- missing output directories ----------------------------------------------------------
def test_make_parents_creates_the_directories_with_the_file(tiny, tmp_path):
    model, example = tiny
    target = tmp_path / "a" / "b" / "model.onnx"
    report = export_onnx(model, example, target, make_parents=True)
    assert report.path == target and report.files == [target] and target.is_file()
    assert onnx.load(str(target)).graph.output[0].name == "logits"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b", "model.onnx"]


def test_make_parents_leaves_nothing_when_the_export_fails(tiny, tmp_path):
    model, example = tiny
    target = tmp_path / "a" / "b" / "model.onnx"
    with pytest.raises(VerificationError, match="nothing was written"):
        export_onnx(model, example, target, make_parents=True, tolerance=1e-12)
    assert list(tmp_path.iterdir()) == []


def test_cli_export_creates_the_missing_out_directory(tiny_dir, tmp_path):
    out = tmp_path / "onnx" / "model.onnx"
    done = _cli(["export", "--model", str(tiny_dir), "--out", str(out)])
    assert done.returncode == 0, done.stderr
    assert out.is_file() and (out.parent / "tokenizer_config.json").is_file()
    assert _hidden(tmp_path) == [] and _hidden(out.parent) == []
    # the same graph inputs as `lora-ext train --export` writes (input_ids, attention_mask)
    inputs = [i.name for i in onnx.load(str(out)).graph.input]
    assert inputs == ["input_ids", "attention_mask"]
    # the report, printed: a few lines, saying what was written
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("ONNX fp32 (opset 17)") and len(lines) <= 12


# -- what the report says ----------------------------------------------------------------
def test_int8_report_says_int8_and_prints_in_one_line(tiny, tmp_path):
    model, example = tiny
    report = export_onnx(model, example, tmp_path / "m.int8.onnx", quantize="int8")
    assert report.dtype == "int8" and report.quantize == "int8"
    assert report.table().splitlines()[0].startswith("ONNX int8")
    text = repr(report)
    assert "\n" not in text and len(text) < 300 and text.startswith("<ExportReport int8 ONNX")
    assert str(report) == text
    assert report.agreement is not None and report.min_agreement == 0.8
    assert json.dumps(report.to_dict())  # still serialisable


# -- the quality gate of quantized exports -----------------------------------------------
@pytest.fixture(scope="module")
def fragile(tok):
    """A 50-label classifier whose weights int8 cannot hold: in every encoder matrix one
    input column is 100x the rest, so per-channel int8 keeps ~1 level for the others and
    the logits move by over half their range (measured: 64% argmax agreement)."""
    model = tiny_classifier(num_labels=50, seed=1)
    with torch.no_grad():
        for module in model.bert.encoder.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight[:, 0] = 100 * module.weight.abs().max()
        model.classifier.weight.mul_(10.0)  # rows PyTorch decides (measured: 36 of 38)
    return model, dict(tok(TEXTS[:2], padding=True, return_tensors="pt"))


def test_quantized_export_below_the_gate_is_refused(fragile, tmp_path):
    model, example = fragile
    path = tmp_path / "m.int8.onnx"
    with pytest.raises(VerificationError, match=r"quality gate: the int8 file agrees .* below"):
        export_onnx(model, example, path, quantize="int8")
    assert list(tmp_path.iterdir()) == []


def test_the_gate_override_writes_loudly(fragile, tmp_path, caplog):
    model, example = fragile
    path = tmp_path / "m.int8.onnx"
    with caplog.at_level("WARNING", logger="lora_ext.export"):
        report = export_onnx(
            model,
            example,
            path,
            quantize="int8",
            accept_low_agreement=True,
        )
    assert path.is_file() and report.accepted_low_agreement
    assert report.agreement < 0.8
    assert "quality gate overridden" in caplog.text
    assert "BELOW, written by override" in report.table()


def test_the_gate_passes_a_good_quantized_file_and_fp32_is_not_gated(tiny, tmp_path):
    model, example = tiny
    fp16 = export_onnx(model, example, tmp_path / "m.fp16.onnx", dtype="fp16")
    assert fp16.min_agreement == 0.8 and fp16.agreement == 1.0
    assert not fp16.accepted_low_agreement
    fp32 = export_onnx(model, example, tmp_path / "m.onnx")
    assert fp32.min_agreement is None and "quality gate" not in fp32.table()


def test_cli_quality_gate_and_its_override(fragile, tok, tmp_path):
    model, _ = fragile
    model_dir = tmp_path / "fragile"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = tmp_path / "o" / "m.int8.onnx"
    argv = ["export", "--model", str(model_dir), "--int8", "--out", str(out)]
    refused = _cli(argv)
    assert refused.returncode == 1, refused.stderr
    assert "lora-ext export: error: quality gate" in refused.stderr
    assert "--accept-low-agreement" in refused.stderr and "Traceback" not in refused.stderr
    assert not out.parent.exists()
    forced = _cli(argv + ["--accept-low-agreement"])
    assert forced.returncode == 0, forced.stderr
    assert "WARNING: quality gate overridden" in forced.stderr and out.is_file()
    assert "BELOW, written by override" in forced.stdout


# -- opsets ------------------------------------------------------------------------------
@pytest.mark.parametrize("opset", [17, 18, 19, 20, 21])
def test_opsets_17_to_21(tiny, tmp_path, opset):
    model, example = tiny
    report = export_onnx(model, example, tmp_path / "m.int8.onnx", quantize="int8", opset=opset)
    graph = onnx.load(str(report.path))
    assert {o.domain: o.version for o in graph.opset_import}.get("") == opset
    onnx.checker.check_model(graph, full_check=True)
    assert report.agreement == 1.0


@pytest.mark.parametrize("opset", [16, 22, "17"])
def test_other_opsets_are_refused(tiny, tmp_path, opset):
    model, example = tiny
    with pytest.raises(ValueError, match=r"opset: got .* need an int in \[17, 21\]"):
        export_onnx(model, example, tmp_path / "m.onnx", opset=opset)


# -- bad input: clear errors, one line from the CLI --------------------------------------
def test_empty_example_batch_is_a_clear_error(tiny, tmp_path):
    model, _ = tiny
    empty = torch.zeros(0, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"example_inputs\['input_ids'\]: got shape \[0, 5\]"):
        export_onnx(model, {"input_ids": empty, "attention_mask": empty}, tmp_path / "m.onnx")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["export", "--model", "minilm", "--num-labels", "-3"], "--num-labels: got -3"),
        (["export", "--model", "minilm", "--num-labels", "0"], "--num-labels: got 0"),
        (["export", "--model", "minilm", "--opset", "22"], "--opset: invalid choice"),
        (["infer", "--onnx", "{bad}", "--tokenizer", "minilm", "good film"], "cannot load"),
    ],
)
def test_cli_bad_input_is_one_line(tmp_path, argv, message):
    bad = tmp_path / "bad.onnx"
    bad.write_text("this is not an ONNX file")
    argv = [a.replace("{bad}", str(bad)) for a in argv]
    if argv[0] == "export":
        argv += ["--out", str(tmp_path / "o" / "m.onnx")]
    done = _cli(argv)
    assert done.returncode != 0
    assert message in done.stderr and "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, done.stderr
    assert not (tmp_path / "o").exists()


def test_cli_example_matches_train_export(tok):
    """`lora-ext export` and `lora-ext train --export` trace the same inputs."""
    assert list(example_inputs(tok)) == ["input_ids", "attention_mask"]


def test_head_supplied_by_the_adapter_is_not_reported_missing(tmp_path, tok):
    import lora_ext

    model = tiny_classifier()
    lora_ext.inject_(model, lora_ext.LoraConfig(r=2, target_modules=["query", "value"]))
    adapter = lora_ext.save_adapter(
        model, tmp_path / "adapter", modules_to_save=["classifier"], task_type="SEQ_CLS"
    )
    base = tmp_path / "base"
    tiny_classifier().bert.save_pretrained(base)  # no head: transformers reports it MISSING
    tok.save_pretrained(base)
    (base / "config.json").write_text(
        json.dumps(
            json.loads((base / "config.json").read_text())
            | {"architectures": ["BertForSequenceClassification"]}
        )
    )
    done = _cli(
        [
            "export",
            "--model",
            str(base),
            "--adapter",
            str(adapter),
            "--out",
            str(tmp_path / "m.onnx"),
        ]
    )
    assert done.returncode == 0, done.stderr
    assert "MISSING" not in done.stderr and "consider training" not in done.stderr.lower()
    without = _cli(["export", "--model", str(base), "--out", str(tmp_path / "n.onnx")])
    assert without.returncode == 0, without.stderr
    assert "MISSING" in without.stderr  # no adapter: the report stays


def test_agreement_of_report_counts_rows(tiny, tmp_path):
    model, example = tiny
    report = export_onnx(model, example, tmp_path / "m.onnx", verify_shapes=[(4, 6)])
    assert [c.rows for c in report.checks] == [2, 4]
    assert np.isclose(report.agreement, 1.0)
