// CUDA kernels of lora_linear / lora_linear_backward / dropout_mask.
//
// The GEMMs are cuBLAS through ATen on the current stream (csrc/lora_linear.h); the kernels here
// only apply the counter-based mask (csrc/rng.h, the same function the CPU uses, so a seed gives
// the same mask on both). drop(x) exists only transiently, as the input of one cuBLAS call.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublas_v2.h>
#include <torch/library.h>

#include <algorithm>

#include "../kernels/fast_kernels.h"
#include "../kernels/launch.h"
#include "../lora_linear.h"
#include "../rng.h"
#include "../switches.h"

namespace lora_ext {
namespace cuda {
namespace {

constexpr int kThreads = 256;

int64_t grid_for(int64_t numel) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::max<int64_t>(1, std::min<int64_t>((numel + kThreads - 1) / kThreads, sms * 32));
}

// The key of a seed that lives on the device (graph-safe: read by the kernel, not the host)
__device__ __forceinline__ rng::DropoutKey device_key(rng::DropoutKey key, const int64_t* seed) {
  return seed == nullptr ? key : rng::make_key(static_cast<uint64_t>(*seed), key.threshold);
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
                                    int64_t in, rng::DropoutKey key, const int64_t* seed_dev,
                                    acc_t inv, scalar_t* __restrict__ out) {
  key = device_key(key, seed_dev);
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
                                   int64_t in, rng::DropoutKey key, const int64_t* seed_dev,
                                   acc_t inv, acc_t g_scale, bool write_drop) {
  key = device_key(key, seed_dev);
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
                            rng::DropoutKey key, const int64_t* seed_dev) {
  key = device_key(key, seed_dev);
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
                x2.const_data_ptr<scalar_t>(), x2.stride(0), n, in, drop.key, drop.seed_dev,
                static_cast<acc_t>(drop.inv_keep), dropped.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return dropped;
}

// y = bias + scale * xa B^T [n, out] by cuBLAS, in x's dtype, or in float32 for float16 (the
// partial sum can leave fp16's range where y does not; the caller adds x W^T and rounds once).
at::Tensor lora_output(const at::Tensor& x2, const std::optional<at::Tensor>& bias,
                       const at::Tensor& xa, const at::Tensor& lora_b, double scale) {
  const bool has_bias = bias.has_value() && bias->defined();
  if (x2.scalar_type() == at::kHalf) {
    at::Tensor y = at::empty({x2.size(0), lora_b.size(0)}, x2.options().dtype(at::kFloat));
    at::addmm_out(y, has_bias ? bias->to(at::kFloat) : y, xa.to(at::kFloat),
                  lora_b.to(at::kFloat).t(), /*beta=*/has_bias ? 1.0 : 0.0, /*alpha=*/scale);
    return y;
  }
  // beta = 0 without a bias: addmm ignores its input then (no zero tensor to allocate)
  at::Tensor y = at::empty({x2.size(0), lora_b.size(0)}, x2.options());
  at::addmm_out(y, has_bias ? *bias : y, xa, lora_b.t(), /*beta=*/has_bias ? 1.0 : 0.0,
                /*alpha=*/scale);
  return y;
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
    return {lora_output(x2, bias, xa, lora_b, scale), xa};
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
                    in, drop.key, drop.seed_dev, static_cast<acc_t>(drop.inv_keep),
                    static_cast<acc_t>(scale), grad_a != nullptr);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
    }
    if (grad_a != nullptr) {
      *grad_a = at::empty_like(lora_a, at::MemoryFormat::Contiguous);
      at::addmm_out(*grad_a, *grad_a, g.t(), t, /*beta=*/0.0, /*alpha=*/scale);
    }
  }
};

// ------------------------------------------------------------------------------ fast path

cudaDataType_t cuda_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return CUDA_R_32F;
    case at::kDouble:
      return CUDA_R_64F;
    case at::kHalf:
      return CUDA_R_16F;
    case at::kBFloat16:
      return CUDA_R_16BF;
    default:
      TORCH_CHECK(false, "lora_ext: no cuBLAS type for ", t);
  }
}

// c [M, N] (contiguous, float32 or float64) = alpha * a [M, K] @ b [K, N], a and b of one dtype
// (row-major or transposed views). cuBLAS accumulates in c's dtype with reduced-precision
// reductions disallowed (no split-K partial sums rounded to 16 bits) and no TF32: the skinny
// products keep float32 throughout, as on the CPU, and are rounded once by the caller.
void gemm_acc(at::Tensor& c, at::Tensor a, at::Tensor b, double alpha) {
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  if (M == 0 || N == 0) return;
  if (K == 0) {
    c.zero_();
    return;
  }
  auto layout = [](at::Tensor& t, bool& trans, int64_t& ld) {
    if (t.stride(1) == 1 && t.stride(0) >= std::max<int64_t>(1, t.size(1))) {
      trans = false, ld = t.stride(0);
    } else if (t.stride(0) == 1 && t.stride(1) >= std::max<int64_t>(1, t.size(0))) {
      trans = true, ld = t.stride(1);
    } else {
      t = t.contiguous();
      trans = false, ld = std::max<int64_t>(1, t.size(1));
    }
  };
  bool ta = false, tb = false;
  int64_t lda = 1, ldb = 1;
  layout(a, ta, lda);
  layout(b, tb, ldb);
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  cublasMath_t old_mode;
  TORCH_CUDABLAS_CHECK(cublasGetMathMode(handle, &old_mode));
  TORCH_CUDABLAS_CHECK(cublasSetMathMode(
      handle, static_cast<cublasMath_t>(CUBLAS_DEFAULT_MATH |
                                        CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)));
  const bool dbl = c.scalar_type() == at::kDouble;
  const float alpha_f = static_cast<float>(alpha), beta_f = 0.0f;
  const double alpha_d = alpha, beta_d = 0.0;
  // row-major C = A B is column-major C^T = B^T A^T
  const cublasStatus_t status =
      cublasGemmEx(handle, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N,
                   static_cast<int>(N), static_cast<int>(M), static_cast<int>(K),
                   dbl ? static_cast<const void*>(&alpha_d) : static_cast<const void*>(&alpha_f),
                   b.const_data_ptr(), cuda_type(b.scalar_type()), static_cast<int>(ldb),
                   a.const_data_ptr(), cuda_type(a.scalar_type()), static_cast<int>(lda),
                   dbl ? static_cast<const void*>(&beta_d) : static_cast<const void*>(&beta_f),
                   c.mutable_data_ptr(), cuda_type(c.scalar_type()), static_cast<int>(N),
                   dbl ? CUBLAS_COMPUTE_64F : CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  cublasSetMathMode(handle, old_mode);
  TORCH_CUDABLAS_CHECK(status);
}

template <typename scalar_t>
__global__ void keep_rows_kernel(const scalar_t* __restrict__ x, int64_t ldx, int64_t n, int64_t in,
                                 rng::DropoutKey key, const int64_t* seed_dev,
                                 scalar_t* __restrict__ out) {
  key = device_key(key, seed_dev);
  kernels::keep_rows<scalar_t>(x, ldx, n, in, key, out, blockIdx.x, threadIdx.x, blockDim.x,
                               gridDim.x);
}

template <typename scalar_t, typename acc_t, int RMAX>
__global__ void __launch_bounds__(kernels::kThreads)
    backward_cols_kernel(scalar_t* grad_x, acc_t* partial, const scalar_t* x, int64_t ldx,
                         const acc_t* g, const acc_t* a, int64_t n, int64_t in, int64_t r,
                         int64_t rows_per_chunk, bool dropout, rng::DropoutKey key,
                         const int64_t* seed_dev, acc_t inv, acc_t scale) {
  if (dropout) key = device_key(key, seed_dev);
  kernels::lora_backward_cols<scalar_t, acc_t, RMAX>(
      grad_x, partial, x, ldx, g, a, n, in, r, rows_per_chunk, dropout, key, inv, scale, blockIdx.x,
      blockIdx.y, threadIdx.x, blockDim.x);
}

// The fast kernels (ops.cuda_kernels("fast")):
// - forward: drop(x) is never formed: x * keep (exact, no rounding) feeds one cuBLAS GEMM with
//   alpha = 1 / (1 - p) and a float32 result, rounded once into xa (as the CPU rounds it);
// - backward: g = dY B and grad_b = s dY^T xa in float32 (no reduced-precision split-K); one
//   pass over x writes the LoRA term of grad_x (A's column in registers, mask inline) and
//   reduces grad_a per chunk of rows (no atomics: the chunks are summed in a fixed order);
//   cuBLAS then adds dY W into grad_x with beta = 1.
struct CudaFastKernels {
  static constexpr bool kLoraTermFirst = true;
  static constexpr bool kUpcastHalf = false;
  using Guard = c10::cuda::CUDAGuard;

  static at::ScalarType acc_type(const at::Tensor& t) {
    return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  }

  static std::tuple<at::Tensor, at::Tensor> lora_forward(const at::Tensor& x2,
                                                         const std::optional<at::Tensor>& bias,
                                                         const at::Tensor& lora_a,
                                                         const at::Tensor& lora_b, double scale,
                                                         const Dropout& drop) {
    const int64_t n = x2.size(0), in = x2.size(1), r = lora_a.size(0);
    at::Tensor xa32 = at::empty({n, r}, x2.options().dtype(acc_type(x2)));
    if (drop.active && n * in > 0) {
      at::Tensor kept = at::empty({n, in}, x2.options());
      AT_DISPATCH_FLOATING_TYPES_AND2(
          at::kBFloat16, at::kHalf, x2.scalar_type(), "lora_ext::keep_rows_cuda", [&] {
            keep_rows_kernel<scalar_t>
                <<<grid_for(n * in), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
                    x2.const_data_ptr<scalar_t>(), x2.stride(0), n, in, drop.key, drop.seed_dev,
                    kept.mutable_data_ptr<scalar_t>());
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
      gemm_acc(xa32, kept, lora_a.t(), drop.inv_keep);
    } else {
      gemm_acc(xa32, x2, lora_a.t(), 1.0);
    }
    const at::Tensor xa = xa32.to(x2.scalar_type());
    return {lora_output(x2, bias, xa, lora_b, scale), xa};
  }

  // grad_x (if wanted) comes in uninitialised and leaves holding the LoRA term
  static void lora_backward(const at::Tensor& dy, const at::Tensor& x2, const at::Tensor& xa2,
                            const at::Tensor& lora_a, const at::Tensor& lora_b, double scale,
                            const Dropout& drop, at::Tensor* grad_x, at::Tensor* grad_a,
                            at::Tensor* grad_b) {
    const int64_t n = x2.size(0), in = x2.size(1), r = lora_a.size(0), out = lora_b.size(0);
    const auto acc = acc_type(x2);
    if (r > kernels::kMaxFastRank) {  // beyond the register budget: the simple kernels
      if (grad_x != nullptr) grad_x->zero_();
      CudaKernels::lora_backward(dy, x2, xa2, lora_a, lora_b, scale, drop, grad_x, grad_a, grad_b);
      return;
    }
    if (grad_b != nullptr) {
      at::Tensor gb = at::empty({out, r}, x2.options().dtype(acc));
      gemm_acc(gb, dy.t(), xa2, scale);
      *grad_b = gb.to(lora_b.scalar_type());
    }
    if (grad_x == nullptr && grad_a == nullptr) return;
    at::Tensor g = at::empty({n, r}, x2.options().dtype(acc));
    gemm_acc(g, dy, lora_b, 1.0);
    const at::Tensor a_acc = lora_a.to(acc).contiguous();
    const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    const int64_t rpc = kernels::rows_per_chunk(n, in, kernels::kThreads, 4 * sms);
    const int64_t chunks = (n + rpc - 1) / rpc;
    at::Tensor partial =
        grad_a != nullptr ? at::empty({chunks, r, in}, x2.options().dtype(acc)) : at::Tensor();
    if (n > 0 && in > 0) {
      const dim3 grid(static_cast<unsigned>((in + kernels::kThreads - 1) / kernels::kThreads),
                      static_cast<unsigned>(chunks));
      AT_DISPATCH_FLOATING_TYPES_AND2(
          at::kBFloat16, at::kHalf, x2.scalar_type(), "lora_ext::backward_cols_cuda", [&] {
            using acc_t = at::opmath_type<scalar_t>;
            kernels::with_rmax(r, [&](auto rmax) {
              constexpr int RM = decltype(rmax)::value;
              backward_cols_kernel<scalar_t, acc_t, RM>
                  <<<grid, kernels::kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
                      grad_x != nullptr ? grad_x->mutable_data_ptr<scalar_t>() : nullptr,
                      grad_a != nullptr ? partial.mutable_data_ptr<acc_t>() : nullptr,
                      x2.const_data_ptr<scalar_t>(), x2.stride(0), g.const_data_ptr<acc_t>(),
                      a_acc.const_data_ptr<acc_t>(), n, in, r, rpc, drop.active, drop.key,
                      drop.seed_dev, static_cast<acc_t>(drop.inv_keep), static_cast<acc_t>(scale));
              C10_CUDA_KERNEL_LAUNCH_CHECK();
            });
          });
    }
    if (grad_a != nullptr) {
      *grad_a = partial.sum(0).mul_(scale).to(lora_a.scalar_type());
    }
  }
};

at::Tensor dropout_mask_cuda(const at::Tensor& like, const at::Tensor& seed, double dropout_p,
                             int64_t offset) {
  check_dropout_p(dropout_p);
  LORA_CHECK_VALUE(offset >= 0, "offset must be >= 0, got ", offset);
  const Dropout drop = make_dropout(dropout_p, seed, like.device());
  const c10::cuda::CUDAGuard device_guard(like.device());  // after the checks
  at::Tensor mask = at::empty(like.sizes(), like.options().dtype(at::kBool));
  if (!drop.active) return mask.fill_(true);
  const int64_t numel = mask.numel();
  if (numel > 0) {
    mask_kernel<<<grid_for(numel), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        mask.mutable_data_ptr<bool>(), numel, offset, drop.key, drop.seed_dev);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return mask;
}

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                const std::optional<at::Tensor>& bias,
                                                const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                double scale, double dropout_p,
                                                const at::Tensor& seed) {
  if (cuda_fast_kernels()) {
    return lora_linear_forward<CudaFastKernels>(x, weight, bias, lora_a, lora_b, scale, dropout_p,
                                                seed);
  }
  return lora_linear_forward<CudaKernels>(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& xa, double scale,
    double dropout_p, const at::Tensor& seed, std::array<bool, 3> output_mask) {
  if (cuda_fast_kernels()) {
    return lora_linear_backward<CudaFastKernels>(grad_y, x, weight, lora_a, lora_b, xa, scale,
                                                 dropout_p, seed, output_mask);
  }
  return lora_linear_backward<CudaKernels>(grad_y, x, weight, lora_a, lora_b, xa, scale, dropout_p,
                                           seed, output_mask);
}

std::tuple<at::Tensor, at::Tensor> delta_forward_cuda(const at::Tensor& x, const at::Tensor& lora_a,
                                                      const at::Tensor& lora_b, double scale,
                                                      double dropout_p, const at::Tensor& seed) {
  if (cuda_fast_kernels()) {
    return lora_delta_forward<CudaFastKernels>(x, lora_a, lora_b, scale, dropout_p, seed);
  }
  return lora_delta_forward<CudaKernels>(x, lora_a, lora_b, scale, dropout_p, seed);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> delta_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& xa, double scale, double dropout_p,
    const at::Tensor& seed, std::array<bool, 3> output_mask) {
  if (cuda_fast_kernels()) {
    return lora_delta_backward<CudaFastKernels>(grad_y, x, lora_a, lora_b, xa, scale, dropout_p,
                                                seed, output_mask);
  }
  return lora_delta_backward<CudaKernels>(grad_y, x, lora_a, lora_b, xa, scale, dropout_p, seed,
                                          output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CUDA, m) {
  m.impl("lora_delta", &delta_forward_cuda);
  m.impl("lora_delta_backward", &delta_backward_cuda);
  m.impl("lora_linear", &forward_cuda);
  m.impl("lora_linear_backward", &backward_cuda);
  m.impl("dropout_mask", &dropout_mask_cuda);
}

}  // namespace cuda
}  // namespace lora_ext
