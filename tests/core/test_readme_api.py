"""The README's API program runs as written (extracted from README.md, run in a fresh
interpreter), so the snippet stays true."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def api_program() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## The API") :]
    match = re.search(r"```python\n(.*?)```", section, flags=re.S)
    assert match, "README.md: no ```python block under '## The API'"
    return match.group(1)


def test_readme_api_program_runs(tmp_path):
    code = api_program()
    assert "..." not in code  # a placeholder is not a program
    for name in ("torch", "model", "tokenizer", "texts"):
        assert re.search(rf"^(import {name}\b|{name}\b.*=|.*\b{name}, )", code, flags=re.M), name
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "model.onnx").is_file()
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"]  # the trained head travels with it
