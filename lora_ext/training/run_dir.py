"""The run directory ``--out``: deciding fresh / resume / overwrite, and atomic JSON files.

run.json            the configuration used, the data split, versions, status
adapter/            the adapter in PEFT's format (+ the head for classifiers)
metrics.json        loss/lr/tokens per step, validation results, timings
loss.png            the loss curve with the validation metric
checkpoints/        step-NNNNNNN/state.pt (atomic), ``latest`` names the newest
onnx/               model.onnx and model.int8.onnx with --export
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lora_ext.training.config import CONTROL_FIELDS, TrainConfig, TrainError

RUN_FILE = "run.json"
# flock'ed by the run using --out; removed when it ends (a killed run's file holds no lock)
LOCK_FILE = ".lora-ext.lock"


OUR_ENTRIES = ("run.json", "adapter", "metrics.json", "loss.png", "checkpoints", "onnx")


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def check_out_dir(cfg: TrainConfig) -> str:
    """Decide what to do with --out before any work: "fresh", "resume" or "overwrite".

    Refuses an --out that holds a different run (or files that are not a run) unless
    --overwrite, and a run with the same config unless --resume or --overwrite.
    """
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out: {str(out)!r} exists and is not a directory")
    run_file = out / RUN_FILE
    if run_file.is_file():
        try:
            old = json.loads(run_file.read_text())["config"]
        except (json.JSONDecodeError, KeyError) as e:
            raise TrainError(f"--out: {run_file} is unreadable ({e}); use --overwrite") from None
        old_identity = {k: v for k, v in old.items() if k not in CONTROL_FIELDS}
        diffs = _differences(old_identity, cfg.identity())
        if cfg.overwrite:
            return "overwrite"
        if cfg.resume:
            if diffs:
                raise TrainError(
                    f"--resume: {out} holds a run with a different configuration ("
                    + "; ".join(diffs)
                    + "); resume with the same settings, or pass --overwrite to start over"
                )
            return "resume"
        what = (
            "a different run (" + "; ".join(diffs) + ")"
            if diffs
            else "a run with this configuration"
        )
        raise TrainError(
            f"--out: {out} already holds {what}; pass --resume to continue it or "
            f"--overwrite to replace it"
        )
    if out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir()) and not cfg.overwrite:
        raise TrainError(
            f"--out: {out} is not empty and holds no lora-ext run; choose an empty directory "
            f"or pass --overwrite (only lora-ext's own files would be replaced)"
        )
    return "overwrite" if cfg.overwrite else "fresh"


def clear_out_dir(out: Path) -> None:
    """Remove lora-ext's own entries from --out (other files are left alone)."""
    for name in OUR_ENTRIES:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _cannot(out: Path, what: str, e: OSError) -> TrainError:
    return TrainError(f"--out: cannot {what} {out}: {e.strerror or e}")


def _make_dirs(out: Path) -> list[Path]:
    """Create --out and its missing parents; returns those created, deepest first."""
    created: list[Path] = []
    try:
        probe = out
        while not probe.exists():
            created.append(probe)
            if probe.parent == probe:
                break
            probe = probe.parent
        if not probe.is_dir():
            raise TrainError(f"--out: {str(probe)!r} exists and is not a directory")
        for path in reversed(created):
            path.mkdir()
    except OSError as e:
        _remove_dirs(created)
        raise _cannot(out, "create", e) from None
    return created


def _remove_dirs(dirs: list[Path]) -> None:
    for path in dirs:  # deepest first; only if still empty
        with contextlib.suppress(OSError):
            path.rmdir()


def _open_locked(lock: Path, out: Path) -> int:
    """An fd holding an exclusive flock on ``lock`` (the file at that path now: a holder
    that unlinked it on exit leaves our inode stale, so the inode is checked and retried)."""
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise _cannot(out, "write in", e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                os.close(fd)
                raise _cannot(out, "lock", e) from None
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise TrainError(
                f"--out: {out} is in use by another lora-ext train (pid {holder}); wait for "
                "it to end or choose another --out"
            ) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextlib.contextmanager
def locked_out_dir(out: Path, enabled: bool = True) -> Iterator[None]:
    """Hold --out for one run: create it (and its parents), take an exclusive ``flock`` on
    ``--out/.lora-ext.lock`` (refusing with a TrainError when another run holds it), and
    on exit remove the lock file, and the directories this call created if the run left
    nothing else in them (a run refused before writing leaves no --out behind).

    The kernel drops a flock when its process dies, so a killed run's lock file never
    blocks the next run. ``enabled=False`` (ranks other than 0): nothing is done; nor when
    this process holds the lock already (``lora-ext demo`` holds it around ``train``).
    A --out that cannot be created or written (read-only file system, a file in the way,
    a name too long) is a TrainError here, before any model is loaded.
    """
    key = os.path.realpath(out)
    if not enabled or key in _HELD:  # held by this process already (the demo around train)
        yield
        return
    created = _make_dirs(out)
    lock = out / LOCK_FILE
    try:
        fd = _open_locked(lock, out)
    except BaseException:
        _remove_dirs(created)
        raise
    _HELD.add(key)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        _HELD.discard(key)
        with contextlib.suppress(OSError):
            lock.unlink()  # while holding the lock: a waiter sees the inode change and retries
        os.close(fd)
        _remove_dirs(created)


_HELD: set[str] = set()  # --out directories this process holds (re-entering is a no-op)
