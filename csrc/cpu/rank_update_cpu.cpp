// AVX-512 rank-r update kernel (see rank_update_cpu.h). Compiled for AVX-512 through a target
// attribute and chosen at run time, so the extension still loads on CPUs without it.
#include "rank_update_cpu.h"

#include <algorithm>
#include <atomic>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define LORA_HAVE_AVX512_KERNEL 1
#endif

namespace lora_ext {
namespace cpu {

namespace {

#ifdef LORA_HAVE_AVX512_KERNEL
bool cpu_has_avx512() { return __builtin_cpu_supports("avx512f"); }
#else
bool cpu_has_avx512() { return false; }
#endif

std::atomic<bool> g_enabled{cpu_has_avx512()};

#ifdef LORA_HAVE_AVX512_KERNEL
constexpr int kVecs = 4;  // 4 x 16 floats = 64 output columns per tile

// Rows [i, i + MR) x columns [j, j + 64) (masked at the right edge).
template <int MR>
__attribute__((target("avx512f"))) inline void tile(int64_t i, int64_t j, int64_t n, int64_t r,
                                                    const float* a, int64_t lda, const float* b,
                                                    int64_t ldb, const float* bias, float* y,
                                                    int64_t ldy) {
  __mmask16 mask[kVecs];
#pragma GCC unroll 4
  for (int v = 0; v < kVecs; ++v) {
    const int64_t left = std::clamp<int64_t>(n - j - 16 * v, 0, 16);
    mask[v] =
        left == 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
  }
  __m512 acc[MR][kVecs];
#pragma GCC unroll 4
  for (int v = 0; v < kVecs; ++v) {
    const __m512 init =
        bias != nullptr ? _mm512_maskz_loadu_ps(mask[v], bias + j + 16 * v) : _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int ii = 0; ii < MR; ++ii) acc[ii][v] = init;
  }
  for (int64_t k = 0; k < r; ++k) {
    __m512 bv[kVecs];
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v)
      bv[v] = _mm512_maskz_loadu_ps(mask[v], b + k * ldb + j + 16 * v);
#pragma GCC unroll 4
    for (int ii = 0; ii < MR; ++ii) {
      const __m512 av = _mm512_set1_ps(a[(i + ii) * lda + k]);
#pragma GCC unroll 4
      for (int v = 0; v < kVecs; ++v) acc[ii][v] = _mm512_fmadd_ps(av, bv[v], acc[ii][v]);
    }
  }
#pragma GCC unroll 4
  for (int ii = 0; ii < MR; ++ii) {
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v)
      _mm512_mask_storeu_ps(y + (i + ii) * ldy + j + 16 * v, mask[v], acc[ii][v]);
  }
}

__attribute__((target("avx512f"))) void rank_update_avx512(int64_t m, int64_t n, int64_t r,
                                                           const float* a, int64_t lda,
                                                           const float* b, int64_t ldb,
                                                           const float* bias, float* y,
                                                           int64_t ldy) {
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) {
    for (int64_t j = 0; j < n; j += 16 * kVecs) tile<4>(i, j, n, r, a, lda, b, ldb, bias, y, ldy);
  }
  for (; i < m; ++i) {
    for (int64_t j = 0; j < n; j += 16 * kVecs) tile<1>(i, j, n, r, a, lda, b, ldb, bias, y, ldy);
  }
}
#endif

}  // namespace

bool rank_update_kernel_enabled() { return g_enabled.load(std::memory_order_relaxed); }

bool set_rank_update_kernel(bool enabled) {
  return g_enabled.exchange(enabled && cpu_has_avx512());
}

void rank_update_f32(int64_t m, int64_t n, int64_t r, const float* a, int64_t lda, const float* b,
                     int64_t ldb, const float* bias, float* y, int64_t ldy) {
#ifdef LORA_HAVE_AVX512_KERNEL
  rank_update_avx512(m, n, r, a, lda, b, ldb, bias, y, ldy);
#else
  (void)m, (void)n, (void)r, (void)a, (void)lda, (void)b, (void)ldb, (void)bias, (void)y, (void)ldy;
#endif
}

}  // namespace cpu
}  // namespace lora_ext
