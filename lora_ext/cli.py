"""The ``lora-ext`` command: ``train``, ``demo``, and ``export`` / ``infer`` (from lora_ext.export).

    lora-ext train --model minilm --data rotten-tomatoes --steps 300 --out runs/rt [--export]
    lora-ext export --model minilm --adapter runs/rt/adapter --out model.onnx --int8
    lora-ext infer --onnx model.onnx --tokenizer minilm "a gripping, beautifully shot film"
    lora-ext demo

Each subcommand's parser sets ``func``: a callable(args) -> exit status. transformers, onnx
and onnxruntime are imported only by the subcommand that runs (torch is imported to build the
parser: the train flags and their defaults live next to the code in lora_ext.train).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _train(args: argparse.Namespace) -> int:
    from lora_ext.train import run_from_args

    return run_from_args(args)


def _demo(args: argparse.Namespace) -> int:
    from lora_ext.demo import run_from_args

    return run_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    """The full parser with every subcommand."""
    import lora_ext
    from lora_ext.demo import add_demo_arguments
    from lora_ext.train import add_train_arguments

    parser = argparse.ArgumentParser(
        prog="lora-ext",
        description="LoRA fine-tuning with a compiled op, merged ONNX export, edge inference.",
    )
    parser.add_argument("--version", action="version", version=f"lora-ext {lora_ext.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    train = sub.add_parser(
        "train",
        help="fine-tune a model with LoRA (also under torchrun)",
        description="Fine-tune a model with LoRA; see lora_ext/train.py for the output layout.",
    )
    add_train_arguments(train)
    train.set_defaults(func=_train)
    demo = sub.add_parser(
        "demo",
        help="fine-tune MiniLM on Rotten Tomatoes, export ONNX fp32/int8, compare",
        description="The whole flow on the bundled model and data: train, merge, export, evaluate.",
    )
    add_demo_arguments(demo)
    demo.set_defaults(func=_demo)
    from lora_ext.export.cli import add_subcommands  # export, infer

    add_subcommands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lora-ext``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
