// CUDA kernels of lora_linear / lora_linear_backward / dropout_mask.
//
// The GEMMs are cuBLAS through ATen on the current stream (csrc/lora_linear.h); the kernels here
// only apply the counter-based mask (csrc/rng.h, the same function the CPU uses, so a seed gives
// the same mask on both). drop(x) exists only transiently, as the input of one cuBLAS call.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../lora_linear.h"
#include "../rng.h"

namespace lora_ext {
namespace cuda {
namespace {

constexpr int kThreads = 256;

int64_t grid_for(int64_t numel) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::max<int64_t>(1, std::min<int64_t>((numel + kThreads - 1) / kThreads, sms * 32));
}

// Element idx of the logical [n, in] matrix lives at x[(idx / in) * ldx + idx % in].
__device__ __forceinline__ int64_t strided(int64_t idx, int64_t in, int64_t ldx) {
  if (ldx == in) return idx;
  const int64_t i = idx / in;
  return i * ldx + (idx - i * in);
}

// out (contiguous [n, in]) = x * keep / (1 - p)
template <typename scalar_t, typename acc_t>
__global__ void dropout_rows_kernel(const scalar_t* __restrict__ x, int64_t ldx, int64_t n,
                                    int64_t in, rng::DropoutKey key, acc_t inv,
                                    scalar_t* __restrict__ out) {
  const int64_t numel = n * in;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < numel;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const acc_t m = rng::keep(key, static_cast<uint64_t>(idx)) ? inv : acc_t(0);
    out[idx] = static_cast<scalar_t>(static_cast<acc_t>(x[strided(idx, in, ldx)]) * m);
  }
}

// Backward, one pass per element, mask evaluated once:
//   grad_x += g_scale * keep / (1 - p) * t     (t = g @ A, when grad_x != nullptr)
//   t       = x * keep / (1 - p)               (drop(x) for grad_a, when write_drop)
template <typename scalar_t, typename acc_t>
__global__ void masked_grad_kernel(scalar_t* __restrict__ grad_x, scalar_t* __restrict__ t,
                                   const scalar_t* __restrict__ x, int64_t ldx, int64_t n,
                                   int64_t in, rng::DropoutKey key, acc_t inv, acc_t g_scale,
                                   bool write_drop) {
  const int64_t numel = n * in;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < numel;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const acc_t m = rng::keep(key, static_cast<uint64_t>(idx)) ? inv : acc_t(0);
    if (grad_x != nullptr) {
      grad_x[idx] = static_cast<scalar_t>(static_cast<acc_t>(grad_x[idx]) +
                                          g_scale * m * static_cast<acc_t>(t[idx]));
    }
    if (write_drop)
      t[idx] = static_cast<scalar_t>(static_cast<acc_t>(x[strided(idx, in, ldx)]) * m);
  }
}

__global__ void mask_kernel(bool* __restrict__ out, int64_t numel, int64_t offset,
                            rng::DropoutKey key) {
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < numel;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[idx] = rng::keep(key, static_cast<uint64_t>(offset + idx));
  }
}

// drop(x2) into a transient contiguous buffer (consumed by one cuBLAS call, then freed)
at::Tensor dropped_copy(const at::Tensor& x2, const Dropout& drop) {
  const int64_t n = x2.size(0), in = x2.size(1);
  at::Tensor dropped = at::empty({n, in}, x2.options());
  if (dropped.numel() == 0) return dropped;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, x2.scalar_type(), "lora_ext::dropout_rows_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        dropout_rows_kernel<scalar_t, acc_t>
            <<<grid_for(n * in), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
                x2.const_data_ptr<scalar_t>(), x2.stride(0), n, in, drop.key,
                static_cast<acc_t>(drop.inv_keep), dropped.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return dropped;
}

struct CudaKernels {
  // grad_x comes in holding dY W; lora_backward adds the LoRA term (the simple path until a
  // GPU has measured the write-first order the CPU uses)
  static constexpr bool kLoraTermFirst = false;
  static constexpr bool kUpcastHalf = false;
  using Guard = c10::cuda::CUDAGuard;

  // xa = drop(x2) @ A^T;  y = bias + scale * xa @ B^T (cuBLAS; the caller adds x W^T)
  static std::tuple<at::Tensor, at::Tensor> lora_forward(const at::Tensor& x2,
                                                         const std::optional<at::Tensor>& bias,
                                                         const at::Tensor& lora_a,
                                                         const at::Tensor& lora_b, double scale,
                                                         const Dropout& drop) {
    const at::Tensor xa =
        drop.active ? at::mm(dropped_copy(x2, drop), lora_a.t()) : at::mm(x2, lora_a.t());
    const bool has_bias = bias.has_value() && bias->defined();
    if (x2.scalar_type() == at::kHalf) {
      // float16: bias + s xa B^T stays in float32 (it can leave fp16's range where y does not);
      // the caller adds x W^T and rounds once. [n, out] float32: small next to the big GEMM.
      at::Tensor y = at::empty({x2.size(0), lora_b.size(0)}, x2.options().dtype(at::kFloat));
      at::addmm_out(y, has_bias ? bias->to(at::kFloat) : y, xa.to(at::kFloat),
                    lora_b.to(at::kFloat).t(), /*beta=*/has_bias ? 1.0 : 0.0, /*alpha=*/scale);
      return {y, xa};
    }
    // beta = 0 without a bias: addmm ignores its input then (no zero tensor to allocate)
    at::Tensor y = at::empty({x2.size(0), lora_b.size(0)}, x2.options());
    at::addmm_out(y, has_bias ? *bias : y, xa, lora_b.t(), /*beta=*/has_bias ? 1.0 : 0.0,
                  /*alpha=*/scale);
    return {y, xa};
  }

  static void lora_backward(const at::Tensor& dy, const at::Tensor& x2, const at::Tensor& xa2,
                            const at::Tensor& lora_a, const at::Tensor& lora_b, double scale,
                            const Dropout& drop, at::Tensor* grad_x, at::Tensor* grad_a,
                            at::Tensor* grad_b) {
    const int64_t n = x2.size(0), in = x2.size(1);
    if (grad_b != nullptr) {
      *grad_b = at::empty_like(lora_b, at::MemoryFormat::Contiguous);
      at::addmm_out(*grad_b, *grad_b, dy.t(), xa2, /*beta=*/0.0, /*alpha=*/scale);
    }
    if (grad_x == nullptr && grad_a == nullptr) return;
    const at::Tensor g = at::mm(dy, lora_b);  // [n, r], computed once; scale applied below
    if (!drop.active) {
      if (grad_x != nullptr) grad_x->addmm_(g, lora_a, /*beta=*/1.0, /*alpha=*/scale);
      if (grad_a != nullptr) {
        *grad_a = at::empty_like(lora_a, at::MemoryFormat::Contiguous);
        at::addmm_out(*grad_a, *grad_a, g.t(), x2, /*beta=*/0.0, /*alpha=*/scale);
      }
      return;
    }
    // t: first g @ A (for grad_x), then overwritten in place by drop(x) (for grad_a)
    at::Tensor t = grad_x != nullptr ? at::mm(g, lora_a) : at::empty({n, in}, x2.options());
    if (t.numel() > 0) {
      AT_DISPATCH_FLOATING_TYPES_AND2(
          at::kBFloat16, at::kHalf, x2.scalar_type(), "lora_ext::masked_backward_cuda", [&] {
            using acc_t = at::opmath_type<scalar_t>;
            masked_grad_kernel<scalar_t, acc_t>
                <<<grid_for(n * in), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
                    grad_x != nullptr ? grad_x->mutable_data_ptr<scalar_t>() : nullptr,
                    t.mutable_data_ptr<scalar_t>(), x2.const_data_ptr<scalar_t>(), x2.stride(0), n,
                    in, drop.key, static_cast<acc_t>(drop.inv_keep), static_cast<acc_t>(scale),
                    grad_a != nullptr);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
    }
    if (grad_a != nullptr) {
      *grad_a = at::empty_like(lora_a, at::MemoryFormat::Contiguous);
      at::addmm_out(*grad_a, *grad_a, g.t(), t, /*beta=*/0.0, /*alpha=*/scale);
    }
  }
};

at::Tensor dropout_mask_cuda(const at::Tensor& like, const at::Tensor& seed, double dropout_p,
                             int64_t offset) {
  check_dropout_p(dropout_p);
  LORA_CHECK_VALUE(offset >= 0, "offset must be >= 0, got ", offset);
  const Dropout drop = make_dropout(dropout_p, seed);
  const c10::cuda::CUDAGuard device_guard(like.device());  // after the checks
  at::Tensor mask = at::empty(like.sizes(), like.options().dtype(at::kBool));
  if (!drop.active) return mask.fill_(true);
  const int64_t numel = mask.numel();
  if (numel > 0) {
    mask_kernel<<<grid_for(numel), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        mask.mutable_data_ptr<bool>(), numel, offset, drop.key);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return mask;
}

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                const std::optional<at::Tensor>& bias,
                                                const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                double scale, double dropout_p,
                                                const at::Tensor& seed) {
  return lora_linear_forward<CudaKernels>(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& xa, double scale,
    double dropout_p, const at::Tensor& seed, std::array<bool, 3> output_mask) {
  return lora_linear_backward<CudaKernels>(grad_y, x, weight, lora_a, lora_b, xa, scale, dropout_p,
                                           seed, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CUDA, m) {
  m.impl("lora_linear", &forward_cuda);
  m.impl("lora_linear_backward", &backward_cuda);
  m.impl("dropout_mask", &dropout_mask_cuda);
}

}  // namespace cuda
}  // namespace lora_ext
