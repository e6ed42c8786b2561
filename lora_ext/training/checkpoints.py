"""Checkpoints: the trainable tensors, optimizer, scheduler and every rank's RNG state, written
atomically (a kill at any moment leaves the previous checkpoint whole) and read without
unpickling code (``weights_only``)."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from lora_ext.training.config import TrainError

CHECKPOINT_FORMAT = 1


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(ckpt_dir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``step-NNNNNNN/state.pt`` atomically (temporary directory, fsync, rename), then
    point ``latest`` at it and delete all but the ``keep`` newest. An interruption at any
    moment leaves the previous checkpoint whole."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step-{step:07d}"
    tmp = ckpt_dir / f".tmp-step-{step:07d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    with open(tmp / "state.pt", "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest_tmp = ckpt_dir / ".latest.tmp"
    latest_tmp.write_text(final.name + "\n")
    os.replace(latest_tmp, ckpt_dir / "latest")
    _fsync_dir(ckpt_dir)
    for old in sorted(ckpt_dir.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_dir.glob(".tmp-step-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    return final


def find_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest whole checkpoint: the one ``latest`` names, else the highest step-*."""
    latest = ckpt_dir / "latest"
    if latest.is_file():
        candidate = ckpt_dir / latest.read_text().strip() / "state.pt"
        if candidate.is_file():
            return candidate
    found = sorted(ckpt_dir.glob("step-*/state.pt"))
    return found[-1] if found else None


def load_checkpoint(path: Path) -> dict[str, Any]:
    # weights_only: tensors, numbers, strings and containers only; nothing is unpickled
    # into code.
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(
            f"--resume: {path} has format {state.get('format')}, need {CHECKPOINT_FORMAT}"
        )
    return state
