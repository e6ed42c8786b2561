"""Model-level gradient accuracy (issue 13, item 12): on MiniLM with adapters on query, key,
value and dense (r = 4, float32, dropout 0), the error of every adapter gradient against a
float64 twin of the same model is at most 2x the error of PEFT's float32 twin (the op's own
rule, "2x the same-dtype PyTorch error", applied to whole-model gradients).

Errors are max |grad - grad64| over a tensor, with one unit in the last place of its largest
exact value allowed on top (``reference.error_bound``).
"""

from __future__ import annotations

import copy
import math

import torch

import lora_ext
from lora_ext import reference as ref
from lora_ext.inject import lora_layers


def _adapter_grads(model, inputs, grad_out, peft: bool) -> dict[str, torch.Tensor]:
    """{module path.A / .B: gradient} after one backward of hidden states against grad_out."""
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0  # deterministic: the twins must see the same function
    out = model(**inputs).last_hidden_state
    out.backward(grad_out.to(out.dtype))
    grads = {}
    if peft:
        from peft.tuners.lora import LoraLayer

        root = model.base_model.model
        for name, m in root.named_modules():
            if isinstance(m, LoraLayer):
                grads[f"{name}.A"] = m.lora_A["default"].weight.grad
                grads[f"{name}.B"] = m.lora_B["default"].weight.grad
    else:
        for name, layer in lora_layers(model):
            grads[f"{name}.A"] = layer.lora_A["default"].grad
            grads[f"{name}.B"] = layer.lora_B["default"].grad
    return {k: v for k, v in grads.items() if v is not None}  # the pooler gets none


def test_adapter_gradients_within_2x_of_peft_against_float64(minilm, randomize, peft_twin):
    seed = 0
    inputs = {k: v.repeat(2, 1) for k, v in minilm.inputs.items()}  # 4 sequences
    ours = minilm.fresh()
    lora_ext.inject_(
        ours,
        lora_ext.LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["query", "key", "value", "dense"]),
    )  # fmt: skip
    randomize(ours, seed=seed, std=0.05)
    theirs = peft_twin(minilm.model, ours)
    with torch.no_grad():
        shape = ours(**inputs).last_hidden_state.shape
    g = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    got = _adapter_grads(ours, inputs, g, peft=False)
    exact = _adapter_grads(copy.deepcopy(ours).double(), inputs, g, peft=False)
    peft32 = _adapter_grads(theirs, inputs, g, peft=True)
    assert got.keys() == exact.keys() == peft32.keys() and len(got) == 2 * 36

    ratios, worst = {"A": [], "B": []}, []
    for name in got:
        err, bound = ref.error_bound(got[name], peft32[name], exact[name])
        peft_err = (peft32[name].double() - exact[name]).abs().max().item()
        ratios[name[-1]].append(err / max(peft_err, 1e-30))
        if err > bound:
            worst.append(f"{name}: {err:.3g} > {bound:.3g} (PEFT {peft_err:.3g})")
    assert not worst, worst
    # and on average ours is no worse than PEFT's (geometric mean of the per-tensor ratios)
    for kind, rs in ratios.items():
        geo = math.exp(sum(math.log(max(r, 1e-30)) for r in rs) / len(rs))
        assert geo <= 1.25, f"lora_{kind}: geometric mean error ratio {geo:.2f}"
