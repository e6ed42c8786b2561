// CPU kernels of merge_ / merge_check: weight += scale * B @ A without a weight-sized temporary.
//
// float32/float64 weights whose rows are unit-stride go straight to BLAS with beta = 1: the GEMM
// accumulates into the weight, reading and writing it once. Other dtypes (bfloat16, float16) and
// layouts work in row tiles: the delta of a tile is computed in float32 into a small per-thread
// buffer and added to the weight with a single rounding.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>

#include "../lora_linear.h"

namespace lora_ext {
namespace cpu {
namespace {

// rows per tile: about 64 KB of float32 delta per thread, at least one row
int64_t tile_rows(int64_t k) {
  return std::clamp<int64_t>((int64_t{1} << 14) / std::max<int64_t>(k, 1), 1, 256);
}

// check == false: w += delta tile by tile. check == true: write nothing, return whether the
// delta is finite everywhere and no finite weight would become non-finite after rounding.
template <typename scalar_t>
bool merge_tiles(const MergeProblem& pr, bool check) {
  using acc_t = at::opmath_type<scalar_t>;
  const at::Tensor& w = pr.w;
  const int64_t m = w.size(0), k = w.size(1), s0 = w.stride(0), s1 = w.stride(1);
  const int64_t rows_per_tile = tile_rows(k);
  const int64_t ntiles = (m + rows_per_tile - 1) / rows_per_tile;
  scalar_t* base = w.data_ptr<scalar_t>();
  std::atomic<bool> ok{true};
  at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
    at::AutoDispatchBelowADInplaceOrView guard;  // TLS does not reach OpenMP workers
    at::Tensor buf = at::empty({rows_per_tile, k}, pr.a.options());
    bool local_ok = true;
    for (int64_t t = t0; t < t1 && local_ok; ++t) {
      const int64_t i0 = t * rows_per_tile, rows = std::min(rows_per_tile, m - i0);
      at::Tensor d = buf.narrow(0, 0, rows);
      at::mm_out(d, pr.bs.narrow(0, i0, rows), pr.a);
      const acc_t* dp = buf.const_data_ptr<acc_t>();
      for (int64_t i = 0; i < rows; ++i) {
        scalar_t* wr = base + (i0 + i) * s0;
        const acc_t* dr = dp + i * k;
        if (check) {
          for (int64_t j = 0; j < k; ++j) {
            const acc_t wv = static_cast<acc_t>(wr[j * s1]);
            const acc_t nv = static_cast<acc_t>(static_cast<scalar_t>(wv + dr[j]));
            if (!std::isfinite(dr[j]) || (std::isfinite(wv) && !std::isfinite(nv))) {
              local_ok = false;
              break;
            }
          }
          if (!local_ok) break;
        } else if (s1 == 1) {
          for (int64_t j = 0; j < k; ++j) {
            wr[j] = static_cast<scalar_t>(static_cast<acc_t>(wr[j]) + dr[j]);
          }
        } else {
          for (int64_t j = 0; j < k; ++j) {
            wr[j * s1] = static_cast<scalar_t>(static_cast<acc_t>(wr[j * s1]) + dr[j]);
          }
        }
      }
    }
    if (!local_ok) ok.store(false);
  });
  return ok.load();
}

void merge_cpu(at::Tensor weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
               double scale) {
  at::AutoDispatchBelowADInplaceOrView guard;  // in place on a parameter: no autograd here
  check_merge_args(weight, lora_a, lora_b, scale);
  const MergeProblem pr = make_merge_problem(weight, lora_a, lora_b, scale);
  if (pr.w.numel() == 0) return;
  const auto dt = pr.w.scalar_type();
  const bool blas = (dt == at::kFloat || dt == at::kDouble) && pr.w.stride(1) == 1 &&
                    pr.w.stride(0) >= pr.w.size(1);
  if (blas) {
    // C = 1 * C + 1 * (scale B) A, in place
    at::Tensor w = pr.w;
    w.addmm_(pr.bs, pr.a);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "lora_ext::merge_",
                                  [&] { merge_tiles<scalar_t>(pr, /*check=*/false); });
}

at::Tensor merge_check_cpu(const at::Tensor& weight, const at::Tensor& lora_a,
                           const at::Tensor& lora_b, double scale) {
  at::AutoDispatchBelowADInplaceOrView guard;
  check_merge_args(weight, lora_a, lora_b, scale);
  const MergeProblem pr = make_merge_problem(weight, lora_a, lora_b, scale);
  bool ok = true;
  if (pr.w.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, pr.w.scalar_type(),
                                    "lora_ext::merge_check",
                                    [&] { ok = merge_tiles<scalar_t>(pr, /*check=*/true); });
  }
  return at::scalar_tensor(ok, weight.options().dtype(at::kBool));
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CPU, m) {
  m.impl("merge_", &merge_cpu);
  m.impl("merge_check", &merge_check_cpu);
}

}  // namespace cpu
}  // namespace lora_ext
