"""Autocast and the dropout seed's device (issue 12, items 4 and 5), on every available device.

- Inside torch.autocast(device, bfloat16) the op runs its GEMMs in bfloat16 (its autocast
  kernel casts the inputs, as ATen does for linear), LoRA parameters stay float32 masters with
  float32 gradients, and a float32 LoraLinear does not cast x back to float32.
- The seed of a CUDA call is drawn on the GPU and read there (never with .item() on the host),
  so that CUDA graph replay draws a fresh mask: the plumbing is tested on the CPU, the replay on
  a GPU.
"""

from __future__ import annotations

import pytest
import torch
from test_ops import ALL, CUDA_ONLY, _problem, _rand, _up  # noqa: F401  (tests/core on sys.path)
from torch.utils._python_dispatch import TorchDispatchMode

import lora_ext
from lora_ext import ops
from lora_ext import reference as ref

OPS = torch.ops.lora_ext


class _OpSpy(TorchDispatchMode):
    """Records the dtypes and devices of the arguments each lora_linear call receives."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is OPS.lora_linear.default:
            self.calls.append([(a.dtype, a.device.type) if isinstance(a, torch.Tensor) else a for a in args])  # fmt: skip
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device", ALL)
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_autocast_runs_the_op_in_bf16_with_fp32_masters(device, p):
    x, w, b, a, bb = _problem((4, 6), 32, 24, 4, torch.float32, device=device)
    a, bb = a.requires_grad_(), bb.requires_grad_()
    spy = _OpSpy()
    with spy, torch.autocast(device, dtype=torch.bfloat16):
        y = ops.lora_linear(x, w, b, a, bb, 0.5, p, seed=7)
    assert y.dtype == torch.bfloat16
    got = spy.calls[0]
    assert [got[i][0] for i in (0, 1, 2, 3, 4)] == [torch.bfloat16] * 5, got
    y.float().square().sum().backward()
    assert a.grad.dtype == torch.float32 and bb.grad.dtype == torch.float32
    # the same values as the op called on bf16 copies (autocast only casts)
    a16, b16 = (t.detach().bfloat16().requires_grad_() for t in (a, bb))
    want = ops.lora_linear(x.bfloat16(), w.bfloat16(), b.bfloat16(), a16, b16, 0.5, p, seed=7)
    assert torch.equal(y, want)
    want.float().square().sum().backward()
    torch.testing.assert_close(a.grad, a16.grad.float(), rtol=0, atol=0)
    # and within the 2x rule of plain bf16 PyTorch against float64
    mask = ref.dropout_mask(x.shape, 7, p, device=device)
    same = ref.lora_linear(x.bfloat16(), w.bfloat16(), b.bfloat16(), a.detach().bfloat16(), bb.detach().bfloat16(), 0.5, p, mask=mask)  # fmt: skip
    exact = ref.lora_linear(*(_up(t) for t in (x, w, b, a, bb)), 0.5, p, mask=mask)
    err, bound = ref.error_bound(y, same, exact)
    assert err <= bound


@pytest.mark.parametrize("device", ALL)
def test_lora_layer_under_autocast_keeps_x_in_bf16(device):
    """A float32 LoraLinear under bf16 autocast: the op sees bf16 (the frozen layers' dtype under
    autocast), not float32 (the layer used to cast x to the base weight's dtype)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 8)).to(device)
    lora_ext.inject_(model, lora_ext.LoraConfig(r=4, alpha=8, target_modules=["1"]))
    model.train()
    x = _rand(5, 16, device=device)
    spy = _OpSpy()
    with spy, torch.autocast(device, dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16
    assert spy.calls and all(c[0][0] == torch.bfloat16 for c in spy.calls), spy.calls
    y.float().sum().backward()
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    assert params and all(
        p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in params
    )
    # outside autocast the layer still computes in its weight's dtype
    spy = _OpSpy()
    with spy:
        assert model(x).dtype == torch.float32
    assert spy.calls[0][0][0] == torch.float32


@pytest.mark.parametrize("device", ALL)
def test_the_seed_of_a_call_lives_on_its_device(device):
    """ops.lora_linear draws the seed with the generator of x's device and hands it to the
    kernel on that device (CUDA reads it there: no host sync, graph-safe)."""
    x, w, b, a, bb = _problem((3, 4), 16, 8, 2, torch.float32, device=device)
    spy = _OpSpy()
    with spy:
        ops.lora_linear(x, w, b, a, bb, 1.0, 0.5)
    seed_dtype, seed_device = spy.calls[0][7]
    assert seed_dtype == torch.int64 and seed_device == device
    # reproducible under torch.manual_seed, fresh per call
    torch.manual_seed(1)
    s1, s2 = ops.make_seed(device=device), ops.make_seed(device=device)
    torch.manual_seed(1)
    assert s1.device.type == device and torch.equal(s1, ops.make_seed(device=device))
    assert not torch.equal(s1, s2)
    # a seed on the device gives the same mask as the same value on the CPU
    seed_dev = ops.make_seed(123456789, device=device)
    y_dev = ops.lora_linear(x, w, b, a, bb, 1.0, 0.5, seed=seed_dev)
    y_int = ops.lora_linear(x, w, b, a, bb, 1.0, 0.5, seed=123456789)
    assert torch.equal(y_dev, y_int)


def test_a_cpu_kernel_refuses_a_seed_on_another_device():
    x, w, b, a, bb = _problem((3,), 8, 6, 2, torch.float32)
    with pytest.raises(RuntimeError, match="seed must be on the CPU"):
        OPS.lora_linear(x, w, b, a, bb, 1.0, 0.5, torch.zeros((), dtype=torch.long, device="meta"))


@pytest.mark.parametrize("device", CUDA_ONLY)
def test_cuda_graph_replay_draws_a_fresh_mask(device):
    x, w, b, a, bb = _problem((64,), 128, 64, 8, torch.float32, device=device)
    a.requires_grad_()
    static = {}

    def step():
        seed = ops.make_seed(device=device)
        y = ops.lora_linear(x, w, b, a, bb, 1.0, 0.5, seed=seed)
        (ga,) = torch.autograd.grad(y.square().sum(), a)
        static.update(seed=seed, y=y, ga=ga)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    outs = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        outs.append({k: v.clone() for k, v in static.items()})
    assert not torch.equal(outs[0]["seed"], outs[1]["seed"])
    assert not torch.equal(outs[0]["y"], outs[1]["y"])
    for o in outs:  # each replay used the mask of the seed it drew, forward and backward
        want = ops.lora_linear(x, w, b, a.detach(), bb, 1.0, 0.5, seed=o["seed"])
        torch.testing.assert_close(o["y"], want, rtol=1e-6, atol=1e-6)
