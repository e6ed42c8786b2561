"""The run directory ``--out``: deciding fresh / resume / overwrite, and atomic JSON files.

run.json            the configuration used, the data split, versions, status
adapter/            the adapter in PEFT's format (+ the head for classifiers)
metrics.json        loss/lr/tokens per step, validation results, timings
loss.png            the loss curve with the validation metric
checkpoints/        step-NNNNNNN/state.pt (atomic), ``latest`` names the newest
onnx/               model.onnx and model.int8.onnx with --export
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from lora_ext.training.config import CONTROL_FIELDS, TrainConfig, TrainError

RUN_FILE = "run.json"


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
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
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
