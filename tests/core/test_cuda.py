"""CUDA tests of the compiled core (skipped without a GPU).

The same seed gives the same dropout mask on the CPU and the GPU, so these tests check the GPU
against the CPU bit for bit where that is promised (the mask) and against the float64
reference with the 2x rule elsewhere (fp32, fp16, bf16).

LORA_EXT_CUDA_TEST_DEVICE=cpu runs this file on the CPU (a dry run of the test logic on a
machine without a GPU).
"""

from __future__ import annotations

import os

import pytest
import torch

from lora_ext import ops
from lora_ext import reference as ref

DEVICE = torch.device(os.environ.get("LORA_EXT_CUDA_TEST_DEVICE", "cuda"))
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"
    ),
]
OPS = torch.ops.lora_ext
HALF_TYPES = [torch.float16, torch.bfloat16]


def _rand(*shape, dtype=torch.float32, scale=1.0, gen=None, device=DEVICE):
    t = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
    return t.to(device=device, dtype=dtype)


def _problem(lead, d_in, d_out, r, dtype, bias=True, noncontig=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (
        _rand(*lead, 2 * d_in, dtype=dtype, gen=g)[..., ::2]
        if noncontig
        else _rand(*lead, d_in, dtype=dtype, gen=g)
    )
    w = _rand(d_out, d_in, dtype=dtype, scale=d_in**-0.5, gen=g)
    b = _rand(d_out, dtype=dtype, gen=g) if bias else None
    a = _rand(r, d_in, dtype=dtype, scale=d_in**-0.5, gen=g)
    bb = _rand(d_out, r, dtype=dtype, scale=r**-0.5, gen=g)
    return x, w, b, a, bb  # fmt: skip


def _up(t):
    return None if t is None else t.detach().double()


def _grads(fn, x, w, b, a, bb, g):
    x, a, bb = (t.detach().requires_grad_() for t in (x, a, bb))
    y = fn(x, w, b, a, bb)
    return (y, *torch.autograd.grad(y, (x, a, bb), g))


def test_build_has_cuda_kernels_for_this_gpu():
    info = ops.build_info()
    if DEVICE.type != "cuda":
        pytest.skip("dry run on the CPU")
    assert info["cuda"], "lora_ext was built without CUDA: rebuild with FORCE_CUDA=1"
    major, minor = torch.cuda.get_device_capability(DEVICE)
    # a cubin for sm_XY runs on devices of the same major version and minor >= Y
    assert any(
        int(float(a)) == major and round(10 * float(a)) % 10 <= minor
        for a in info["cuda_archs"]
        if a.replace(".", "").isdigit()
    ), (info["cuda_archs"], (major, minor))


@pytest.mark.parametrize(
    "shape,seed,p,offset",
    [((4096,), 1, 0.1, 0), ((33, 77), 2**63 + 11, 0.5, 0), ((5000,), 7, 0.3, (1 << 32) - 2500)],
)
def test_mask_is_the_same_on_cpu_and_gpu(shape, seed, p, offset):
    on_gpu = ops.dropout_mask(torch.empty(shape, device=DEVICE), seed, p, offset=offset)
    on_cpu = ops.dropout_mask(torch.empty(shape), seed, p, offset=offset)
    assert on_gpu.device.type == DEVICE.type
    assert torch.equal(on_gpu.cpu(), on_cpu)
    assert torch.equal(on_cpu, ref.dropout_mask(shape, ops.make_seed(seed), p, offset=offset))


PARITY = [  # (leading dims, in, out, r, bias, non-contiguous x, p)
    ((64,), 256, 128, 16, True, False, 0.0),
    ((3, 37), 129, 65, 4, False, True, 0.0),
    ((64,), 256, 128, 16, True, False, 0.1),
    ((2, 5, 7), 72, 200, 64, True, True, 0.25),
    ((9,), 33, 17, 1, True, False, 0.5),
]


@pytest.mark.parametrize("dtype", [torch.float32, *HALF_TYPES])
@pytest.mark.parametrize("lead,d_in,d_out,r,bias,noncontig,p", PARITY)
def test_parity_with_float64_reference(lead, d_in, d_out, r, bias, noncontig, p, dtype):
    if DEVICE.type == "cpu" and dtype == torch.float16:
        pytest.skip("float16 GEMMs are a CUDA case")
    x, w, b, a, bb = _problem(lead, d_in, d_out, r, dtype, bias, noncontig, seed=r)
    scale, seed = 2.0 / r, 77
    mask = ops.dropout_mask(x, seed, p)
    g = _rand(*lead, d_out, dtype=dtype, gen=torch.Generator().manual_seed(3))

    def ours(*t):
        return ops.lora_linear(*t, scale, p, seed=seed)

    def plain(*t):
        return ref.lora_linear(*t, scale, p, mask=mask)

    got = _grads(ours, x, w, b, a, bb, g)
    same = _grads(plain, x, w, b, a, bb, g)
    exact = _grads(plain, _up(x), _up(w), _up(b), _up(a), _up(bb), _up(g))
    for name, o, s, e in zip(("y", "grad_x", "grad_a", "grad_b"), got, same, exact):
        assert o.device.type == DEVICE.type and o.dtype == dtype and o.shape == e.shape, name
        err, bound = ref.error_bound(o, s, e)
        assert err <= bound, f"{name}: error {err:.3g} > 2x PyTorch's ({bound:.3g})"


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gpu_matches_cpu_with_the_same_seed(p):
    x, w, b, a, bb = _problem((6, 10), 48, 40, 8, torch.float64)
    y_dev = ops.lora_linear(x, w, b, a, bb, 0.5, p, seed=123)
    y_cpu = ops.lora_linear(x.cpu(), w.cpu(), b.cpu(), a.cpu(), bb.cpu(), 0.5, p, seed=123)
    torch.testing.assert_close(y_dev.cpu(), y_cpu, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck_float64(p):
    x, w, b, a, bb = _problem((2, 5), 9, 7, 3, torch.float64)
    inputs = tuple(t.clone().requires_grad_() for t in (x, a, bb))

    def fn(x, a, bb):
        return ops.lora_linear(x, w, b, a, bb, 0.75, p, seed=5)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


def test_runs_on_the_current_stream():
    x, w, b, a, bb = _problem((128,), 64, 32, 4, torch.float32)
    want = ops.lora_linear(x, w, b, a, bb, 1.0, 0.2, seed=9)
    if DEVICE.type != "cuda":
        pytest.skip("dry run on the CPU")
    side = torch.cuda.Stream(DEVICE)
    side.wait_stream(torch.cuda.current_stream(DEVICE))
    with torch.cuda.stream(side):
        got = ops.lora_linear(x, w, b, a, bb, 1.0, 0.2, seed=9)
        w2 = w.clone()
        ops.merge_(w2, a, bb, 0.5)
    side.synchronize()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w2, ref.merge(w, a, bb, 0.5), rtol=1e-6, atol=1e-6)


MERGE = [  # (out, in, r, dtype, transposed)
    (256, 512, 16, torch.float32, False),
    (300, 77, 64, torch.float32, True),
    (256, 512, 16, torch.bfloat16, False),
    (129, 1000, 8, torch.bfloat16, True),
    (64, 33, 1, torch.float16, False),
    (40, 24, 20, torch.float64, True),
]


@pytest.mark.parametrize("d_out,d_in,r,dtype,transposed", MERGE)
def test_merge_matches_float64_rounded_once(d_out, d_in, r, dtype, transposed):
    g = torch.Generator().manual_seed(r)
    w = (
        _rand(d_in, d_out, dtype=dtype, gen=g).t()
        if transposed
        else _rand(d_out, d_in, dtype=dtype, gen=g)
    )
    a, bb = _rand(r, d_in, gen=g), _rand(d_out, r, gen=g)
    before = w.clone()
    want = ref.merge(w, a, bb, 0.3)
    assert ops.merge_(w, a, bb, 0.3) is w
    diff = (w.double() - want.double()).abs()
    if dtype in HALF_TYPES:
        # one step of the dtype, plus the float32 error of the delta where w + delta cancels
        ulp = want.double().abs().clamp(min=torch.finfo(dtype).tiny) * torch.finfo(dtype).eps
        eps32 = torch.finfo(torch.float32).eps
        fp32_err = eps32 * (
            r * 0.3 * (bb.double().abs() @ a.double().abs()) + before.double().abs()
        )
        assert (diff == 0).double().mean().item() > 0.999
        assert bool((diff <= 1.01 * ulp + fp32_err).all())
    else:
        exact = before.double() + 0.3 * (bb.double() @ a.double())
        err, bound = ref.error_bound(
            w, ref.merge_naive(before, a.to(dtype), bb.to(dtype), 0.3), exact
        )
        # float64: the "exact" value is itself a float64 computation, so allow the error of
        # any float64 summation order (r products and one addition per element)
        mag = (before.double().abs() + 0.3 * (bb.double().abs() @ a.double().abs())).max().item()
        bound = max(bound, (r + 1) * torch.finfo(dtype).eps * mag)
        assert err <= bound  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_safe_merge_leaves_weight_bit_identical(dtype):
    w = _rand(64, 48, dtype=dtype)
    a, bb = _rand(4, 48), _rand(64, 4)
    a[1, 3] = float("nan")
    before = w.clone()
    with pytest.raises(ValueError, match="not finite"):
        ops.merge_(w, a, bb, 1.0, safe=True)
    assert torch.equal(w.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       before.view(torch.int16 if dtype != torch.float32 else torch.int32))  # fmt: skip
    # overflow of a float16 weight by a finite delta is caught too
    if dtype == torch.float16:
        big = _rand(4, 48) * 300
        with pytest.raises(ValueError):
            ops.merge_(w, big, _rand(64, 4) * 300, 1.0, safe=True)
        assert torch.equal(w.view(torch.int16), before.view(torch.int16))


def test_merge_round_trip():
    w = _rand(128, 96)
    a, bb = _rand(8, 96, scale=0.1), _rand(128, 8, scale=0.1)
    before = w.clone()
    ops.merge_(w, a, bb, 2.0)
    ops.merge_(w, a, bb, -2.0)
    torch.testing.assert_close(w, before, rtol=0, atol=4 * torch.finfo(torch.float32).eps * 8)


def test_opcheck_on_gpu():
    x, w, b, a, bb = _problem((3, 5), 12, 10, 4, torch.float32)
    seed = ops.make_seed(3)
    y, xa = OPS.lora_linear(x, w, b, a, bb, 0.5, 0.2, seed)
    cases = [
        (OPS.lora_linear.default, (x.requires_grad_(), w, b, a.requires_grad_(), bb, 0.5, 0.2, seed)),
        (OPS.lora_linear_backward.default, (torch.randn_like(y), x.detach(), w, a.detach(), bb, xa, 0.5, 0.2, seed, [True, True, True])),
        (OPS.merge_.default, (_rand(10, 12), a.detach(), bb, 0.5)),
        (OPS.merge_check.default, (_rand(10, 12), a.detach(), bb, 0.5)),
        (OPS.dropout_mask.default, (x.detach(), seed, 0.3, 0)),
    ]  # fmt: skip
    for op, args in cases:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_torch_compile_fullgraph(p):
    torch._dynamo.reset()
    x, w, b, a, bb = _problem((4, 6), 32, 16, 4, torch.float32)
    seed = ops.make_seed(8)

    def step(x, a, bb):
        return ops.lora_linear(x, w, b, a, bb, 0.5, p, seed=seed).square().mean()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    outs = []
    for fn in (step, compiled):
        xs, As, Bs = (t.detach().clone().requires_grad_() for t in (x, a, bb))
        loss = fn(xs, As, Bs)
        loss.backward()
        outs.append((loss.detach(), xs.grad, As.grad, Bs.grad))
    for e, c in zip(*outs):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)


def test_device_mismatch_is_an_error_not_a_crash():
    if DEVICE.type != "cuda":
        pytest.skip("dry run on the CPU")
    x, w, b, a, bb = _problem((3,), 8, 6, 2, torch.float32)
    with pytest.raises(RuntimeError, match="weight is on cpu but x is on cuda"):
        ops.lora_linear(x, w.cpu(), b, a, bb, 1.0)
    with pytest.raises(RuntimeError, match="one device"):
        ops.merge_(w, a.cpu(), bb, 1.0)
