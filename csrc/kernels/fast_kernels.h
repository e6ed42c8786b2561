// Bodies of the fast CUDA kernels, written as __host__ __device__ functions of their block and
// thread index. csrc/cuda/*.cu launch them as __global__ kernels; csrc/cpu/grid_emulator.cpp
// runs the very same bodies over a small grid on the CPU, one (block, thread) after another,
// so that index math, strides, tails and grid-stride loops are tested in CI without a GPU.
// None of them uses shared memory, barriers or warp shuffles (the emulator could not run those).
//
// Grid index arguments: bx, by (blockIdx.x/y), tx (threadIdx.x), bdx (blockDim.x), gx, gy
// (gridDim.x/y).
#pragma once

#include <cstdint>
#include <cstring>

#include "../rng.h"

namespace lora_ext {
namespace kernels {

// VEC consecutive elements in one access: a 16-byte load/store on the device (the caller
// guarantees the alignment), memcpy on the host.
template <typename T, int VEC>
LORA_HD void load_vec(T (&dst)[VEC], const T* src) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) * VEC == 16) {
    const uint4 v = *reinterpret_cast<const uint4*>(src);
    memcpy(dst, &v, 16);
    return;
  }
#endif
  memcpy(dst, src, sizeof(T) * VEC);
}

template <typename T, int VEC>
LORA_HD void store_vec(T* dst, const T (&src)[VEC]) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) * VEC == 16) {
    uint4 v;
    memcpy(&v, src, 16);
    *reinterpret_cast<uint4*>(dst) = v;
    return;
  }
#endif
  memcpy(dst, src, sizeof(T) * VEC);
}

// The row-major problem the kernels see: element (i, j) of w at w[i * s0 + j * s1].

// ------------------------------------------------------------------------------------ merge
// w[i, j] += sum_c bs[i, c] * a[c, j] for a tile of ROWS rows x VEC columns per thread: the
// whole tile of w is loaded first (every load in flight before the rank-r product), then the
// product is accumulated in acc_t, added and rounded once, stored. VEC > 1 needs s1 == 1,
// k % VEC == 0, s0 % VEC == 0 and a 16-byte aligned w (one 16-byte access per row); VEC == 1
// handles any strides. kCheck: write nothing, set *bad = 1 where the delta is not finite or a
// finite weight would become non-finite. Rows are walked with a grid-stride loop over y.
template <typename scalar_t, typename acc_t, int VEC, int ROWS, bool kCheck>
LORA_HD void merge_tile(scalar_t* w, int64_t m, int64_t k, int64_t s0, int64_t s1, const acc_t* bs,
                        const acc_t* a, int64_t r, int* bad, int64_t bx, int64_t by, int tx,
                        int bdx, int64_t gy) {
  const int64_t j0 = (bx * bdx + tx) * VEC;
  if (j0 >= k) return;
  for (int64_t i0 = by * ROWS; i0 < m; i0 += gy * ROWS) {
    scalar_t wv[ROWS][VEC];
#pragma unroll
    for (int ii = 0; ii < ROWS; ++ii) {
      if (i0 + ii < m) {
        const scalar_t* p = w + (i0 + ii) * s0 + j0 * s1;
        if constexpr (VEC > 1) {
          load_vec<scalar_t, VEC>(wv[ii], p);  // one 16-byte load on the device
        } else {
          wv[ii][0] = *p;
        }
      } else {
#pragma unroll
        for (int v = 0; v < VEC; ++v) wv[ii][v] = scalar_t(0);  // rows past m: never stored
      }
    }
    acc_t acc[ROWS][VEC];
#pragma unroll
    for (int ii = 0; ii < ROWS; ++ii) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[ii][v] = acc_t(0);
    }
    for (int64_t c = 0; c < r; ++c) {
      acc_t av[VEC];
#pragma unroll
      for (int v = 0; v < VEC; ++v) av[v] = a[c * k + j0 + v];
#pragma unroll
      for (int ii = 0; ii < ROWS; ++ii) {
        const acc_t b = i0 + ii < m ? bs[(i0 + ii) * r + c] : acc_t(0);
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[ii][v] += b * av[v];
      }
    }
#pragma unroll
    for (int ii = 0; ii < ROWS; ++ii) {
      if (i0 + ii >= m) break;
      scalar_t nv[VEC];
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const acc_t old = static_cast<acc_t>(wv[ii][v]);
        nv[v] = static_cast<scalar_t>(old + acc[ii][v]);
        if constexpr (kCheck) {
          const acc_t rounded = static_cast<acc_t>(nv[v]);
          const bool delta_ok = acc[ii][v] - acc[ii][v] == acc_t(0);  // finite
          const bool old_finite = old - old == acc_t(0);
          const bool new_finite = rounded - rounded == acc_t(0);
          if (!delta_ok || (old_finite && !new_finite)) *bad = 1;
        }
      }
      if constexpr (!kCheck) {
        scalar_t* p = w + (i0 + ii) * s0 + j0 * s1;
        if constexpr (VEC > 1) {
          store_vec<scalar_t, VEC>(p, nv);  // one 16-byte store on the device
        } else {
          *p = nv[0];
        }
      }
    }
  }
}

// --------------------------------------------------------------------------- dropout input
// out[i, j] = x[i * ldx + j] * keep(i * in + j): the kept elements of x, exact (no scaling: the
// 1 / (1 - p) goes into the GEMM's alpha, so nothing is rounded here). Grid-stride over the
// flat index.
template <typename scalar_t>
LORA_HD void keep_rows(const scalar_t* x, int64_t ldx, int64_t n, int64_t in, rng::DropoutKey key,
                       scalar_t* out, int64_t bx, int tx, int bdx, int64_t gx) {
  const int64_t numel = n * in;
  for (int64_t idx = bx * bdx + tx; idx < numel; idx += gx * bdx) {
    const int64_t i = idx / in, j = idx - i * in;
    out[idx] = rng::keep(key, static_cast<uint64_t>(idx)) ? x[i * ldx + j] : scalar_t(0);
  }
}

// ---------------------------------------------------------------------- backward, fused
// One pass over x (and grad_x) per column chunk, the mask evaluated once per element:
//   grad_x[i, j]      = scale * m(i, j) * sum_c g[i, c] * a[c, j]   (when grad_x != nullptr)
//   partial[s, c, j]  = sum_{i in chunk s} g[i, c] * m(i, j) * x[i * ldx + j]  (partial != 0)
// with m = keep / (1 - p) (1 without dropout). Each thread owns one column j and one chunk of
// rows: a[:, j] stays in registers, g[i, :] is the same for the whole warp (a broadcast), x and
// grad_x are read/written coalesced along j. grad_x ([n, in], contiguous) comes in
// uninitialised and leaves holding the LoRA term, rounded once (cuBLAS adds dY W afterwards
// with beta = 1). The caller sums partial over the chunks in a fixed order (deterministic, no
// atomics) and scales it. r <= RMAX. Grid: x over columns, y over chunks of rows_per_chunk.
template <typename scalar_t, typename acc_t, int RMAX>
LORA_HD void lora_backward_cols(scalar_t* grad_x, acc_t* partial, const scalar_t* x, int64_t ldx,
                                const acc_t* g, const acc_t* a, int64_t n, int64_t in, int64_t r,
                                int64_t rows_per_chunk, bool dropout, rng::DropoutKey key,
                                acc_t inv, acc_t scale, int64_t bx, int64_t by, int tx, int bdx) {
  const int64_t j = bx * bdx + tx;
  if (j >= in) return;
  const int64_t i0 = by * rows_per_chunk;
  const int64_t i1 = i0 + rows_per_chunk < n ? i0 + rows_per_chunk : n;
  acc_t acol[RMAX], acc[RMAX];
#pragma unroll
  for (int c = 0; c < RMAX; ++c) {
    acol[c] = c < r && grad_x != nullptr ? a[c * in + j] : acc_t(0);
    acc[c] = acc_t(0);
  }
  for (int64_t i = i0; i < i1; ++i) {
    const acc_t m =
        dropout ? (rng::keep(key, static_cast<uint64_t>(i * in + j)) ? inv : acc_t(0)) : acc_t(1);
    const acc_t* gi = g + i * r;
    if (grad_x != nullptr) {
      acc_t s = acc_t(0);
#pragma unroll
      for (int c = 0; c < RMAX; ++c) {
        if (c < r) s += gi[c] * acol[c];
      }
      grad_x[i * in + j] = static_cast<scalar_t>(scale * (m * s));
    }
    if (partial != nullptr) {
      const acc_t xv = static_cast<acc_t>(x[i * ldx + j]) * m;
#pragma unroll
      for (int c = 0; c < RMAX; ++c) {
        if (c < r) acc[c] += gi[c] * xv;
      }
    }
  }
  if (partial != nullptr) {
    acc_t* out = partial + by * r * in;
#pragma unroll
    for (int c = 0; c < RMAX; ++c) {
      if (c < r) out[c * in + j] = acc[c];
    }
  }
}

}  // namespace kernels
}  // namespace lora_ext
