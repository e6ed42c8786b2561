"""The fast CUDA kernels' bodies (csrc/kernels/fast_kernels.h) run on the CPU by the grid
emulator (csrc/cpu/grid_emulator.cpp), one (block, thread) after another: index math, strides,
tails, grid-stride loops and the masked gradient with only one of grad_x / grad_a wanted are
checked against lora_ext.reference in CI, without a GPU. The same bodies run on the GPU when
``ops.cuda_kernels("fast")`` is on (tests/core/test_ops.py runs both variants there).
"""

from __future__ import annotations

import pytest
import torch

from lora_ext import ops
from lora_ext import reference as ref


@pytest.fixture(scope="module")
def C():
    ops.load_library()
    from lora_ext import _C

    return _C


def _rand(*shape, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _merge_tol(w, a, bs, want):
    eps32 = torch.finfo(torch.float32).eps
    mag = w.double().abs() + bs.double().abs() @ a.double().abs()
    return (a.shape[0] + 2) * eps32 * mag + torch.finfo(w.dtype).eps * want.double().abs()


# (rows, cols, r, dtype, layout, grid_y, block): grid_y below the row tiles = grid-stride rows
MERGE = [
    (37, 64, 5, torch.float32, "contiguous", 3, 4),  # 10 row tiles over 3 grid rows
    (9, 48, 16, torch.bfloat16, "contiguous", 1, 2),  # 3 tiles of 4 rows, one grid row
    (13, 40, 3, torch.float16, "row_slice", 2, 8),  # row stride > cols, vectorised
    (11, 20, 7, torch.float64, "contiguous", 5, 4),
    (17, 33, 4, torch.float32, "contiguous", 2, 8),  # cols % 4 != 0: scalar path
    (6, 30, 2, torch.bfloat16, "col_step", 1, 16),  # stride(1) == 2: scalar path
    (5, 3, 1, torch.float32, "contiguous", 1, 32),  # more threads than columns
]


@pytest.mark.parametrize("m,k,r,dtype,layout,grid_y,block", MERGE)
def test_merge_tile_on_the_emulated_grid(C, m, k, r, dtype, layout, grid_y, block):
    if layout == "row_slice":
        w = _rand(m, k + 8, dtype=dtype)[:, 8:]  # 16-byte aligned rows, stride k + 8
    elif layout == "col_step":
        w = _rand(m, 2 * k, dtype=dtype)[:, ::2]
    else:
        w = _rand(m, k, dtype=dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    a, bs = _rand(r, k, dtype=acc, seed=1), _rand(m, r, dtype=acc, seed=2)
    vectorized = layout in ("contiguous", "row_slice") and k % (16 // w.element_size()) == 0
    before = w.clone()
    want = (before.double() + bs.double() @ a.double()).to(dtype)
    assert C._emulate_merge(w, bs, a, vectorized, False, grid_y, block)
    diff = (w.double() - want.double()).abs()
    assert bool((diff <= _merge_tol(before, a, bs, want)).all()), diff.max()
    # every element was written exactly once (a second merge of -delta returns close to w)
    if layout == "col_step":  # the untouched odd columns of the parent are still the same
        pass
    # the check variant writes nothing and sees a non-finite delta
    probe = before.clone()
    bad_bs = bs.clone()
    bad_bs[m - 1, r - 1] = float("inf")
    assert C._emulate_merge(probe, bs, a, vectorized, True, grid_y, block)
    assert not C._emulate_merge(probe, bad_bs, a, vectorized, True, grid_y, block)
    assert torch.equal(probe, before)


def test_merge_tile_refuses_16_byte_accesses_on_a_misaligned_layout(C):
    w = _rand(4, 33)[:, 1:]  # rows start 4 bytes past a 16-byte boundary
    with pytest.raises(RuntimeError, match="16-byte"):
        C._emulate_merge(w, _rand(4, 2), _rand(2, 32), True, False, 1, 4)


@pytest.mark.parametrize("grid,block", [(1, 7), (3, 5), (64, 32)])  # several grid-stride turns
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keep_rows_is_x_times_the_mask_exactly(C, grid, block, dtype):
    x = _rand(13, 41, dtype=dtype)
    x2 = _rand(13, 50, dtype=dtype)[:, 4:45]  # row stride 50: the strided path
    for xi in (x, x2):
        got = C._emulate_keep_rows(xi, 77, 0.3, grid, block)
        mask = ref.dropout_mask(xi.shape, 77, 0.3)
        assert torch.equal(got, xi * mask.to(dtype))


CASES = [  # (n, in, r, dtype, p, rows_per_chunk, block)
    (10, 24, 4, torch.float32, 0.0, 3, 8),  # chunk tail: 10 = 3 + 3 + 3 + 1
    (17, 33, 16, torch.float32, 0.3, 4, 16),  # column tail: 33 = 16 + 16 + 1
    (9, 20, 20, torch.bfloat16, 0.5, 2, 8),  # r in the 32-wide bucket
    (5, 12, 40, torch.float64, 0.2, 5, 4),  # r in the 64-wide bucket, one chunk
    (7, 40, 3, torch.float16, 0.1, 7, 64),  # more threads than columns
]


@pytest.mark.parametrize("n,d_in,r,dtype,p,rows_per_chunk,block", CASES)
@pytest.mark.parametrize("want", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("strided", [False, True])
def test_backward_cols_on_the_emulated_grid(C, n, d_in, r, dtype, p, rows_per_chunk, block, want, strided):  # fmt: skip
    x = _rand(n, d_in + 5, dtype=dtype)[:, 2 : 2 + d_in] if strided else _rand(n, d_in, dtype=dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g, a = _rand(n, r, dtype=acc, seed=3), _rand(r, d_in, dtype=acc, seed=4)
    scale, seed = 0.7, 1234
    gx, ga = C._emulate_backward_cols(x, g, a, seed, p, scale, *want, rows_per_chunk, block)
    m = ref.dropout_mask(x.shape, seed, p).double() / (1 - p)
    exact_x = scale * m * (g.double() @ a.double())
    exact_a = g.double().t() @ (x.double() * m)
    if want[0]:
        assert gx.dtype == dtype and gx.shape == (n, d_in)
        tol = (r + 2) * torch.finfo(acc).eps * scale * m * (g.double().abs() @ a.double().abs())
        tol = tol + torch.finfo(dtype).eps * exact_x.abs()
        assert bool(((gx.double() - exact_x).abs() <= tol + 1e-300).all())
    else:
        assert gx is None
    if want[1]:
        assert ga.dtype == acc and ga.shape == (r, d_in)
        tol = (n + 2) * torch.finfo(acc).eps * (g.double().abs().t() @ (x.double() * m).abs())
        assert bool(((ga.double() - exact_a).abs() <= tol + 1e-300).all())
    else:
        assert ga is None
