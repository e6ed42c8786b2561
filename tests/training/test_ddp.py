"""DistributedDataParallel: 2 CPU processes under torchrun (gloo) train the same adapter as
one process over the same global batch.

Each process takes half of every global batch of 4; DDP averages the two halves' gradients,
which is the gradient of the mean over the whole batch, so the adapters must agree up to float
rounding (the halves are padded to their own longest row, which changes matmul shapes and so
the last bits), as amplified by Adam. Dropout is 0 (LoRA's and the model's): masks are drawn per process and would
differ from the single process's by construction. A run over only one half shows the test
can tell the difference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
ARGS = [
    "--model", "minilm", "--data", "rotten-tomatoes", "--max-train", "48", "--max-val", "8",
    "--max-length", "24", "--rank", "4", "--alpha", "8", "--targets", "query,value",
    "--dropout", "0", "--model-dropout", "0", "--lr", "5e-3", "--steps", "3",
    "--eval-every", "100", "--save-every", "100", "--no-progress", "--threads", "1",
]  # fmt: skip


def _run(cmd: list[str], timeout: int = 300) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("ddp")
    outs = {name: base / name for name in ("ddp", "single", "half", "ddp_accum", "single_accum")}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    train = ["-m", "lora_ext.cli", "train", *ARGS]
    accum = ["--batch-size", "2", "--grad-accum", "2"]
    _run([*torchrun, *train, "--batch-size", "4", "--out", str(outs["ddp"])])
    _run([sys.executable, *train, "--batch-size", "4", "--out", str(outs["single"])])
    _run([sys.executable, *train, "--batch-size", "2", "--out", str(outs["half"])])
    # gradient accumulation: DDP skips the all-reduce (no_sync) on all but the last micro-step
    _run([*torchrun, *train, *accum, "--out", str(outs["ddp_accum"])])
    _run([sys.executable, *train, *accum, "--out", str(outs["single_accum"])])
    return outs


def test_ddp_adapter_equals_single_process(runs):
    ddp, single, half = (_adapter(runs[k]) for k in ("ddp", "single", "half"))
    assert ddp.keys() == single.keys()
    moved = 0.0
    for key in ddp:
        # Adam divides by sqrt(v): an element whose gradient is near zero turns a rounding-level
        # gradient difference into an update difference of up to ~lr per step, so the bound is
        # a small fraction of lr (5e-3), not of the values.
        torch.testing.assert_close(ddp[key], single[key], rtol=0, atol=1e-4, msg=key)
        moved = max(moved, (ddp[key] - half[key]).abs().max().item())
    # training on half the batch gives a clearly different adapter: the tolerance above is
    # far below the effect of the other half's gradient
    assert moved > 1e-3


def test_ddp_run_metadata_and_single_writer(runs):
    run = json.loads((runs["ddp"] / "run.json").read_text())
    assert run["world_size"] == 2 and run["status"] == "done"
    metrics = json.loads((runs["ddp"] / "metrics.json").read_text())
    single = json.loads((runs["single"] / "metrics.json").read_text())
    # the logged loss is the global mean over both processes: the single process's loss
    for a, b in zip(metrics["history"], single["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["tokens"] == b["tokens"]
    # validation is split across ranks and summed: the same examples, the same accuracy
    assert metrics["final"]["n"] == single["final"]["n"] == 8
    assert metrics["final"]["accuracy"] == single["final"]["accuracy"]
    # rank 0 alone wrote: one checkpoint directory, no leftovers from a second writer
    ckpts = sorted(p.name for p in (runs["ddp"] / "checkpoints").iterdir())
    assert ckpts == ["latest", "step-0000003"]
    state = torch.load(runs["ddp"] / "checkpoints" / "step-0000003" / "state.pt", weights_only=True)
    assert len(state["rng"]) == 2  # every rank's RNG state, for an exact resume


def test_ddp_with_gradient_accumulation(runs):
    ddp, single = _adapter(runs["ddp_accum"]), _adapter(runs["single_accum"])
    other = _adapter(runs["single"])  # no accumulation: a different data order
    for key in ddp:
        torch.testing.assert_close(ddp[key], single[key], rtol=0, atol=1e-4, msg=key)
    assert max((ddp[k] - other[k]).abs().max().item() for k in ddp) > 1e-3
