// CPU kernels of dora_norm / dora_merge_ / dora_merge_check (csrc/dora.h): tiles of output rows,
// the delta of a tile computed in float32 by one small GEMM into a per-thread buffer (about
// 64 KB), then one pass over the tile's weight elements. No weight-sized temporary.
//
// A weight whose rows are not unit-stride (GPT-2 Conv1D viewed as [out, in]) is walked column by
// column inside a tile, so that consecutive reads are consecutive in memory.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "../dora.h"

namespace lora_ext {
namespace cpu {
namespace {

int64_t dora_tile_rows(int64_t k) {
  return std::clamp<int64_t>((int64_t{1} << 14) / std::max<int64_t>(k, 1), 1, 256);
}

enum class Mode { kNorm, kMerge, kCheck };

// Visit every element of a tile: fn(i, j) with i the row inside the tile, in the order that
// walks memory contiguously (rows inner when the weight is stored transposed).
template <typename Fn>
inline void visit_tile(int64_t rows, int64_t k, bool rows_inner, Fn&& fn) {
  if (rows_inner) {
    for (int64_t j = 0; j < k; ++j)
      for (int64_t i = 0; i < rows; ++i) fn(i, j);
  } else {
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < k; ++j) fn(i, j);
  }
}

template <typename scalar_t, Mode kMode>
bool dora_tiles(const dora::Problem& pr, const at::Tensor& factor, at::Tensor* norm,
                bool inverse) {
  using acc_t = at::opmath_type<scalar_t>;
  const at::Tensor& w = pr.w;
  const int64_t m = w.size(0), k = w.size(1), s0 = w.stride(0), s1 = w.stride(1);
  const bool rows_inner = s0 < s1;
  const int64_t rows_per_tile = dora_tile_rows(k);
  const int64_t ntiles = (m + rows_per_tile - 1) / rows_per_tile;
  scalar_t* base = w.data_ptr<scalar_t>();
  const acc_t* fp = kMode == Mode::kNorm ? nullptr : factor.const_data_ptr<acc_t>();
  acc_t* np = kMode == Mode::kNorm ? norm->mutable_data_ptr<acc_t>() : nullptr;
  std::atomic<bool> ok{true};
  at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
    at::AutoDispatchBelowADInplaceOrView guard;  // TLS does not reach OpenMP workers
    at::Tensor buf = at::empty({rows_per_tile, k}, pr.a.options());
    std::vector<double> sq(kMode == Mode::kNorm ? rows_per_tile : 0);
    bool local_ok = true;
    for (int64_t t = t0; t < t1 && local_ok; ++t) {
      const int64_t i0 = t * rows_per_tile, rows = std::min(rows_per_tile, m - i0);
      at::Tensor d = buf.narrow(0, 0, rows);
      at::mm_out(d, pr.bs.narrow(0, i0, rows), pr.a);
      const acc_t* dp = buf.const_data_ptr<acc_t>();
      scalar_t* tile = base + i0 * s0;
      if constexpr (kMode == Mode::kNorm) {
        std::fill(sq.begin(), sq.end(), 0.0);
        visit_tile(rows, k, rows_inner, [&](int64_t i, int64_t j) {
          const double v = static_cast<double>(static_cast<acc_t>(tile[i * s0 + j * s1]) +
                                               dp[i * k + j]);
          sq[i] += v * v;
        });
        for (int64_t i = 0; i < rows; ++i) np[i0 + i] = static_cast<acc_t>(std::sqrt(sq[i]));
      } else if constexpr (kMode == Mode::kMerge) {
        visit_tile(rows, k, rows_inner, [&](int64_t i, int64_t j) {
          scalar_t* p = tile + i * s0 + j * s1;
          *p = static_cast<scalar_t>(
              dora::merged_value<acc_t>(static_cast<acc_t>(*p), dp[i * k + j], fp[i0 + i], inverse));
        });
      } else {
        visit_tile(rows, k, rows_inner, [&](int64_t i, int64_t j) {
          const acc_t wv = static_cast<acc_t>(tile[i * s0 + j * s1]);
          const acc_t dv = dp[i * k + j], fv = fp[i0 + i];
          const acc_t nv = static_cast<acc_t>(
              static_cast<scalar_t>(dora::merged_value<acc_t>(wv, dv, fv, inverse)));
          if (!dora::element_ok<acc_t>(wv, dv, fv, nv)) local_ok = false;
        });
      }
    }
    if (!local_ok) ok.store(false);
  });
  return ok.load();
}

at::Tensor dora_norm_cpu(const at::Tensor& weight, const at::Tensor& lora_a,
                         const at::Tensor& lora_b, double scale) {
  at::AutoDispatchBelowADInplaceOrView guard;
  check_merge_args(weight, lora_a, lora_b, scale);
  const dora::Problem pr = dora::make_problem(weight, lora_a, lora_b, scale);
  at::Tensor norm = at::zeros({weight.size(0)}, weight.options().dtype(dora::acc_type(weight)));
  if (weight.numel() == 0) return norm;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(),
                                  "lora_ext::dora_norm", [&] {
                                    dora_tiles<scalar_t, Mode::kNorm>(pr, at::Tensor(), &norm,
                                                                      false);
                                  });
  return norm;
}

void dora_merge_cpu(at::Tensor weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
                    double scale, const at::Tensor& factor, bool inverse) {
  at::AutoDispatchBelowADInplaceOrView guard;  // in place on a parameter: no autograd here
  check_merge_args(weight, lora_a, lora_b, scale);
  const at::Tensor f = dora::check_factor(weight, factor);
  const dora::Problem pr = dora::make_problem(weight, lora_a, lora_b, scale);
  if (weight.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(),
                                  "lora_ext::dora_merge_", [&] {
                                    dora_tiles<scalar_t, Mode::kMerge>(pr, f, nullptr, inverse);
                                  });
}

at::Tensor dora_merge_check_cpu(const at::Tensor& weight, const at::Tensor& lora_a,
                                const at::Tensor& lora_b, double scale, const at::Tensor& factor,
                                bool inverse) {
  at::AutoDispatchBelowADInplaceOrView guard;
  check_merge_args(weight, lora_a, lora_b, scale);
  const at::Tensor f = dora::check_factor(weight, factor);
  const dora::Problem pr = dora::make_problem(weight, lora_a, lora_b, scale);
  bool ok = true;
  if (weight.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(),
                                    "lora_ext::dora_merge_check", [&] {
                                      ok = dora_tiles<scalar_t, Mode::kCheck>(pr, f, nullptr,
                                                                              inverse);
                                    });
  }
  return at::scalar_tensor(ok, weight.options().dtype(at::kBool));
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CPU, m) {
  m.impl("dora_norm", &dora_norm_cpu);
  m.impl("dora_merge_", &dora_merge_cpu);
  m.impl("dora_merge_check", &dora_merge_check_cpu);
}

}  // namespace cpu
}  // namespace lora_ext
