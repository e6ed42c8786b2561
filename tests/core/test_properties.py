"""Property-based tests of the ops against lora_ext.reference (hypothesis).

Shapes (zero-size, 1-D up to 5-D x, r up to in_features), layouts (column steps, row slices,
expanded rows, transposed weights), dtypes, devices (and meta mixed in), dropout rates and
scales are drawn at random. CI runs the "ci" profile (a fixed seed, a modest count, registered
in tests/conftest.py); ``pytest tests/core/test_properties.py --hypothesis-profile=long``
searches much deeper.
"""

from __future__ import annotations

import pytest
import torch

from lora_ext import ops
from lora_ext import reference as ref

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import assume, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_ops import DEVICES  # noqa: E402  (tests/core is on sys.path: rootdir-less test modules)

DEVICE = st.sampled_from([d for d in DEVICES if d != "cuda" or torch.cuda.is_available()])
DTYPE = st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16])


@st.composite
def linear_problems(draw):
    device, dtype = draw(DEVICE), draw(DTYPE)
    lead = draw(st.lists(st.integers(0, 4), min_size=0, max_size=4))  # x is 1-D to 5-D
    d_in, d_out = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    r = draw(st.integers(1, d_in))
    layout = draw(st.sampled_from(["contiguous", "cols", "rows", "expanded", "transposed_w"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device, dtype)

    if layout == "cols":
        x = rand(*lead, 2 * d_in)[..., ::2]
    elif layout == "rows":
        x = rand(*lead, d_in + 3)[..., :d_in]
    elif layout == "expanded" and lead:
        x = rand(*lead[:-1], 1, d_in).expand(*lead, d_in)  # rows sharing memory (read only)
    else:
        x = rand(*lead, d_in)
    w = rand(d_in, d_out, scale=d_in**-0.5).t() if layout == "transposed_w" else rand(d_out, d_in, scale=d_in**-0.5)  # fmt: skip
    b = rand(d_out) if draw(st.booleans()) else None
    a, bb = rand(r, d_in, scale=d_in**-0.5), rand(d_out, r, scale=r**-0.5)
    p = draw(st.sampled_from([0.0, 0.0, 0.1, 0.5, 0.9]))
    scale = draw(st.floats(-4.0, 4.0, allow_nan=False))
    return x, w, b, a, bb, scale, p, draw(st.integers(-(2**63), 2**63 - 1))


@given(linear_problems())
def test_lora_linear_forward_and_backward_follow_the_reference(problem):
    x, w, b, a, bb, scale, p, seed = problem
    mask = ref.dropout_mask(x.shape, seed, p, device=x.device)
    g = torch.randn(*x.shape[:-1], w.shape[0], generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64).to(x.device, x.dtype)  # fmt: skip
    # the mask of the op is the reference's, bit for bit
    assert torch.equal(ops.dropout_mask(x, seed, p).cpu(), mask.cpu())

    def run(fn, *t, grad=g):
        xs, As, Bs = (u.detach().requires_grad_() for u in (t[0], t[3], t[4]))
        y = fn(xs, t[1], t[2], As, Bs)
        return (y, *torch.autograd.grad(y, (xs, As, Bs), grad.to(y.dtype)))

    ours = run(lambda *t: ops.lora_linear(*t, scale, p, seed=seed), x, w, b, a, bb)
    same = run(lambda *t: ref.lora_linear(*t, scale, p, mask=mask), x, w, b, a, bb)
    up = [None if t is None else t.detach().double() for t in (x, w, b, a, bb)]
    exact = run(lambda *t: ref.lora_linear(*t, scale, p, mask=mask), *up)
    # Under cancellation on a few elements (a result much smaller than its terms) PyTorch can
    # be exact by luck and the 2x rule then asks for more than any other summation order can
    # give; float64 has no wider reference at all. So the bound is at least the textbook one of
    # any summation order in the accumulation dtype: (terms + 2) * eps * sum of |terms| (the
    # same computation on absolute values). test_ops.py holds the plain 2x rule on real shapes.
    absolute = [None if t is None else t.abs() for t in up]
    mags = run(lambda *t: ref.lora_linear(*t, abs(scale), p, mask=mask), *absolute,
               grad=g.double().abs())  # fmt: skip
    terms = x.shape[-1] + a.shape[0] + w.shape[0] + max(1, x[..., 0].numel()) + 2
    for name, o, s, e, mag in zip(("y", "grad_x", "grad_a", "grad_b"), ours, same, exact, mags):
        assert o.shape == e.shape and o.dtype == x.dtype and o.device == x.device, name
        err, bound = ref.error_bound(o, s, e)
        # On problems of a few elements PyTorch's own error is often exactly 0 by luck, and the
        # rule's one-ulp allowance is then smaller than any other summation order's error
        # (the long profile found grad_a of a 10-term dot product off by 1.6 ulp): allow two
        # more units of the largest value, and one more for 16-bit types, whose forward
        # rounds y twice (bias + LoRA term, then + x W^T)
        ulps = 3 if x.dtype in (torch.bfloat16, torch.float16) else 2
        bound += ulps * torch.finfo(x.dtype).eps * e.abs().max().item() if e.numel() else 0.0
        if e.numel():
            eps_acc = torch.finfo(torch.float64 if x.dtype == torch.float64 else torch.float32).eps
            bound = max(bound, terms * eps_acc * mag.abs().max().item())
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g}"


@st.composite
def merge_problems(draw):
    device, dtype = draw(DEVICE), draw(DTYPE)
    d_out, d_in = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    r = draw(st.integers(1, min(d_in, 16)))
    layout = draw(st.sampled_from(["contiguous", "transposed", "row_slice", "col_step"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))

    def rand(*shape, dt=dtype):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device, dt)

    if layout == "transposed":
        w = rand(d_in, d_out).t()
    elif layout == "row_slice":
        w = rand(d_out, d_in + 5)[:, 2 : 2 + d_in]
    elif layout == "col_step":
        w = rand(d_out, 2 * d_in)[:, ::2]
    else:
        w = rand(d_out, d_in)
    a, bb = rand(r, d_in, dt=torch.float32), rand(d_out, r, dt=torch.float32)
    return w, a, bb, draw(st.floats(-3.0, 3.0, allow_nan=False))


@given(merge_problems())
def test_merge_rounds_the_float64_sum_once(problem):
    w, a, bb, scale = problem
    before = w.clone()
    want = ref.merge(before, a, bb, scale)  # float64 sum, rounded once to w's dtype
    ops.merge_(w, a, bb, scale)
    eps32, eps = torch.finfo(torch.float32).eps, torch.finfo(w.dtype).eps
    # float32 accumulation: within float32's error of the sum, plus one step of w's dtype
    mag = before.double().abs() + abs(scale) * (bb.double().abs() @ a.double().abs())
    tol = (a.shape[0] + 2) * eps32 * mag + eps * want.double().abs()
    if w.dtype == torch.float64:  # float64 weights accumulate in float64
        tol = (a.shape[0] + 2) * eps * mag
    assert bool(((w.double() - want.double()).abs() <= tol + 1e-300).all())
    # unmerge returns to the weight up to one rounding per step
    ops.merge_(w, a, bb, -scale)
    assert bool(((w.double() - before.double()).abs() <= 2 * tol + 2 * eps * mag + 1e-300).all())


@given(merge_problems(), st.integers(2, 4))
def test_merge_refuses_weights_whose_rows_share_memory(problem, copies):
    w, a, bb, scale = problem
    row = w[:1].clone()
    expanded = row.expand(w.shape[0] * copies, w.shape[1])
    bb = bb.repeat(copies, 1)
    assume(expanded.shape[0] > 1)
    with pytest.raises(RuntimeError, match="share memory"):
        ops.merge_(expanded, a, bb, scale)
    assert torch.equal(row, w[:1])


@given(linear_problems(), st.sampled_from(["x", "weight", "bias", "lora_a", "lora_b"]))
def test_a_meta_tensor_among_real_ones_is_named(problem, which):
    x, w, b, a, bb, scale, p, seed = problem
    assume(x.device.type != "meta")
    args = dict(x=x, weight=w, bias=b, lora_a=a, lora_b=bb)
    assume(args[which] is not None)
    args[which] = args[which].to("meta")
    name = which if which != "x" else "weight"  # a meta x: the first tensor compared to it
    with pytest.raises(RuntimeError, match=f"{name} is on "):
        ops.lora_linear(*args.values(), scale, p, seed=seed)
