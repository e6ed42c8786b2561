"""Tests of the compiled core on the CPU: lora_linear (forward, backward, dropout) and merge_.

Accuracy rule (flash-attention's): our error at most 2x the error of the same computation in
plain PyTorch in the same dtype, both measured against float64 (lora_ext.reference).
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks
from torch.utils._python_dispatch import TorchDispatchMode

from lora_ext import ops
from lora_ext import reference as ref

OPS = torch.ops.lora_ext


def _rand(*shape, dtype=torch.float32, scale=1.0, gen=None):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def _problem(lead, d_in, d_out, r, dtype, bias=True, noncontig=False, seed=0):
    """Fresh random inputs; weights scaled like nn.Linear init so outputs are O(1)."""
    g = torch.Generator().manual_seed(seed)
    if noncontig:  # every other column of a wider tensor: stride(-1) == 2
        x = _rand(*lead, 2 * d_in, dtype=dtype, gen=g)[..., ::2]
    else:
        x = _rand(*lead, d_in, dtype=dtype, gen=g)
    w = _rand(d_out, d_in, dtype=dtype, scale=d_in**-0.5, gen=g)
    b = _rand(d_out, dtype=dtype, gen=g) if bias else None
    a = _rand(r, d_in, dtype=dtype, scale=d_in**-0.5, gen=g)
    bb = _rand(d_out, r, dtype=dtype, scale=r**-0.5, gen=g)
    return x, w, b, a, bb


def _grads(fn, x, w, b, a, bb, g):
    """Output and gradients w.r.t. (x, a, bb) of fn(x, w, b, a, bb) for output gradient g."""
    x, a, bb = (t.detach().requires_grad_() for t in (x, a, bb))
    y = fn(x, w, b, a, bb)
    return (y, *torch.autograd.grad(y, (x, a, bb), g))


def _up(t):
    return None if t is None else t.detach().double()


# (leading dims, in, out, r, bias, non-contiguous x, dropout p)
PARITY = [
    ((7,), 33, 17, 1, True, False, 0.0),
    ((5, 9), 64, 48, 4, False, False, 0.0),
    ((3, 11), 45, 70, 16, True, True, 0.0),
    ((130,), 37, 29, 64, True, False, 0.0),
    ((2, 3, 5), 20, 24, 4, True, False, 0.0),
    ((7,), 33, 17, 1, True, False, 0.1),
    ((3, 11), 45, 70, 16, False, True, 0.25),
    ((130,), 37, 29, 64, True, False, 0.5),
    ((2, 71), 50, 30, 4, True, True, 0.9),
]


@contextlib.contextmanager
def _rank_update_kernel(enabled: bool):
    """Switch the CPU's AVX-512 rank-r kernel on or off (off: ATen's GEMM) for a block."""
    from lora_ext import _C

    before = _C._set_cpu_rank_update_kernel(enabled)
    try:
        yield
    finally:
        _C._set_cpu_rank_update_kernel(before)


# float32 runs twice: the CPU's own rank-r kernel (where the CPU has AVX-512) and ATen's GEMM
DTYPE_KERNEL = [(torch.float32, True), (torch.float32, False), (torch.bfloat16, True)]


@pytest.mark.parametrize("dtype,kernel", DTYPE_KERNEL)
@pytest.mark.parametrize("lead,d_in,d_out,r,bias,noncontig,p", PARITY)
def test_parity_with_float64_reference(lead, d_in, d_out, r, bias, noncontig, p, dtype, kernel):
    x, w, b, a, bb = _problem(lead, d_in, d_out, r, dtype, bias, noncontig, seed=len(lead) + r)
    scale, seed = 2.0 / r, 1234 + r
    mask = ref.dropout_mask(x.shape, seed, p)
    g = _rand(*lead, d_out, dtype=dtype, gen=torch.Generator().manual_seed(7))

    def ours(*t):
        return ops.lora_linear(*t, scale, p, seed=seed)

    def plain(*t):
        return ref.lora_linear(*t, scale, p, mask=mask)

    with _rank_update_kernel(kernel):
        got = _grads(ours, x, w, b, a, bb, g)
    same = _grads(plain, x, w, b, a, bb, g)
    exact = _grads(plain, _up(x), _up(w), _up(b), _up(a), _up(bb), _up(g))
    for name, o, s, e in zip(("y", "grad_x", "grad_a", "grad_b"), got, same, exact):
        assert o.dtype == dtype and o.shape == e.shape, name
        err, bound = ref.error_bound(o, s, e)
        assert err <= bound, f"{name}: error {err:.3g} > 2x PyTorch's ({bound:.3g})"


@pytest.mark.parametrize(
    "tokens,d_in,d_out,r", [(1, 8, 1, 1), (5, 19, 63, 3), (67, 40, 65, 16), (9, 16, 130, 64)]
)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_rank_update_kernel_agrees_with_aten(tokens, d_in, d_out, r, p):
    """Edges of the 4 x 64 register tile: row counts not divisible by 4, masked column tails."""
    if not ops.build_info()["cpu_rank_update_kernel"]:
        pytest.skip("this CPU has no AVX-512: ATen's GEMM is the only path")
    x, w, b, a, bb = _problem((tokens,), d_in, d_out, r, torch.float32, seed=r)
    g = _rand(tokens, d_out, gen=torch.Generator().manual_seed(3))

    def ours(*t):
        return ops.lora_linear(*t, 0.7, p, seed=11)

    with _rank_update_kernel(True):
        tiled = _grads(ours, x, w, b, a, bb, g)
    with _rank_update_kernel(False):
        aten = _grads(ours, x, w, b, a, bb, g)
    for name, t, e in zip(("y", "grad_x", "grad_a", "grad_b"), tiled, aten):
        torch.testing.assert_close(t, e, rtol=1e-5, atol=1e-5, msg=name)


def test_non_contiguous_weight_like_gpt2_conv1d():
    # GPT-2 Conv1D stores weight as [in, out]; the layer passes weight.t() (stride (1, out))
    x, _, b, a, bb = _problem((4, 6), 24, 40, 8, torch.float32)
    w_conv = _rand(24, 40, scale=24**-0.5)
    w = w_conv.t()
    assert not w.is_contiguous()
    y = ops.lora_linear(x, w, b, a, bb, 0.5)
    exact = ref.lora_linear(*(_up(t) for t in (x, w, b, a, bb)), 0.5)
    err, bound = ref.error_bound(y, ref.lora_linear(x, w, b, a, bb, 0.5), exact)
    assert err <= bound


def test_empty_batch():
    x, w, b, a, bb = _problem((0, 3), 8, 5, 2, torch.float32)
    x.requires_grad_()
    a.requires_grad_()
    y = ops.lora_linear(x, w, b, a, bb, 1.0, 0.3, seed=1)
    assert y.shape == (0, 3, 5)
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(a.grad, torch.zeros_like(a))


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck_float64(p):
    x, w, b, a, bb = _problem((2, 5), 9, 7, 3, torch.float64)
    inputs = tuple(t.clone().requires_grad_() for t in (x, a, bb))

    def fn(x, a, bb):  # a fixed seed: the finite differences see the same mask
        return ops.lora_linear(x, w, b, a, bb, 0.75, p, seed=99)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "needs",
    [(True, True, True), (False, True, True), (True, False, False), (False, False, True)],
)
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_backward_honours_needs_input_grad(needs, p):
    """Only the wanted gradients are computed (output_mask) and they are right."""
    x, w, b, a, bb = _problem((6, 5), 16, 12, 4, torch.float32)
    x, a, bb = (t.requires_grad_(n) for t, n in zip((x, a, bb), needs))
    masks = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is OPS.lora_linear_backward.default:
                masks.append(list(args[-1]))
            return func(*args, **(kwargs or {}))

    with Spy():
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


def test_saved_tensors_hold_nothing_of_x_size_but_x():
    """With dropout, backward keeps x itself and [.., r] tensors: no mask, no dropped copy."""
    x, w, b, a, bb = _problem((8, 16), 64, 48, 4, torch.float32)
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


# ------------------------------------------------------------------------------------ dropout


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_dropout_kept_fraction_within_statistical_bounds(p):
    n = 1 << 18
    kept = ops.dropout_mask(torch.empty(n), seed=2024, dropout_p=p).double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(kept - (1 - p)) < 5 * sigma, (kept, 1 - p, sigma)


def test_dropout_mask_is_a_function_of_seed_and_index():
    like = torch.empty(37, 129)
    m1 = ops.dropout_mask(like, 7, 0.3)
    assert torch.equal(m1, ops.dropout_mask(like, 7, 0.3))
    assert not torch.equal(m1, ops.dropout_mask(like, 8, 0.3))
    # the same as the pure-PyTorch mirror of csrc/rng.h, bit for bit
    assert torch.equal(m1, ref.dropout_mask(like.shape, 7, 0.3))
    # index-based: a slice of the flat index range gives the same bits as the whole
    flat = ops.dropout_mask(torch.empty(37 * 129), 7, 0.3)
    assert torch.equal(flat[1000:1500], ops.dropout_mask(torch.empty(500), 7, 0.3, offset=1000))
    # adjacent seeds are not correlated
    agree = (m1 == ops.dropout_mask(like, 8, 0.3)).double().mean().item()
    assert abs(agree - (0.7**2 + 0.3**2)) < 0.02


@pytest.mark.parametrize("seed", [0, 1, -1, 2**62 + 12345, 2**64 - 5])
def test_dropout_mask_matches_reference_across_the_2_to_32_index_boundary(seed):
    offset = (1 << 32) - 3000  # the CPU kernel splits runs where the high index word changes
    got = ops.dropout_mask(torch.empty(6000), seed, 0.4, offset=offset)
    want = ref.dropout_mask((6000,), ops.make_seed(seed), 0.4, offset=offset)
    assert torch.equal(got, want)


def test_dropout_uses_that_mask_and_is_reproducible_under_manual_seed():
    x, w, b, a, bb = _problem((4, 9), 32, 16, 4, torch.float32)
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


def test_dropout_does_not_depend_on_thread_count():
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


# ------------------------------------------------------------------------- opcheck, compile


def _opcheck_cases():
    x, w, b, a, bb = _problem((3, 5), 12, 10, 4, torch.float32, noncontig=True)
    seed = ops.make_seed(11)
    y, xa = OPS.lora_linear(x, w, b, a, bb, 0.5, 0.2, seed)
    gy = torch.randn_like(y)
    wt = _rand(12, 10).t()  # a transposed (Conv1D-style) weight
    return [
        (OPS.lora_linear.default, (x.requires_grad_(), w, b, a.requires_grad_(), bb, 0.5, 0.0, seed)),
        (OPS.lora_linear.default, (x, w, None, a, bb.requires_grad_(), 0.5, 0.2, seed)),
        (OPS.lora_linear_backward.default, (gy, x.detach(), w, a.detach(), bb.detach(), xa, 0.5, 0.2, seed, [True, True, True])),
        (OPS.lora_linear_backward.default, (gy, x.detach(), w, a.detach(), bb.detach(), xa, 0.5, 0.0, seed, [False, True, False])),
        (OPS.merge_.default, (_rand(10, 12), a.detach(), bb.detach(), 0.5)),
        (OPS.merge_.default, (wt, a.detach(), bb.detach(), 0.5)),
        (OPS.merge_.default, (_rand(10, 12, dtype=torch.bfloat16), a.detach(), bb.detach(), 0.5)),
        (OPS.merge_check.default, (_rand(10, 12), a.detach(), bb.detach(), 0.5)),
        (OPS.dropout_mask.default, (x.detach(), seed, 0.3, 0)),
    ]  # fmt: skip


@pytest.mark.parametrize("case", range(9))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_torch_compile_fullgraph(p):
    torch._dynamo.reset()
    x, w, b, a, bb = _problem((4, 6), 16, 12, 4, torch.float32)
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


def test_torch_compile_draws_a_fresh_seed_per_step():
    torch._dynamo.reset()
    x, w, b, a, bb = _problem((4, 6), 16, 12, 4, torch.float32)

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
    (129, 33, 1, torch.float16, False),
    (20, 30, 8, torch.float64, True),
]


@pytest.mark.parametrize("d_out,d_in,r,dtype,transposed", MERGE)
def test_merge_matches_float64_rounded_once(d_out, d_in, r, dtype, transposed):
    g = torch.Generator().manual_seed(d_out * r)
    w = (
        _rand(d_in, d_out, dtype=dtype, gen=g).t()
        if transposed
        else _rand(d_out, d_in, dtype=dtype, gen=g)
    )
    a = _rand(r, d_in, gen=g)  # adapters in float32 over a weight of another dtype
    bb = _rand(d_out, r, gen=g)
    scale = 0.3
    exact_rounded = ref.merge(w, a, bb, scale)
    before = w.clone()
    out = ops.merge_(w, a, bb, scale)
    assert out is w and w.stride() == before.stride()
    if dtype in (torch.bfloat16, torch.float16):
        # fp32 accumulation then one rounding: equal to round(exact) except where the exact value
        # is within fp32 error of a rounding boundary, and then off by one step at most
        diff = (w.double() - exact_rounded.double()).abs()
        assert (diff == 0).double().mean().item() > 0.999
        assert bool((diff <= _merge_tolerance(before, a, bb, scale, exact_rounded)).all())
    else:
        exact64 = before.double() + scale * (bb.double() @ a.double())
        err, bound = ref.error_bound(
            w, ref.merge_naive(before, a.to(dtype), bb.to(dtype), scale), exact64
        )
        assert err <= bound


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transposed", [False, True])
def test_merge_unmerge_round_trip(dtype, transposed):
    w = _rand(96, 80, dtype=dtype)
    w = w.t().contiguous().t() if transposed else w
    a, bb = _rand(8, 80, scale=0.1), _rand(96, 8, scale=0.1)
    before = w.clone()
    ops.merge_(w, a, bb, 2.0)
    assert not torch.equal(w, before)
    ops.merge_(w, a, bb, -2.0)
    # each step rounds once: back within one unit in the last place (of the larger magnitude)
    merged = ref.merge(before, a, bb, 2.0)
    tol = _ulp(torch.maximum(before.double().abs(), merged.double().abs()).to(dtype))
    assert bool(((w.double() - before.double()).abs() <= 1.01 * tol + 1e-30).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bad", ["nan_a", "inf_b", "overflow"])
def test_safe_merge_leaves_weight_bit_identical(dtype, bad):
    w = _rand(32, 24, dtype=dtype)
    a, bb = _rand(4, 24), _rand(32, 4)
    if bad == "nan_a":
        a[2, 5] = float("nan")
    elif bad == "inf_b":
        bb[7, 1] = float("inf")
    else:  # finite factors whose product overflows
        a, bb = a * 1e20, bb * 1e20
    before = w.clone()
    with pytest.raises(ValueError, match="not finite"):
        ops.merge_(w, a, bb, 1.0, safe=True)
    assert torch.equal(w.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       before.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))  # fmt: skip
    # the unsafe merge does write the non-finite values (it is the caller's choice)
    ops.merge_(w, a, bb, 1.0)
    assert not bool(torch.isfinite(w).all())


def test_safe_merge_of_finite_delta_merges():
    w = _rand(32, 24)
    a, bb = _rand(4, 24), _rand(32, 4)
    want = ref.merge(w, a, bb, 0.5)
    ops.merge_(w, a, bb, 0.5, safe=True)
    torch.testing.assert_close(w, want, rtol=1e-6, atol=1e-6)


def test_merge_into_a_parameter_outside_no_grad():
    lin = torch.nn.Linear(24, 32)
    a, bb = _rand(4, 24), _rand(32, 4)
    want = ref.merge(lin.weight.detach(), a, bb, 0.5)
    ops.merge_(lin.weight, a, bb, 0.5)
    torch.testing.assert_close(lin.weight.detach(), want, rtol=1e-6, atol=1e-6)
    assert lin.weight.requires_grad and lin.weight.grad_fn is None


# -------------------------------------------------------------------------------- bad input


def _bad_linear_cases():
    x, w, b, a, bb = _problem((3, 4), 8, 6, 2, torch.float32)
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
    }  # fmt: skip


@pytest.mark.parametrize("case", list(_bad_linear_cases()))
def test_bad_linear_input_raises_naming_the_argument(case):
    args, exc, msg = _bad_linear_cases()[case]
    with pytest.raises(exc, match=msg):
        ops.lora_linear(*args)


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
def test_bad_merge_input_raises_naming_the_argument(make, exc, msg):
    w, a, bb = _rand(6, 8), _rand(2, 8), _rand(6, 2)
    with pytest.raises(exc, match=msg):
        ops.merge_(*make(w, a, bb))


def test_build_info():
    info = ops.build_info()
    assert info["version"] and isinstance(info["cuda"], bool)
    assert info["cuda"] == bool(info["cuda_archs"])
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
