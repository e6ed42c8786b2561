"""``lora-ext infer``: run an exported ONNX model on text with onnxruntime.

lora-ext infer --onnx model.onnx --tokenizer minilm "a gripping, beautifully shot film"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lora_ext.cli import HelpFormatter


def add_infer_command(subparsers: Any) -> None:
    """Register ``infer`` on an argparse subparsers object (``func``: args -> exit status)."""
    inf = subparsers.add_parser(
        "infer",
        formatter_class=HelpFormatter,
        help="run an exported ONNX model on text with onnxruntime",
        description="Tokenize the texts, run the ONNX file, print labels or next tokens.",
    )
    inf.add_argument("--onnx", required=True, help="the .onnx (or .ort) file")
    inf.add_argument(
        "--tokenizer",
        help="tokenizer dir, or minilm | smollm2 (default: the .onnx file's directory)",
    )
    inf.add_argument("--adapter", help=".onnx_adapter file for a --hot-swap export")
    inf.add_argument(
        "--generate", type=int, default=0, metavar="N", help="causal-lm: N greedy new tokens"
    )
    inf.add_argument("--cpu", action="store_true", help="CPU execution provider only")
    inf.add_argument("texts", nargs="+", help="input text(s)")
    inf.set_defaults(func=run_infer)


def _load_tokenizer(source: str | Path) -> Any:
    """A bundled model's tokenizer, a model dir's, or a bare tokenizer dir's (the one
    ``lora-ext export`` and ``lora-ext train --export`` save next to the .onnx file)."""
    from lora_ext.training import models

    path = Path(source)
    if str(source) in models.BUNDLED or (path / "config.json").is_file():
        return models.load_tokenizer(source)
    if (path / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    raise ValueError(
        f"--tokenizer: got {str(source)!r}, which is neither minilm / smollm2 nor a directory "
        "with a tokenizer (tokenizer_config.json)"
    )


def run_infer(args: argparse.Namespace) -> int:
    """``lora-ext infer``: prints one line per text; returns 0, or 1 on bad input."""
    from lora_ext.export.runner import OnnxRunner

    try:
        onnx_path = Path(args.onnx)
        if not onnx_path.is_file():
            raise FileNotFoundError(f"--onnx: {args.onnx!r} does not exist")
        source = args.tokenizer
        if source is None:
            if not (onnx_path.parent / "tokenizer_config.json").is_file():
                raise ValueError(
                    f"--tokenizer: none given and {str(onnx_path.parent)!r} holds no tokenizer; "
                    "pass a tokenizer dir or minilm / smollm2"
                )
            source = onnx_path.parent
        tokenizer = _load_tokenizer(source)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        runner = OnnxRunner(
            onnx_path,
            tokenizer,
            providers=["CPUExecutionProvider"] if args.cpu else None,
            adapter=args.adapter,
        )
    except (ValueError, OSError) as exc:
        print(f"lora-ext infer: error: {exc}", file=sys.stderr)
        return 1
    print(f"[infer] {onnx_path.name} on {runner.providers[0]}", file=sys.stderr)
    if args.generate:
        for text in args.texts:
            print(f"{text}{runner.generate(text, args.generate)}")
        return 0
    import numpy as np

    out = runner(args.texts)
    width = min(max(len(t) for t in args.texts), 60)
    for i, text in enumerate(args.texts):
        shown = text if len(text) <= width else text[: width - 3] + "..."
        if out.logits.ndim == 2:
            logits = out.logits[i].astype(np.float64)
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
            print(f"{shown:<{width}}  {out.labels[i]!s:<10} p={probs.max():.3f}")
        else:
            token = tokenizer.decode([out.labels[i]])
            print(f"{shown:<{width}}  next token: {token!r}")
    return 0
