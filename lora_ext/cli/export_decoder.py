"""The causal-LM branch of ``lora-ext export``: an onnxruntime-genai model folder.

    lora-ext export --model smollm2 --adapter runs/lm/adapter --out smollm2-genai
    lora-ext export --model smollm2 --adapter runs/lm/adapter --out smollm2-int4 --int4
    lora-ext export --model smollm2 --adapter runs/lm/adapter --out smollm2-hot --hot-swap
    lora-ext export --model path/to/gpt2 --out gpt2-genai   # our own KV-cache graph

Bad input (not a decoder, an unsupported architecture, a tokenizer that does not fit the
vocab, --int4 with --fp16, an adapter for another base, a non-empty --out without
--overwrite) exits 2 with one line and writes nothing; a failed verification exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

EXIT_BAD_INPUT = 2
EVAL_DATA_DEFAULT = "bbc-news"
CALIBRATION_SAMPLES = 32


def add_decoder_arguments(parser: argparse.ArgumentParser) -> None:
    """The causal-LM flags of ``lora-ext export``."""
    g = parser.add_argument_group(
        "causal LM (writes an onnxruntime-genai model folder at --out: KV cache graph, "
        "genai_config.json, tokenizer)"
    )
    g.add_argument(
        "--int4", action="store_true", help="int4 weights (MatMulNBits), GPTQ by default"
    )
    g.add_argument("--block-size", type=int, default=32, help="int4: weights per scale")
    g.add_argument("--asymmetric", action="store_true", help="int4: with zero points")
    g.add_argument(
        "--int4-method",
        choices=["gptq", "rtn", "k_quant"],
        default="gptq",
        help="int4: gptq (default: RTN's grid and size, weights chosen on calibration text "
        "from --calibration's training split; SmolLM2: 69%% next-token agreement with fp32 "
        "vs RTN's 59%%), rtn (round to nearest, the builder's default), or k_quant",
    )
    g.add_argument(
        "--accuracy-level",
        type=int,
        choices=[0, 1, 2, 3, 4],
        default=4,
        help="int4: MatMulNBits compute type on the CPU (4: int8 activations, 1: fp32, 0: unset)",
    )
    g.add_argument("--lm-head-int8", action="store_true", help="int4: lm_head in int8")
    g.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    g.add_argument(
        "--new-tokens", type=int, default=32, help="greedy tokens compared with PyTorch per prompt"
    )
    g.add_argument(
        "--eval-data",
        metavar="DATA",
        help="held-out text for the int4 quality report (validation split): a bundled data "
        "set or a .txt/.csv/.jsonl file. Default: the adapter's training data (run.json), "
        f"else {EVAL_DATA_DEFAULT}",
    )
    g.add_argument("--eval-samples", type=int, default=32, help="held-out texts for the report")


def is_causal_lm(args: argparse.Namespace) -> bool:
    """Whether ``lora-ext export`` was asked for a causal LM (--task, else the model's)."""
    if args.task is not None:
        return args.task == "causal-lm"
    from lora_ext.cli.export import _task_of
    from lora_ext.training import models

    try:
        kind, path = models.resolve_model(args.model)
        return _task_of(args.model, kind, path, None) == "causal-lm"
    except (ValueError, OSError):
        return False  # the classifier path reports it


def _refuse_flags(args: argparse.Namespace) -> None:
    if args.int4 and args.fp16:
        raise ValueError("--int4: cannot be combined with --fp16 (int4 weights run fp32 on CPU)")
    if args.int4 and args.int8:
        raise ValueError("--int4: cannot be combined with --int8; pick one")
    if args.hot_swap and not args.adapter:
        raise ValueError("--hot-swap: needs --adapter (its layers become LoRA graph inputs)")
    gptq = args.int4 and args.int4_method == "gptq"
    if not gptq and (args.calibration or args.calibration_samples is not None):
        raise ValueError(
            "--calibration: for a causal LM it calibrates --int4 --int4-method gptq only"
        )
    if gptq and args.asymmetric:
        raise ValueError("--asymmetric: GPTQ uses the symmetric grid; add --int4-method rtn")
    for flag, value in (
        ("--optimize", args.optimize),
        ("--all-positions", args.all_positions),
        ("--ort-format", args.ort_format),
        ("--external-data", args.external_data),
    ):
        if value:
            raise ValueError(f"{flag}: applies to classifier exports, not to a causal-LM folder")


def eval_texts(
    data: str | None, adapter: str | None, samples: int, train: bool = False
) -> tuple[str, list[str]]:
    """(data name, held-out texts): the validation split of ``data``, else of the adapter's
    training data (its run.json), else of EVAL_DATA_DEFAULT; with ``train`` the first
    ``samples`` texts of its training split instead (GPTQ's calibration)."""
    from lora_ext.training import data as D

    val_fraction, seed = 0.1, 0
    if data is None and adapter is not None:
        run_file = Path(adapter).resolve().parent / "run.json"
        if run_file.is_file():
            config = json.loads(run_file.read_text()).get("config", {})
            data = config.get("data")
            val_fraction = config.get("val_fraction", val_fraction)
            seed = config.get("seed", seed)
    data = data or EVAL_DATA_DEFAULT
    try:
        split = D.split_dataset(D.load_dataset(data), val_fraction, seed)
    except D.DataError as exc:
        raise ValueError(f"--eval-data: {exc}") from exc
    texts = [t for t in (split.train if train else split.val).texts if t.strip()][:samples]
    return data, texts


def run_export_decoder(args: argparse.Namespace) -> int:
    """Export a causal LM as a genai folder; 0, 1 (verification failed) or 2 (bad input)."""
    from lora_ext.cli.export import load_for_export
    from lora_ext.export.decoder import DecoderExportError, check_output_dir, export_decoder
    from lora_ext.export.exporter import VerificationError

    def say(msg: str) -> None:
        print(f"[export] {msg}", file=sys.stderr, flush=True)

    def fail(msg: Any, status: int) -> int:
        print(f"lora-ext export: error: {msg}", file=sys.stderr)
        return status

    try:
        _refuse_flags(args)
        if args.eval_samples < 1:
            raise ValueError(f"--eval-samples: got {args.eval_samples}, need >= 1")
        check_output_dir(args.out, args.overwrite, arg="--out")  # before loading anything
        say(f"loading {args.model}" + (f" + adapter {args.adapter}" if args.adapter else ""))
        model, tokenizer, _ = load_for_export(args.model, args.adapter, "causal-lm", None)
        texts = None
        quantize = "int4" if args.int4 else "int8" if args.int8 else None
        calibration = None
        if quantize:
            name, texts = eval_texts(args.eval_data, args.adapter, args.eval_samples)
            say(f"quality report on {len(texts)} held-out texts of {name}")
        if quantize == "int4" and args.int4_method == "gptq":
            samples = args.calibration_samples or CALIBRATION_SAMPLES
            if samples < 1:
                raise ValueError(f"--calibration-samples: got {samples}, need >= 1")
            name, calibration = eval_texts(
                args.calibration or args.eval_data, args.adapter, samples, train=True
            )
            say(f"GPTQ calibration on {len(calibration)} training texts of {name}")
        elif args.eval_data:
            raise ValueError("--eval-data: only used with --int4 / --int8")
        report = export_decoder(
            model,
            args.out,
            tokenizer=tokenizer,
            quantize=quantize,
            merge=not args.hot_swap,
            dtype="fp16" if args.fp16 else "fp32",
            block_size=args.block_size,
            symmetric=not args.asymmetric,
            int4_method=args.int4_method if quantize == "int4" else "rtn",
            calibration_texts=calibration,
            lm_head_int8=args.lm_head_int8,
            accuracy_level=args.accuracy_level,
            new_tokens=args.new_tokens,
            eval_texts=texts,
            verify=not args.no_verify,
            overwrite=args.overwrite,
            log=say,
        )
    except VerificationError as exc:
        return fail(exc, 1)
    except (DecoderExportError, ValueError, TypeError, OSError, KeyError) as exc:
        return fail(str(exc).splitlines()[0] if str(exc) else repr(exc), EXIT_BAD_INPUT)
    print(report.table())
    if args.report:
        Path(args.report).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return 0
