"""Tests of the LoRA-only op ``lora_delta`` (y = s * (drop(x) A^T) B^T, for a base layer that
computes its own output, e.g. bitsandbytes 4-bit): parity with the float64 reference under the
2x rule, gradcheck, the dropout mask of lora_linear for the same seed, saved tensors, opcheck.
Devices as in test_ops.py (the CPU, and CUDA when a GPU is visible)."""

from __future__ import annotations

import pytest
import torch
from test_ops import ALL, _kernel, _kernels, _problem, _rand, _up  # (tests/core on sys.path)
from torch.autograd.graph import saved_tensors_hooks

from lora_ext import ops
from lora_ext import reference as ref

OPS = torch.ops.lora_ext

# (leading dims, in, out, r, non-contiguous x, dropout p)
CASES = [
    ((7,), 33, 17, 1, False, 0.0),
    ((3, 11), 45, 70, 16, "cols", 0.0),
    ((130,), 37, 29, 64, "rows", 0.5),
    ((2, 5, 7), 72, 200, 8, False, 0.25),
]


def _cases():
    out = []
    for d in ALL:
        dev = d.values[0]
        for k in _kernels(dev):
            out.append(pytest.param(dev, torch.float32, k, marks=d.marks, id=f"{dev}-f32-{k}"))
        for dtype in (torch.bfloat16, torch.float16):
            k = _kernels(dev)[0]
            out.append(pytest.param(dev, dtype, k, marks=d.marks, id=f"{dev}-{dtype}-{k}"))
    return out


def _grads(fn, x, a, bb, g):
    x, a, bb = (t.detach().requires_grad_() for t in (x, a, bb))
    y = fn(x, a, bb)
    return (y, *torch.autograd.grad(y, (x, a, bb), g))


@pytest.mark.parametrize("device,dtype,kernel", _cases())
@pytest.mark.parametrize("lead,d_in,d_out,r,noncontig,p", CASES)
def test_parity_with_float64_reference(lead, d_in, d_out, r, noncontig, p, device, dtype, kernel):
    x, _, _, a, bb = _problem(lead, d_in, d_out, r, dtype, False, noncontig, seed=r, device=device)
    scale, seed = 2.0 / r, 77 + r
    mask = ref.dropout_mask(x.shape, seed, p, device=device)
    g = _rand(*lead, d_out, dtype=dtype, gen=torch.Generator().manual_seed(3), device=device)

    def ours(*t):
        return ops.lora_delta(*t, scale, p, seed=seed)

    def plain(*t):
        return ref.lora_delta(*t, scale, p, mask=mask)

    with _kernel(device, kernel):
        got = _grads(ours, x, a, bb, g)
    same = _grads(plain, x, a, bb, g)
    exact = _grads(plain, _up(x), _up(a), _up(bb), _up(g))
    for name, o, s, e in zip(("y", "grad_x", "grad_a", "grad_b"), got, same, exact):
        assert o.device.type == device and o.dtype == dtype and o.shape == e.shape, name
        err, bound = ref.error_bound(o, s, e)
        assert err <= bound, f"{name}: error {err:.3g} > 2x PyTorch's ({bound:.3g})"


@pytest.mark.parametrize("device", ALL)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck_float64(p, device):
    x, _, _, a, bb = _problem((2, 5), 9, 7, 3, torch.float64, device=device)
    inputs = tuple(t.clone().requires_grad_() for t in (x, a, bb))

    def fn(x, a, bb):  # a fixed seed: the finite differences see the same mask
        return ops.lora_delta(x, a, bb, 0.75, p, seed=99)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)
    assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", ALL)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_mask_is_lora_linears_for_the_same_seed(p, device):
    """lora_linear(x, W, b) == x W^T + b + lora_delta(x) with the same seed, bit for bit in
    float64 up to the summation order; and lora_delta with W = 0 equals lora_linear exactly."""
    x, w, b, a, bb = _problem((6, 5), 24, 16, 4, torch.float64, device=device)
    delta = ops.lora_delta(x, a, bb, 0.5, p, seed=1234)
    zero_w = torch.zeros_like(w)
    assert torch.equal(delta, ops.lora_linear(x, zero_w, None, a, bb, 0.5, p, seed=1234))
    full = ops.lora_linear(x, w, b, a, bb, 0.5, p, seed=1234)
    torch.testing.assert_close(full, x @ w.t() + b + delta, rtol=1e-12, atol=1e-12)
    mask = ops.dropout_mask(x, 1234, p)
    torch.testing.assert_close(delta, ref.lora_delta(x, a, bb, 0.5, p, mask=mask))
    # and the gradients of x, A, B agree with lora_linear's LoRA part
    xs, as_, bs = (t.clone().requires_grad_() for t in (x, a, bb))
    ops.lora_delta(xs, as_, bs, 0.5, p, seed=1234).square().sum().backward()
    xl, al, bl = (t.clone().requires_grad_() for t in (x, a, bb))
    ops.lora_linear(xl, zero_w, None, al, bl, 0.5, p, seed=1234).square().sum().backward()
    for got, want in ((xs.grad, xl.grad), (as_.grad, al.grad), (bs.grad, bl.grad)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("device", ALL)
def test_saved_tensors_hold_nothing_of_x_size_but_x(device):
    x, _, _, a, bb = _problem((8, 16), 64, 48, 4, torch.float32, device=device)
    x.requires_grad_()
    a.requires_grad_()
    bb.requires_grad_()
    saved = []
    with saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = ops.lora_delta(x, a, bb, 0.5, 0.1)
    big = [t for t in saved if t.numel() >= x.numel()]
    assert all(t.data_ptr() == x.data_ptr() for t in big), [t.shape for t in big]
    assert sum(t.numel() for t in saved if t.dim() == 3 and t.shape[-1] == 4) == 8 * 16 * 4
    y.sum().backward()


@pytest.mark.parametrize("device", ALL)
def test_bad_arguments_name_the_argument(device):
    x, _, _, a, bb = _problem((3,), 8, 5, 2, torch.float32, device=device)
    with pytest.raises(RuntimeError, match="lora_a must have shape"):
        ops.lora_delta(x, a[:, :4], bb, 1.0)
    with pytest.raises(RuntimeError, match="lora_b must have shape"):
        ops.lora_delta(x, a, bb[:, :1], 1.0)
    with pytest.raises(RuntimeError, match="lora_b has dtype"):
        ops.lora_delta(x, a, bb.double(), 1.0)
    with pytest.raises(ValueError, match="dropout_p"):
        ops.lora_delta(x, a, bb, 1.0, 1.0)
    with pytest.raises(ValueError, match="scale"):
        ops.lora_delta(x, a, bb, float("nan"))


@pytest.mark.parametrize("device", ALL)
def test_empty_batch(device):
    x, _, _, a, bb = _problem((0, 3), 8, 5, 2, torch.float32, device=device)
    x.requires_grad_()
    a.requires_grad_()
    y = ops.lora_delta(x, a, bb, 1.0, 0.3, seed=1)
    assert y.shape == (0, 3, 5)
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(a.grad, torch.zeros_like(a))


def _opcheck_cases(device):
    x, _, _, a, bb = _problem((3, 5), 12, 10, 4, torch.float32, noncontig=True, device=device)
    seed = ops.make_seed(11)
    y, xa = OPS.lora_delta(x, a, bb, 0.5, 0.2, seed)
    gy = torch.randn_like(y)
    a, bb = a.detach(), bb.detach()
    return [
        (OPS.lora_delta.default, (x.requires_grad_(), a.clone().requires_grad_(), bb, 0.5, 0.0, seed)),
        (OPS.lora_delta.default, (x, a, bb.clone().requires_grad_(), 0.5, 0.2, seed)),
        (OPS.lora_delta_backward.default, (gy, x.detach(), a, bb, xa, 0.5, 0.2, seed, [True, True, True])),
        (OPS.lora_delta_backward.default, (gy, x.detach(), a, bb, xa, 0.5, 0.0, seed, [False, True, False])),
    ]  # fmt: skip


@pytest.mark.parametrize("device", ALL)
@pytest.mark.parametrize("case", range(4))
def test_opcheck(case, device):
    ops.load_library()
    op, args = _opcheck_cases(device)[case]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", ALL)
def test_torch_compile_fullgraph(device):
    x, _, _, a, bb = _problem((4, 6), 16, 12, 4, torch.float32, device=device)
    a.requires_grad_()

    def fn(x, a, bb):
        return ops.lora_delta(x, a, bb, 0.5, 0.0)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    y = compiled(x, a, bb)
    torch.testing.assert_close(y, fn(x, a, bb))
    y.sum().backward()
    assert a.grad is not None
