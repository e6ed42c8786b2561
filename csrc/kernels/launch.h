// Host-side launch parameters of the fast kernels (csrc/kernels/fast_kernels.h), shared by the
// CUDA launchers and the CPU grid emulator, so that both run the bodies on the same problems.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

namespace lora_ext {
namespace kernels {

constexpr int kMergeRows = 4;     // rows of w per thread in merge_tile
constexpr int kThreads = 256;     // threads per block of the fast kernels
constexpr int kMaxFastRank = 64;  // lora_backward_cols keeps r <= 64 accumulators per thread

// Elements per 16-byte access of merge_tile on w, or 1 when w's layout does not allow it.
inline int merge_vec(const at::Tensor& w) {
  const int64_t v = 16 / w.element_size();
  const bool ok = w.stride(1) == 1 && w.size(1) % v == 0 && w.stride(0) % v == 0 &&
                  reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0;
  return ok ? static_cast<int>(v) : 1;
}

// Rows per chunk of lora_backward_cols: enough (column block, chunk) pairs to fill the device
// (target_blocks), at least one row per chunk.
inline int64_t rows_per_chunk(int64_t n, int64_t in, int64_t threads, int64_t target_blocks) {
  const int64_t col_blocks = std::max<int64_t>(1, (in + threads - 1) / threads);
  const int64_t chunks = std::clamp<int64_t>((target_blocks + col_blocks - 1) / col_blocks, 1,
                                             std::max<int64_t>(n, 1));
  return std::max<int64_t>(1, (n + chunks - 1) / chunks);
}

// f(std::integral_constant<int, RMAX>) for the smallest RMAX in {16, 32, 64} with r <= RMAX.
template <class F>
void with_rmax(int64_t r, const F& f) {
  if (r <= 16) {
    f(std::integral_constant<int, 16>{});
  } else if (r <= 32) {
    f(std::integral_constant<int, 32>{});
  } else {
    f(std::integral_constant<int, 64>{});
  }
}

}  // namespace kernels
}  // namespace lora_ext
