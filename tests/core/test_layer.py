"""LoraLinear on small layers: forward and gradients against the float64 formula, inits,
merge/unmerge, safe merge, several adapters, dropout, bias training, repr."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lora_ext import LoraLinear


def make_base(kind: str, in_f: int, out_f: int, bias: bool = True, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "linear":
        return nn.Linear(in_f, out_f, bias=bias)
    layer = Conv1D(out_f, in_f)  # nf=out, nx=in; weight [in, out]
    nn.init.normal_(layer.weight, std=0.2)
    nn.init.normal_(layer.bias, std=0.2)
    return layer


def weight_oi(base: nn.Module) -> torch.Tensor:
    """The [out, in] weight of a Linear or Conv1D."""
    return base.weight if isinstance(base, nn.Linear) else base.weight.t()


def randomize(layer: LoraLinear, seed: int = 1) -> None:
    """Non-zero A and B (B starts at zero after the default init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in layer.lora_A:
            layer.lora_A[name].copy_(torch.randn(layer.lora_A[name].shape, generator=g) * 0.3)
            layer.lora_B[name].copy_(torch.randn(layer.lora_B[name].shape, generator=g) * 0.3)


def reference(layer: LoraLinear, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    """float64: x W^T + b + sum_i s_i (x A_i^T) B_i^T from the base layer's own tensors."""
    x64 = x.double()
    base = layer.base_layer
    y = x64 @ weight_oi(base).double().t()
    if base.bias is not None:
        y = y + base.bias.double()
    for n in names:
        a, b = layer.lora_A[n].double(), layer.lora_B[n].double()
        y = y + layer.scaling[n] * (x64 @ a.t()) @ b.t()
    return y


CASES = [  # kind, in, out, r, bias, x shape prefix
    ("linear", 16, 24, 4, True, (3,)),
    ("linear", 32, 8, 8, False, (2, 5)),
    ("conv1d", 16, 48, 4, True, (2, 3)),
    ("conv1d", 24, 12, 2, True, (7,)),
]


@pytest.mark.parametrize("kind,in_f,out_f,r,bias,prefix", CASES)
def test_forward_and_grads_match_formula(kind, in_f, out_f, r, bias, prefix):
    base = make_base(kind, in_f, out_f, bias).requires_grad_(False)  # frozen, as after inject_
    layer = LoraLinear(base)
    layer.add_adapter("a", r=r, alpha=2 * r + 1)
    layer.set_adapter("a")
    randomize(layer)
    assert layer.scaling["a"] == pytest.approx((2 * r + 1) / r)
    x = torch.randn(*prefix, in_f, requires_grad=True)
    y = layer(x)
    assert y.shape == (*prefix, out_f)
    want = reference(layer, x, ["a"])
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)

    # gradients of x, A, B against autograd through the float64 formula
    g = torch.randn_like(y)
    y.backward(g)
    x64 = x.detach().double().requires_grad_()
    a64 = layer.lora_A["a"].detach().double().requires_grad_()
    b64 = layer.lora_B["a"].detach().double().requires_grad_()
    w = weight_oi(layer.base_layer).detach().double()
    y64 = x64 @ w.t() + layer.scaling["a"] * (x64 @ a64.t()) @ b64.t()
    if bias:
        y64 = y64 + layer.base_layer.bias.double()
    y64.backward(g.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_A["a"].grad.double(), a64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_B["a"].grad.double(), b64.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base(dtype):
    """Adapters over a 16-bit base are float32 (as PEFT); the forward error against a float64
    reference is at most 2x that of the same computation in plain PyTorch at that dtype."""
    base = make_base("linear", 64, 48).to(dtype).requires_grad_(False)
    layer = LoraLinear(base)
    layer.add_adapter("a", r=8, alpha=16)
    layer.set_adapter("a")
    randomize(layer)
    assert layer.lora_A["a"].dtype == torch.float32
    x = torch.randn(16, 64).to(dtype)
    y = layer(x)
    assert y.dtype == dtype
    want = reference(layer, x, ["a"])
    a16, b16 = layer.lora_A["a"].to(dtype), layer.lora_B["a"].to(dtype)
    torch_y = base(x) + layer.scaling["a"] * ((x @ a16.t()) @ b16.t())
    ours_err = (y.double() - want).abs().max().item()
    torch_err = (torch_y.double() - want).abs().max().item()
    assert ours_err <= 2 * torch_err + 1e-6
    y.float().sum().backward()
    assert layer.lora_A["a"].grad.dtype == torch.float32
    assert torch.isfinite(layer.lora_B["a"].grad).all() and layer.lora_B["a"].grad.abs().sum() > 0
    # merge rounds once into the 16-bit weight: round(W + s B A) in float32
    w32 = base.weight.float() + layer.get_delta_weight("a")
    layer.merge()
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10  # one unit of the 16-bit mantissa
    torch.testing.assert_close(base.weight.float(), w32.to(dtype).float(), rtol=ulp, atol=0)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("init", ["kaiming", "gaussian", "pissa"])
def test_init_leaves_output_unchanged(kind, init):
    base = make_base(kind, 20, 12)
    x = torch.randn(4, 20)
    before = base(x).detach()
    w_before = weight_oi(base).detach().clone()
    layer = LoraLinear(base)
    layer.add_adapter("a", r=3, alpha=6, init=init)
    layer.set_adapter("a")
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    a, b = layer.lora_A["a"], layer.lora_B["a"]
    if init == "pissa":
        # s B A is the best rank-3 approximation of W; W now holds the residual
        u, s, vh = torch.linalg.svd(w_before.double(), full_matrices=False)
        best = (u[:, :3] * s[:3]) @ vh[:3]
        torch.testing.assert_close(layer.get_delta_weight("a").double(), best, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            weight_oi(layer.base_layer).double(), w_before.double() - best, rtol=1e-4, atol=1e-5
        )
    else:
        assert torch.count_nonzero(b) == 0 and torch.count_nonzero(a) == a.numel()
        torch.testing.assert_close(weight_oi(layer.base_layer), w_before, rtol=0, atol=0)


def test_init_distributions():
    layer = LoraLinear(nn.Linear(4096, 8))
    layer.add_adapter("k", r=16, alpha=16, init="kaiming")
    layer.add_adapter("g", r=16, alpha=16, init="gaussian")
    # kaiming-uniform(a=sqrt(5)) on fan_in 4096: U(-1/64, 1/64), std 1/(64 sqrt(3))
    a = layer.lora_A["k"]
    assert a.abs().max() <= 1 / 64
    assert a.std().item() == pytest.approx(1 / (64 * math.sqrt(3)), rel=0.05)
    assert layer.lora_A["g"].std().item() == pytest.approx(1 / 16, rel=0.05)  # PEFT: std 1/r


def test_rslora_scale():
    layer = LoraLinear(nn.Linear(8, 8))
    layer.add_adapter("a", r=16, alpha=8, use_rslora=True)
    layer.add_adapter("b", r=16, alpha=8)
    assert layer.scaling["a"] == pytest.approx(8 / 4)
    assert layer.scaling["b"] == pytest.approx(8 / 16)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merge_unmerge_round_trip(kind):
    layer = LoraLinear(make_base(kind, 16, 32))
    layer.add_adapter("a", r=4, alpha=8)
    layer.set_adapter("a")
    randomize(layer)
    x = torch.randn(5, 16)
    w0 = layer.base_layer.weight.detach().clone()
    unmerged = layer(x).detach()
    assert layer.merge(safe=True) == []
    assert layer.merged_adapters == ["a"]
    torch.testing.assert_close(
        weight_oi(layer.base_layer),
        weight_oi_of(w0, kind) + layer.get_delta_weight("a"),
        rtol=1e-6,
        atol=1e-6,
    )
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
    # merged: the forward is the base layer alone, the LoRA tensors are no longer read
    with torch.no_grad():
        layer.lora_B["a"].add_(1.0)
    torch.testing.assert_close(layer(x), layer.base_layer(x))
    with torch.no_grad():
        layer.lora_B["a"].sub_(1.0)
    assert layer.merge() == ["a"]  # idempotent: reported as skipped, weight unchanged
    assert layer.unmerge() == ["a"]
    assert not layer.merged
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)


def weight_oi_of(w: torch.Tensor, kind: str) -> torch.Tensor:
    return w if kind == "linear" else w.t()


@pytest.mark.parametrize("bad", ["inf", "nan", "overflow"])
def test_safe_merge_refuses_non_finite(bad):
    layer = LoraLinear(nn.Linear(8, 6))
    layer.add_adapter("ok", r=2, alpha=2)
    layer.add_adapter("bad", r=2, alpha=2)
    layer.set_adapter(["ok", "bad"])
    randomize(layer)
    with torch.no_grad():
        if bad == "overflow":  # finite delta, but W + delta overflows float32
            layer.base_layer.weight[0, 0] = 2e38
            layer.lora_A["bad"][:, 0] = 1e19
            layer.lora_B["bad"][0, :] = 1e19
        else:
            layer.lora_B["bad"][1, 0] = float(bad)
    w0 = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="overflow" if bad == "overflow" else "non-finite"):
        layer.merge(safe=True)
    assert torch.equal(layer.base_layer.weight, w0)  # bit-identical, "ok" not merged either
    assert layer.merged_adapters == []


def test_several_adapters_sum_and_dropout_rule():
    layer = LoraLinear(make_base("linear", 12, 10)).eval()
    layer.add_adapter("a", r=2, alpha=4, dropout=0.1)
    layer.add_adapter("b", r=5, alpha=3, dropout=0.2)
    randomize(layer)
    x = torch.randn(3, 12)
    layer.set_adapter(["a", "b"])
    torch.testing.assert_close(
        layer(x).double(), reference(layer, x, ["a", "b"]), rtol=1e-5, atol=1e-5
    )
    layer.set_adapter("b")
    torch.testing.assert_close(layer(x).double(), reference(layer, x, ["b"]), rtol=1e-5, atol=1e-5)
    assert not layer.lora_A["a"].requires_grad and layer.lora_A["b"].requires_grad
    layer.set_adapter(["a", "b"])
    layer.train()
    with pytest.raises(ValueError, match="same rate"):
        layer(x)
    # merging both and unmerging restores the weight
    layer.eval()
    w0 = layer.base_layer.weight.detach().clone()
    want = reference(layer, x, ["a", "b"])
    layer.merge()
    torch.testing.assert_close(layer.base_layer(x).double(), want, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=1e-6, atol=1e-6)


def test_dropout_train_only_and_seeded():
    layer = LoraLinear(make_base("linear", 64, 32)).eval()
    layer.add_adapter("a", r=4, alpha=4, dropout=0.5)
    layer.set_adapter("a")
    randomize(layer)
    x = torch.randn(8, 64)
    eval_out = layer(x)
    torch.testing.assert_close(eval_out.double(), reference(layer, x, ["a"]), rtol=1e-5, atol=1e-5)
    layer.train()
    torch.manual_seed(123)
    t1 = layer(x)
    torch.manual_seed(123)
    t2 = layer(x)
    t3 = layer(x)
    assert torch.equal(t1, t2)  # the op's seed comes from torch's generator
    assert not torch.equal(t1, t3)
    assert not torch.allclose(t1, eval_out)
    # inverted dropout on the LoRA branch only: its mean over many masks is the eval output
    base = layer.base_layer(x).detach()
    with torch.no_grad():
        mean = sum(layer(x) - base for _ in range(300)) / 300
    want = eval_out.detach() - base
    assert (mean - want).norm() / want.norm() < 0.15


def test_trainable_bias_gets_gradient():
    layer = LoraLinear(make_base("linear", 6, 4))
    layer.add_adapter("a", r=2, alpha=2)
    layer.set_adapter("a")
    layer.base_layer.weight.requires_grad_(False)
    layer.base_layer.bias.requires_grad_(True)
    x = torch.randn(3, 6)
    layer(x).sum().backward()
    torch.testing.assert_close(layer.base_layer.bias.grad, torch.full((4,), 3.0))


def test_delete_and_errors():
    layer = LoraLinear(nn.Linear(4, 4))
    layer.add_adapter("a", r=2, alpha=2)
    with pytest.raises(ValueError, match="already exists"):
        layer.add_adapter("a", r=2, alpha=2)
    with pytest.raises(ValueError, match="adapter_name"):
        layer.add_adapter("x.y", r=2, alpha=2)
    with pytest.raises(ValueError, match="r <= min"):
        layer.add_adapter("p", r=5, alpha=2, init="pissa")
    layer.set_adapter("a")
    layer.merge()
    with pytest.raises(ValueError, match="merged"):
        layer.delete_adapter("a")
    layer.unmerge()
    layer.delete_adapter("a")
    assert not layer.lora_A and layer.active_adapters == []
    x = torch.randn(2, 4)
    torch.testing.assert_close(layer(x), layer.base_layer(x))
    with pytest.raises(TypeError, match="need nn.Linear"):
        LoraLinear(nn.LayerNorm(4))


def test_repr_names_adapters():
    layer = LoraLinear(make_base("conv1d", 8, 16))
    layer.add_adapter("default", r=4, alpha=16, dropout=0.05)
    layer.set_adapter("default")
    text = repr(layer)
    assert "Conv1D 8 -> 16" in text
    assert "default(r=4, alpha=16, scale=4, dropout=0.05)" in text
    assert "active=['default']" in text
