"""Checkpoints: the trainable tensors, optimizer, scheduler and every rank's RNG state, written
atomically (a kill at any moment leaves the previous checkpoint whole) and read without
unpickling code (``weights_only``)."""

from __future__ import annotations

import contextlib
import io
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
    moment leaves the previous checkpoint whole.

    Raises:
        OSError: the write failed (disk full, file size limit, ...); the temporary
            directory is removed and the message names the step and the checkpoint kept.
    """
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step-{step:07d}"
    tmp = ckpt_dir / f".tmp-step-{step:07d}-{os.getpid()}"
    # serialised in memory first: torch.save into a file that stops growing (ENOSPC,
    # RLIMIT_FSIZE) fails with an opaque "unexpected pos" RuntimeError, a plain write with
    # the OSError that says why
    buffer = io.BytesIO()
    torch.save(state, buffer)
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        with open(tmp / "state.pt", "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = ckpt_dir / ".latest.tmp"
        latest_tmp.write_text(final.name + "\n")
        os.replace(latest_tmp, ckpt_dir / "latest")
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = find_checkpoint(ckpt_dir)
        whole = f"{kept.parent.name} is whole" if kept else "there is no earlier checkpoint"
        raise OSError(
            e.errno, f"{e.strerror}: the step {step} checkpoint was not written; {whole}"
        ) from None
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


def _corrupt(path: Path, what: str) -> TrainError:
    older = sorted(p.name for p in path.parent.parent.glob("step-*") if p != path.parent)
    fallback = (
        f"delete {path.parent} to resume from {older[-1]}" if older else "no older checkpoint"
    )
    return TrainError(
        f"--resume: {path} is not a usable checkpoint ({what}); {fallback}, or pass "
        "--overwrite to start over"
    )


def load_checkpoint(
    path: Path, expected: dict[str, tuple[int, ...]] | None = None
) -> dict[str, Any]:
    """Read and check a checkpoint; every way it can be broken is a TrainError naming it.

    Args:
        expected: {name: shape} of the run's trainable tensors; the checkpoint must hold
            exactly these, finite, and optimizer state of the same shapes.

    Raises:
        TrainError: a truncated or garbage file, a torch file of other content, a missing
            or mistyped entry, tensors that do not fit the model, non-finite values.
    """
    # weights_only: tensors, numbers, strings and containers only; nothing is unpickled
    # into code.
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, garbage, pickled code, ...: all unusable
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _corrupt(path, f"unreadable: {first[:200]}") from None
    if not isinstance(state, dict):
        raise _corrupt(path, f"holds a {type(state).__name__}, not a checkpoint dict")
    if state.get("format") != CHECKPOINT_FORMAT:
        raise _corrupt(path, f"format {state.get('format')!r}, need {CHECKPOINT_FORMAT}")
    _check_structure(path, state, expected)
    return state


_ENTRIES: dict[str, type | tuple[type, ...]] = {
    "step": int,
    "config_digest": str,
    "data_fingerprint": str,
    "world_size": int,
    "trainable": dict,
    "optimizer": dict,
    "scheduler": dict,
    "rng": list,
    "history": list,
    "evals": list,
}


def _check_structure(
    path: Path, state: dict[str, Any], expected: dict[str, tuple[int, ...]] | None
) -> None:
    for key, kind in _ENTRIES.items():
        if key not in state:
            raise _corrupt(path, f"no {key!r} entry")
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            raise _corrupt(path, f"{key!r} is a {type(state[key]).__name__}")
    step, world = state["step"], state["world_size"]
    if step < 0 or world < 1:
        raise _corrupt(path, f"step {step}, world_size {world}")
    if len(state["history"]) != step or not all(isinstance(h, dict) for h in state["history"]):
        raise _corrupt(path, f"{len(state['history'])} history records for step {step}")
    rng = state["rng"]
    if len(rng) != world or not all(
        isinstance(r, dict)
        and isinstance(r.get("torch"), torch.Tensor)
        and r["torch"].dtype == torch.uint8
        and isinstance(r.get("python"), (tuple, list))
        for r in rng
    ):
        raise _corrupt(path, "malformed RNG states")
    trainable = state["trainable"]
    for name, tensor in trainable.items():
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise _corrupt(path, f"trainable {name!r} is not a float tensor")
        if not bool(torch.isfinite(tensor).all()):
            raise _corrupt(path, f"trainable {name!r} holds NaN or Inf")
    if expected is not None:
        missing = sorted(set(expected) - set(trainable))
        extra = sorted(set(trainable) - set(expected))
        if missing or extra:
            raise _corrupt(
                path,
                f"its tensors do not match the model: missing {missing[:3]}"
                + (f" (+{len(missing) - 3})" if len(missing) > 3 else "")
                + f", unexpected {extra[:3]}",
            )
        for name, shape in expected.items():
            if tuple(trainable[name].shape) != tuple(shape):
                raise _corrupt(
                    path, f"{name!r} has shape {tuple(trainable[name].shape)}, the model {shape}"
                )
    opt = state["optimizer"]
    if not isinstance(opt.get("state"), dict) or not isinstance(opt.get("param_groups"), list):
        raise _corrupt(path, "malformed optimizer state")
    # keyed by position in the optimizer (plain), or by parameter name (FSDP2's full state)
    shapes: dict[int | str, tuple[int, ...]] = {
        i: tuple(t.shape) for i, t in enumerate(trainable.values())
    }
    shapes |= {name: tuple(t.shape) for name, t in trainable.items()}
    n_params = sum(len(g.get("params", ())) for g in opt["param_groups"] if isinstance(g, dict))
    if n_params != len(trainable):
        raise _corrupt(path, f"optimizer state for {n_params} tensors, {len(trainable)} trainable")
    for index, entry in opt["state"].items():
        if not isinstance(entry, dict) or index not in shapes:
            raise _corrupt(path, f"malformed optimizer state entry {index!r}")
        for key in ("exp_avg", "exp_avg_sq"):
            t = entry.get(key)
            if t is not None and (
                not isinstance(t, torch.Tensor) or tuple(t.shape) != shapes[index]
            ):
                raise _corrupt(path, f"optimizer {key} of tensor {index} does not fit")
