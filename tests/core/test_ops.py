"""Tests of the compiled core, one table over every available device: lora_linear (forward,
backward, dropout), merge_, the checks, opcheck and torch.compile.

Devices: the CPU, and CUDA when a GPU is visible; LORA_EXT_TEST_DEVICES=cuda (or cpu) runs one
device's cases only (gpu-check runs the CUDA ones; CI runs the CPU ones on every push). On the
GPU every case also runs with each CUDA kernel variant (``ops.cuda_kernels``).

Accuracy rule (flash-attention's): our error at most 2x the error of the same computation in
plain PyTorch in the same dtype, both measured against float64 (lora_ext.reference).
"""

from __future__ import annotations

import contextlib
import math
import os

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks
from torch.utils._python_dispatch import TorchDispatchMode

from lora_ext import ops
from lora_ext import reference as ref

OPS = torch.ops.lora_ext


def _available_devices() -> list[str]:
    env = os.environ.get("LORA_EXT_TEST_DEVICES")
    if env:
        return [d.strip() for d in env.split(",") if d.strip()]
    return ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


DEVICES = _available_devices()
HAS_CUDA = "cuda" in DEVICES and torch.cuda.is_available()


def _on(devices) -> list:
    """pytest params of the given devices that are available, CUDA ones marked `cuda`."""
    no_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    return [
        pytest.param(d, marks=[pytest.mark.cuda, no_gpu] if d == "cuda" else [], id=d)
        for d in devices
        if d in DEVICES
    ]


ALL = _on(["cpu", "cuda"])
CUDA_ONLY = _on(["cuda"]) or [pytest.param("cuda", marks=pytest.mark.skip("no CUDA device"))]
CPU_ONLY = _on(["cpu"]) or [pytest.param("cpu", marks=pytest.mark.skip("CPU cases not selected"))]


def _rand(*shape, dtype=torch.float32, scale=1.0, gen=None, device="cpu"):
    t = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
    return t.to(device=device, dtype=dtype)


def _problem(lead, d_in, d_out, r, dtype, bias=True, noncontig=False, seed=0, device="cpu"):
    """Fresh random inputs; weights scaled like nn.Linear init so outputs are O(1).
    noncontig: "cols" takes every other column (stride(-1) == 2), "rows" a column slice of a
    wider matrix (row stride > in, as big[:, :in]); True means "cols"."""
    g = torch.Generator().manual_seed(seed)
    if noncontig in (True, "cols"):
        x = _rand(*lead, 2 * d_in, dtype=dtype, gen=g, device=device)[..., ::2]
    elif noncontig == "rows":
        x = _rand(*lead, d_in + 7, dtype=dtype, gen=g, device=device)[..., :d_in]
    else:
        x = _rand(*lead, d_in, dtype=dtype, gen=g, device=device)
    w = _rand(d_out, d_in, dtype=dtype, scale=d_in**-0.5, gen=g, device=device)
    b = _rand(d_out, dtype=dtype, gen=g, device=device) if bias else None
    a = _rand(r, d_in, dtype=dtype, scale=d_in**-0.5, gen=g, device=device)
    bb = _rand(d_out, r, dtype=dtype, scale=r**-0.5, gen=g, device=device)
    return x, w, b, a, bb


def _grads(fn, x, w, b, a, bb, g):
    """Output and gradients w.r.t. (x, a, bb) of fn(x, w, b, a, bb) for output gradient g."""
    x, a, bb = (t.detach().requires_grad_() for t in (x, a, bb))
    y = fn(x, w, b, a, bb)
    return (y, *torch.autograd.grad(y, (x, a, bb), g))


def _up(t):
    return None if t is None else t.detach().double()


@contextlib.contextmanager
def _kernel(device: str, kernel: str):
    """Select the kernel variant for a block: on the CPU "avx512" (the register-tiled rank-r
    kernel, where the CPU has AVX-512) or "aten" (ATen's GEMM); on CUDA "simple" or "fast"."""
    if device == "cuda":
        with ops.cuda_kernels(kernel):
            yield
        return
    from lora_ext import _C

    before = _C._set_cpu_rank_update_kernel(kernel == "avx512")
    try:
        yield
    finally:
        _C._set_cpu_rank_update_kernel(before)


def _kernels(device: str) -> list[str]:
    if device == "cuda":
        return ops.cuda_kernel_variants() if HAS_CUDA else ["simple"]
    return ["avx512", "aten"]


# (leading dims, in, out, r, bias, non-contiguous x, dropout p)
PARITY = [
    ((7,), 33, 17, 1, True, False, 0.0),
    ((5, 9), 64, 48, 4, False, False, 0.0),
    ((3, 11), 45, 70, 16, True, "cols", 0.0),
    ((130,), 37, 29, 64, True, False, 0.0),
    ((2, 3, 5), 20, 24, 4, True, "rows", 0.0),
    ((64,), 256, 128, 16, True, False, 0.0),
    ((7,), 33, 17, 1, True, False, 0.1),
    ((3, 11), 45, 70, 16, False, "cols", 0.25),
    ((130,), 37, 29, 64, True, "rows", 0.5),
    ((2, 71), 50, 30, 4, True, "cols", 0.9),
    ((2, 5, 7), 72, 200, 64, True, "rows", 0.25),
]


def _dtype_kernel_cases():
    """(device, dtype, kernel): float32 with every kernel variant, the 16-bit types too (the CPU
    runs float16 in float32 and rounds once)."""
    out = []
    for d in ALL:
        dev = d.values[0]
        for k in _kernels(dev):
            out.append(pytest.param(dev, torch.float32, k, marks=d.marks, id=f"{dev}-f32-{k}"))
        k = _kernels(dev)[-1] if dev == "cuda" else "avx512"
        out.append(pytest.param(dev, torch.bfloat16, k, marks=d.marks, id=f"{dev}-bf16-{k}"))
        for k in _kernels(dev) if dev == "cuda" else ["avx512"]:
            out.append(pytest.param(dev, torch.float16, k, marks=d.marks, id=f"{dev}-f16-{k}"))
    return out


@pytest.mark.parametrize("device,dtype,kernel", _dtype_kernel_cases())
@pytest.mark.parametrize("lead,d_in,d_out,r,bias,noncontig,p", PARITY)
def test_parity_with_float64_reference(
    lead, d_in, d_out, r, bias, noncontig, p, device, dtype, kernel
):
    x, w, b, a, bb = _problem(
        lead, d_in, d_out, r, dtype, bias, noncontig, seed=len(lead) + r, device=device
    )
    scale, seed = 2.0 / r, 1234 + r
    mask = ref.dropout_mask(x.shape, seed, p, device=device)
    g = _rand(*lead, d_out, dtype=dtype, gen=torch.Generator().manual_seed(7), device=device)

    def ours(*t):
        return ops.lora_linear(*t, scale, p, seed=seed)

    def plain(*t):
        return ref.lora_linear(*t, scale, p, mask=mask)

    with _kernel(device, kernel):
        got = _grads(ours, x, w, b, a, bb, g)
    same = _grads(plain, x, w, b, a, bb, g)
    exact = _grads(plain, _up(x), _up(w), _up(b), _up(a), _up(bb), _up(g))
    for name, o, s, e in zip(("y", "grad_x", "grad_a", "grad_b"), got, same, exact):
        assert o.device.type == device and o.dtype == dtype and o.shape == e.shape, name
        err, bound = ref.error_bound(o, s, e)
        assert err <= bound, f"{name}: error {err:.3g} > 2x PyTorch's ({bound:.3g})"


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_a_realistic_shape_on_the_gpu(device, p):
    """2048 tokens x 1024 features in bf16: grid-stride loops run several iterations."""
    x, w, b, a, bb = _problem((2048,), 1024, 512, 16, torch.bfloat16, seed=5, device=device)
    mask = ref.dropout_mask(x.shape, 3, p, device=device)
    g = _rand(2048, 512, dtype=torch.bfloat16, gen=torch.Generator().manual_seed(1), device=device)
    for kernel in _kernels(device):
        with _kernel(device, kernel):
            got = _grads(lambda *t: ops.lora_linear(*t, 0.5, p, seed=3), x, w, b, a, bb, g)
        same = _grads(lambda *t: ref.lora_linear(*t, 0.5, p, mask=mask), x, w, b, a, bb, g)
        exact = _grads(
            lambda *t: ref.lora_linear(*t, 0.5, p, mask=mask),
            *(_up(t) for t in (x, w, b, a, bb)),
            _up(g),
        )
        for name, o, s, e in zip(("y", "grad_x", "grad_a", "grad_b"), got, same, exact):
            err, bound = ref.error_bound(o, s, e)
            assert err <= bound, f"{kernel} {name}: error {err:.3g} > bound {bound:.3g}"


@pytest.mark.parametrize(
    "tokens,d_in,d_out,r", [(1, 8, 1, 1), (5, 19, 63, 3), (67, 40, 65, 16), (9, 16, 130, 64)]
)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("device", ALL)
def test_kernel_variants_agree(tokens, d_in, d_out, r, p, device):
    """Edges of the tiles (row counts not divisible by the tile, masked column tails): every
    kernel variant of a device gives what the first one gives."""
    if device == "cpu" and not ops.build_info()["cpu_rank_update_kernel"]:
        pytest.skip("this CPU has no AVX-512: ATen's GEMM is the only path")
    x, w, b, a, bb = _problem((tokens,), d_in, d_out, r, torch.float32, seed=r, device=device)
    g = _rand(tokens, d_out, gen=torch.Generator().manual_seed(3), device=device)

    def ours(*t):
        return ops.lora_linear(*t, 0.7, p, seed=11)

    results = []
    for kernel in _kernels(device):
        with _kernel(device, kernel):
            results.append(_grads(ours, x, w, b, a, bb, g))
    for other in results[1:]:
        for name, t, e in zip(("y", "grad_x", "grad_a", "grad_b"), other, results[0]):
            torch.testing.assert_close(t, e, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("device", ALL)
def test_non_contiguous_weight_like_gpt2_conv1d(device):
    # GPT-2 Conv1D stores weight as [in, out]; the layer passes weight.t() (stride (1, out))
    x, _, b, a, bb = _problem((4, 6), 24, 40, 8, torch.float32, device=device)
    w = _rand(24, 40, scale=24**-0.5, device=device).t()
    assert not w.is_contiguous()
    y = ops.lora_linear(x, w, b, a, bb, 0.5)
    exact = ref.lora_linear(*(_up(t) for t in (x, w, b, a, bb)), 0.5)
    err, bound = ref.error_bound(y, ref.lora_linear(x, w, b, a, bb, 0.5), exact)
    assert err <= bound


@pytest.mark.parametrize("device", ALL)
def test_empty_batch(device):
    x, w, b, a, bb = _problem((0, 3), 8, 5, 2, torch.float32, device=device)
    x.requires_grad_()
    a.requires_grad_()
    y = ops.lora_linear(x, w, b, a, bb, 1.0, 0.3, seed=1)
    assert y.shape == (0, 3, 5)
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(a.grad, torch.zeros_like(a))


@pytest.mark.parametrize("device", ALL)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck_float64(p, device):
    x, w, b, a, bb = _problem((2, 5), 9, 7, 3, torch.float64, device=device)
    inputs = tuple(t.clone().requires_grad_() for t in (x, a, bb))

    def fn(x, a, bb):  # a fixed seed: the finite differences see the same mask
        return ops.lora_linear(x, w, b, a, bb, 0.75, p, seed=99)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", ALL)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_double_backward_matches_the_reference(p, device):
    """backward(create_graph=True) is differentiable (it was silently zero): gradgradcheck,
    and a gradient penalty equal to the reference's."""
    x, w, b, a, bb = _problem((2, 5), 9, 7, 3, torch.float64, device=device)
    inputs = tuple(t.clone().requires_grad_() for t in (x, a, bb))

    def fn(x, a, bb):
        return ops.lora_linear(x, w, b, a, bb, 0.75, p, seed=99)

    assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-6)

    def penalty(f):
        xs, As, Bs = (t.detach().clone().requires_grad_() for t in inputs)
        y = f(xs, As, Bs)
        (gx,) = torch.autograd.grad(y.square().sum(), xs, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), (As, Bs))

    mask = ref.dropout_mask(x.shape, 99, p, device=device)
    want = penalty(lambda x, a, bb: ref.lora_linear(x, w, b, a, bb, 0.75, p, mask=mask))
    got = penalty(fn)
    for g_, w_ in zip(got, want):
        assert g_.abs().max() > 0
        torch.testing.assert_close(g_, w_, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", ALL)
@pytest.mark.parametrize(
    "needs",
    [(True, True, True), (False, True, True), (True, False, False), (False, False, True),
     (True, True, False), (False, True, False)],
)  # fmt: skip
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_backward_honours_needs_input_grad(needs, p, device):
    """Only the wanted gradients are computed (output_mask) and they are right (on CUDA also
    the masked gradient kernel with only one of grad_x / grad_a wanted)."""
    x, w, b, a, bb = _problem((6, 5), 16, 12, 4, torch.float32, device=device)
    x, a, bb = (t.requires_grad_(n) for t, n in zip((x, a, bb), needs))
    masks = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is OPS.lora_linear_backward.default:
                masks.append(list(args[-1]))
            return func(*args, **(kwargs or {}))

    for kernel in _kernels(device)[:2]:
        for t in (x, a, bb):
            t.grad = None
        masks.clear()
        with Spy(), _kernel(device, kernel):
            y = ops.lora_linear(x, w, b, a, bb, 0.5, p, seed=3)
            y.square().sum().backward()
        assert masks == [list(needs)]
        x64, a64, b64 = (_up(t).requires_grad_() for t in (x, a, bb))
        y64 = ref.lora_linear(x64, _up(w), _up(b), a64, b64, 0.5, p, seed=3)
        exact = torch.autograd.grad(y64.square().sum(), (x64, a64, b64))
        for t, e, n in zip((x, a, bb), exact, needs):
            if n:
                torch.testing.assert_close(t.grad.double(), e, rtol=1e-4, atol=1e-4)
            else:
                assert t.grad is None


@pytest.mark.parametrize("device", ALL)
def test_saved_tensors_hold_nothing_of_x_size_but_x(device):
    """With dropout, backward keeps x itself and [.., r] tensors: no mask, no dropped copy."""
    x, w, b, a, bb = _problem((8, 16), 64, 48, 4, torch.float32, device=device)
    x.requires_grad_()
    a.requires_grad_()
    bb.requires_grad_()
    saved = []
    with saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = ops.lora_linear(x, w, b, a, bb, 0.5, 0.1)
    big = [t for t in saved if t.numel() >= x.numel()]
    assert all(t.data_ptr() == x.data_ptr() for t in big), [t.shape for t in big]
    assert sum(t.numel() for t in saved if t.dim() == 3 and t.shape[-1] == 4) == 8 * 16 * 4
    y.sum().backward()


@pytest.mark.parametrize("device", ALL)
def test_float16_partial_sums_do_not_overflow(device):
    """bias + s xa B^T = -70000 leaves float16's range, y = -20000 does not (issue 13, item 5):
    partial sums stay in float32 until the final write."""
    h = lambda v: torch.tensor(v, dtype=torch.float16, device=device)  # noqa: E731
    y = ops.lora_linear(h([[1.0]]), h([[5e4]]), h([-2e4]), h([[1.0]]), h([[-2.5e4]]), 2.0)
    assert y.item() == -20000.0


# ------------------------------------------------------------------------------------ dropout


@pytest.mark.parametrize("device", ALL)
@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_dropout_kept_fraction_within_statistical_bounds(p, device):
    n = 1 << 18
    like = torch.empty(n, device=device)
    kept = ops.dropout_mask(like, seed=2024, dropout_p=p).double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(kept - (1 - p)) < 5 * sigma, (kept, 1 - p, sigma)


@pytest.mark.parametrize("device", ALL)
def test_dropout_mask_is_a_function_of_seed_and_index(device):
    like = torch.empty(37, 129, device=device)
    m1 = ops.dropout_mask(like, 7, 0.3)
    assert m1.device.type == device
    assert torch.equal(m1, ops.dropout_mask(like, 7, 0.3))
    assert not torch.equal(m1, ops.dropout_mask(like, 8, 0.3))
    # the same as the pure-PyTorch mirror of csrc/rng.h (and so as every device), bit for bit
    assert torch.equal(m1.cpu(), ref.dropout_mask(like.shape, 7, 0.3))
    # index-based: a slice of the flat index range gives the same bits as the whole
    flat = ops.dropout_mask(torch.empty(37 * 129, device=device), 7, 0.3)
    part = ops.dropout_mask(torch.empty(500, device=device), 7, 0.3, offset=1000)
    assert torch.equal(flat[1000:1500], part)
    # adjacent seeds are not correlated
    agree = (m1 == ops.dropout_mask(like, 8, 0.3)).double().mean().item()
    assert abs(agree - (0.7**2 + 0.3**2)) < 0.02


@pytest.mark.parametrize("device", ALL)
@pytest.mark.parametrize("seed", [0, 1, -1, 2**62 + 12345, 2**64 - 5])
def test_dropout_mask_matches_reference_across_the_2_to_32_index_boundary(seed, device):
    offset = (1 << 32) - 3000  # the CPU kernel splits runs where the high index word changes
    got = ops.dropout_mask(torch.empty(6000, device=device), seed, 0.4, offset=offset)
    want = ref.dropout_mask((6000,), ops.make_seed(seed), 0.4, offset=offset)
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("device", ALL)
def test_dropout_uses_that_mask_and_is_reproducible_under_manual_seed(device):
    x, w, b, a, bb = _problem((4, 9), 32, 16, 4, torch.float32, device=device)
    y = ops.lora_linear(x, w, b, a, bb, 1.0, 0.5, seed=5)
    mask = ops.dropout_mask(x, 5, 0.5)
    exact = ref.lora_linear(*(_up(t) for t in (x, w, b, a, bb)), 1.0, 0.5, mask=mask)
    err, bound = ref.error_bound(y, ref.lora_linear(x, w, b, a, bb, 1.0, 0.5, mask=mask), exact)
    assert err <= bound
    torch.manual_seed(0)
    y1 = ops.lora_linear(x, w, b, a, bb, 1.0, 0.5)
    y2 = ops.lora_linear(x, w, b, a, bb, 1.0, 0.5)  # fresh seed: another mask
    torch.manual_seed(0)
    assert torch.equal(y1, ops.lora_linear(x, w, b, a, bb, 1.0, 0.5))
    assert not torch.equal(y1, y2)
    # dropout_p = 0 ignores the seed
    assert torch.equal(
        ops.lora_linear(x, w, b, a, bb, 1.0, 0.0, seed=1),
        ops.lora_linear(x, w, b, a, bb, 1.0, 0.0, seed=2),
    )


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gpu_matches_cpu_with_the_same_seed(p, device):
    x, w, b, a, bb = _problem((6, 10), 48, 40, 8, torch.float64, device=device)
    y_dev = ops.lora_linear(x, w, b, a, bb, 0.5, p, seed=123)
    y_cpu = ops.lora_linear(x.cpu(), w.cpu(), b.cpu(), a.cpu(), bb.cpu(), 0.5, p, seed=123)
    torch.testing.assert_close(y_dev.cpu(), y_cpu, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", CPU_ONLY)
def test_dropout_does_not_depend_on_thread_count(device):
    x, w, b, a, bb = _problem((300,), 40, 8, 4, torch.float64)
    a.requires_grad_()
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            a.grad = None
            y = ops.lora_linear(x, w, b, a, bb, 1.0, 0.3, seed=9)
            y.sum().backward()
            results.append((y.detach(), a.grad.clone()))
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", CUDA_ONLY)
def test_runs_on_the_current_stream(device):
    x, w, b, a, bb = _problem((128,), 64, 32, 4, torch.float32, device=device)
    want = ops.lora_linear(x, w, b, a, bb, 1.0, 0.2, seed=9)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        got = ops.lora_linear(x, w, b, a, bb, 1.0, 0.2, seed=9)
        w2 = w.clone()
        ops.merge_(w2, a, bb, 0.5)
    side.synchronize()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w2, ref.merge(w, a, bb, 0.5), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", CUDA_ONLY)
def test_build_has_cuda_kernels_for_this_gpu(device):
    info = ops.build_info()
    assert info["cuda"], "lora_ext was built without CUDA: rebuild with FORCE_CUDA=1"
    major, minor = torch.cuda.get_device_capability(device)
    # a cubin for sm_XY runs on devices of the same major version and minor >= Y
    assert any(
        int(float(a)) == major and round(10 * float(a)) % 10 <= minor
        for a in info["cuda_archs"]
        if a.replace(".", "").isdigit()
    ), (info["cuda_archs"], (major, minor))


# ------------------------------------------------------------------------- opcheck, compile


def _opcheck_cases(device):
    x, w, b, a, bb = _problem((3, 5), 12, 10, 4, torch.float32, noncontig=True, device=device)
    seed = ops.make_seed(11)
    y, xa = OPS.lora_linear(x, w, b, a, bb, 0.5, 0.2, seed)
    gy = torch.randn_like(y)
    wt = _rand(12, 10, device=device).t()  # a transposed (Conv1D-style) weight
    a, bb = a.detach(), bb.detach()
    return [
        (OPS.lora_linear.default, (x.requires_grad_(), w, b, a.clone().requires_grad_(), bb, 0.5, 0.0, seed)),
        (OPS.lora_linear.default, (x, w, None, a, bb.clone().requires_grad_(), 0.5, 0.2, seed)),
        (OPS.lora_linear_backward.default, (gy, x.detach(), w, a, bb, xa, 0.5, 0.2, seed, [True, True, True])),
        (OPS.lora_linear_backward.default, (gy, x.detach(), w, a, bb, xa, 0.5, 0.0, seed, [False, True, False])),
        (OPS.merge_.default, (_rand(10, 12, device=device), a, bb, 0.5)),
        (OPS.merge_.default, (wt, a, bb, 0.5)),
        (OPS.merge_.default, (_rand(10, 12, dtype=torch.bfloat16, device=device), a, bb, 0.5)),
        (OPS.merge_check.default, (_rand(10, 12, device=device), a, bb, 0.5)),
        (OPS.dropout_mask.default, (x.detach(), seed, 0.3, 0)),
    ]  # fmt: skip


@pytest.mark.parametrize("device", ALL)
@pytest.mark.parametrize("case", range(9))
def test_opcheck(case, device):
    op, args = _opcheck_cases(device)[case]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", ALL)
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_torch_compile_fullgraph(p, device):
    torch._dynamo.reset()
    x, w, b, a, bb = _problem((4, 6), 16, 12, 4, torch.float32, device=device)
    seed = ops.make_seed(21)

    def step(x, a, bb, seed):
        return ops.lora_linear(x, w, b, a, bb, 0.5, p, seed=seed).square().mean()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    outs = []
    for fn in (step, compiled):
        xs, As, Bs = (t.detach().clone().requires_grad_() for t in (x, a, bb))
        loss = fn(xs, As, Bs, seed)
        loss.backward()
        outs.append((loss.detach(), xs.grad, As.grad, Bs.grad))
    for e, c in zip(*outs):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", ALL)
def test_torch_compile_draws_a_fresh_seed_per_step(device):
    torch._dynamo.reset()
    x, w, b, a, bb = _problem((4, 6), 16, 12, 4, torch.float32, device=device)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def fwd(x):
        return ops.lora_linear(x, w, b, a, bb, 0.5, 0.5)

    torch.manual_seed(3)
    y1, y2 = fwd(x), fwd(x)
    torch.manual_seed(3)
    assert torch.equal(y1, fwd(x)) and not torch.equal(y1, y2)


# -------------------------------------------------------------------------------------- merge


def _ulp(t: torch.Tensor) -> torch.Tensor:
    """Spacing of t's dtype at each value of t (as float64)."""
    eps = torch.finfo(t.dtype).eps
    tiny = torch.finfo(t.dtype).tiny
    return torch.clamp(t.double().abs(), min=tiny) * eps


def _merge_tolerance(w, a, bb, scale, rounded):
    """Allowed |merge_(w) - round(exact)| for a 16-bit w: one step of w's dtype, plus the float32
    error of the accumulated delta (which matters where w + delta nearly cancels)."""
    eps32 = torch.finfo(torch.float32).eps
    mag = abs(scale) * (bb.double().abs() @ a.double().abs())
    fp32_err = eps32 * (a.shape[0] * mag + w.double().abs())
    return 1.01 * _ulp(rounded) + fp32_err


MERGE = [  # (out, in, r, dtype, transposed)
    (64, 48, 4, torch.float32, False),
    (37, 91, 16, torch.float32, True),
    (300, 200, 64, torch.float32, False),
    (64, 48, 4, torch.bfloat16, False),
    (37, 91, 16, torch.bfloat16, True),
    (256, 512, 16, torch.bfloat16, False),
    (129, 1000, 8, torch.bfloat16, True),
    (129, 33, 1, torch.float16, False),
    (20, 30, 8, torch.float64, True),
]


@pytest.mark.parametrize("device", ALL)
@pytest.mark.parametrize("d_out,d_in,r,dtype,transposed", MERGE)
def test_merge_matches_float64_rounded_once(d_out, d_in, r, dtype, transposed, device):
    g = torch.Generator().manual_seed(d_out * r)
    w = (
        _rand(d_in, d_out, dtype=dtype, gen=g, device=device).t()
        if transposed
        else _rand(d_out, d_in, dtype=dtype, gen=g, device=device)
    )
    a = _rand(r, d_in, gen=g, device=device)  # adapters in float32 over a weight of another dtype
    bb = _rand(d_out, r, gen=g, device=device)
    scale = 0.3
    exact_rounded = ref.merge(w, a, bb, scale)
    before = w.clone()
    for kernel in _kernels(device)[:1] if device == "cpu" else _kernels(device):
        w = before.clone()  # clone keeps the (transposed) strides
        with _kernel(device, kernel):
            out = ops.merge_(w, a, bb, scale)
        assert out is w and w.stride() == before.stride()
        if dtype in (torch.bfloat16, torch.float16):
            # fp32 accumulation then one rounding: equal to round(exact) except where the exact
            # value is within fp32 error of a rounding boundary, and then off by one step at most
            diff = (w.double() - exact_rounded.double()).abs()
            assert (diff == 0).double().mean().item() > 0.999, kernel
            assert bool((diff <= _merge_tolerance(before, a, bb, scale, exact_rounded)).all())
        else:
            exact64 = before.double() + scale * (bb.double() @ a.double())
            err, bound = ref.error_bound(
                w, ref.merge_naive(before, a.to(dtype), bb.to(dtype), scale), exact64
            )
            # float64: the "exact" value is a float64 computation too: allow the error of any
            # summation order (r products and one addition per element)
            mag = (before.double().abs() + scale * (bb.double().abs() @ a.double().abs())).max()
            bound = max(bound, (r + 1) * torch.finfo(dtype).eps * mag.item())
            assert err <= bound, kernel


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("transposed", [False, True])
def test_bf16_merge_on_the_gpu_is_bit_identical_to_the_cpus(transposed, device):
    g = torch.Generator().manual_seed(4)
    w = _rand(256, 384, dtype=torch.bfloat16, gen=g)
    w = w.t().contiguous().t() if transposed else w
    a, bb = _rand(16, 384, gen=g, scale=0.05), _rand(256, 16, gen=g, scale=0.05)
    on_cpu = w.clone()
    ops.merge_(on_cpu, a, bb, 2.0)
    for kernel in _kernels(device):
        on_gpu = w.to(device)
        on_gpu = on_gpu.t().contiguous().t() if transposed else on_gpu
        with _kernel(device, kernel):
            ops.merge_(on_gpu, a.to(device), bb.to(device), 2.0)
        # one rounding of an fp32 sum; the sums agree unless fp32 order differs at a tie
        same = (on_gpu.cpu().view(torch.int16) == on_cpu.view(torch.int16)).double().mean()
        assert same.item() > 0.999, kernel


@pytest.mark.parametrize("device", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transposed", [False, True])
def test_merge_unmerge_round_trip(dtype, transposed, device):
    w = _rand(96, 80, dtype=dtype, device=device)
    w = w.t().contiguous().t() if transposed else w
    a, bb = _rand(8, 80, scale=0.1, device=device), _rand(96, 8, scale=0.1, device=device)
    before = w.clone()
    ops.merge_(w, a, bb, 2.0)
    assert not torch.equal(w, before)
    ops.merge_(w, a, bb, -2.0)
    # each step rounds once: back within one unit in the last place (of the larger magnitude)
    merged = ref.merge(before, a, bb, 2.0)
    tol = _ulp(torch.maximum(before.double().abs(), merged.double().abs()).to(dtype))
    assert bool(((w.double() - before.double()).abs() <= 1.01 * tol + 1e-30).all())


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("device", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", ["nan_a", "inf_b", "overflow"])
def test_safe_merge_leaves_weight_bit_identical(dtype, bad, device):
    w = _rand(32, 24, dtype=dtype, device=device)
    a, bb = _rand(4, 24, device=device), _rand(32, 4, device=device)
    if bad == "nan_a":
        a[2, 5] = float("nan")
    elif bad == "inf_b":
        bb[7, 1] = float("inf")
    else:  # finite factors whose product overflows (float16: overflows the weight only)
        k = 300.0 if dtype == torch.float16 else 1e20
        a, bb = a * k, bb * k
    before = w.clone()
    with pytest.raises(ValueError, match="not finite"):
        ops.merge_(w, a, bb, 1.0, safe=True)
    assert torch.equal(_bits(w), _bits(before))
    # the unsafe merge does write the non-finite values (it is the caller's choice)
    ops.merge_(w, a, bb, 1.0)
    assert not bool(torch.isfinite(w).all())


@pytest.mark.parametrize("device", ALL)
def test_safe_merge_of_finite_delta_merges(device):
    w = _rand(32, 24, device=device)
    a, bb = _rand(4, 24, device=device), _rand(32, 4, device=device)
    want = ref.merge(w, a, bb, 0.5)
    ops.merge_(w, a, bb, 0.5, safe=True)
    torch.testing.assert_close(w, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", ALL)
def test_merge_into_a_parameter_outside_no_grad(device):
    lin = torch.nn.Linear(24, 32, device=device)
    a, bb = _rand(4, 24, device=device), _rand(32, 4, device=device)
    want = ref.merge(lin.weight.detach(), a, bb, 0.5)
    ops.merge_(lin.weight, a, bb, 0.5)
    torch.testing.assert_close(lin.weight.detach(), want, rtol=1e-6, atol=1e-6)
    assert lin.weight.requires_grad and lin.weight.grad_fn is None


@pytest.mark.parametrize("device", ALL)
def test_merge_refuses_overlapping_views(device):
    """An expanded weight (rows sharing memory) and factors aliasing the weight are refused,
    as PyTorch's own in-place ops refuse them, and nothing is written (issue 13, item 4)."""
    row = torch.zeros(1, 4, device=device)
    with pytest.raises(RuntimeError, match="weight has elements that share memory"):
        ops.merge_(row.expand(3, 4), torch.ones(2, 4, device=device), torch.ones(3, 2, device=device), 1.0)  # fmt: skip
    assert torch.equal(row, torch.zeros(1, 4, device=device))
    w = _rand(6, 6, device=device)
    before = w.clone()
    with pytest.raises(RuntimeError, match="lora_a shares memory with weight"):
        ops.merge_(w, w[:2], _rand(6, 2, device=device), 1.0)
    with pytest.raises(RuntimeError, match="lora_b shares memory with weight"):
        ops.merge_(w, _rand(2, 6, device=device), w[:, 4:], 1.0)
    assert torch.equal(w, before)


# -------------------------------------------------------------------------------- bad input


def _bad_linear_cases(device="cpu"):
    x, w, b, a, bb = _problem((3, 4), 8, 6, 2, torch.float32, device=device)
    return {
        "weight shape": ((x, w[:, :7], b, a, bb, 1.0, 0.0), RuntimeError, r"weight must have shape \[out_features, 8\]"),
        "lora_a in": ((x, w, b, a[:, :5], bb, 1.0, 0.0), RuntimeError, r"lora_a must have shape \[r, 8\]"),
        "lora_b shape": ((x, w, b, a, bb[:, :1], 1.0, 0.0), RuntimeError, r"lora_b must have shape \[6, 2\]"),
        "rank 0": ((x, w, b, a[:0], bb[:, :0], 1.0, 0.0), RuntimeError, "rank must be at least 1"),
        "bias shape": ((x, w, b[:5], a, bb, 1.0, 0.0), RuntimeError, r"bias must have shape \[6\]"),
        "dtype": ((x, w.double(), b, a, bb, 1.0, 0.0), RuntimeError, "weight has dtype Double but x has dtype Float"),
        "lora dtype": ((x, w, b, a.bfloat16(), bb, 1.0, 0.0), RuntimeError, "lora_a has dtype BFloat16"),
        "0-d x": ((x[0, 0, 0], w, b, a, bb, 1.0, 0.0), RuntimeError, r"x must have shape \[\.\.\., in_features\]"),
        "1-d weight": ((x, w[0], b, a, bb, 1.0, 0.0), RuntimeError, "weight must be 2-D"),
        "p = 1": ((x, w, b, a, bb, 1.0, 1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
        "p < 0": ((x, w, b, a, bb, 1.0, -0.1), ValueError, r"dropout_p must be in \[0, 1\)"),
        "nan scale": ((x, w, b, a, bb, float("nan"), 0.0), ValueError, "scale must be a finite number"),
        "inf scale": ((x, w, b, a, bb, float("inf"), 0.0), ValueError, "scale must be a finite number"),
        "trainable weight": ((x, w.clone().requires_grad_(), b, a, bb, 1.0, 0.0), ValueError, "frozen"),
        "meta lora_a": ((x, w, b, a.to("meta"), bb, 1.0, 0.0), RuntimeError, "lora_a is on meta but x is on"),
        "meta bias": ((x, w, b.to("meta"), a, bb, 1.0, 0.0), RuntimeError, "bias is on meta but x is on"),
        "meta x": ((x.to("meta"), w, b, a, bb, 1.0, 0.0), RuntimeError, "weight is on .* but x is on meta"),
    }  # fmt: skip


@pytest.mark.parametrize("device", ALL)
@pytest.mark.parametrize("case", list(_bad_linear_cases()))
def test_bad_linear_input_raises_naming_the_argument(case, device):
    args, exc, msg = _bad_linear_cases(device)[case]
    with pytest.raises(exc, match=msg):
        ops.lora_linear(*args)


def test_mixed_meta_and_cpu_with_a_wrong_bias_is_refused():
    """Issue 13, item 2: this call returned uninitialised memory."""
    with pytest.raises(RuntimeError, match="lora_a is on meta but x is on cpu"):
        ops.lora_linear(torch.ones(2, 4), torch.ones(3, 4), torch.ones(7),
                        torch.ones(2, 4, device="meta"), torch.ones(3, 2), 1.0)  # fmt: skip
    w = torch.ones(3, 4)
    for safe in (True, False):
        with pytest.raises(RuntimeError, match="lora_a is on meta but weight is on cpu"):
            ops.merge_(w, torch.ones(2, 4, device="meta"), torch.ones(3, 2), 1.0, safe=safe)
    assert torch.equal(w, torch.ones(3, 4))


@pytest.mark.parametrize(
    "case",
    ["compiled op: p = 1", "compiled op: nan scale", "compiled op: seed dtype"],
)
def test_bad_input_reaching_the_compiled_op_directly(case):
    x, w, b, a, bb = _problem((3,), 8, 6, 2, torch.float32)
    seed = ops.make_seed(0)
    args = {
        "compiled op: p = 1": ((x, w, b, a, bb, 1.0, 1.0, seed), ValueError, "dropout_p"),
        "compiled op: nan scale": ((x, w, b, a, bb, math.nan, 0.0, seed), ValueError, "scale"),
        "compiled op: seed dtype": ((x, w, b, a, bb, 1.0, 0.5, seed.float()), RuntimeError, "seed must be"),
    }[case]  # fmt: skip
    with pytest.raises(args[1], match=args[2]):
        OPS.lora_linear(*args[0])


@pytest.mark.parametrize("device", ALL)
@pytest.mark.parametrize(
    "make,exc,msg",
    [
        (lambda w, a, b: (w, a[:, :5], b, 1.0), RuntimeError, r"lora_a must have shape \[r, 8\]"),
        (lambda w, a, b: (w, a, b[:5], 1.0), RuntimeError, r"lora_b must have shape \[6, 2\]"),
        (lambda w, a, b: (w, a[:0], b[:, :0], 1.0), RuntimeError, "rank must be at least 1"),
        (lambda w, a, b: (w[0], a, b, 1.0), RuntimeError, "weight must be 2-D"),
        (lambda w, a, b: (w, a, b, math.nan), ValueError, "scale must be a finite number"),
        (lambda w, a, b: (w.long(), a, b, 1.0), RuntimeError, "weight must be a floating-point"),
    ],
)
def test_bad_merge_input_raises_naming_the_argument(make, exc, msg, device):
    w, a, bb = (_rand(*s, device=device) for s in ((6, 8), (2, 8), (6, 2)))
    with pytest.raises(exc, match=msg):
        ops.merge_(*make(w, a, bb))


@pytest.mark.parametrize("device", CUDA_ONLY)
def test_device_mismatch_is_an_error_not_a_crash(device):
    """Checks come before any device guard or launch: a CPU tensor among CUDA ones is named
    (it used to die in the CUDAGuard constructor)."""
    x, w, b, a, bb = _problem((3,), 8, 6, 2, torch.float32, device=device)
    with pytest.raises(RuntimeError, match="weight is on cpu but x is on cuda"):
        ops.lora_linear(x, w.cpu(), b, a, bb, 1.0)
    with pytest.raises(RuntimeError, match="weight is on cuda:0 but x is on cpu"):
        ops.lora_linear(x.cpu(), w, b.cpu(), a.cpu(), bb.cpu(), 1.0)
    with pytest.raises(RuntimeError, match="one device"):
        ops.merge_(w, a.cpu(), bb, 1.0)
    with pytest.raises(RuntimeError, match="one device"):
        ops.merge_(w.cpu(), a, bb.cpu(), 1.0)


def test_build_info():
    info = ops.build_info()
    assert info["version"] and isinstance(info["cuda"], bool)
    assert info["cuda"] == bool(info["cuda_archs"])
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert set(ops.cuda_kernel_variants()) <= {"simple", "fast"}
