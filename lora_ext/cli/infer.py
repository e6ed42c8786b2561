"""``lora-ext infer``: run an exported ONNX model on text with onnxruntime.

lora-ext infer --onnx model.onnx --tokenizer minilm "a gripping, beautifully shot film"
lora-ext infer --onnx smollm2-genai "The capital of France is" [--sample --top-p 0.9 --seed 0]
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
    inf.add_argument(
        "--onnx",
        required=True,
        help="the .onnx (or .ort) file, or a causal LM's model folder (genai_config.json)",
    )
    inf.add_argument(
        "--tokenizer",
        help="tokenizer dir, or minilm | smollm2 (default: the .onnx file's directory)",
    )
    inf.add_argument(
        "--adapter", help=".onnx_adapter file for a --hot-swap export (file or model folder)"
    )
    inf.add_argument(
        "--generate", type=int, default=0, metavar="N", help="causal-lm: N greedy new tokens"
    )
    inf.add_argument("--cpu", action="store_true", help="CPU execution provider only")
    gen = inf.add_argument_group("a model folder (causal LM, KV cache)")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens per prompt")
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy")
    gen.add_argument("--temperature", type=float, default=1.0, help="--sample: temperature")
    gen.add_argument("--top-k", type=int, default=0, help="--sample: top-k (0: off)")
    gen.add_argument("--top-p", type=float, default=1.0, help="--sample: nucleus (1: off)")
    gen.add_argument("--seed", type=int, default=None, help="--sample: random seed")
    gen.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    gen.add_argument(
        "--no-stream", action="store_true", help="print when done instead of token by token"
    )
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


def run_generate(args: argparse.Namespace) -> int:
    """``lora-ext infer --onnx FOLDER``: continue each text with the KV cache (our runner);
    one prompt streams to stdout token by token, a batch prints each continuation."""
    from lora_ext.export.runner import DecoderRunner

    try:
        folder = Path(args.onnx)
        tokenizer = _load_tokenizer(args.tokenizer or folder)
        runner = DecoderRunner(
            folder,
            tokenizer,
            providers=["CPUExecutionProvider"] if args.cpu else None,
            threads=args.threads,
            adapter=args.adapter,
        )
        stream = None
        if len(args.texts) == 1 and not args.no_stream:
            shown: list[int] = []
            printed = [""]
            print(args.texts[0], end="", flush=True)

            def stream(_row: int, token: int) -> None:
                shown.append(token)
                text = tokenizer.decode(shown, skip_special_tokens=True)
                print(text[len(printed[0]) :], end="", flush=True)
                printed[0] = text

        out = runner.generate(
            args.texts,
            max_new_tokens=args.max_new_tokens,
            do_sample=args.sample,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            stream=stream,
        )
    except (ValueError, OSError) as exc:
        print(f"lora-ext infer: error: {exc}", file=sys.stderr)
        return 2
    if stream is not None:
        print()
    else:
        for text, cont in zip(args.texts, out.texts or []):
            print(f"{text}{cont}")
    steps = max(out.decode_steps, 1)
    print(
        f"[infer] prefill {out.prefill_s * 1e3:.1f} ms, decode "
        f"{steps / max(out.decode_s, 1e-9):.1f} tokens/s ({len(args.texts)} prompt(s))",
        file=sys.stderr,
    )
    return 0


def run_infer(args: argparse.Namespace) -> int:
    """``lora-ext infer``: prints one line per text; returns 0, or 1 on bad input."""
    from lora_ext.export.runner import OnnxRunner

    if Path(args.onnx).is_dir():
        return run_generate(args)
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
