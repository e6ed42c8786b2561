// A CPU emulator of CUDA grids for the fast kernels' bodies (csrc/kernels/fast_kernels.h): every
// (block, thread) of a small grid runs the same __host__ __device__ body the GPU runs, one after
// another. Exposed to the tests through lora_ext._C (tests/core/test_kernels.py), so the index
// math, strides, tails and grid-stride loops of the CUDA kernels are checked in CI without a GPU.
#include "grid_emulator.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "../checks.h"
#include "../kernels/fast_kernels.h"
#include "../kernels/launch.h"

namespace lora_ext {
namespace emulator {
namespace {

template <class Body>
void run_grid(int64_t gx, int64_t gy, int bdx, const Body& body) {
  for (int64_t by = 0; by < gy; ++by)
    for (int64_t bx = 0; bx < gx; ++bx)
      for (int tx = 0; tx < bdx; ++tx) body(bx, by, tx);
}

rng::DropoutKey key_for(int64_t seed, double p) {
  return rng::make_key(static_cast<uint64_t>(seed), rng::threshold_for(p));
}

}  // namespace

bool merge(at::Tensor w, const at::Tensor& bs, const at::Tensor& a, bool vectorized, bool check,
           int64_t grid_y, int64_t block) {
  LORA_CHECK(w.dim() == 2 && bs.dim() == 2 && a.dim() == 2, "2-D tensors expected");
  const int64_t m = w.size(0), k = w.size(1), r = a.size(0);
  const int vec = vectorized ? kernels::merge_vec(w) : 1;
  LORA_CHECK(!vectorized || vec > 1, "w's layout does not allow 16-byte accesses");
  const int64_t gx = ((k + vec - 1) / vec + block - 1) / block;
  int bad = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "emulate_merge", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor bsc = bs.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const at::Tensor ac = a.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    auto launch = [&](auto vec_c, auto check_c) {
      constexpr int V = decltype(vec_c)::value;
      constexpr bool C = decltype(check_c)::value;
      run_grid(gx, grid_y, static_cast<int>(block), [&](int64_t bx, int64_t by, int tx) {
        kernels::merge_tile<scalar_t, acc_t, V, kernels::kMergeRows, C>(
            w.data_ptr<scalar_t>(), m, k, w.stride(0), w.stride(1), bsc.const_data_ptr<acc_t>(),
            ac.const_data_ptr<acc_t>(), r, &bad, bx, by, tx, static_cast<int>(block), grid_y);
      });
    };
    constexpr int kV = 16 / sizeof(scalar_t);
    if (vec > 1) {
      check ? launch(std::integral_constant<int, kV>{}, std::true_type{})
            : launch(std::integral_constant<int, kV>{}, std::false_type{});
    } else {
      check ? launch(std::integral_constant<int, 1>{}, std::true_type{})
            : launch(std::integral_constant<int, 1>{}, std::false_type{});
    }
  });
  return bad == 0;
}

at::Tensor keep_rows(const at::Tensor& x2, int64_t seed, double p, int64_t grid, int64_t block) {
  LORA_CHECK(x2.dim() == 2 && (x2.size(1) <= 1 || x2.stride(1) == 1), "x2: [n, in] rows");
  const int64_t n = x2.size(0), in = x2.size(1);
  at::Tensor out = at::empty({n, in}, x2.options());
  const rng::DropoutKey key = key_for(seed, p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x2.scalar_type(), "emulate_keep", [&] {
    run_grid(grid, 1, static_cast<int>(block), [&](int64_t bx, int64_t, int tx) {
      kernels::keep_rows<scalar_t>(x2.const_data_ptr<scalar_t>(), x2.stride(0), n, in, key,
                                   out.data_ptr<scalar_t>(), bx, tx, static_cast<int>(block), grid);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> backward_cols(const at::Tensor& x2, const at::Tensor& g,
                                                 const at::Tensor& a, int64_t seed, double p,
                                                 double scale, bool want_x, bool want_a,
                                                 int64_t rows_per_chunk, int64_t block) {
  LORA_CHECK(x2.dim() == 2 && (x2.size(1) <= 1 || x2.stride(1) == 1), "x2: [n, in] rows");
  const int64_t n = x2.size(0), in = x2.size(1), r = a.size(0);
  LORA_CHECK(r <= kernels::kMaxFastRank, "r > ", kernels::kMaxFastRank);
  const int64_t chunks = std::max<int64_t>(1, (n + rows_per_chunk - 1) / rows_per_chunk);
  const int64_t gx = (in + block - 1) / block;
  at::Tensor grad_x = want_x ? at::empty({n, in}, x2.options()) : at::Tensor();
  at::Tensor grad_a;
  const rng::DropoutKey key = key_for(seed, p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x2.scalar_type(), "emulate_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor gc = g.to(acc).contiguous(), ac = a.to(acc).contiguous();
    at::Tensor partial =
        want_a ? at::empty({chunks, r, in}, x2.options().dtype(acc)) : at::Tensor();
    kernels::with_rmax(r, [&](auto rmax) {
      constexpr int RM = decltype(rmax)::value;
      run_grid(gx, chunks, static_cast<int>(block), [&](int64_t bx, int64_t by, int tx) {
        kernels::lora_backward_cols<scalar_t, acc_t, RM>(
            want_x ? grad_x.data_ptr<scalar_t>() : nullptr,
            want_a ? partial.data_ptr<acc_t>() : nullptr, x2.const_data_ptr<scalar_t>(),
            x2.stride(0), gc.const_data_ptr<acc_t>(), ac.const_data_ptr<acc_t>(), n, in, r,
            rows_per_chunk, p > 0.0, key, static_cast<acc_t>(1.0 / (1.0 - p)),
            static_cast<acc_t>(scale), bx, by, tx, static_cast<int>(block));
      });
    });
    if (want_a) grad_a = partial.sum(0);
  });
  return {grad_x, grad_a};
}

}  // namespace emulator
}  // namespace lora_ext
