// CUDA kernels of merge_ / merge_check: weight += scale * B @ A in one pass over the weight.
//
// A block owns a tile of kTileRows rows x kThreads columns. The scaled left factor of those rows
// goes to shared memory in chunks of kChunk ranks; each thread keeps its column of A for the
// chunk in registers and kTileRows float32 accumulators, then reads, updates (one rounding)
// and writes its column of the tile. Reads and writes of the weight are coalesced along the
// unit-stride dimension (make_merge_problem turns a transposed weight into a row-major one).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../kernels/fast_kernels.h"
#include "../kernels/launch.h"
#include "../lora_linear.h"
#include "../switches.h"

namespace lora_ext {
namespace cuda {
namespace {

constexpr int kThreads = 256;  // columns per block
constexpr int kTileRows = 32;  // rows per block
constexpr int kChunk = 16;     // ranks per shared-memory chunk

template <typename T>
__device__ __forceinline__ bool finite(T v) {
  return isfinite(static_cast<double>(v));
}

// kCheck == false: w += bs @ a.  kCheck == true: w untouched; *bad = 1 if some delta is not
// finite or some finite weight would become inf/nan after rounding.
template <typename scalar_t, typename acc_t, bool kCheck>
__global__ void __launch_bounds__(kThreads)
    merge_kernel(scalar_t* __restrict__ w, int64_t m, int64_t k, int64_t s0, int64_t s1,
                 const acc_t* __restrict__ bs, const acc_t* __restrict__ a, int64_t r,
                 int* __restrict__ bad) {
  __shared__ acc_t sb[kTileRows][kChunk];
  const int64_t j = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  const int64_t i0 = blockIdx.y * static_cast<int64_t>(kTileRows);
  acc_t acc[kTileRows];
#pragma unroll
  for (int ii = 0; ii < kTileRows; ++ii) acc[ii] = acc_t(0);

  for (int64_t c0 = 0; c0 < r; c0 += kChunk) {
    for (int e = threadIdx.x; e < kTileRows * kChunk; e += kThreads) {
      const int ii = e / kChunk, cc = e % kChunk;
      sb[ii][cc] = (i0 + ii < m && c0 + cc < r) ? bs[(i0 + ii) * r + c0 + cc] : acc_t(0);
    }
    __syncthreads();
    if (j < k) {
      acc_t av[kChunk];
#pragma unroll
      for (int cc = 0; cc < kChunk; ++cc) av[cc] = c0 + cc < r ? a[(c0 + cc) * k + j] : acc_t(0);
#pragma unroll
      for (int ii = 0; ii < kTileRows; ++ii) {
#pragma unroll
        for (int cc = 0; cc < kChunk; ++cc) acc[ii] += sb[ii][cc] * av[cc];
      }
    }
    __syncthreads();
  }
  if (j >= k) return;
#pragma unroll
  for (int ii = 0; ii < kTileRows; ++ii) {
    const int64_t i = i0 + ii;
    if (i >= m) break;
    scalar_t* p = w + i * s0 + j * s1;
    const acc_t wv = static_cast<acc_t>(*p);
    const scalar_t nv = static_cast<scalar_t>(wv + acc[ii]);
    if (kCheck) {
      if (!finite(acc[ii]) || (finite(wv) && !finite(static_cast<acc_t>(nv)))) *bad = 1;
    } else {
      *p = nv;
    }
  }
}

template <bool kCheck>
void launch_merge(const MergeProblem& pr, int* bad) {
  const at::Tensor& w = pr.w;
  const int64_t m = w.size(0), k = w.size(1), r = pr.a.size(0);
  const int64_t row_blocks = (m + kTileRows - 1) / kTileRows;
  LORA_CHECK(row_blocks <= 65535, "merge_: weight has too many rows (", m, ") for one launch");
  const dim3 grid(static_cast<unsigned>((k + kThreads - 1) / kThreads),
                  static_cast<unsigned>(row_blocks));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, w.scalar_type(), "lora_ext::merge_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        merge_kernel<scalar_t, acc_t, kCheck>
            <<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
                w.data_ptr<scalar_t>(), m, k, w.stride(0), w.stride(1),
                pr.bs.const_data_ptr<acc_t>(), pr.a.const_data_ptr<acc_t>(), r, bad);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

// The fast merge (ops.cuda_kernels("fast")): csrc/kernels/fast_kernels.h merge_tile, each
// thread a 4-row x 16-byte tile of the weight loaded into registers before the rank-r product,
// 16-byte loads and stores where the layout allows (else one element per thread).
template <typename scalar_t, typename acc_t, int VEC, bool kCheck>
__global__ void __launch_bounds__(kernels::kThreads)
    merge_fast_kernel(scalar_t* __restrict__ w, int64_t m, int64_t k, int64_t s0, int64_t s1,
                      const acc_t* __restrict__ bs, const acc_t* __restrict__ a, int64_t r,
                      int* __restrict__ bad) {
  kernels::merge_tile<scalar_t, acc_t, VEC, kernels::kMergeRows, kCheck>(
      w, m, k, s0, s1, bs, a, r, bad, blockIdx.x, blockIdx.y, threadIdx.x, blockDim.x, gridDim.y);
}

template <bool kCheck>
void launch_merge_fast(const MergeProblem& pr, int* bad) {
  const at::Tensor& w = pr.w;
  const int64_t m = w.size(0), k = w.size(1), r = pr.a.size(0);
  const int vec = kernels::merge_vec(w);
  const int64_t gx = ((k + vec - 1) / vec + kernels::kThreads - 1) / kernels::kThreads;
  // rows beyond 65535 tiles are walked by the kernel's grid-stride loop
  const int64_t gy = std::min<int64_t>((m + kernels::kMergeRows - 1) / kernels::kMergeRows, 65535);
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, w.scalar_type(), "lora_ext::merge_fast_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        constexpr int kVec = 16 / sizeof(scalar_t);
        const auto stream = at::cuda::getCurrentCUDAStream();
        if (vec > 1) {
          merge_fast_kernel<scalar_t, acc_t, kVec, kCheck><<<grid, kernels::kThreads, 0, stream>>>(
              w.data_ptr<scalar_t>(), m, k, w.stride(0), w.stride(1), pr.bs.const_data_ptr<acc_t>(),
              pr.a.const_data_ptr<acc_t>(), r, bad);
        } else {
          merge_fast_kernel<scalar_t, acc_t, 1, kCheck><<<grid, kernels::kThreads, 0, stream>>>(
              w.data_ptr<scalar_t>(), m, k, w.stride(0), w.stride(1), pr.bs.const_data_ptr<acc_t>(),
              pr.a.const_data_ptr<acc_t>(), r, bad);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

void merge_cuda(at::Tensor weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
                double scale) {
  check_merge_args(weight, lora_a, lora_b, scale);
  const c10::cuda::CUDAGuard device_guard(weight.device());  // after the checks
  at::AutoDispatchBelowADInplaceOrView guard;
  const MergeProblem pr = make_merge_problem(weight, lora_a, lora_b, scale);
  if (pr.w.numel() == 0) return;
  if (cuda_fast_kernels()) {
    launch_merge_fast<false>(pr, nullptr);
  } else {
    launch_merge<false>(pr, nullptr);
  }
}

at::Tensor merge_check_cuda(const at::Tensor& weight, const at::Tensor& lora_a,
                            const at::Tensor& lora_b, double scale) {
  check_merge_args(weight, lora_a, lora_b, scale);
  const c10::cuda::CUDAGuard device_guard(weight.device());  // after the checks
  at::AutoDispatchBelowADInplaceOrView guard;
  const MergeProblem pr = make_merge_problem(weight, lora_a, lora_b, scale);
  at::Tensor bad = at::zeros({}, weight.options().dtype(at::kInt));
  if (pr.w.numel() > 0) {
    if (cuda_fast_kernels()) {
      launch_merge_fast<true>(pr, bad.mutable_data_ptr<int>());
    } else {
      launch_merge<true>(pr, bad.mutable_data_ptr<int>());
    }
  }
  return bad.eq(0);
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CUDA, m) {
  m.impl("merge_", &merge_cuda);
  m.impl("merge_check", &merge_check_cuda);
}

}  // namespace cuda
}  // namespace lora_ext
