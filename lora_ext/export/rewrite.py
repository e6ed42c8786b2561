"""Exact rewrites of a (merged) transformers model before it is traced to ONNX.

Both use identities of softmax attention, softmax(z + c) = softmax(z) for a constant c
added to a row, and rows of softmax summing to 1; outputs agree with the model as given to
float32 rounding, and the export verifies the file against the caller's model as always.

**Attention biases** (:func:`fold_attention_biases`): the key bias adds q·b_k to every
score of a query's row, which softmax ignores, so it is dropped; the value bias passes
through attention unchanged (P (V + 1 b_vᵀ) = P V + 1 b_vᵀ) and then through the output
projection, so it is folded into that projection's bias (b_o + W_o b_v). Two fewer
elementwise passes per layer.

**First-token pruning** (:func:`prune_to_first_token`): BERT-family classifiers
(BertForSequenceClassification's pooler, RoBERTa/ELECTRA's classification head) read only
the first position of the last layer's output. Every other position of that layer is
computed and thrown away: about 1/L of an L-layer encoder's work. The export replaces the
last layer with :class:`FirstTokenLayer`, which computes position 0 only, reassociated:

    q      = W_q h_0 + b_q                            per head: [d]
    scores = (q_h W_k,h) H^T · scaling + mask          [s]   (K = H W_kᵀ never formed; the
                                                              key bias is softmax-invariant)
    ctx_h  = (softmax(scores) H) W_v,hᵀ + b_v,h        [d]

(the two per-head products with W_k,h and W_v,h as broadcast Mul + ReduceSum: every MatMul
of the graph keeps a 2-D weight, which int8 quantizers need)

so the layer costs O(s·hidden·heads) instead of O(s·hidden²): no K, V, Q projections of
the whole sequence, no attention output or feed-forward over it.
:func:`prune_to_first_token` checks the pruned model against the unpruned one on the given
inputs before the export uses it.

Layers whose key/value are not plain nn.Linear (the hot-swap export's stand-ins) keep their
K/V projections over the whole sequence and prune the rest (query, attention, output,
feed-forward) to position 0; their biases are left as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

# classifiers whose head reads position 0 of the last hidden state and nothing else
FIRST_TOKEN_CLASSIFIERS = frozenset(
    {
        "BertForSequenceClassification",
        "RobertaForSequenceClassification",
        "XLMRobertaForSequenceClassification",
        "CamembertForSequenceClassification",
        "ElectraForSequenceClassification",
    }
)
# self-attention classes with BERT's maths (query/key/value Linear, scaled dot product, an
# additive or boolean mask, no relative positions)
_SELF_ATTENTION_CLASSES = frozenset(
    {
        "BertSelfAttention",
        "RobertaSelfAttention",
        "XLMRobertaSelfAttention",
        "CamembertSelfAttention",
        "ElectraSelfAttention",
    }
)


def fold_attention_biases(model: nn.Module) -> int:
    """Drop the key bias and fold the value bias into the attention output's bias, in place,
    in every BERT-family self-attention whose key, value and output projections are plain
    nn.Linear (see the module docstring). Returns how many layers were changed."""
    changed = 0
    for block in model.modules():  # BertAttention-like: .self (attention), .output.dense
        module = getattr(block, "self", None)
        if type(module).__name__ not in _SELF_ATTENTION_CLASSES:
            continue
        dense = getattr(getattr(block, "output", None), "dense", None)
        key, value = module.key, module.value
        if not all(type(m) is nn.Linear for m in (key, value, dense)):
            continue
        if key.bias is None and value.bias is None:
            continue
        with torch.no_grad():
            if value.bias is not None:
                if dense.bias is None:
                    dense.bias = nn.Parameter(torch.zeros_like(dense.weight[:, 0]))
                # in float64: b_o + W_o b_v, rounded once
                folded = dense.bias.double() + dense.weight.double() @ value.bias.double()
                dense.bias.copy_(folded.to(dense.bias.dtype))
            key.bias = None
            value.bias = None
        changed += 1
    return changed


def _last_layer(model: nn.Module) -> tuple[nn.ModuleList, int] | str:
    """(the encoder's layer list, index of the last layer), or why the model does not
    qualify."""
    name = type(model).__name__
    if name not in FIRST_TOKEN_CLASSIFIERS:
        return f"{name} is not a classifier known to read token 0 only"
    config = getattr(model, "config", None)
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        return "decoder / cross-attention configuration"
    if getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
        return f"position_embedding_type {config.position_embedding_type!r}"
    encoder = getattr(getattr(model, "base_model", None), "encoder", None)
    layers = getattr(encoder, "layer", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return "no encoder.layer list"
    last = layers[-1]
    if isinstance(last, FirstTokenLayer):
        return "already pruned"
    attention = getattr(last, "attention", None)
    self_attn = getattr(attention, "self", None)
    if type(self_attn).__name__ not in _SELF_ATTENTION_CLASSES:
        return f"last layer's self-attention is {type(self_attn).__name__}"
    for part in ("intermediate", "output"):
        if not isinstance(getattr(last, part, None), nn.Module):
            return f"last layer has no {part}"
    if not isinstance(getattr(attention, "output", None), nn.Module):
        return "last layer's attention has no output block"
    if getattr(last, "chunk_size_feed_forward", 0):
        return "chunked feed-forward"
    return layers, len(layers) - 1


class FirstTokenLayer(nn.Module):
    """A BERT-family encoder layer computing position 0 only.

    forward(hidden_states [b, s, hidden], attention_mask [b, 1, 1 or s, s] additive or
    boolean, or None) -> [b, 1, hidden], equal to ``layer(...)[:, :1]``.
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        attn = layer.attention.self
        self.heads = int(attn.num_attention_heads)
        self.head_size = int(attn.attention_head_size)
        self.scaling = float(getattr(attn, "scaling", self.head_size**-0.5))
        # K and V folded into the query side needs their plain weights (merged export)
        self.reassociate = type(attn.key) is nn.Linear and type(attn.value) is nn.Linear

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *_: Any,
        **__: Any,
    ) -> torch.Tensor:
        attn = self.layer.attention.self
        h, d = self.heads, self.head_size
        first = hidden_states[:, :1]  # [b, 1, hidden]
        # [b, 1, h*d] -> [b, h, 1, d]: the query's sequence axis has length 1, so this
        # reshape is the usual view + transpose (and exports as one constant Reshape)
        q = attn.query(first).reshape(-1, h, 1, d)
        keys = hidden_states.unsqueeze(1)  # [b, 1, s, hidden]
        if self.reassociate:
            # q_h W_k,h as a broadcast product and a sum over d (not a MatMul with a 3-D
            # constant weight, which int8 quantizers such as onnxruntime's quantize_dynamic
            # cannot take): [b, h, d, 1] * [h, d, hidden] -> [b, h, 1, hidden]
            w_k = attn.key.weight.reshape(h, d, -1)
            qk = (q.transpose(-1, -2) * w_k).sum(-2, keepdim=True)
            scores = torch.matmul(qk, keys.transpose(-1, -2))  # [b, h, 1, s]
        else:
            k = attn.key(hidden_states).unflatten(-1, (h, d)).transpose(1, 2)  # [b, h, s, d]
            scores = torch.matmul(q, k.transpose(-1, -2))
        scores = scores * self.scaling
        if attention_mask is not None:
            mask = attention_mask[..., :1, :]  # the first query's row
            if mask.dtype == torch.bool:
                mask = torch.zeros_like(mask, dtype=scores.dtype).masked_fill(
                    ~mask, torch.finfo(scores.dtype).min
                )
            scores = scores + mask
        probs = torch.softmax(scores, dim=-1)  # [b, h, 1, s]
        if self.reassociate:
            w_v = attn.value.weight.reshape(h, d, -1)  # [h, d, hidden]
            # (P H) W_v,hᵀ likewise: [b, h, 1, hidden] * [h, d, hidden], summed over hidden
            ctx = (torch.matmul(probs, keys) * w_v).sum(-1).unsqueeze(-2)  # [b, h, 1, d]
            if attn.value.bias is not None:
                ctx = ctx + attn.value.bias.reshape(h, 1, d)
        else:
            v = attn.value(hidden_states).unflatten(-1, (h, d)).transpose(1, 2)  # [b, h, s, d]
            ctx = torch.matmul(probs, v)
        ctx = ctx.reshape(-1, 1, h * d)  # [b, 1, h*d]
        attention_output = self.layer.attention.output(ctx, first)
        return self.layer.output(self.layer.intermediate(attention_output), attention_output)


def first_token_reason(model: nn.Module) -> str | None:
    """None if :func:`prune_to_first_token` applies to ``model``, else why not."""
    found = _last_layer(model)
    return found if isinstance(found, str) else None


def prune_to_first_token(
    model: nn.Module,
    check_inputs: list[Mapping[str, torch.Tensor]],
    forward: Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor],
    rtol: float = 1e-5,
) -> str | None:
    """Replace ``model``'s last encoder layer by a :class:`FirstTokenLayer` in place.

    ``forward(model, inputs)`` -> logits; the pruned model must match the unpruned one on
    every ``check_inputs`` to ``rtol`` (max abs error / max |logit|), else the layer is put
    back. Returns None when pruned, else the reason it was not.
    """
    found = _last_layer(model)
    if isinstance(found, str):
        return found
    layers, index = found
    with torch.no_grad():
        before = [forward(model, inputs) for inputs in check_inputs]
        original = layers[index]
        layers[index] = FirstTokenLayer(original)
        for inputs, ref in zip(check_inputs, before):
            out = forward(model, inputs)
            scale = float(ref.abs().max()) or 1.0
            err = float((out - ref).abs().max()) / scale if out.shape == ref.shape else 1.0
            if not err <= rtol:
                layers[index] = original
                return f"pruned outputs differ from the model's by {err:.2e} (relative)"
    return None
