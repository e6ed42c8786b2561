"""A LoRA-tuned causal LM as an onnxruntime-genai model folder: KV cache, fp32 or int4
weights, verified token for token against PyTorch before anything is written.

    from lora_ext.export import export_decoder, save_decoder_adapter, DecoderRunner
    report = export_decoder(model, "out/smollm2-genai", tokenizer=tok)             # fp32
    report = export_decoder(model, "out/smollm2-int4", tokenizer=tok, quantize="int4",
                            calibration_texts=train_texts,                 # GPTQ (else RTN)
                            eval_texts=held_out)                           # + quality
    DecoderRunner("out/smollm2-genai", tok).generate(["The capital of France is"])
    export_decoder(model, "out/hot", tokenizer=tok, merge=False)  # + out/hot/adapter.onnx_adapter
    save_decoder_adapter(other_model, "out/hot", "other")         # another adapter, same base

What we chose and why (measured on SmolLM2-135M, 2 cores):
- The graph is written by onnxruntime-genai's own model builder
  (``onnxruntime_genai.models.builder``), driven on the *merged* model saved with
  ``save_pretrained``. The builder is what that runtime's users already trust: its graph
  uses onnxruntime's ``GroupQueryAttention`` (rotary and the KV cache inside one kernel,
  ``past_present_share_buffer`` in genai), so decode time barely grows with the context, and
  onnxruntime-genai loads it as is. A torch.onnx export with a concatenated cache would be
  slower per token and would need its own genai plumbing; writing our own builder would be
  a second copy of theirs. Its fp32 graph matched PyTorch to 1.8e-6 relative on SmolLM2.
- What the builder lacks, we add: merging the adapter on a copy (our op's fp32-accumulated
  merge), checks of the input before any work (a decoder, a supported architecture, the
  tokenizer fitting the vocab, the output folder), verification of the staged folder against
  PyTorch ``generate(use_cache=True)`` (greedy tokens equal for every prompt, a divergence
  accepted only at a near-tie and reported; the step logits of the cached decode within
  1e-4 relative), loading the folder in onnxruntime-genai and generating the same tokens
  there, the quality report of int4 (next-token agreement and perplexity against fp32
  PyTorch on held-out text), and the atomic write of the whole folder.
- Hot-swap (``merge=False``): the builder's own LoRA path (``adapter_path``: the adapter in
  PEFT's format, which ``lora_ext.save_adapter`` writes) emits each adapted projection as
  ``x W + (x A') B'`` with A', B' as initializers; we turn those into optional graph inputs of
  dynamic rank ``lora_r`` with empty defaults (Olive's ExtractAdapters scheme: no adapter =
  the base model), keep them float over int4 weights (``nodes_to_exclude``), and write each
  adapter as an onnxruntime ``.onnx_adapter`` file that ``og.Adapters`` and our runner load.
  Verified with the adapter active against the merged model and without it against the base.
- GPT-2 (the builder has none): our own KV-cache graph, traced with torch.onnx from a
  flat-cache GPT-2 forward (``kv_graph.py``; concatenated cache, ``position_ids`` input),
  with a ``genai_config.json`` of model type ``"decoder"``, onnxruntime-genai's generic
  decoder-only model, which 0.18 runs. Same verification, int4 through the same quantizer
  (``kv_graph.quantize_weights``; the tied LM head and the embedding stay fp32), hot-swap
  with LoRA inputs traced into the graph.
- int4: the builder's path to onnxruntime's ``MatMulNBitsQuantizer`` (``MatMulNBits``
  weights, block-wise, RTN by default; ``k_quant`` as an option; symmetric or not; the
  tied embedding shares the int4 lm_head through ``GatherBlockQuantized``; the last MatMul,
  lm_head, in int8 by option), then optionally GPTQ (``int4_method="gptq"``,
  weight_only.py) on that same grid and layout, calibrated on ``calibration_texts``: same
  size and speed, closer to fp32 (SmolLM2: 69.1% next-token agreement against RTN's 58.7%).
  The int4 folder is checked to load and generate in onnxruntime-genai and its quality is
  measured; token equality is not required of it.

The folder: ``model.onnx`` + ``model.onnx.data``, ``genai_config.json``, the tokenizer files
(``tokenizer.json``, ``tokenizer_config.json``) and ``lora_ext.json`` (this report).
Inputs ``input_ids`` [batch, seq], ``attention_mask`` [batch, total_seq],
``past_key_values.%d.key/value`` [batch, kv_heads, past_seq, head_size]; outputs ``logits``
[batch, seq, vocab] and ``present.%d.key/value``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._io import staging_dir
from .exporter import VerificationError

# transformers architecture -> genai model type, for the architectures the builder writes and
# these tests cover (Mistral is Llama's layer with sliding-window config; the builder takes it)
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "GPT2LMHeadModel": "decoder",  # our own graph (kv_graph.py): genai's generic decoder
}
# architectures whose graph we trace ourselves (kv_graph.py); the builder writes the others
OWN_GRAPH = frozenset({"GPT2LMHeadModel"})
QUANTIZE_CHOICES = (None, "int4", "int8")
INT4_METHODS = ("rtn", "k_quant", "gptq")
DEFAULT_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "To make a cup of tea, first",
)
LOGITS_RTOL = 1e-4  # step logits: max|onnx - torch| / max|torch|, fp32
NEAR_TIE = 1e-3  # a divergence is accepted where torch's top-2 gap <= this * max|logits|
REPORT_NAME = "lora_ext.json"


class DecoderExportError(ValueError):
    """Bad input to export_decoder (the CLI prints it as one line, exit status 2)."""


@dataclass
class PromptCheck:
    """One prompt's greedy run: ours against PyTorch ``generate(use_cache=True)``."""

    prompt: str
    tokens: int  # new tokens compared
    equal: bool  # all equal
    diverged_at: int | None = None  # step of the first differing token, if any
    near_tie_gap: float | None = None  # torch's logit gap there, relative to max|logits|
    max_rel_logits: float = 0.0  # over the compared steps
    genai_equal: bool | None = None  # onnxruntime-genai's greedy tokens equal ours


@dataclass
class Int4Quality:
    """Teacher-forced quality on held-out text: the int4 folder against fp32 PyTorch."""

    texts: int
    tokens: int
    agreement: float  # argmax next token equal to fp32 PyTorch's, fraction of positions
    perplexity: float  # the int4 folder's
    perplexity_fp32: float  # fp32 PyTorch's, same positions


@dataclass
class DecoderReport:
    """What export_decoder wrote and checked."""

    path: str
    architecture: str
    model_type: str
    precision: str  # fp32 | int4 | int8
    merged: bool
    files: list[str] = field(default_factory=list)
    size_bytes: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    checks: list[PromptCheck] = field(default_factory=list)
    max_rel_logits: float | None = None
    quality: Int4Quality | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    adapter_files: list[str] = field(default_factory=list)  # hot-swap: .onnx_adapter files
    lora_inputs: int = 0  # hot-swap: LoRA graph inputs (A and B per adapted layer)
    base_checks: list[PromptCheck] = field(default_factory=list)  # hot-swap, no adapter

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        lines = [
            f"{self.path}: {self.architecture} ({self.model_type}), {self.precision}, "
            f"{self.size_bytes / 1e6:.1f} MB",
        ]
        if not self.merged:
            lines.append(
                f"  hot-swap: {self.lora_inputs} LoRA inputs, adapter file(s) "
                f"{', '.join(self.adapter_files)}; checks with the adapter active, then without"
            )
        for c in self.checks + self.base_checks:
            if c.equal:
                what = f"{c.tokens} tokens equal"
            elif self.precision != "fp32":
                what = f"first differs at token {c.diverged_at} ({self.precision}: not required)"
            else:
                what = f"diverged at token {c.diverged_at} at a near-tie (gap {c.near_tie_gap:.2e})"
            genai = (
                ""
                if c.genai_equal is None
                else f", genai {'same' if c.genai_equal else 'DIFFERENT'}"
            )
            lines.append(
                f"  {c.prompt[:40]!r}: {what}, step logits max rel {c.max_rel_logits:.2e}{genai}"
            )
        if self.quality is not None:
            q = self.quality
            lines.append(
                f"  {self.precision} vs fp32 PyTorch on {q.texts} held-out texts ({q.tokens} "
                f"tokens): next-token agreement {q.agreement:.1%}, perplexity "
                f"{q.perplexity:.3f} (fp32 {q.perplexity_fp32:.3f})"
            )
        return "\n".join(lines)


# -- checks before any work -------------------------------------------------------------
def check_decoder(model: Any, tokenizer: Any) -> tuple[str, str]:
    """(architecture, genai model type) of a supported causal LM whose tokenizer fits.

    Raises:
        DecoderExportError: not a decoder, an unsupported architecture, or a tokenizer whose
            ids do not fit the model's vocab.
    """
    config = getattr(model, "config", None)
    name = type(model).__name__
    if config is None or not hasattr(model, "generate"):
        raise DecoderExportError(
            f"model: got a {name}, need a transformers causal LM (...ForCausalLM)"
        )
    if getattr(config, "is_encoder_decoder", False) or not (
        name.endswith("ForCausalLM") or name.endswith("LMHeadModel")
    ):
        raise DecoderExportError(
            f"model: got a {name}, which is not a decoder-only causal LM; need a "
            f"...ForCausalLM ({', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    if name not in SUPPORTED_ARCHITECTURES:
        raise DecoderExportError(
            f"model: the architecture {name} is not supported for a genai folder; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if name in OWN_GRAPH:
        from .kv_graph import check_gpt2

        try:
            check_gpt2(model)
        except ValueError as exc:
            raise DecoderExportError(str(exc)) from None
    if tokenizer is None:
        raise DecoderExportError("tokenizer: got None, need the model's tokenizer")
    vocab = int(config.vocab_size)
    n_tok = len(tokenizer)
    if n_tok > vocab:
        raise DecoderExportError(
            f"tokenizer: has {n_tok} tokens but the model's vocab_size is {vocab}; it is not "
            "this model's tokenizer"
        )
    for attr in ("eos_token_id", "bos_token_id", "pad_token_id"):
        tid = getattr(tokenizer, attr, None)
        if tid is not None and not 0 <= int(tid) < vocab:
            raise DecoderExportError(
                f"tokenizer: {attr} {tid} is outside the model's vocab (size {vocab})"
            )
    return name, SUPPORTED_ARCHITECTURES[name]


def check_output_dir(out: str | os.PathLike, overwrite: bool, arg: str = "out") -> Path:
    """The output folder, checked: its parent exists and is writable, and it is absent or
    empty (or ``overwrite``)."""
    target = Path(out).expanduser().absolute()
    parent = target.parent
    if not parent.is_dir():
        raise DecoderExportError(f"{arg}: the directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DecoderExportError(f"{arg}: {str(parent)!r} is not writable")
    if target.exists():
        if not target.is_dir():
            raise DecoderExportError(f"{arg}: {str(target)!r} is a file, need a folder path")
        if any(target.iterdir()) and not overwrite:
            raise DecoderExportError(
                f"{arg}: {str(target)!r} exists and is not empty; pass overwrite=True "
                "(--overwrite) to replace it"
            )
    return target


# -- the builder -----------------------------------------------------------------------
def _plain_fp32(model: Any) -> Any:
    """A float32 eval copy of ``model``; a GGUF-loaded model (weights already dequantized)
    loses the gguf quantizer that ``.float()`` and ``save_pretrained`` refuse."""
    import torch

    out = copy.deepcopy(model).eval()
    if getattr(out, "hf_quantizer", None) is not None:
        out.hf_quantizer = None
    if getattr(out, "is_quantized", False):
        out.is_quantized = False
    if hasattr(out.config, "quantization_config"):
        del out.config.quantization_config
    out = out.float()
    out.config.dtype = torch.float32
    return out


def _save_merged(model: Any, tokenizer: Any, hf_dir: Path) -> Any:
    """Merge the active LoRA adapters on a copy and save it (fp32, safetensors) with the
    tokenizer. Returns the merged copy (eval mode)."""
    from lora_ext.inject import lora_layers, merge_and_unload

    merged = _plain_fp32(model)
    if lora_layers(merged):
        merge_and_unload(merged)
    merged.save_pretrained(hf_dir, safe_serialization=True)
    tokenizer.save_pretrained(hf_dir)
    return merged


def _save_base_and_adapter(
    model: Any, tokenizer: Any, hf_dir: Path, adapter_dir: Path
) -> tuple[Any, Any]:
    """Hot-swap: save the base (LoRA layers unwrapped, nothing merged) with the tokenizer, and
    the active adapter in PEFT's format. Returns (merged copy, base copy), float32 eval."""
    from lora_ext.inject import merge_and_unload
    from lora_ext.io import save_adapter

    plain = _plain_fp32(model)
    save_adapter(plain, adapter_dir)
    base = _base_copy(plain)
    base.save_pretrained(hf_dir, safe_serialization=True)
    tokenizer.save_pretrained(hf_dir)
    return merge_and_unload(plain), base


def _builder_options(
    precision: str,
    block_size: int,
    symmetric: bool,
    method: str,
    lm_head_int8: bool,
    accuracy_level: int,
) -> dict[str, str]:
    if precision == "fp32":
        return {}
    opts = {
        "block_size": str(block_size),
        "is_symmetric": "true" if symmetric else "false",
        "accuracy_level": str(accuracy_level),
        "algo_config": "default" if method in ("rtn", "gptq") else method,
    }
    if lm_head_int8:
        opts["matmul_mixed_precision"] = "last_matmul:int8"
    return opts


def write_own_folder(
    model: Any,
    tokenizer: Any,
    folder: Path,
    precision: str,
    options: dict[str, str],
    lora: dict[str, np.ndarray] | None = None,
    calibration: Sequence[Sequence[int]] = (),
) -> None:
    """A genai folder with our own KV-cache graph (kv_graph.py, GPT-2): the traced graph
    (LoRA inputs optional for hot-swap: ``lora``, decoder_adapter_tensors of the adapter,
    gives their names and shapes), genai_config.json and the tokenizer files, then for
    int4/int8 the weight-only quantization (``options``: block_size, is_symmetric,
    accuracy_level, algo_config; GPTQ over RTN with ``calibration`` token rows)."""
    import onnx

    from . import kv_graph, weight_only

    folder.mkdir()
    onnx_path = folder / "model.onnx"
    pairs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in sorted(lora or {}):
        module, _, which = name.partition(".lora_")
        if which.startswith("A."):
            pairs[module] = (lora[name], lora[f"{module}.lora_B.MatMul.weight"])  # type: ignore[index]
    kv_graph.export_gpt2_graph(model, onnx_path, pairs)
    if pairs:
        kv_graph.lora_inputs_optional(onnx_path)
    config = kv_graph.genai_config(model, tokenizer, onnx_path.name)
    (folder / "genai_config.json").write_text(json.dumps(config, indent=4) + "\n")
    tokenizer.save_pretrained(folder)
    if precision == "fp32":
        return
    fp32_dir = folder.parent / "fp32_reference"
    if calibration:
        fp32_dir.mkdir()
        for f in (onnx_path, folder / "model.onnx.data"):
            shutil.copy2(f, fp32_dir / f.name)
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    lora_nodes = [n.name for n in graph.node if any(".lora_" in i for i in n.input)]
    method = options["algo_config"]
    weight_only.quantize_weights(
        onnx_path,
        bits=4 if precision == "int4" else 8,
        block_size=int(options["block_size"]),
        symmetric=options["is_symmetric"] == "true",
        method="k_quant" if method == "k_quant" else "rtn",
        accuracy_level=int(options["accuracy_level"]),
        exclude=lora_nodes,  # adapters stay float
    )
    if calibration:
        apply_gptq(folder, fp32_dir / onnx_path.name, calibration, int(options["block_size"]))
        shutil.rmtree(fp32_dir)


def apply_gptq(
    folder: Path, fp32_path: Path, calibration: Sequence[Sequence[int]], block_size: int
) -> int:
    """GPTQ over the RTN int4 weights of a staged folder (weight_only.gptq_layers, the LM
    head included), calibrated by prefill runs of ``fp32_path`` (the fp32 graph of the same
    model) on the token rows ``calibration``. Returns the number of MatMuls re-quantized."""
    from . import weight_only
    from .runner import DecoderRunner

    runner = DecoderRunner(folder, threads=None)
    feeds = [runner.feeds(np.asarray([row], dtype=np.int64)) for row in calibration]
    del runner
    return weight_only.gptq_layers(folder / "model.onnx", fp32_path, feeds, block_size, True)


def run_builder(hf_dir: Path, out_dir: Path, precision: str, options: dict[str, str]) -> str:
    """onnxruntime-genai's model builder on a saved transformers folder, CPU EP, in process
    with its console output captured. Returns that output (for errors)."""
    from onnxruntime_genai.models import builder

    cache = out_dir.parent / (out_dir.name + ".cache")
    buf = io.StringIO()
    quiet = [logging.getLogger(n) for n in ("onnxruntime", "onnxruntime.quantization", "")]
    levels = [lg.level for lg in quiet]
    try:
        for lg in quiet:
            lg.setLevel(logging.WARNING)
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            extra = builder.parse_extra_options(
                None,
                str(hf_dir),
                str(out_dir),
                precision,
                "cpu",
                str(cache),
                [f"{k}={v}" for k, v in options.items()],
            )
            builder.create_model(
                None, str(hf_dir), str(out_dir), precision, "cpu", str(cache), **extra
            )
    except Exception as exc:
        tail = buf.getvalue().strip().splitlines()[-3:]
        raise RuntimeError(
            f"onnxruntime-genai's builder failed: {exc} ({' | '.join(tail)})"
        ) from exc
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)
        shutil.rmtree(cache, ignore_errors=True)
    return buf.getvalue()


# -- verification ---------------------------------------------------------------------
def torch_greedy(merged: Any, ids: list[int], new_tokens: int) -> tuple[list[int], np.ndarray]:
    """PyTorch ``generate(use_cache=True)``, greedy, ``new_tokens`` tokens (EOS does not
    stop it). Returns (tokens, step logits [new_tokens, vocab] float32)."""
    import torch
    from transformers import GenerationConfig

    gen = GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=0,
        do_sample=False,
        use_cache=True,
        eos_token_id=None,
        pad_token_id=merged.config.pad_token_id if merged.config.pad_token_id is not None else 0,
        return_dict_in_generate=True,
        output_logits=True,
    )
    saved = merged.generation_config.eos_token_id
    merged.generation_config.eos_token_id = None  # else generate falls back to it and stops
    try:
        with torch.inference_mode():
            out = merged.generate(torch.tensor([ids]), generation_config=gen)
    finally:
        merged.generation_config.eos_token_id = saved
    tokens = out.sequences[0, len(ids) :].tolist()
    logits = torch.stack([s[0] for s in out.logits]).float().numpy()
    return tokens, logits


def compare_greedy(
    prompt: str, ours: list[int], ours_logits: np.ndarray, ref: list[int], ref_logits: np.ndarray
) -> PromptCheck:
    """Token equality with the near-tie rule, and the step logits' relative error over the
    steps where both runs saw the same prefix."""
    n = min(len(ours), len(ref))
    diverged = next((i for i in range(n) if ours[i] != ref[i]), None)
    upto = n if diverged is None else diverged + 1
    scale = float(np.abs(ref_logits[:upto]).max())
    rel = float(np.abs(ours_logits[:upto] - ref_logits[:upto]).max() / scale)
    check = PromptCheck(prompt, n, diverged is None, diverged, None, rel)
    if diverged is not None:
        row = ref_logits[diverged]
        check.near_tie_gap = float((row[ref[diverged]] - row[ours[diverged]]) / np.abs(row).max())
    return check


def genai_greedy(
    model: Any, ids: list[int], new_tokens: int, adapters: Any = None, name: str | None = None
) -> list[int]:
    """onnxruntime-genai's own greedy run with an ``og.Model`` (and an adapter of
    ``og.Adapters`` made active); it stops at EOS, which it returns."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + new_tokens, do_sample=False)
    gen = og.Generator(model, params)
    if adapters is not None:
        gen.set_active_adapter(adapters, name)
    gen.append_tokens(ids)
    out: list[int] = []
    while not gen.is_done() and len(out) < new_tokens:
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out


def teacher_forced_quality(
    runner: Any, merged: Any, token_rows: Sequence[Sequence[int]]
) -> Int4Quality:
    """Next-token agreement and perplexity of ``runner``'s graph against fp32 PyTorch, on
    token sequences (each [len] ints, len >= 2), one prefill each."""
    import torch

    agree = total = 0
    nll_ours = nll_ref = 0.0
    for row in token_rows:
        ids = np.asarray(row, dtype=np.int64)[None]
        ours = runner.score(ids)[0].astype(np.float64)  # [len, vocab]
        with torch.inference_mode():
            ref = merged(torch.from_numpy(ids)).logits[0].double().numpy()
        target = ids[0, 1:]
        agree += int((ours[:-1].argmax(-1) == ref[:-1].argmax(-1)).sum())
        total += len(target)
        for logits, acc in ((ours, "o"), (ref, "r")):
            lg = logits[:-1]
            m = lg.max(-1, keepdims=True)
            logp = lg - m - np.log(np.exp(lg - m).sum(-1, keepdims=True))
            nll = float(-logp[np.arange(len(target)), target].sum())
            if acc == "o":
                nll_ours += nll
            else:
                nll_ref += nll
    return Int4Quality(
        texts=len(token_rows),
        tokens=total,
        agreement=agree / max(total, 1),
        perplexity=math.exp(nll_ours / max(total, 1)),
        perplexity_fp32=math.exp(nll_ref / max(total, 1)),
    )


def encode_texts(tokenizer: Any, texts: Sequence[str], max_tokens: int = 128) -> list[list[int]]:
    """Token ids of each text (at most ``max_tokens``; texts under 2 tokens are dropped)."""
    rows = []
    for t in texts:
        ids = list(tokenizer(t)["input_ids"])[:max_tokens]
        if len(ids) >= 2:
            rows.append(ids)
    return rows


# -- hot-swap: LoRA weights as optional graph inputs, adapters as .onnx_adapter files ----
def builder_lora_name(module: str, which: str) -> str:
    """The builder's initializer name of one LoRA matrix: ``model.layers.0.self_attn.q_proj``
    and "A" -> ``model.layers.0.attn.q_proj.lora_A.MatMul.weight`` (layout [in, r] for A,
    [r, out] for s*B, as MatMul takes them)."""
    return f"{module.replace('.self_attn.', '.attn.')}.lora_{which}.MatMul.weight"


def builder_lora_node(module: str, which: str) -> str:
    """The builder's MatMul node of one LoRA matrix (to keep it out of int4 quantization)."""
    parts = module.replace(".self_attn.", ".attn.").split(".")
    # model.layers.0.attn.q_proj -> /model/layers.0/attn/q_proj/lora_A/MatMul
    return "/" + "/".join(
        [parts[0], f"{parts[1]}.{parts[2]}", *parts[3:], f"lora_{which}", "MatMul"]
    )


def decoder_adapter_tensors(model: Any) -> dict[str, np.ndarray]:
    """The active (unmerged) adapter of a lora_ext model as the hot-swap inputs of a decoder
    folder: {builder name: float32 [in, r] (A transposed) or [r, out] (scale * B
    transposed)}."""
    from .adapters import adapter_tensors

    out = {}
    for key, value in adapter_tensors(model).items():
        module, _, which = key.rpartition(".lora_")
        out[builder_lora_name(module, which[0])] = value
    return out


def graph_lora_inputs(onnx_path: Path) -> dict[str, tuple[int | str, int | str]]:
    """{name: shape} of a folder graph's LoRA inputs (empty for a merged folder)."""
    import onnx

    g = onnx.load(str(onnx_path), load_external_data=False).graph
    shapes = {}
    for i in g.input:
        if ".lora_A." in i.name or ".lora_B." in i.name:
            dims = i.type.tensor_type.shape.dim
            shapes[i.name] = tuple(
                d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims
            )
    return shapes


def lora_to_inputs(onnx_path: Path) -> dict[str, np.ndarray]:
    """Turn the LoRA initializers of a builder graph into graph inputs of dynamic rank
    ``lora_r`` whose defaults are empty (rank 0: the base model), as Olive's ExtractAdapters
    does; the model is saved in place (weights in ``<name>.data``). Returns the tensors
    removed {name: array}."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from ._io import save_model
    from .adapters import LORA_R

    model = onnx.load(str(onnx_path))
    taken: dict[str, np.ndarray] = {}
    for init in model.graph.initializer:
        is_a, is_b = ".lora_A." in init.name, ".lora_B." in init.name
        if not (is_a or is_b):
            continue
        arr = numpy_helper.to_array(init)
        taken[init.name] = arr
        shape = [arr.shape[0], LORA_R] if is_a else [LORA_R, arr.shape[1]]
        empty = np.zeros((arr.shape[0], 0) if is_a else (0, arr.shape[1]), dtype=arr.dtype)
        init.CopyFrom(numpy_helper.from_array(empty, init.name))
        model.graph.input.append(helper.make_tensor_value_info(init.name, TensorProto.FLOAT, shape))
    for stale in onnx_path.parent.glob(onnx_path.name + ".data"):
        stale.unlink()
    save_model(model, onnx_path, external_data=True)
    return taken


def save_decoder_adapter(model: Any, folder: str | os.PathLike, name: str = "adapter") -> Path:
    """Write the active adapter of ``model`` (lora_ext LoRA layers, unmerged) as
    ``<folder>/<name>.onnx_adapter`` for a hot-swap folder (``export_decoder(merge=False)``)
    of the same base; onnxruntime-genai loads it with ``og.Adapters``, ``DecoderRunner`` with
    ``set_adapter``. Checked against the folder's LoRA inputs first (names, in/out sizes):
    an adapter for another base fails with a message. The write is atomic.

    Returns: the adapter file's path.
    """
    from ._io import commit
    from .adapters import ADAPTER_SUFFIX, write_adapter_file

    folder = Path(folder)
    config = json.loads((folder / "genai_config.json").read_text())
    wanted = graph_lora_inputs(folder / config["model"]["decoder"]["filename"])
    if not wanted:
        raise DecoderExportError(
            f"folder: {str(folder)!r} was exported merged (no LoRA inputs); export the base "
            "with merge=False (--hot-swap)"
        )
    try:
        tensors = decoder_adapter_tensors(model)
    except ValueError as exc:
        raise DecoderExportError(str(exc)) from None
    for key, value in tensors.items():
        if key not in wanted:
            raise DecoderExportError(
                f"model: its adapter has {key!r}, which is not a LoRA input of {folder.name} "
                f"(the base adapts {len(wanted) // 2} layers, e.g. {next(iter(wanted))!r}): an "
                "adapter for another base or other target modules"
            )
        fixed = 0 if ".lora_A." in key else 1
        if value.shape[fixed] != wanted[key][fixed]:
            raise DecoderExportError(
                f"model: its adapter's {key!r} has shape {list(value.shape)}, the base needs "
                f"{list(wanted[key])}: an adapter for another base"
            )
    target = folder / f"{name}{ADAPTER_SUFFIX}"
    with staging_dir(target, arg="folder") as tmp:
        staged = tmp / target.name
        write_adapter_file(tensors, staged)
        commit([staged], folder)
    return target


def _base_copy(model: Any) -> Any:
    """A copy of ``model`` with every LoraLinear replaced by its (unmerged) base layer."""
    from lora_ext.inject import lora_layers

    base = copy.deepcopy(model)
    for name, layer in lora_layers(base):
        parent, _, child = name.rpartition(".")
        setattr(base.get_submodule(parent) if parent else base, child, layer.base_layer)
    return base


# -- the export -----------------------------------------------------------------------
def folder_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file())


def commit_folder(staged: Path, target: Path) -> None:
    """Move a staged folder to ``target`` by renames on one file system: a reader sees the
    old folder or the new one. An existing target is moved aside first and removed after."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.replace(target, old)
    try:
        os.replace(staged, target)
    except OSError:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _verify_prompts(
    runner: Any,
    genai_model: Any,
    genai_adapters: Any,
    adapter_name: str | None,
    reference: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    new_tokens: int,
    precision: str,
) -> list[PromptCheck]:
    """Greedy runs of the staged folder (our runner as set up, and onnxruntime-genai with
    the same adapter) against PyTorch ``reference``; raises VerificationError on a miss
    (fp32: tokens, near-ties aside, and step logits; int4/int8: finite logits)."""
    checks = []
    for prompt in prompts:
        ids = list(tokenizer(prompt)["input_ids"])
        if not ids:
            raise DecoderExportError(f"prompts: {prompt!r} tokenizes to nothing")
        ref, ref_logits = torch_greedy(reference, ids, new_tokens)
        res = runner.generate(
            [ids], max_new_tokens=new_tokens, stop_at_eos=False, return_logits=True
        )
        check = compare_greedy(prompt, res.tokens[0], res.logits[0], ref, ref_logits)
        theirs = genai_greedy(genai_model, ids, new_tokens, genai_adapters, adapter_name)
        check.genai_equal = bool(theirs) and theirs == res.tokens[0][: len(theirs)]
        checks.append(check)
        if precision != "fp32":
            if not np.isfinite(res.logits[0]).all():
                raise VerificationError(f"verify: {precision} folder gave non-finite logits")
            continue
        if check.max_rel_logits > LOGITS_RTOL:
            raise VerificationError(
                f"verify: step logits differ from PyTorch by {check.max_rel_logits:.2e} "
                f"relative on {prompt!r} (need <= {LOGITS_RTOL:g}); nothing written"
            )
        if not check.equal and check.near_tie_gap > NEAR_TIE:
            raise VerificationError(
                f"verify: greedy tokens differ from PyTorch at token {check.diverged_at} of "
                f"{prompt!r}, not at a near-tie (gap {check.near_tie_gap:.2e} > {NEAR_TIE:g}); "
                "nothing written"
            )
        if not check.genai_equal:
            raise VerificationError(
                f"verify: onnxruntime-genai's greedy tokens differ from our runner's on "
                f"{prompt!r}; nothing written"
            )
    return checks


def export_decoder(
    model: Any,
    out: str | os.PathLike,
    tokenizer: Any,
    quantize: str | None = None,
    merge: bool = True,
    adapter_name: str = "adapter",
    dtype: str = "fp32",
    block_size: int = 32,
    symmetric: bool = True,
    int4_method: str | None = None,
    calibration_texts: Sequence[str] | None = None,
    lm_head_int8: bool = False,
    accuracy_level: int = 4,
    prompts: Sequence[str] | None = None,
    new_tokens: int = 32,
    eval_texts: Sequence[str] | None = None,
    verify: bool = True,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> DecoderReport:
    """Write ``model`` (LoRA merged on a copy) as an onnxruntime-genai folder at ``out``.

    Args:
        model: a transformers causal LM (Llama, Mistral, Qwen2, GPT-2), with or without lora_ext
            adapters; never changed.
        out: the folder to write (absent or empty, or ``overwrite``).
        tokenizer: its tokenizer (saved into the folder).
        quantize: None (fp32), "int4" or "int8" (weight-only MatMulNBits).
        merge: True: the adapter merged into the weights. False (hot-swap): the adapted
            layers keep LoRA A/B as optional graph inputs of dynamic rank (empty defaults:
            the base model), and the active adapter is written as
            ``<adapter_name>.onnx_adapter`` (``save_decoder_adapter`` writes more for the
            same base); verified with the adapter active against the merged model and
            without it against the base. Adapters stay float over int4 weights.
        dtype: "fp32" (fp16 genai folders need a GPU execution provider).
        block_size, symmetric, int4_method, lm_head_int8, accuracy_level: the weight-only
            quantization (int4/int8). ``int4_method``: None (default: "gptq" when
            ``calibration_texts`` are given and symmetric, else "rtn"), "rtn" (round to nearest, the
            builder's default), "k_quant", or "gptq": GPTQ on the same symmetric int4
            grid and layout as RTN (same size, same kernels), layers and LM head,
            calibrated on ``calibration_texts`` (keep them apart from ``eval_texts``).
            Measured on SmolLM2: GPTQ 69.1% next-token agreement / perplexity 56.47
            against RTN's 58.7% / 59.76 (weight_only.py).
        prompts: greedy verification prompts (default DEFAULT_PROMPTS); ``new_tokens`` each.
        eval_texts: held-out texts for the int4/int8 quality report (default: the prompts).
        verify: compare with PyTorch before writing (fp32: tokens and logits).

    Returns: a DecoderReport (also saved as ``lora_ext.json`` in the folder).

    Raises:
        DecoderExportError: bad input (nothing is written).
        VerificationError: the staged folder does not match PyTorch (nothing is written; an
            earlier folder at ``out`` stays intact).
    """
    say = log or (lambda _msg: None)
    if quantize not in QUANTIZE_CHOICES:
        raise DecoderExportError(f"quantize: got {quantize!r}, need one of {QUANTIZE_CHOICES}")
    if dtype not in ("fp32", "fp16"):
        raise DecoderExportError(f"dtype: got {dtype!r}, need 'fp32'")
    if dtype == "fp16":
        if quantize is not None:
            raise DecoderExportError(
                f"dtype: fp16 with quantize={quantize!r}; {quantize} weights keep fp32 "
                "activations on the CPU, drop one of the two"
            )
        raise DecoderExportError(
            "dtype: fp16 genai folders need a GPU execution provider (the builder writes fp16 "
            "for CUDA/DML only); use fp32 or quantize='int4' for the CPU"
        )
    if int4_method is None:  # the best measured that the inputs allow
        gptq = quantize == "int4" and symmetric and bool(calibration_texts)
        int4_method = "gptq" if gptq else "rtn"
    if int4_method not in INT4_METHODS:
        raise DecoderExportError(f"int4_method: got {int4_method!r}, need one of {INT4_METHODS}")
    if block_size not in (16, 32, 64, 128, 256):
        raise DecoderExportError(f"block_size: got {block_size}, need 16, 32, 64, 128 or 256")
    if new_tokens < 1:
        raise DecoderExportError(f"new_tokens: got {new_tokens}, need >= 1")
    arch, model_type = check_decoder(model, tokenizer)
    if lm_head_int8 and getattr(model.config, "tie_word_embeddings", False):
        raise DecoderExportError(
            "lm_head_int8: the model ties its embeddings to lm_head; onnxruntime-genai 0.18's "
            "builder then shares one table through GatherBlockQuantized, which is 4-bit only "
            "(it writes an invalid graph); leave lm_head in int4"
        )
    if arch in OWN_GRAPH and lm_head_int8:
        raise DecoderExportError(
            f"lm_head_int8: not available for {arch} folders (our own graph keeps the LM head "
            "and the embedding in fp32); drop it"
        )
    calibration: list[list[int]] = []
    if quantize == "int4" and int4_method == "gptq":
        if not symmetric:
            raise DecoderExportError(
                "int4_method: 'gptq' works on the symmetric int4 grid; drop symmetric=False "
                "(--asymmetric) or use 'rtn'"
            )
        calibration = encode_texts(tokenizer, list(calibration_texts or []))
        if not calibration:
            raise DecoderExportError(
                "calibration_texts: int4_method='gptq' needs calibration text (texts of 2 "
                "tokens or more, e.g. the training split; not the held-out eval_texts)"
            )
    elif int4_method == "gptq":
        raise DecoderExportError(
            f"int4_method: 'gptq' applies to quantize='int4', got quantize={quantize!r}"
        )
    target = check_output_dir(out, overwrite)
    if not merge:
        if not adapter_name.isidentifier():
            raise DecoderExportError(f"adapter_name: got {adapter_name!r}, need a plain name")
        try:
            lora_names = sorted(decoder_adapter_tensors(model))
        except ValueError as exc:  # no LoRA layers / none active / merged
            raise DecoderExportError(f"merge=False: {exc}") from None
    precision = quantize or "fp32"
    prompts = list(prompts or DEFAULT_PROMPTS)
    options = _builder_options(
        precision, block_size, symmetric, int4_method, lm_head_int8, accuracy_level
    )
    report = DecoderReport(str(target), arch, model_type, precision, merged=merge, options=options)
    from .runner import DecoderRunner

    own = arch in OWN_GRAPH
    with staging_dir(target, arg="out") as tmp:
        t0 = time.perf_counter()
        base = None
        staged = tmp / "folder"
        adapter_file = None
        if own:
            plain = _plain_fp32(model)
            if merge:
                from lora_ext.inject import lora_layers, merge_and_unload

                merged = merge_and_unload(plain) if lora_layers(plain) else plain
                say(f"tracing the KV-cache graph (torch.onnx): {precision}")
                write_own_folder(
                    merged, tokenizer, staged, precision, options, calibration=calibration
                )
            else:
                from lora_ext.inject import merge_and_unload

                lora = decoder_adapter_tensors(model)
                base = _base_copy(plain)
                merged = merge_and_unload(plain)
                say(f"tracing the KV-cache graph (torch.onnx): {precision}, LoRA as inputs")
                write_own_folder(base, tokenizer, staged, precision, options, lora, calibration)
                adapter_file = save_decoder_adapter(model, staged, adapter_name)
                report.adapter_files = [adapter_file.name]
                report.lora_inputs = len(lora)
            t1, t2 = t0, time.perf_counter()
        elif merge:
            say("merging the adapter on a copy and saving it (safetensors)")
            merged = _save_merged(model, tokenizer, tmp / "hf")
        else:
            say("saving the base and the adapter (PEFT format) for LoRA graph inputs")
            merged, base = _save_base_and_adapter(model, tokenizer, tmp / "hf", tmp / "adapter")
            options = {**options, "adapter_path": str(tmp / "adapter")}
            if precision != "fp32":  # adapters stay float over int4 / int8 base weights
                modules = {n.rsplit(".lora_", 1)[0] for n in lora_names}
                nodes = [builder_lora_node(m.replace(".attn.", ".self_attn."), w)
                         for m in sorted(modules) for w in "AB"]  # fmt: skip
                options["nodes_to_exclude"] = ",".join(nodes)
        if not own:
            t1 = time.perf_counter()
            say(f"onnxruntime-genai builder: {precision}" + ("" if merge else ", LoRA as inputs"))
            run_builder(tmp / "hf", staged, precision, options)
            if calibration:
                say(f"GPTQ over the int4 weights, {len(calibration)} calibration texts")
                ref = tmp / "fp32_reference"  # the same graph in fp32, LoRA as the int4's
                keep = {k: v for k, v in options.items() if k == "adapter_path"}
                run_builder(tmp / "hf", ref, "fp32", keep)
                apply_gptq(staged, ref / "model.onnx", calibration, block_size)
                shutil.rmtree(ref)
            options.pop("adapter_path", None)
        if not merge and not own:
            taken = lora_to_inputs(staged / "model.onnx")
            ours = decoder_adapter_tensors(model)
            if sorted(taken) != sorted(ours) or any(
                not np.allclose(taken[k], ours[k], rtol=1e-5, atol=1e-7) for k in ours
            ):
                raise VerificationError(
                    "verify: the builder's LoRA tensors differ from this adapter's (names "
                    f"{sorted(set(taken) ^ set(ours))[:2]}); nothing written"
                )
            adapter_file = save_decoder_adapter(model, staged, adapter_name)
            report.adapter_files = [adapter_file.name]
            report.lora_inputs = len(taken)
        if not own:
            t2 = time.perf_counter()
        report.seconds.update(save=t1 - t0, build=t2 - t1)
        report.options = {**options}
        if precision == "int4":
            report.options["int4_method"] = int4_method
            report.options["calibration_texts"] = str(len(calibration))
        if verify:
            import onnxruntime_genai as og

            runner = DecoderRunner(staged, threads=None)
            genai_model = og.Model(str(staged))
            genai_adapters = None
            if adapter_file is not None:
                runner.set_adapter(adapter_file)
                genai_adapters = og.Adapters(genai_model)
                genai_adapters.load(str(adapter_file), adapter_name)
            say(f"verifying against PyTorch generate(use_cache=True): {len(prompts)} prompts")
            report.checks = _verify_prompts(
                runner, genai_model, genai_adapters, adapter_name, merged, tokenizer,
                prompts, new_tokens, precision,
            )  # fmt: skip
            if base is not None:
                say("verifying the base (no adapter active) against PyTorch")
                runner.set_adapter(None)
                report.base_checks = _verify_prompts(
                    runner, genai_model, None, None, base, tokenizer, prompts[:1], new_tokens,
                    precision,
                )  # fmt: skip
                runner.set_adapter(adapter_file)
            if precision == "fp32":
                report.max_rel_logits = max(
                    c.max_rel_logits for c in report.checks + report.base_checks
                )
            else:
                rows = encode_texts(tokenizer, list(eval_texts or prompts))
                if not rows:
                    raise DecoderExportError("eval_texts: no text of 2 tokens or more")
                say(f"{precision} quality on {len(rows)} held-out texts")
                report.quality = teacher_forced_quality(runner, merged, rows)
            del runner, genai_model, genai_adapters
        report.seconds["verify"] = time.perf_counter() - t2
        files = folder_files(staged)
        report.files = [p.name for p in files] + [REPORT_NAME]
        report.size_bytes = sum(p.stat().st_size for p in files)
        (staged / REPORT_NAME).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        commit_folder(staged, target)
    say(f"wrote {target}")
    return report
