"""Faults during ``lora-ext train``: kill -9 (resume bit-identical), a second run into the
same --out, a disk filling up while checkpointing (RLIMIT_FSIZE), a read-only --out, and
corrupt checkpoints on --resume. Each ends in a one-line message, never a traceback.

Killed runs are subprocesses on the tiny settings of test_train.py; the rest runs
in-process.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cli_bad_input import check_one_line, run_cli
from test_train import TINY

from lora_ext.training import trainer as T
from lora_ext.training.run_dir import LOCK_FILE

ROOT = Path(__file__).resolve().parents[2]
STEPS = "16"  # long enough that a kill lands mid-run, short on 2 cores


def _cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lora_ext.cli", "train", *TINY, "--out", str(out), *extra]


def _spawn(out: Path, *extra: str, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        _cmd(out, *extra),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def _latest_step(out: Path) -> int:
    path = T.find_checkpoint(out / "checkpoints")
    return int(path.parent.name.split("-")[1]) if path else 0


def _wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while _latest_step(out) < step:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"no checkpoint of step {step} within {timeout} s"
        time.sleep(0.01)


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _losses(out: Path) -> list[float]:
    return [h["loss"] for h in json.loads((out / "metrics.json").read_text())["history"]]


def test_kill_9_twice_then_resume_is_bit_identical_and_out_is_locked(tmp_path):
    """Two kill -9s (one right after a checkpoint, one at a random moment, often inside a
    checkpoint write), then --resume: the adapter and every step's loss equal an
    uninterrupted run's. While the first run lives, a second run into its --out is refused
    (also with --overwrite); the killed run's lock file blocks nobody."""
    victim, reference = tmp_path / "victim", tmp_path / "reference"
    steps = ["--steps", STEPS, "--save-every", "1"]
    proc = _spawn(victim, *steps)
    try:
        _wait_for_step(proc, victim, 2)
        for extra in ([], ["--overwrite"], ["--resume"]):
            status, err = run_cli(["train", *TINY, *steps, "--out", str(victim), *extra])
            check_one_line(status, err, ["in use by another lora-ext train", f"pid {proc.pid}"])
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert (victim / LOCK_FILE).exists()  # left by the kill; holds no lock
    first = _latest_step(victim)
    assert 2 <= first < int(STEPS)
    T.load_checkpoint(T.find_checkpoint(victim / "checkpoints"))  # whole

    proc = _spawn(victim, *steps, "--resume")
    try:
        _wait_for_step(proc, victim, first + 1)
        time.sleep(random.Random(os.getpid()).uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    second = _latest_step(victim)
    assert second > first
    json.loads((victim / "run.json").read_text())  # never half-written

    status, err = run_cli(["train", *TINY, *steps, "--out", str(victim), "--resume"])
    assert status == 0, err
    if second < int(STEPS):
        assert f"trained {STEPS} steps" in err
    assert run_cli(["train", *TINY, "--steps", STEPS, "--out", str(reference)])[0] == 0
    a, b = _adapter(reference), _adapter(victim)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert _losses(victim) == _losses(reference)
    assert not (victim / LOCK_FILE).exists()
    assert not list((victim / "checkpoints").glob(".tmp-*"))


def _limit_file_size(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_disk_full_while_checkpointing(tmp_path):
    """A file size limit below a checkpoint's size (as a full disk): the run stops with one
    line naming the step and the checkpoint kept, exit 1, no temporary directory left;
    the earlier checkpoint resumes. (Python ignores SIGXFSZ, so writes fail with EFBIG.)"""
    out = tmp_path / "run"
    # step 1's checkpoint fits in 1 MB, a second file of that size does not fit in 0.5 MB
    assert run_cli(["train", *TINY, "--steps", "4", "--stop-at", "1", "--out", str(out)])[0] == 0
    size = (T.find_checkpoint(out / "checkpoints")).stat().st_size
    proc = _spawn(
        out,
        "--steps",
        "4",
        "--resume",
        "--eval-every",
        "100",
        preexec_fn=_limit_file_size(size // 2),
    )
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("lora-ext train: error:"), err
    for word in ("File too large", "step 2 checkpoint was not written", "step-0000001 is whole"):
        assert word in line, (word, line)
    assert "--resume" in line
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert _latest_step(out) == 1
    status = json.loads((out / "run.json").read_text())["status"]
    assert status.startswith("failed at step 2: File too large"), status
    assert not (out / LOCK_FILE).exists()
    assert run_cli(["train", *TINY, "--steps", "4", "--resume", "--out", str(out)])[0] == 0


def test_read_only_out_is_refused_before_the_model_loads(tmp_path):
    """--out on a read-only file system (a tmpfs mounted ro in a private mount namespace)."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare")
    ro = tmp_path / "ro"
    ro.mkdir()
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o ro none {ro} && touch {ro}/x"],
        capture_output=True,
        text=True,
    )
    if "Read-only file system" not in probe.stderr:
        pytest.skip(f"cannot mount a read-only file system here: {probe.stderr.strip()}")
    script = f"mount -t tmpfs -o ro none {ro} && exec {' '.join(_cmd(ro / 'run', '--steps', '2'))}"
    t0 = time.perf_counter()
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", script],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    check_one_line(done.returncode, done.stderr, ["--out", "Read-only file system"])
    assert "run" in done.stderr
    assert time.perf_counter() - t0 < 120


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> Path:
    """A run stopped after step 2 (checkpoints of steps 1 and 2)."""
    out = tmp_path_factory.mktemp("corrupt") / "run"
    argv = ["train", *TINY, "--steps", "3", "--stop-at", "2", "--save-every", "1"]
    assert run_cli([*argv, "--out", str(out)])[0] == 0
    return out


def _state(path: Path) -> dict:
    return torch.load(path, weights_only=True)


class _Code:  # pickled as a class reference: weights_only must refuse to load it
    pass


CORRUPTIONS = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "empty": lambda p: p.write_bytes(b""),
    "garbage": lambda p: p.write_bytes(random.Random(0).randbytes(p.stat().st_size)),
    "a-tensor": lambda p: torch.save(torch.zeros(3), p),
    "no-format": lambda p: torch.save({"step": 2}, p),
    "missing-optimizer": lambda p: torch.save({k: v for k, v in _state(p).items() if k != "optimizer"}, p),
    "wrong-shape": lambda p: torch.save(
        _state(p) | {"trainable": {k: v[:, :1] if v.dim() == 2 else v for k, v in _state(p)["trainable"].items()}}, p
    ),
    "missing-tensor": lambda p: torch.save(
        _state(p) | {"trainable": dict(list(_state(p)["trainable"].items())[1:])}, p
    ),
    "nan": lambda p: torch.save(
        _state(p) | {"trainable": {k: v * float("nan") for k, v in _state(p)["trainable"].items()}}, p
    ),
    "bad-rng": lambda p: torch.save(_state(p) | {"rng": [{"torch": "x"}]}, p),
    "pickled-code": lambda p: torch.save(_state(p) | {"step": _Code()}, p),
}  # fmt: skip


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupt_checkpoint_on_resume_is_one_line(stopped_run, tmp_path, kind):
    out = tmp_path / "run"
    shutil.copytree(stopped_run, out)
    path = out / "checkpoints" / "step-0000002" / "state.pt"
    CORRUPTIONS[kind](path)
    before = path.read_bytes()
    status, err = run_cli(["train", *TINY, "--steps", "3", "--resume", "--out", str(out)])
    check_one_line(status, err, [str(path), "step-0000001"])
    assert path.read_bytes() == before  # left for the user to inspect
    assert not (out / "adapter").exists() and not (out / LOCK_FILE).exists()


def test_lock_is_reentrant_in_process_and_exclusive_across_processes(tmp_path):
    """``lora-ext demo`` holds --out around its train(): re-entering in the same process is a
    no-op that does not release it; another process is refused while it is held."""
    from lora_ext.training.run_dir import locked_out_dir

    out = tmp_path / "held"
    code = (
        "import sys\nfrom pathlib import Path\nfrom lora_ext.training.run_dir import locked_out_dir\n"
        "try:\n    with locked_out_dir(Path(sys.argv[1])):\n        pass\n"
        "except Exception as e:\n    print(e)\n    sys.exit(3)\n"
    )
    with locked_out_dir(out):
        with locked_out_dir(out):
            pass
        assert (out / LOCK_FILE).read_text().strip() == str(os.getpid())
        done = subprocess.run(
            [sys.executable, "-c", code, str(out)],
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 3, done
        assert f"in use by another lora-ext train (pid {os.getpid()})" in done.stdout
    assert not out.exists()  # made by the lock, nothing written into it: removed
