// Rank-r row updates for float32 on the CPU: Y[m, n] = bias + A[m, r] B[r, n], r small (LoRA).
//
// MKL runs these at about half its peak: K = r = 16 is too short for its blocking, so its
// kernels spend their time loading and storing C. A 4 x 64 register tile keeps the 16
// accumulators of 4 output rows in zmm registers for the whole k loop and writes each output
// element once. Used for y = bias + scale * xa B^T (forward) and g A (backward's grad_x term).
#pragma once

#include <cstdint>

namespace lora_ext {
namespace cpu {

// True when the AVX-512 kernel runs on this CPU and has not been switched off (tests compare it
// with ATen's GEMM through set_rank_update_kernel(false)).
bool rank_update_kernel_enabled();
bool set_rank_update_kernel(bool enabled);  // returns the previous setting

// y[i, j] = (bias ? bias[j] : 0) + sum_k a[i * lda + k] * b[k * ldb + j], i < m, j < n, k < r.
// Requires rank_update_kernel_enabled().
void rank_update_f32(int64_t m, int64_t n, int64_t r, const float* a, int64_t lda, const float* b,
                     int64_t ldb, const float* bias, float* y, int64_t ldy);

}  // namespace cpu
}  // namespace lora_ext
