"""``lora-ext export``: load a model (+ a trained adapter), export it with lora_ext.export.

    lora-ext export --model minilm --adapter runs/rt/adapter --out model.onnx [--int8]
    lora-ext export --model smollm2 --adapter runs/lm/adapter --out smollm2-genai [--int4]

Heavy modules (torch, transformers, onnx, onnxruntime) are imported when a command runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lora_ext.cli import HelpFormatter
from lora_ext.cli.export_decoder import add_decoder_arguments, is_causal_lm, run_export_decoder
from lora_ext.config import Task

TASKS = tuple(t.value for t in Task)
# example inputs for tracing and verification: two lengths, so padding is exercised
EXAMPLE_TEXTS = (
    "A gripping, beautifully shot film with a terrific lead performance.",
    "Dull and far too long.",
)


def add_export_command(subparsers: Any) -> None:
    """Register ``export`` on an argparse subparsers object (``func``: args -> exit status)."""
    exp = subparsers.add_parser(
        "export",
        formatter_class=HelpFormatter,
        help="export a model (+ LoRA adapter) to ONNX, verified in onnxruntime",
        description=(
            "Merge the adapter into a copy of the model and write an ONNX file with dynamic "
            "batch/sequence axes, checked in onnxruntime against PyTorch (fp32 to 1e-4 "
            "relative). The write is atomic: a failed export leaves nothing at --out."
        ),
    )
    exp.add_argument("--model", required=True, help="transformers model dir, or minilm | smollm2")
    exp.add_argument("--adapter", help="LoRA adapter dir (PEFT layout, as lora-ext train writes)")
    exp.add_argument(
        "--out",
        required=True,
        help="output .onnx file; missing directories are created with it (atomically: "
        "nothing is left if the export fails); the tokenizer is saved there too, for "
        "lora-ext infer. A causal LM: the model folder to write",
    )
    variant = exp.add_mutually_exclusive_group()
    variant.add_argument("--fp16", action="store_true", help="fp16 weights and activations")
    variant.add_argument("--int8", action="store_true", help="int8 dynamic quantization")
    exp.add_argument(
        "--calibration",
        metavar="DATA",
        help="--int8: texts whose activations calibrate the smoothing that keeps int8 close "
        "to fp32: a bundled data set (rotten-tomatoes, bbc-news) or a .csv/.jsonl/.txt file; "
        "its training split is used (validation fraction 0.1, seed 0, as lora-ext train "
        "draws it). Default: the data of the run the adapter comes from (run.json next to "
        "it), else none. A causal LM's --int4 (GPTQ) calibrates on the same split (default: "
        "the adapter's data, else bbc-news)",
    )
    exp.add_argument(
        "--calibration-samples",
        type=int,
        default=None,
        metavar="N",
        help="--int8: texts to calibrate on, half one per run, half in padded batches of 16 "
        "(default 256); causal LM --int4: GPTQ's calibration texts (default 32)",
    )
    exp.add_argument(
        "--accept-low-agreement",
        action="store_true",
        help="write an --int8/--fp16 file even when its argmax agreement with PyTorch on the "
        "verification inputs is below the quality gate (80%%); without it such a file is "
        "refused",
    )
    exp.add_argument("--task", choices=TASKS, help="default: from the model")
    exp.add_argument(
        "--num-labels",
        type=_positive_int,
        default=None,
        help="seq-cls head size without an adapter (2)",
    )
    exp.add_argument(
        "--hot-swap",
        action="store_true",
        help="keep LoRA A/B as graph inputs (needs --adapter); writes <out>.onnx_adapter",
    )
    exp.add_argument(
        "--optimize",
        choices=["bert"],
        default=None,
        help="fuse a BERT-family encoder with onnxruntime's transformer optimizer "
        "(Attention, SkipLayerNorm, BiasGelu, EmbedLayerNorm: com.microsoft contrib ops that "
        "only onnxruntime runs; not faster on the 2-core CPU measured). Default: plain ONNX, "
        "standard ops only",
    )
    exp.add_argument(
        "--all-positions",
        action="store_true",
        help="compute every position of the last layer (default: a classifier that reads "
        "token 0 only gets its last layer for token 0 alone; same logits, ~1/L less work)",
    )
    exp.add_argument("--ort-format", action="store_true", help="also write <stem>.ort")
    exp.add_argument(
        "--opset",
        type=int,
        choices=range(17, 22),
        metavar="{17..21}",
        default=None,
        help="ONNX opset (default 17)",
    )
    exp.add_argument("--external-data", action="store_true", help="weights in <out>.data")
    exp.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check")
    exp.add_argument("--report", help="also write the report as JSON to this file")
    add_decoder_arguments(exp)
    exp.set_defaults(func=run_export)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"got {text!r}, need a whole number >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"got {value}, need >= 1")
    return value


# -- export ------------------------------------------------------------------------------
def _task_of(model_name: str, kind: str, path: Path, task: str | None) -> str:
    if task:
        return task
    if kind == "minilm":
        return "seq-cls"
    if kind == "smollm2":
        return "causal-lm"
    config = json.loads((path / "config.json").read_text())
    arch = " ".join(config.get("architectures") or [])
    for name in config.get("architectures") or []:
        found = Task.from_architecture(name)
        if found is not None:
            return found
    raise ValueError(
        f"--task: cannot tell the task of {model_name!r} (architectures {arch or 'unknown'}); "
        f"pass --task {' or '.join(TASKS)}"
    )


def _adapter_labels(adapter: Path | None) -> list[str] | None:
    """Class names (or just their count) of a classifier adapter, from the files lora-ext
    train writes: lora_ext_task.json, else the head's shape in the safetensors file."""
    from lora_ext.training.heads import read_task_file

    if adapter is None:
        return None
    classes = read_task_file(adapter)  # checked: a malformed file is a one-line error
    if classes:
        return classes
    weights = adapter / "adapter_model.safetensors"
    if weights.is_file():
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if key.endswith(HEAD_WEIGHTS):
                    return [f"LABEL_{i}" for i in range(f.get_slice(key).get_shape()[0])]
    return None


HEAD_WEIGHTS = ("classifier.weight", "score.weight")
_HEAD_KEY = re.compile(r"^(classifier|score)\.(weight|bias)$")


def _adapter_has_head(adapter: Path | None) -> bool:
    weights = None if adapter is None else adapter / "adapter_model.safetensors"
    if weights is None or not weights.is_file():
        return False
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        return any(k.endswith(HEAD_WEIGHTS) for k in f.keys())  # noqa: SIM118


class _HeadMissingFilter(logging.Filter):
    """Drops transformers' load report when all it says is that the classification head is
    MISSING ("newly initialized ... consider training"): the adapter supplies that head."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "LOAD REPORT" not in message:
            return True
        rows = [line.split("|") for line in message.splitlines() if line.count("|") >= 2]
        statuses = [(r[0].strip(), r[1].strip()) for r in rows if r[1].strip() and r[0].strip()]
        statuses = [(k, st) for k, st in statuses if k != "Key"]
        return not statuses or not all(st == "MISSING" and _HEAD_KEY.match(k) for k, st in statuses)


@contextlib.contextmanager
def _quiet_head_report(active: bool) -> Iterator[None]:
    names = ("transformers.modeling_utils", "transformers.utils.loading_report")
    loggers = [logging.getLogger(n) for n in names] if active else []
    flt = _HeadMissingFilter()
    for lg in loggers:
        lg.addFilter(flt)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(flt)


def load_for_export(
    model_name: str, adapter: str | None, task: str | None, num_labels: int | None
) -> tuple[Any, Any, str]:
    """(model in float32 eval mode with the adapter loaded, tokenizer, task)."""
    from lora_ext.training import models

    kind, path = models.resolve_model(model_name)
    task = _task_of(model_name, kind, path, task)
    adapter_dir = None
    if adapter is not None:
        adapter_dir = Path(adapter)
        if not (adapter_dir / "adapter_config.json").is_file():
            raise FileNotFoundError(
                f"--adapter: {adapter!r} has no adapter_config.json (need a PEFT adapter dir)"
            )
    labels = _adapter_labels(adapter_dir) if task == "seq-cls" else None
    if labels and num_labels and num_labels != len(labels):
        raise ValueError(
            f"--num-labels: got {num_labels}, but the adapter's head has {len(labels)}"
        )
    # the head size: --num-labels, else the adapter's head, else the model's own config
    head_size = (num_labels or (len(labels) if labels else None)) if task == "seq-cls" else None
    try:
        with _quiet_head_report(task == "seq-cls" and _adapter_has_head(adapter_dir)):
            model, tokenizer = models.load_model(model_name, task, num_labels=head_size)
    except ValueError as exc:
        raise ValueError(f"--task: {exc}") from None
    if adapter_dir is not None:
        from lora_ext.training.trainer import (
            load_trained_adapter,  # LoRA tensors + the trained head
        )

        load_trained_adapter(model, adapter_dir)
    return model.eval(), tokenizer, task


def calibration_inputs(
    tokenizer: Any,
    data: str | None,
    adapter: str | None,
    samples: int | None,
    say: Any = print,
    max_length: int = 128,
) -> list[dict[str, Any]] | None:
    """int8 calibration inputs: the first ``samples`` texts of a data set's training split
    (half one per run, half in padded batches: quantize.calibration_runs; ``samples`` None:
    quantize.CALIBRATION_SAMPLES). ``data`` None: the data of the ``lora-ext train`` run that
    wrote ``adapter`` (its run.json), else None."""
    from lora_ext.export.quantize import CALIBRATION_SAMPLES, calibration_runs
    from lora_ext.training import data as D

    if samples is None:
        samples = CALIBRATION_SAMPLES
    if samples < 1:
        raise ValueError(f"--calibration-samples: got {samples}, need >= 1")
    val_fraction, seed, columns = 0.1, 0, {}
    if data is None and adapter is not None:
        run_file = Path(adapter).resolve().parent / "run.json"
        if run_file.is_file():
            config = json.loads(run_file.read_text()).get("config", {})
            data = config.get("data")
            val_fraction = config.get("val_fraction", val_fraction)
            seed = config.get("seed", seed)
            columns = {
                k: config[k] for k in ("text_column", "label_column") if config.get(k) is not None
            }
    if data is None:
        say(
            "int8 without calibration data (no --calibration, no run.json next to the "
            "adapter): plain dynamic quantization, less accurate"
        )
        return None
    try:
        split = D.split_dataset(D.load_dataset(data, **columns), val_fraction, seed)
    except D.DataError as exc:
        raise ValueError(f"--calibration: {exc}") from exc
    texts = [t for t in split.train.texts if t.strip()][:samples]
    say(f"int8 calibration: {len(texts)} texts from the training split of {data}")
    return calibration_runs(tokenizer, texts, max_length=max_length)


def example_inputs(tokenizer: Any) -> dict[str, Any]:
    """The example batch the export traces: input_ids and attention_mask, as ``lora-ext
    train --export`` passes them, so both commands write the same graph inputs (a model
    that takes token_type_ids gets zeros, its default; the runner feeds what the graph
    declares)."""
    enc = tokenizer(list(EXAMPLE_TEXTS), padding=True, return_tensors="pt")
    return {k: enc[k] for k in ("input_ids", "attention_mask") if k in enc}


def run_export(args: argparse.Namespace) -> int:
    """``lora-ext export``: returns 0 on success, 1 on a failed export (message printed)."""
    from lora_ext.export._io import check_output_path
    from lora_ext.export.exporter import DEFAULT_OPSET, VerificationError, export_onnx

    if is_causal_lm(args):  # an onnxruntime-genai folder: cli/export_decoder.py
        return run_export_decoder(args)

    def say(msg: str) -> None:
        print(f"[export] {msg}", file=sys.stderr, flush=True)

    try:
        check_output_path(args.out, arg="--out", make_parents=True)  # before loading anything
        if args.hot_swap and not args.adapter:
            raise ValueError("--hot-swap: needs --adapter (the adapted layers become inputs)")
        say(f"loading {args.model}" + (f" + adapter {args.adapter}" if args.adapter else ""))
        model, tokenizer, task = load_for_export(
            args.model, args.adapter, args.task, args.num_labels
        )
        example = example_inputs(tokenizer)
        calibration = None
        if args.int8:
            calibration = calibration_inputs(
                tokenizer, args.calibration, args.adapter, args.calibration_samples, say
            )
        elif args.calibration:
            raise ValueError("--calibration: only used with --int8")
        report = export_onnx(
            model,
            example,
            args.out,
            dtype="fp16" if args.fp16 else "fp32",
            quantize="int8" if args.int8 else None,
            verify=not args.no_verify,
            merge=not args.hot_swap,
            optimize=args.optimize,
            opset=args.opset or DEFAULT_OPSET,
            external_data=True if args.external_data else None,
            ort_format=args.ort_format,
            calibration=calibration,
            task=task,
            first_token_only=False if args.all_positions else None,
            log=say,
            accept_low_agreement=args.accept_low_agreement,
            make_parents=True,
        )
    except (ValueError, TypeError, OSError, VerificationError) as exc:
        print(f"lora-ext export: error: {exc}", file=sys.stderr)
        return 1
    tokenizer_dir = Path(args.out).parent
    if not (tokenizer_dir / "tokenizer_config.json").exists():
        # `lora-ext infer --onnx` finds it here without --tokenizer
        tokenizer.save_pretrained(tokenizer_dir)
    print(report.table())
    if args.report:
        Path(args.report).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return 0
