"""GPT-2 as a KV-cache ONNX graph of our own, for the architectures onnxruntime-genai's model
builder does not write (0.18 has no GPT-2).

The graph is traced with ``torch.onnx.export`` (TorchScript, ``dynamo=False``) from
``Gpt2WithCache``, a module that reads the GPT-2 weights of a transformers
``GPT2LMHeadModel`` and computes its forward with the cache as flat tensors:

    inputs   input_ids [batch, seq] int64, attention_mask [batch, past + seq] int64,
             position_ids [batch, seq] int64,
             past_key_values.%d.key / .value [batch, heads, past, head_size] float32
    outputs  logits [batch, seq, vocab], present.%d.key / .value [batch, heads, past + seq,
             head_size] (the past with this step's keys/values concatenated)

(the names onnxruntime-genai and Optimum share). ``past = 0`` is the prefill. Why our own
forward rather than the transformers module with a ``DynamicCache`` built inside: tracing
transformers 5's cache and mask code bakes Python-side branches on the first shapes into the
graph (``cache.keys.numel() == 0``, the padding-length checks of the mask builder), which
gave wrong logits once the past length changed; the forward below has no data-dependent
Python branches, so one trace serves prefill and decode. Every projection is written as
``x @ W + b`` so that the graph has plain ``MatMul`` nodes, which onnxruntime's
``MatMulNBitsQuantizer`` turns into int4 ``MatMulNBits``.

onnxruntime-genai runs the folder as model type ``"decoder"`` (its generic decoder-only
model: separate key/value caches, ``position_ids`` computed from the mask, the cache
concatenated, ``past_present_share_buffer`` off). Its ``"gpt2"`` type is something else: it
wants one combined ``past_%d`` tensor [2, batch, heads, past, head_size] per layer, and a
folder of ours declared as ``"gpt2"`` fails in ``og.Generator`` with "Model input was not
found".

Hot-swap: with ``lora`` given, each listed projection computes ``x W + b + (x A') B'`` with
``A'`` [in, lora_r] and ``B'`` [lora_r, out] graph inputs (the names of
``decoder.builder_lora_name``) that ``lora_inputs_optional`` then gives empty defaults (no
adapter: the base model); int4 quantization comes before that step, so the LoRA MatMuls,
whose weights are inputs, stay float.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

GENAI_MODEL_TYPE = "decoder"
OPSET = 17


def lora_input_names(module: str) -> tuple[str, str]:
    """(A' name, B' name) of one adapted projection, as decoder.builder_lora_name writes
    them (``transformer.h.0.attn.c_attn`` -> ``...c_attn.lora_A.MatMul.weight``)."""
    return f"{module}.lora_A.MatMul.weight", f"{module}.lora_B.MatMul.weight"


def check_gpt2(model: Any) -> None:
    """Refuse GPT-2 variants this graph does not compute (ValueError naming the setting)."""
    if getattr(model.config, "add_cross_attention", False):
        raise ValueError(
            "model: GPT-2 with cross-attention (add_cross_attention=True) is an encoder-decoder "
            "part, not a decoder-only LM"
        )


class Gpt2WithCache(nn.Module):
    """GPT-2's forward with the KV cache as flat tensors (see the module docstring).

    Args:
        model: a transformers ``GPT2LMHeadModel`` (eval, float32, adapters merged or
            unwrapped to their base layers).
        lora: names of projections (``transformer.h.0.attn.c_attn``) that get LoRA graph
            inputs; their A', B' follow the past tensors in ``forward``'s arguments, in order.
    """

    def __init__(self, model: Any, lora: Sequence[str] = ()) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        self.lora = {name: i for i, name in enumerate(lora)}
        self.names = {id(m): n for n, m in model.named_modules()}

    def _proj(
        self, module: nn.Module, x: torch.Tensor, lora: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """x [..., in] -> [..., out] as MatMul (+ Add), plus the LoRA term when adapted."""
        weight = module.weight
        y = x @ (weight if type(module).__name__ == "Conv1D" else weight.t())
        if getattr(module, "bias", None) is not None:
            y = y + module.bias
        slot = self.lora.get(self.names[id(module)])
        if slot is not None:
            y = y + (x @ lora[2 * slot]) @ lora[2 * slot + 1]
        return y

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *flat: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        """input_ids, position_ids [batch, seq]; attention_mask [batch, past + seq];
        flat: 2 x layers past tensors [batch, heads, past, head_size] (key, value per layer),
        then A', B' per LoRA projection. Returns (logits [batch, seq, vocab], presents...)."""
        c, t = self.config, self.model.transformer
        layers = len(t.h)
        past, lora = flat[: 2 * layers], flat[2 * layers :]
        heads = c.n_head
        head_size = c.n_embd // heads
        batch, seq = input_ids.shape[0], input_ids.shape[1]
        total = attention_mask.shape[1]
        h = t.wte(input_ids) + t.wpe(position_ids)
        # key j is visible to query i (at absolute column total - seq + i) when j <= that
        # column and the mask keeps it: [batch, 1, seq, total]
        q_col = torch.arange(seq, device=h.device) + (total - seq)
        k_col = torch.arange(total, device=h.device)
        visible = (k_col[None, :] <= q_col[:, None])[None, None] & (
            attention_mask[:, None, None, :] > 0
        )
        lowest = torch.finfo(h.dtype).min
        presents: list[torch.Tensor] = []
        for i, block in enumerate(t.h):
            a = block.ln_1(h)
            q, k, v = self._proj(block.attn.c_attn, a, lora).split(c.n_embd, dim=2)
            q, k, v = (z.reshape(batch, seq, heads, head_size).transpose(1, 2) for z in (q, k, v))
            k = torch.cat([past[2 * i], k], dim=2)
            v = torch.cat([past[2 * i + 1], v], dim=2)
            presents += [k, v]
            scores = q @ k.transpose(-1, -2)
            if getattr(c, "scale_attn_weights", True):
                scores = scores / math.sqrt(head_size)
            if getattr(c, "scale_attn_by_inverse_layer_idx", False):
                scores = scores / float(i + 1)
            probs = torch.softmax(scores.masked_fill(~visible, lowest), dim=-1)
            o = (probs @ v).transpose(1, 2).reshape(batch, seq, c.n_embd)
            h = h + self._proj(block.attn.c_proj, o, lora)
            m = block.mlp.act(self._proj(block.mlp.c_fc, block.ln_2(h), lora))
            h = h + self._proj(block.mlp.c_proj, m, lora)
        h = t.ln_f(h)
        return (self._proj(self.model.lm_head, h, lora), *presents)


def io_names(layers: int) -> tuple[list[str], list[str], list[str]]:
    """(leading inputs, past inputs, outputs) names of the graph."""
    past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    outs = ["logits"] + [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids"], past, outs


def export_gpt2_graph(
    model: Any, onnx_path: Path, lora: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
) -> None:
    """Trace ``Gpt2WithCache(model)`` to ``onnx_path`` (weights in ``<name>.data``), with
    dynamic batch, sequence, past and (LoRA) rank axes, the tied LM head stored once.

    Args:
        model: a float32 ``GPT2LMHeadModel`` (merged, or the base for hot-swap).
        lora: hot-swap: {projection name: (A' [in, r], B' [r, out])} example tensors; their
            names become graph inputs with dynamic rank ``lora_r``.
    """
    import onnx

    from ._io import save_model
    from .adapters import LORA_R
    from .graph_passes import share_tied_weights

    lora = lora or {}
    check_gpt2(model)
    wrapper = Gpt2WithCache(model, list(lora)).eval()
    c = model.config
    layers, heads = c.n_layer, c.n_head
    head_size = c.n_embd // heads
    lead, past_names, out_names = io_names(layers)
    lora_names = [n for module in lora for n in lora_input_names(module)]
    batch, past_len, seq = 1, 2, 3
    ids = torch.zeros(batch, seq, dtype=torch.int64)
    mask = torch.ones(batch, past_len + seq, dtype=torch.int64)
    pos = torch.arange(past_len, past_len + seq)[None]
    past = [torch.zeros(batch, heads, past_len, head_size) for _ in past_names]
    lora_args = [torch.from_numpy(np.ascontiguousarray(x)) for pair in lora.values() for x in pair]
    dynamic: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "seq"},
        "attention_mask": {0: "batch", 1: "total"},
        "position_ids": {0: "batch", 1: "seq"},
        "logits": {0: "batch", 1: "seq"},
    }
    dynamic.update({n: {0: "batch", 2: "past"} for n in past_names})
    dynamic.update({n: {0: "batch", 2: "total"} for n in out_names[1:]})
    dynamic.update({n: {1 if ".lora_A." in n else 0: LORA_R} for n in lora_names})
    trace_dir = onnx_path.parent / f".{onnx_path.stem}.trace"
    trace_dir.mkdir()
    tmp = trace_dir / "model.onnx"  # torch.onnx may spread large weights over files here
    was_training = model.training
    try:
        with torch.no_grad():
            torch.onnx.export(
                wrapper,
                (ids, mask, pos, *past, *lora_args),
                str(tmp),
                input_names=lead + past_names + lora_names,
                output_names=out_names,
                dynamic_axes=dynamic,
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
        graph = onnx.load(str(tmp))
    finally:
        model.train(was_training)
        shutil.rmtree(trace_dir, ignore_errors=True)
    graph, _ = share_tied_weights(graph)
    save_model(graph, onnx_path, external_data=True)


def lora_inputs_optional(onnx_path: Path) -> list[str]:
    """Give each LoRA graph input an empty (rank 0) initializer of the same name, in place:
    the input becomes optional and a run without an adapter computes the base model (Olive's
    ExtractAdapters scheme, as decoder.lora_to_inputs makes of the builder's graphs). Run it
    after any quantization (the quantizer would take the defaults for weights). Returns the
    LoRA input names."""
    import onnx
    from onnx import numpy_helper

    from ._io import save_model

    graph = onnx.load(str(onnx_path))
    names = []
    for inp in graph.graph.input:
        is_a = ".lora_A." in inp.name
        if not (is_a or ".lora_B." in inp.name):
            continue
        fixed = inp.type.tensor_type.shape.dim[0 if is_a else 1].dim_value
        empty = np.zeros((fixed, 0) if is_a else (0, fixed), np.float32)
        graph.graph.initializer.append(numpy_helper.from_array(empty, inp.name))
        names.append(inp.name)
    (onnx_path.parent / (onnx_path.name + ".data")).unlink(missing_ok=True)
    save_model(graph, onnx_path, external_data=True)
    return names


def genai_config(model: Any, tokenizer: Any, filename: str = "model.onnx") -> dict[str, Any]:
    """The ``genai_config.json`` of a GPT-2 folder (model type ``"decoder"``, the
    concatenated cache: ``past_present_share_buffer`` off)."""
    c = model.config
    eos = c.eos_token_id if c.eos_token_id is not None else tokenizer.eos_token_id
    bos = c.bos_token_id if c.bos_token_id is not None else tokenizer.bos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    context = int(c.n_positions)
    _, past_names, _ = io_names(c.n_layer)
    return {
        "model": {
            "bos_token_id": bos,
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": c.n_embd // c.n_head,
                "hidden_size": c.n_embd,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": c.n_head,
                "num_hidden_layers": c.n_layer,
                "num_key_value_heads": c.n_head,
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": GENAI_MODEL_TYPE,
            "vocab_size": c.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 50,
            "top_p": 1.0,
        },
    }
