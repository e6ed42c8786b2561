// The CPU grid emulator of the fast CUDA kernels' bodies (see grid_emulator.cpp), for tests.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

namespace lora_ext {
namespace emulator {

// merge_tile over a grid of ceil(k / vec / block) x grid_y blocks: w += bs @ a in place (check:
// w untouched, returns false where merge_check would). vectorized: 16-byte accesses (w must
// allow them, as kernels::merge_vec says).
bool merge(at::Tensor w, const at::Tensor& bs, const at::Tensor& a, bool vectorized, bool check,
           int64_t grid_y, int64_t block);

// keep_rows over grid blocks of block threads: x * keep(seed, p), not scaled.
at::Tensor keep_rows(const at::Tensor& x2, int64_t seed, double p, int64_t grid, int64_t block);

// lora_backward_cols: (grad_x LoRA term in x's dtype or undefined, grad_a before scaling in
// the accumulation dtype or undefined), with chunks of rows_per_chunk rows and blocks of block
// threads.
std::tuple<at::Tensor, at::Tensor> backward_cols(const at::Tensor& x2, const at::Tensor& g,
                                                 const at::Tensor& a, int64_t seed, double p,
                                                 double scale, bool want_x, bool want_a,
                                                 int64_t rows_per_chunk, int64_t block);

}  // namespace emulator
}  // namespace lora_ext
