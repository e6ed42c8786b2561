"""lora_ext.training.trainer and the lora-ext CLI: end to end (train, resume, export, infer), exact
resume, bad input refused before any training, Ctrl-C, and what trains.

Runs are tiny (MiniLM on 64 Rotten Tomatoes snippets, a few steps of batch 4) so the module
takes well under a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_ext import cli
from lora_ext.training import trainer as T

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--model", "minilm", "--data", "rotten-tomatoes", "--max-train", "64", "--max-val", "16",
    "--batch-size", "4", "--max-length", "24", "--r", "4", "--alpha", "8",
    "--targets", "query,value", "--lr", "5e-3", "--eval-every", "2", "--save-every", "2",
    "--no-progress", "--threads", "1",
]  # fmt: skip


def _train(out: Path, *extra: str) -> int:
    return cli.main(["train", *TINY, "--out", str(out), *extra])


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """4 uninterrupted steps with --export (LoRA dropout 0.05 and BERT's own dropout active,
    so the resume test below also covers the RNG state)."""
    out = tmp_path_factory.mktemp("runs") / "full"
    assert _train(out, "--steps", "4", "--export") == 0
    return out


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def test_outputs_of_a_run(full_run):
    run = json.loads((full_run / "run.json").read_text())
    assert run["status"] == "done" and run["task"] == "seq-cls"
    assert run["exported"] == ["onnx/model.int8.onnx", "onnx/model.onnx"]  # what happened
    assert not (full_run / ".lora-ext.lock").exists()  # the lock went with the run
    assert run["classes"] == ["rotten", "fresh"] and run["head"] == "classifier"
    assert run["config"]["steps"] == 4 and run["split"]["n_train"] == 64
    metrics = json.loads((full_run / "metrics.json").read_text())
    assert [h["step"] for h in metrics["history"]] == [1, 2, 3, 4]
    assert all(math.isfinite(h["loss"]) and h["tokens"] > 0 for h in metrics["history"])
    assert [e["step"] for e in metrics["evals"]] == [2, 4]
    assert 0.0 <= metrics["final"]["accuracy"] <= 1.0 and metrics["final"]["n"] == 16
    # warm-up then cosine: lr rises over the first 10% and ends below its peak
    lrs = [h["lr"] for h in metrics["history"]]
    assert max(lrs) <= 5e-3 and lrs[-1] < max(lrs)
    assert (full_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (full_run / "checkpoints" / "latest").read_text().strip() == "step-0000004"
    # PEFT's layout: LoRA tensors of the 12 adapted layers + the classifier head
    config = json.loads((full_run / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"] and config["task_type"] == "SEQ_CLS"
    keys = set(_adapter(full_run))
    assert len([k for k in keys if ".lora_A." in k]) == 12
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys
    assert all(".lora_" in k or ".classifier." in k for k in keys)  # nothing else trained


def test_only_lora_and_head_change(full_run):
    """A fresh base model + the saved adapter reproduces the final validation metrics, and
    PEFT loads the same adapter (head included) to the same logits."""
    from peft import PeftModel

    from lora_ext.training import data as D
    from lora_ext.training import models

    cfg = T.TrainConfig(out="", max_train=64, max_val=16)
    split, _ = T.prepare_data(cfg)
    ours, tok = models.load_minilm_classifier(2, seed=99)  # a different head init
    T.load_trained_adapter(ours, full_run / "adapter")
    enc = D.encode_classification(split.val, tok, 24)
    result = T.evaluate(
        ours,
        enc,
        T.TaskSpec("seq-cls", ["rotten", "fresh"], "classifier"),
        torch.device("cpu"),
        T.Dist(),
        64,
        None,
    )
    final = json.loads((full_run / "metrics.json").read_text())["final"]
    assert result["accuracy"] == final["accuracy"]
    assert result["val_loss"] == pytest.approx(final["val_loss"], rel=1e-5)
    peft_model = PeftModel.from_pretrained(
        models.load_minilm_classifier(2, seed=7)[0], full_run / "adapter"
    ).eval()
    batch = D.collate(enc, range(8))
    feed = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        torch.testing.assert_close(
            ours.eval()(**feed).logits, peft_model(**feed).logits, rtol=1e-5, atol=1e-6
        )


def test_resume_equals_uninterrupted_run(full_run, tmp_path):
    part = tmp_path / "part"
    assert _train(part, "--steps", "4", "--stop-at", "2", "--export") == 0
    assert not (part / "adapter").exists()
    assert (part / "checkpoints" / "latest").read_text().strip() == "step-0000002"
    assert "stopped" in json.loads((part / "run.json").read_text())["status"]
    # --export and --stop-at are run controls: they may differ on --resume
    assert _train(part, "--steps", "4", "--resume") == 0
    a, b = _adapter(full_run), _adapter(part)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert _losses(part) == _losses(full_run)


def _losses(out: Path) -> list[float]:
    return [h["loss"] for h in json.loads((out / "metrics.json").read_text())["history"]]


def test_export_and_infer(full_run, tmp_path, capsys):
    """--export wrote merged fp32/int8 files that agree with PyTorch; `lora-ext export`
    from the adapter gives the same fp32 graph outputs; `lora-ext infer` labels text."""
    import numpy as np

    from lora_ext.export import OnnxRunner

    onnx_dir = full_run / "onnx"
    metrics = json.loads((full_run / "metrics.json").read_text())
    assert metrics["export"]["fp32"]["max_rel"] < 1e-4
    assert (onnx_dir / "model.int8.onnx").stat().st_size * 3 < (
        onnx_dir / "model.onnx"
    ).stat().st_size

    again = tmp_path / "again.onnx"
    assert (
        cli.main(
            [
                "export",
                "--model",
                "minilm",
                "--adapter",
                str(full_run / "adapter"),
                "--out",
                str(again),
            ]
        )
        == 0
    )
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(onnx_dir)
    texts = ["a tender, funny and wise film", "a tedious mess from start to finish"]
    a = OnnxRunner(onnx_dir / "model.onnx", tok)(texts)
    b = OnnxRunner(again, tok)(texts)
    np.testing.assert_allclose(a.logits, b.logits, rtol=1e-4, atol=1e-5)
    assert set(a.labels) <= {"rotten", "fresh"}

    capsys.readouterr()
    assert (
        cli.main(
            ["infer", "--onnx", str(onnx_dir / "model.onnx"), "--tokenizer", str(onnx_dir), *texts]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert all(label in printed for label in a.labels)


def _csv(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


GOOD_ROWS = "".join(f"text {i},{'pos' if i % 2 else 'neg'}\n" for i in range(40))
BAD_INPUT = [
    # (id, extra args (placeholders filled by the test), words the error must contain)
    ("missing-file", ["--data", "{tmp}/nope.csv"], ["nope.csv", "does not exist"]),
    ("missing-column", ["--data", "{cols}"], ["missing column", "'label'"]),
    ("bad-row", ["--data", "{badrow}"], ["row 3", "fields"]),
    ("label-outside-classes", ["--data", "{good}", "--classes", "neg,neutral"], ["'pos'", "declared classes"]),
    ("empty-split", ["--data", "{tiny}", "--val-fraction", "0.1"], ["validation split is empty"]),
    ("targets-nothing", ["--targets", "querry"], ["--targets", "'querry'", "query"]),
    ("smollm2-on-labels", ["--model", "smollm2"], ["causal LM", "labelled"]),
    ("bad-rank", ["--r", "0"], ["--r", "got 0"]),
    ("batch-too-big", ["--data", "{good}", "--batch-size", "64"], ["--batch-size", "64"]),
    ("resume-and-overwrite", ["--resume", "--overwrite"], ["--resume and --overwrite"]),
]  # fmt: skip


@pytest.mark.parametrize("case,args,words", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_fails_before_training(tmp_path, capsys, case, args, words):
    files = {
        "tmp": str(tmp_path),
        "cols": _csv(tmp_path, "cols.csv", "text,stars\nx,1\n"),
        "badrow": _csv(tmp_path, "badrow.csv", "text,label\nok,pos\nbroken\n"),
        "good": _csv(tmp_path, "good.csv", "text,label\n" + GOOD_ROWS),
        "tiny": _csv(tmp_path, "tiny.csv", "text,label\na,x\nb,y\nc,x\n"),
    }
    out = tmp_path / "out"
    argv = [a.format(**files) for a in args]
    capsys.readouterr()
    assert _train(out, "--steps", "2", *argv) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, (word, err)
    assert not out.exists()  # refused before anything was written


def test_out_holding_another_run_is_refused(full_run, capsys):
    before = (full_run / "run.json").read_text()
    cases = [
        (["--steps", "5"], ["different run", "steps: 4 -> 5", "--resume", "--overwrite"]),
        (["--steps", "4"], ["a run with this configuration", "--resume"]),
        (["--steps", "5", "--resume"], ["different configuration", "steps: 4 -> 5"]),
    ]
    for extra, words in cases:
        capsys.readouterr()
        assert _train(full_run, *extra) == 2
        err = capsys.readouterr().err
        for word in words:
            assert word in err, (word, err)
    assert (full_run / "run.json").read_text() == before
    # a directory with other files is not a run: refused without --overwrite
    other = full_run.parent / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert _train(other, "--steps", "1") == 2
    assert "holds no lora-ext run" in capsys.readouterr().err


def test_overwrite_replaces_only_our_files(tmp_path):
    out = tmp_path / "o"
    assert _train(out, "--steps", "2") == 0
    assert json.loads((out / "run.json").read_text())["exported"] == []
    (out / "notes.txt").write_text("keep me")
    assert _train(out, "--steps", "1", "--overwrite") == 0
    assert json.loads((out / "run.json").read_text())["config"]["steps"] == 1
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-0000001"
    assert not (out / "checkpoints" / "step-0000002").exists()
    assert (out / "notes.txt").read_text() == "keep me"


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    ckpt = tmp_path / "ck"
    for step in (1, 2, 3):
        T.save_checkpoint(
            ckpt, step, {"format": T.CHECKPOINT_FORMAT, "step": step, "x": torch.randn(3)}, keep=2
        )
    assert sorted(p.name for p in ckpt.glob("step-*")) == ["step-0000002", "step-0000003"]
    # a write killed halfway leaves a temporary directory that is never taken for a checkpoint
    (ckpt / ".tmp-step-0000004-1").mkdir()
    (ckpt / ".tmp-step-0000004-1" / "state.pt").write_bytes(b"partial")
    assert T.find_checkpoint(ckpt).parent.name == "step-0000003"
    # a `latest` naming a missing directory falls back to the newest whole checkpoint
    (ckpt / "latest").write_text("step-0000009\n")
    assert T.find_checkpoint(ckpt).parent.name == "step-0000003"
    assert torch.load(T.find_checkpoint(ckpt), weights_only=True)["step"] == 3


def test_lr_schedule_warmup_then_cosine():
    cfg = T.TrainConfig(out="", steps=100, warmup_ratio=0.1, min_lr_ratio=0.1)
    f = T.lr_lambda(cfg)
    warm = [f(s) for s in range(10)]
    assert warm == sorted(warm) and warm[0] > 0 and f(10) == pytest.approx(1.0)
    decay = [f(s) for s in range(10, 101)]
    assert decay == sorted(decay, reverse=True)
    assert f(55) == pytest.approx(0.1 + 0.9 * 0.5)  # half way down the cosine
    assert f(100) == pytest.approx(0.1)


def test_ctrl_c_leaves_a_whole_resumable_checkpoint(tmp_path):
    """SIGINT mid-run: the run checkpoints the last whole step and exits 130; --resume
    continues from it."""
    out = tmp_path / "sig"
    cmd = [
        sys.executable,
        "-m",
        "lora_ext.cli",
        "train",
        *TINY,
        "--steps",
        "500",
        "--out",
        str(out),
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 120
        while not (out / "checkpoints" / "latest").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "no checkpoint within 120 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted after step" in err and "--resume" in err
    path = T.find_checkpoint(out / "checkpoints")
    state = T.load_checkpoint(path)
    step = state["step"]
    assert 2 <= step < 500 and len(state["history"]) == step
    assert f"interrupted at step {step}" in json.loads((out / "run.json").read_text())["status"]
    assert _train(out, "--steps", "500", "--resume", "--stop-at", str(step + 1)) == 0
    assert T.load_checkpoint(T.find_checkpoint(out / "checkpoints"))["step"] == step + 1


def test_gradient_checkpointing_trains_the_same_adapter(tmp_path):
    """Recomputation under checkpointing replays the RNG, so the op's seeded dropout (and
    BERT's) draw the same masks: the adapter is the one trained without checkpointing."""
    plain, ckpt = tmp_path / "plain", tmp_path / "ckpt"
    assert _train(plain, "--steps", "2", "--dropout", "0.1") == 0
    assert _train(ckpt, "--steps", "2", "--dropout", "0.1", "--grad-checkpointing") == 0
    a, b = _adapter(plain), _adapter(ckpt)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    # and the LoRA dropout is live: without it the adapter differs
    other = tmp_path / "other"
    assert _train(other, "--steps", "2", "--dropout", "0") == 0
    assert any(not torch.equal(a[k], v) for k, v in _adapter(other).items())


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A transformers model directory: a small random Llama with SmolLM2's real tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_ext.training import models

    tok = models.load_tokenizer("smollm2")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=True, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_causal_lm_from_a_model_directory(tiny_llama_dir, tmp_path):
    """Plain text -> fixed blocks -> causal-LM loss; validation perplexity; the adapter on a
    fresh copy of the model reproduces the final validation loss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lora_ext
    from lora_ext.training import data as D

    rt = D.load_rotten_tomatoes()
    text = tmp_path / "reviews.txt"
    text.write_text("\n\n".join(rt.texts[:400]))
    out = tmp_path / "lm"
    args = [
        "--model",
        str(tiny_llama_dir),
        "--data",
        str(text),
        "--steps",
        "6",
        "--batch-size",
        "4",
    ]
    args += [
        "--max-length",
        "32",
        "--lr",
        "1e-2",
        "--eval-every",
        "3",
        "--no-progress",
        "--threads",
        "1",
    ]
    assert cli.main(["train", *args, "--out", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["task"] == "causal-lm" and run["classes"] is None and run["head"] is None
    metrics = json.loads((out / "metrics.json").read_text())
    final = metrics["final"]
    assert final["perplexity"] == pytest.approx(math.exp(final["val_loss"]))
    assert metrics["evals"][0]["perplexity"] > final["perplexity"]  # it learnt something
    assert all(h["tokens"] == 4 * 32 for h in metrics["history"])  # full blocks only
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert not config.get("modules_to_save")

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    lora_ext.load_adapter(model, out / "adapter")
    split = D.split_dataset(D.load_text(text), 0.1, 0)
    enc = D.encode_causal_lm(split.val, AutoTokenizer.from_pretrained(tiny_llama_dir), 32)
    again = T.evaluate(
        model, enc, T.TaskSpec("causal-lm", None, None), torch.device("cpu"), T.Dist(), 64, None
    )
    assert again["val_loss"] == pytest.approx(final["val_loss"], rel=1e-5)


def test_demo_flow_on_a_small_budget(tmp_path, capsys):
    """The demo's whole flow on a tiny budget: the table has the three variants, ONNX fp32
    predicts exactly what PyTorch does, and missing the accuracy target (certain after 3
    steps) is an exit status of 1, not a silent pass."""
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--steps", "3", "--batch-size", "8", "--max-train", "64"]
    argv += ["--max-val", "48", "--latency-sentences", "3", "--threads", "1", "--no-progress"]
    status = cli.main(argv)
    table = capsys.readouterr().out
    result = json.loads((out / "demo.json").read_text())
    assert [r["variant"] for r in result["rows"]] == ["PyTorch (LoRA)", "ONNX fp32", "ONNX int8"]
    assert result["n_val"] == 48
    checks = result["checks"]
    assert checks["ONNX fp32 predictions equal PyTorch"]
    rows = {r["variant"]: r for r in result["rows"]}
    assert rows["ONNX fp32"]["agreement"] == 1.0
    assert rows["ONNX int8"]["size_bytes"] * 3 < rows["ONNX fp32"]["size_bytes"]
    assert all(r["latency_ms"] > 0 for r in result["rows"])
    assert status == (0 if all(checks.values()) else 1)
    for variant in rows:
        assert variant in table
    # the printed training time is metrics.json's; run.json lists what the demo exported
    metrics = json.loads((out / "metrics.json").read_text())
    assert f"in {metrics['train_time_s']:.1f} s" in table
    assert result["train_time_s"] == metrics["train_time_s"] <= result["train_wall_time_s"]
    run = json.loads((out / "run.json").read_text())
    assert run["exported"] == ["onnx/model.int8.onnx", "onnx/model.onnx"]
    # a second demo into the same --out refuses to replace these results without --overwrite
    before = (out / "demo.json").read_bytes()
    assert cli.main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "demo.json").read_bytes() == before


def test_resume_refuses_changed_data(tmp_path, capsys):
    data_file = Path(_csv(tmp_path, "d.csv", "text,label\n" + GOOD_ROWS))
    out = tmp_path / "run"
    assert _train(out, "--data", str(data_file), "--steps", "3", "--stop-at", "1") == 0
    data_file.write_text(data_file.read_text().replace("text 7,", "text seven,"))
    capsys.readouterr()
    assert _train(out, "--data", str(data_file), "--steps", "3", "--resume") == 2
    assert "differ from those" in capsys.readouterr().err
    assert T.load_checkpoint(T.find_checkpoint(out / "checkpoints"))["step"] == 1


def test_bbc_news_five_classes(tmp_path):
    out = tmp_path / "bbc"
    args = ["--data", "bbc-news", "--steps", "2", "--max-length", "32", "--max-val", "10"]
    assert cli.main(["train", *TINY, *args, "--out", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["classes"] == ["business", "entertainment", "politics", "sports", "tech"]
    assert run["split"]["n_val"] == 51 + 39 + 42 + 51 + 40  # 10% per class, before --max-val
    head = _adapter(out)["base_model.model.classifier.weight"]
    assert head.shape == (5, 384)
    task = json.loads((out / "adapter" / "lora_ext_task.json").read_text())
    assert task["classes"] == run["classes"]


@pytest.mark.parametrize(
    "flags",
    [
        ["--lr", "1e30", "--max-grad-norm", "none"],  # the update overflows, then the loss
        ["--lr", "1e30"],  # clipped gradients, but Adam's step is ~lr: the weights overflow
    ],
)
def test_divergence_stops_with_an_error_and_keeps_the_last_good_checkpoint(tmp_path, capsys, flags):
    out = tmp_path / "run"
    status = _train(out, "--steps", "6", "--save-every", "1", "--eval-every", "100", *flags)
    err = capsys.readouterr().err
    assert status == 3, err
    assert "diverged at step" in err and "Traceback" not in err
    assert not (out / "adapter").exists()  # a NaN adapter is never written
    run = json.loads((out / "run.json").read_text())
    assert run["status"].startswith("diverged at step")
    step = int(run["status"].split()[3].rstrip(":"))
    path = T.find_checkpoint(out / "checkpoints")
    if step == 1:
        assert path is None
    else:  # the checkpoint before the bad step: finite, resumable
        state = T.load_checkpoint(path)
        assert state["step"] == step - 1
        assert all(torch.isfinite(t).all() for t in state["trainable"].values())


def test_progress_in_a_log_is_plain_lines_and_the_time_is_metrics_time(tmp_path, capsys):
    """stderr not a terminal (a log file, CI): a plain line per 5% of the steps, never a
    carriage-return bar; the closing line's time and tokens/s are metrics.json's."""
    out = tmp_path / "log"
    argv = [a for a in TINY if a != "--no-progress"]
    capsys.readouterr()
    assert cli.main(["train", *argv, "--steps", "4", "--eval-every", "100", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("train: step ")]
    assert [line.split()[2] for line in lines] == ["1/4", "2/4", "3/4", "4/4"]
    assert all("loss=" in line and "lr=" in line for line in lines)
    metrics = json.loads((out / "metrics.json").read_text())
    summary = f"trained 4 steps in {metrics['train_time_s']:.1f} s ({metrics['tokens_per_s']:.0f} tokens/s)"
    assert summary in err
    assert metrics["train_time_s"] == pytest.approx(sum(h["time_s"] for h in metrics["history"]))


def test_help_documents_every_flag(capsys):
    """Every flag of train / demo / export / infer has help text; train's defaults are shown
    and --targets names the modules it adapts by default."""
    from lora_ext.training.heads import DEFAULT_TARGETS

    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name in ("train", "demo", "export", "infer"):
        undocumented = [
            a.option_strings or a.dest
            for a in commands[name]._actions
            if not a.help and a.help is not argparse.SUPPRESS
        ]
        assert not undocumented, (name, undocumented)
    text = " ".join(commands["train"].format_help().split())
    assert "alpha/r (default: 16.0)" in text and "directory (default: minilm)" in text
    assert "(default: True)" not in text  # a switch's help says what it does instead
    for targets in DEFAULT_TARGETS.values():
        assert ",".join(targets) in text


def test_bf16_training_on_the_cpu(tmp_path, capsys):
    """--bf16: CPU autocast runs the model (and the op's LoRA GEMMs) in bfloat16 while the
    LoRA tensors and the head stay float32 masters; the run trains and saves float32 tensors."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from lora_ext import ops

    ops.load_library()  # the spy names torch.ops.lora_ext.lora_linear
    seen = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.lora_ext.lora_linear.default:
                seen.append((args[0].dtype, args[3].dtype))
            return func(*args, **(kwargs or {}))

    out = tmp_path / "bf16"
    with Spy():
        assert _train(out, "--steps", "2", "--eval-every", "100", "--bf16") == 0
    assert seen and all(x == torch.bfloat16 and a == torch.bfloat16 for x, a in seen)
    run = json.loads((out / "run.json").read_text())
    assert run["precision"] == "bfloat16" and run["config"]["precision"] == "bf16"
    tensors = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert tensors and all(t.dtype == torch.float32 for t in tensors.values())
    fresh = [k for k in tensors if "lora_B" in k]
    assert any(tensors[k].abs().max() > 0 for k in fresh)  # B moved from its zero init
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(math.isfinite(h["loss"]) for h in metrics["history"])


@pytest.mark.parametrize(
    "content, words",
    [
        ("{not json", "not valid UTF-8 JSON"),
        ('{"classes": 5}', "need a list of distinct"),
        ('["rotten", "fresh"]', "holds a list, need an object"),
        ('{"classes": ["a", "a"]}', "need a list of distinct"),
        ('{"task": "regression"}', "task 'regression'"),
        ('{"classes": ["rotten", "fresh", "meh"]}', "names 3 classes, but the model's head has 2"),
    ],
)
def test_load_trained_adapter_is_all_or_nothing(full_run, tmp_path, content, words):
    """A malformed lora_ext_task.json (or class names that do not fit the head) is refused
    before any layer is injected: the model is bit-identical afterwards."""
    import shutil

    from lora_ext.training import models

    adapter = tmp_path / "adapter"
    shutil.copytree(full_run / "adapter", adapter)
    (adapter / "lora_ext_task.json").write_text(content)
    model, _ = models.load_minilm_classifier(num_labels=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    labels = dict(model.config.id2label)
    with pytest.raises(ValueError, match=words):
        T.load_trained_adapter(model, adapter)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any("lora" in name for name, _ in model.named_modules())
    assert model.config.id2label == labels
