"""The ``lora-ext`` command: the only layer that joins training and export.

    lora-ext train --model minilm --data rotten-tomatoes --steps 300 --out runs/rt [--export]
    lora-ext export --model minilm --adapter runs/rt/adapter --out model.onnx --int8
    lora-ext infer --onnx model.onnx --tokenizer minilm "a gripping, beautifully shot film"
    lora-ext demo

One module per subcommand (train.py, export.py, infer.py, demo.py); each registers its parser
with a ``func``: a callable(args) -> exit status. A subcommand whose optional dependencies are
not installed exits 2 with the ``pip install "lora_ext[...]"`` line that adds them.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence

# subcommand -> (module defining add_<name>_command, extra, modules that extra installs)
_TRAIN_MODULES = ("transformers", "gguf", "tqdm")
_EXPORT_MODULES = ("transformers", "onnx", "onnxruntime")
COMMANDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "train": ("train", _TRAIN_MODULES),
    "export": ("export", _EXPORT_MODULES),
    "infer": ("export", ("transformers", "onnxruntime")),
    "demo": ("all", _TRAIN_MODULES + _EXPORT_MODULES),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each flag's default, except where there is none to show (and for
    on/off switches, whose help says what they turn on or off)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        switch = isinstance(action, argparse._StoreConstAction)  # incl. store_true/false
        if (
            switch
            or action.default in (None, False, argparse.SUPPRESS)
            or "%(default)" in (action.help or "")
        ):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage block): ``lora-ext train: error:
    argument --r/--rank: invalid int value: '4.9' (see lora-ext train --help)``."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def missing_modules(command: str) -> list[str]:
    """The optional modules ``command`` needs that are not installed."""
    _, modules = COMMANDS[command]
    return [m for m in modules if importlib.util.find_spec(m) is None]


def build_parser() -> argparse.ArgumentParser:
    """The full parser with every subcommand."""
    from lora_ext import __version__

    parser = Parser(
        prog="lora-ext",
        description="LoRA fine-tuning with a compiled op, merged ONNX export, edge inference.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"lora-ext {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"lora_ext.cli.{name}")
        getattr(module, f"add_{name}_command")(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lora-ext``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    missing = missing_modules(args.command)
    if missing:
        extra = COMMANDS[args.command][0]
        print(
            f"lora-ext {args.command}: needs {', '.join(missing)}, not installed: "
            f'pip install "lora_ext[{extra}]"',
            file=sys.stderr,
        )
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
