"""The package as a newcomer meets it: cheap, honest imports and one public API list."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import lora_ext
import lora_ext.export

ROOT = Path(__file__).resolve().parents[2]


def _fresh_python(code: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout.strip()


def test_importing_the_layer_and_the_export_package_does_not_load_the_compiled_library():
    out = _fresh_python(
        "import sys, lora_ext, lora_ext.layer, lora_ext.export, lora_ext.cli\n"
        "print('lora_ext._C' in sys.modules)\n"
        "from lora_ext import ops\n"
        "ops.build_info()\n"
        "print('lora_ext._C' in sys.modules)"
    )
    assert out.split() == ["False", "True"]


def test_public_api_lists_name_real_objects():
    for module in (lora_ext, lora_ext.export):
        for name in module.__all__:
            assert getattr(module, name) is not None, f"{module.__name__}.{name}"


def test_version_has_one_home_in_setup_py():
    declared = re.search(r'^VERSION = "([^"]+)"', (ROOT / "setup.py").read_text(), re.M)
    assert declared is not None
    assert lora_ext.__version__ == declared.group(1) == importlib.metadata.version("lora_ext")


def test_exporter_recognises_lora_layers_by_type():
    from lora_ext.export import adapters

    for path in (ROOT / "lora_ext" / "export").glob("*.py"):
        text = path.read_text()
        assert "sys.modules" not in text, path
        assert '"LoraLinear"' not in text, path
    assert adapters.lora_layers.__annotations__["return"]


def test_a_model_compiled_fullgraph_before_any_eager_call():
    """Importing stays cheap, yet a LoRA model compiled with fullgraph=True before any eager
    op call works: constructing a LoraLinear loads the library, so no forward has to."""
    out = _fresh_python(
        "import sys, torch, lora_ext\n"
        "m = torch.nn.Sequential(torch.nn.Linear(8, 8))\n"
        "lora_ext.inject_(m, lora_ext.LoraConfig(r=2, target_modules=['0']))\n"
        "print('lora_ext._C' in sys.modules)\n"
        "x = torch.randn(3, 8)\n"
        "y = torch.compile(m, fullgraph=True, backend='eager')(x)\n"
        "print(torch.allclose(y, m(x)))"
    )
    assert out.split() == ["True", "True"]
