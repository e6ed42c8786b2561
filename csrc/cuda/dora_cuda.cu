// CUDA kernels of dora_norm / dora_merge_ / dora_merge_check (csrc/dora.h). Each element's
// delta s (B A)_ij is formed on the fly (dora::delta_at, rank r terms in float32), so neither
// W + s B A nor B A is ever materialised.
//
//   norm:  one block per output row (grid-stride over rows), threads stride over the row,
//          squares summed in float32 per thread, then a shared-memory tree reduction.
//   merge / check: one thread per weight element (grid-stride), reading the row's factor.
// A weight stored transposed (Conv1D viewed as [out, in]) is read with its strides (correct,
// not coalesced: merges are rare, and GPT-2's Conv1D layers are small).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../dora.h"

namespace lora_ext {
namespace cuda {
namespace {

constexpr int kNormThreads = 256;
constexpr int kMergeThreads = 256;

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kNormThreads)
    dora_norm_kernel(const scalar_t* __restrict__ w, int64_t m, int64_t k, int64_t s0, int64_t s1,
                     const acc_t* __restrict__ bs, const acc_t* __restrict__ a, int64_t r,
                     acc_t* __restrict__ norm) {
  __shared__ acc_t partial[kNormThreads];
  for (int64_t i = blockIdx.x; i < m; i += gridDim.x) {
    const acc_t* bs_row = bs + i * r;
    acc_t acc = acc_t(0);
    for (int64_t j = threadIdx.x; j < k; j += blockDim.x) {
      const acc_t v =
          static_cast<acc_t>(w[i * s0 + j * s1]) + dora::delta_at<acc_t>(bs_row, a, j, k, r);
      acc += v * v;
    }
    partial[threadIdx.x] = acc;
    __syncthreads();
    for (int half = kNormThreads / 2; half > 0; half /= 2) {
      if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
      __syncthreads();
    }
    if (threadIdx.x == 0) norm[i] = sqrt(partial[0]);
    __syncthreads();
  }
}

// kCheck == false: w <- merged value.  kCheck == true: w untouched; *bad = 1 if an element
// fails dora::element_ok.
template <typename scalar_t, typename acc_t, bool kCheck>
__global__ void __launch_bounds__(kMergeThreads)
    dora_merge_kernel(scalar_t* __restrict__ w, int64_t m, int64_t k, int64_t s0, int64_t s1,
                      const acc_t* __restrict__ bs, const acc_t* __restrict__ a, int64_t r,
                      const acc_t* __restrict__ f, bool inverse, int* __restrict__ bad) {
  const int64_t total = m * k;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e / k, j = e % k;
    scalar_t* p = w + i * s0 + j * s1;
    const acc_t wv = static_cast<acc_t>(*p);
    const acc_t dv = dora::delta_at<acc_t>(bs + i * r, a, j, k, r);
    const scalar_t nv = static_cast<scalar_t>(dora::merged_value<acc_t>(wv, dv, f[i], inverse));
    if (kCheck) {
      if (!dora::element_ok<acc_t>(wv, dv, f[i], static_cast<acc_t>(nv))) *bad = 1;
    } else {
      *p = nv;
    }
  }
}

unsigned blocks_for(int64_t work, int threads) {
  return static_cast<unsigned>(std::clamp<int64_t>((work + threads - 1) / threads, 1, 65535));
}

at::Tensor dora_norm_cuda(const at::Tensor& weight, const at::Tensor& lora_a,
                          const at::Tensor& lora_b, double scale) {
  check_merge_args(weight, lora_a, lora_b, scale);
  const c10::cuda::CUDAGuard device_guard(weight.device());  // after the checks
  at::AutoDispatchBelowADInplaceOrView guard;
  const dora::Problem pr = dora::make_problem(weight, lora_a, lora_b, scale);
  at::Tensor norm = at::zeros({weight.size(0)}, weight.options().dtype(dora::acc_type(weight)));
  if (weight.numel() == 0) return norm;
  const int64_t m = weight.size(0), k = weight.size(1), r = pr.a.size(0);
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(m, 65535));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, weight.scalar_type(), "lora_ext::dora_norm_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        dora_norm_kernel<scalar_t, acc_t>
            <<<grid, kNormThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
                weight.const_data_ptr<scalar_t>(), m, k, weight.stride(0), weight.stride(1),
                pr.bs.const_data_ptr<acc_t>(), pr.a.const_data_ptr<acc_t>(), r,
                norm.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return norm;
}

template <bool kCheck>
void launch_dora_merge(const at::Tensor& weight, const dora::Problem& pr, const at::Tensor& f,
                       bool inverse, int* bad) {
  const int64_t m = weight.size(0), k = weight.size(1), r = pr.a.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, weight.scalar_type(), "lora_ext::dora_merge_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        dora_merge_kernel<scalar_t, acc_t, kCheck>
            <<<blocks_for(m * k, kMergeThreads), kMergeThreads, 0,
               at::cuda::getCurrentCUDAStream()>>>(
                pr.w.data_ptr<scalar_t>(), m, k, pr.w.stride(0), pr.w.stride(1),
                pr.bs.const_data_ptr<acc_t>(), pr.a.const_data_ptr<acc_t>(), r,
                f.const_data_ptr<acc_t>(), inverse, bad);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

void dora_merge_cuda(at::Tensor weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
                     double scale, const at::Tensor& factor, bool inverse) {
  check_merge_args(weight, lora_a, lora_b, scale);
  const at::Tensor f = dora::check_factor(weight, factor);
  const c10::cuda::CUDAGuard device_guard(weight.device());  // after the checks
  at::AutoDispatchBelowADInplaceOrView guard;
  const dora::Problem pr = dora::make_problem(weight, lora_a, lora_b, scale);
  if (weight.numel() == 0) return;
  launch_dora_merge<false>(weight, pr, f, inverse, nullptr);
}

at::Tensor dora_merge_check_cuda(const at::Tensor& weight, const at::Tensor& lora_a,
                                 const at::Tensor& lora_b, double scale, const at::Tensor& factor,
                                 bool inverse) {
  check_merge_args(weight, lora_a, lora_b, scale);
  const at::Tensor f = dora::check_factor(weight, factor);
  const c10::cuda::CUDAGuard device_guard(weight.device());  // after the checks
  at::AutoDispatchBelowADInplaceOrView guard;
  const dora::Problem pr = dora::make_problem(weight, lora_a, lora_b, scale);
  at::Tensor bad = at::zeros({}, weight.options().dtype(at::kInt));
  if (weight.numel() > 0) {
    launch_dora_merge<true>(weight, pr, f, inverse, bad.mutable_data_ptr<int>());
  }
  return bad.eq(0);
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CUDA, m) {
  m.impl("dora_norm", &dora_norm_cuda);
  m.impl("dora_merge_", &dora_merge_cuda);
  m.impl("dora_merge_check", &dora_merge_check_cuda);
}

}  // namespace cuda
}  // namespace lora_ext
