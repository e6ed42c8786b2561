// CPU kernels of lora_linear / lora_linear_backward / dropout_mask.
//
// The big GEMMs (x W^T, dY W) are ATen's (MKL / oneDNN), called by csrc/lora_linear.h. The LoRA
// branch runs here block by block of kRows rows, in one parallel region per direction: each
// block of x and dY is read once and reused from cache by the skinny GEMMs, a block of drop(x)
// lives only in a small per-thread buffer (no tensor of x's size is kept), and the mask of a
// block is evaluated once for both its grad_x and its grad_a use.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../lora_linear.h"
#include "mask_cpu.h"
#include "rank_update_cpu.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define LORA_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LORA_CPU_CLONES
#endif

namespace lora_ext {
namespace cpu {

// All n indices share the high word: lo0 + n <= 2^32.
LORA_CPU_CLONES void keep_flags_lo(uint32_t k0, uint32_t khi, uint32_t threshold, uint32_t lo0,
                                   int64_t n, uint8_t* keep) {
  for (int64_t j = 0; j < n; ++j) {
    keep[j] = rng::hash32(k0, khi, lo0 + static_cast<uint32_t>(j)) >= threshold ? 1 : 0;
  }
}

// float32 row kernels with the mask evaluated inline (no flag array), compiled per ISA like
// keep_flags_lo. All n indices share the high word (lo0 + n <= 2^32).
//   drop:         out[j] = x[j] * m(j)     (also grad_x's masked term: out = grad_x, x = g @ A)
//   scale + drop: dx[j] = m(j) * t[j] and out[j] = x[j] * m(j), one mask evaluation
// with m(j) = keep(lo0 + j) ? inv : 0.
LORA_CPU_CLONES void drop_run_f32(const float* __restrict__ x, float* __restrict__ out, int64_t n,
                                  uint32_t k0, uint32_t khi, uint32_t threshold, uint32_t lo0,
                                  float inv) {
  for (int64_t j = 0; j < n; ++j) {
    const bool keep = rng::hash32(k0, khi, lo0 + static_cast<uint32_t>(j)) >= threshold;
    out[j] = x[j] * (keep ? inv : 0.0f);
  }
}

LORA_CPU_CLONES void scale_drop_run_f32(float* __restrict__ dx, const float* __restrict__ t,
                                        const float* __restrict__ x, float* __restrict__ out,
                                        int64_t n, uint32_t k0, uint32_t khi, uint32_t threshold,
                                        uint32_t lo0, float inv) {
  for (int64_t j = 0; j < n; ++j) {
    const bool keep = rng::hash32(k0, khi, lo0 + static_cast<uint32_t>(j)) >= threshold;
    const float m = keep ? inv : 0.0f;
    dx[j] = m * t[j];
    out[j] = x[j] * m;
  }
}

namespace {

// Calls fn(offset, length, lo, khi) for the runs of [idx0, idx0 + n) that share a high word.
template <class F>
void for_each_run(const rng::DropoutKey& key, uint64_t idx0, int64_t n, const F& fn) {
  int64_t done = 0;
  while (done < n) {
    const uint64_t idx = idx0 + static_cast<uint64_t>(done);
    const uint32_t lo = static_cast<uint32_t>(idx);
    const int64_t room = static_cast<int64_t>((uint64_t{1} << 32) - lo);
    const int64_t len = std::min<int64_t>(n - done, room);
    fn(done, len, lo, rng::hi_key(key, static_cast<uint32_t>(idx >> 32)));
    done += len;
  }
}

}  // namespace

// The split into runs is the same code the float32 kernels use, so the tests of dropout_mask
// across the 2^32 boundary (offset argument) cover it.
void keep_flags(const rng::DropoutKey& key, uint64_t idx0, int64_t n, uint8_t* keep) {
  for_each_run(key, idx0, n, [&](int64_t off, int64_t len, uint32_t lo, uint32_t khi) {
    keep_flags_lo(key.k0, khi, key.threshold, lo, len, keep + off);
  });
}

namespace {

constexpr int64_t kRows = 64;  // rows per block: 64 x in floats stay in L2 (measured best)

// Splits [0, nblocks) into one contiguous range per thread; fn(group, b0, b1). The partition
// depends only on the sizes, so reductions over groups are deterministic.
template <class F>
int64_t for_each_group(int64_t nblocks, const F& fn) {
  const int64_t ngroups = std::max<int64_t>(1, std::min<int64_t>(nblocks, at::get_num_threads()));
  at::parallel_for(0, ngroups, 1, [&](int64_t g0, int64_t g1) {
    // dispatch-key TLS is not propagated to OpenMP workers: keep autograd out of the ATen calls
    at::AutoDispatchBelowADInplaceOrView guard;
    for (int64_t g = g0; g < g1; ++g) fn(g, g * nblocks / ngroups, (g + 1) * nblocks / ngroups);
  });
  return ngroups;
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Rows [i0, i0 + rows) of drop(x2) into out (accumulation dtype, row stride in).
template <typename scalar_t, typename acc_t>
void drop_rows(const at::Tensor& x2, int64_t i0, int64_t rows, const Dropout& drop, acc_t* out,
               std::vector<uint8_t>& keep) {
  const int64_t in = x2.size(1), ldx = x2.stride(0);
  const scalar_t* xp = x2.const_data_ptr<scalar_t>();
  const acc_t inv = static_cast<acc_t>(drop.inv_keep);
  for (int64_t i = 0; i < rows; ++i) {
    const uint64_t idx0 = static_cast<uint64_t>(i0 + i) * in;
    const scalar_t* xr = xp + (i0 + i) * ldx;
    acc_t* orow = out + i * in;
    if constexpr (std::is_same_v<scalar_t, float>) {
      for_each_run(drop.key, idx0, in, [&](int64_t off, int64_t len, uint32_t lo, uint32_t khi) {
        drop_run_f32(xr + off, orow + off, len, drop.key.k0, khi, drop.key.threshold, lo, inv);
      });
    } else {
      keep.resize(in);
      keep_flags(drop.key, idx0, in, keep.data());
      for (int64_t j = 0; j < in; ++j)
        orow[j] = static_cast<acc_t>(xr[j]) * (keep[j] ? inv : acc_t(0));
    }
  }
}

// Forward of the LoRA branch, block by block of kRows rows, in one parallel region:
//   xa[rows] = drop(x2)[rows] @ A^T            (drop(x2) only ever exists as one block)
//   y[rows]  = bias + scale * xa[rows] @ B^T    (the big GEMM accumulates x W^T into y later)
// A block of x is read once and is still in cache for the second GEMM's input xa.
template <typename scalar_t>
void forward_impl(const at::Tensor& x2, const std::optional<at::Tensor>& bias,
                  const at::Tensor& lora_a, const at::Tensor& lora_b, double scale,
                  const Dropout& drop, at::Tensor& y, at::Tensor& xa) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool direct = std::is_same_v<scalar_t, acc_t>;  // GEMMs can read/write in place
  const int64_t n = x2.size(0), in = x2.size(1), r = lora_a.size(0);
  const auto acc_opts = x2.options().dtype(acc_type(x2.scalar_type()));
  const at::Tensor a_t = drop.active ? lora_a.to(acc_opts.dtype()).t() : lora_a.t();  // [in, r]
  const at::Tensor b_t = lora_b.t();                                                  // [r, out]
  const bool has_bias = bias.has_value() && bias->defined();
  // float32: y[rows] = bias + xa[rows] @ (scale * B)^T by the register-tiled kernel
  constexpr bool is_f32 = std::is_same_v<scalar_t, float>;
  const bool own_kernel = is_f32 && rank_update_kernel_enabled();
  const at::Tensor bs_t = own_kernel ? lora_b.t().mul(scale).contiguous() : at::Tensor();
  const at::Tensor bias_c = own_kernel && has_bias ? bias->contiguous() : at::Tensor();
  const at::Tensor zero = at::zeros({}, y.options());
  const int64_t nblocks = (n + kRows - 1) / kRows;
  for_each_group(nblocks, [&](int64_t, int64_t b0, int64_t b1) {
    if (b0 == b1) return;
    at::Tensor buf = drop.active ? at::empty({kRows, in}, acc_opts) : at::Tensor();
    at::Tensor xa_acc = (drop.active && !direct) ? at::empty({kRows, r}, acc_opts) : at::Tensor();
    std::vector<uint8_t> keep;
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t i0 = blk * kRows, rows = std::min(kRows, n - i0);
      at::Tensor xa_b = xa.narrow(0, i0, rows);
      if (!drop.active) {
        at::mm_out(xa_b, x2.narrow(0, i0, rows), a_t);
      } else {
        drop_rows<scalar_t, acc_t>(x2, i0, rows, drop, buf.data_ptr<acc_t>(), keep);
        if constexpr (direct) {
          at::mm_out(xa_b, buf.narrow(0, 0, rows), a_t);
        } else {
          at::Tensor t = xa_acc.narrow(0, 0, rows);
          at::mm_out(t, buf.narrow(0, 0, rows), a_t);
          xa_b.copy_(t);
        }
      }
      at::Tensor y_b = y.narrow(0, i0, rows);
      if constexpr (is_f32) {
        if (own_kernel) {
          rank_update_f32(rows, y.size(1), r, xa_b.const_data_ptr<float>(), r,
                          bs_t.const_data_ptr<float>(), bs_t.size(1),
                          has_bias ? bias_c.const_data_ptr<float>() : nullptr,
                          y_b.data_ptr<float>(), y.size(1));
          continue;
        }
      }
      at::addmm_out(y_b, has_bias ? *bias : zero, xa_b, b_t, /*beta=*/has_bias ? 1.0 : 0.0,
                    /*alpha=*/scale);
    }
  });
}

// Backward of the LoRA branch, block by block in one parallel region. grad_x comes in
// uninitialised and leaves holding only the LoRA term; the caller's big GEMM then accumulates
// dY W into it with beta = 1, which MKL does for free inside its compute-bound loop (adding the
// LoRA term afterwards would cost a read-modify-write pass over grad_x). With
// g = scale * dY[rows] @ B, computed once per block:
//   grad_x[rows]  = mask * (g @ A) / (1 - p)      (no mask when p = 0)
//   grad_a       += g^T @ drop(x)[rows]            (per-thread partial sums, added at the end)
//   grad_b^T     += xa[rows]^T @ dY[rows]          (times scale at the end; [r, out] is the
//                                                   faster layout for MKL's skinny GEMM)
// The blocks of dY and x are read from memory once and reused from cache, and the mask of a
// block is evaluated once for grad_x and grad_a.
// The two reductions stay with MKL: an AVX-512 kernel keeping a 16 x 16 (or 8 x 48) tile of
// grad_a / grad_b^T in registers over the block's rows was 15% slower (measured on the 2-core
// Xeon), since it walks down rows 4 KB or more apart (a new page per load, no prefetch, L1 set
// conflicts) where MKL packs the block first.
template <typename scalar_t>
void backward_impl(const at::Tensor& dy, const at::Tensor& x2, const at::Tensor& xa2,
                   const at::Tensor& lora_a, const at::Tensor& lora_b, double scale,
                   const Dropout& drop, at::Tensor* grad_x, at::Tensor* grad_a,
                   at::Tensor* grad_b) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool direct = std::is_same_v<scalar_t, acc_t>;
  const int64_t n = x2.size(0), in = x2.size(1), r = lora_a.size(0), out = lora_b.size(0);
  const auto acc_opts = x2.options().dtype(acc_type(x2.scalar_type()));
  const at::Tensor a32 = lora_a.to(acc_opts.dtype()).contiguous();  // [r, in]
  const at::Tensor b32s = lora_b.to(acc_opts.dtype()).mul(scale);   // [out, r], scale folded in
  const bool need_x = grad_x != nullptr, need_a = grad_a != nullptr, need_b = grad_b != nullptr;
  const bool need_g = need_x || need_a;
  const bool own_kernel = std::is_same_v<scalar_t, float> && rank_update_kernel_enabled();
  const int64_t nblocks = (n + kRows - 1) / kRows;
  const int64_t max_groups =
      std::max<int64_t>(1, std::min<int64_t>(nblocks, at::get_num_threads()));
  at::Tensor part_a = need_a ? at::zeros({max_groups, r, in}, acc_opts) : at::Tensor();
  at::Tensor part_bt = need_b ? at::zeros({max_groups, r, out}, acc_opts) : at::Tensor();
  scalar_t* gxp = need_x ? grad_x->data_ptr<scalar_t>() : nullptr;  // contiguous [n, in]
  const scalar_t* xp = x2.const_data_ptr<scalar_t>();
  const int64_t ldx = x2.stride(0);
  const acc_t inv = static_cast<acc_t>(drop.inv_keep);

  const int64_t ngroups = for_each_group(nblocks, [&](int64_t grp, int64_t b0, int64_t b1) {
    if (b0 == b1) return;
    at::Tensor g = at::empty({kRows, r}, acc_opts);
    at::Tensor dy_buf = direct ? at::Tensor() : at::empty({kRows, out}, acc_opts);
    at::Tensor xa_buf = (!direct && need_b) ? at::empty({kRows, r}, acc_opts) : at::Tensor();
    // t = g @ A for grad_x (unless it can be written into grad_x directly); d = drop(x)
    const bool t_needed = need_x && (drop.active || !direct);
    const bool d_needed = need_a && (drop.active || !direct);
    at::Tensor tbuf = t_needed ? at::empty({kRows, in}, acc_opts) : at::Tensor();
    at::Tensor dbuf = d_needed ? at::empty({kRows, in}, acc_opts) : at::Tensor();
    at::Tensor pa = need_a ? part_a.select(0, grp) : at::Tensor();
    at::Tensor pbt = need_b ? part_bt.select(0, grp) : at::Tensor();
    std::vector<uint8_t> keep(drop.active ? in : 0);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t i0 = blk * kRows, rows = std::min(kRows, n - i0);
      at::Tensor dy_b = dy.narrow(0, i0, rows);
      if constexpr (!direct) dy_b = dy_buf.narrow(0, 0, rows).copy_(dy_b);
      if (need_b) {
        at::Tensor xa_b = xa2.narrow(0, i0, rows);
        if constexpr (!direct) xa_b = xa_buf.narrow(0, 0, rows).copy_(xa_b);
        pbt.addmm_(xa_b.t(), dy_b);
      }
      if (!need_g) continue;
      at::Tensor g_b = g.narrow(0, 0, rows);
      at::mm_out(g_b, dy_b, b32s);
      at::Tensor t = t_needed ? tbuf.narrow(0, 0, rows) : at::Tensor();
      // g @ A ([rows, r] x [r, in]) into out: the register-tiled kernel for float32
      auto g_times_a = [&](at::Tensor& out_b) {
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (own_kernel) {
            rank_update_f32(rows, in, r, g_b.const_data_ptr<float>(), r,
                            a32.const_data_ptr<float>(), in, nullptr, out_b.data_ptr<float>(),
                            out_b.stride(0));
            return;
          }
        }
        at::mm_out(out_b, g_b, a32);
      };
      if (t_needed) g_times_a(t);
      if (!drop.active) {
        if (need_x) {
          at::Tensor gx_b = grad_x->narrow(0, i0, rows);
          if constexpr (direct) {
            g_times_a(gx_b);
          } else {
            gx_b.copy_(t);
          }
        }
        if (need_a) {
          at::Tensor x_b = x2.narrow(0, i0, rows);
          if constexpr (!direct) x_b = dbuf.narrow(0, 0, rows).copy_(x_b);
          pa.addmm_(g_b.t(), x_b);
        }
        continue;
      }
      for (int64_t i = 0; i < rows; ++i) {
        const uint64_t idx0 = static_cast<uint64_t>(i0 + i) * in;
        const acc_t* tr = t_needed ? tbuf.const_data_ptr<acc_t>() + i * in : nullptr;
        scalar_t* dxr = need_x ? gxp + (i0 + i) * in : nullptr;
        const scalar_t* xr = xp + (i0 + i) * ldx;
        acc_t* dr = need_a ? dbuf.data_ptr<acc_t>() + i * in : nullptr;
        if constexpr (std::is_same_v<scalar_t, float>) {
          const uint32_t k0 = drop.key.k0, thr = drop.key.threshold;
          for_each_run(drop.key, idx0, in,
                       [&](int64_t off, int64_t len, uint32_t lo, uint32_t khi) {
                         if (need_x && need_a) {
                           scale_drop_run_f32(dxr + off, tr + off, xr + off, dr + off, len, k0, khi,
                                              thr, lo, inv);
                         } else if (need_x) {
                           drop_run_f32(tr + off, dxr + off, len, k0, khi, thr, lo, inv);
                         } else {
                           drop_run_f32(xr + off, dr + off, len, k0, khi, thr, lo, inv);
                         }
                       });
        } else {
          keep_flags(drop.key, idx0, in, keep.data());
          for (int64_t j = 0; j < in; ++j) {
            const acc_t m = keep[j] ? inv : acc_t(0);
            if (need_x) dxr[j] = static_cast<scalar_t>(m * tr[j]);
            if (need_a) dr[j] = static_cast<acc_t>(xr[j]) * m;
          }
        }
      }
      if (need_a) pa.addmm_(g_b.t(), dbuf.narrow(0, 0, rows));
    }
  });
  auto reduce = [&](const at::Tensor& part) {
    return ngroups == 1 ? part.select(0, 0) : part.narrow(0, 0, ngroups).sum(0);
  };
  if (need_a) *grad_a = reduce(part_a).to(lora_a.scalar_type());
  if (need_b) *grad_b = reduce(part_bt).t().mul(scale).to(lora_b.scalar_type()).contiguous();
}

struct CpuKernels {
  // lora_backward writes the LoRA term into an uninitialised grad_x; the big GEMM adds dY W
  static constexpr bool kLoraTermFirst = true;
  static constexpr bool kUpcastHalf = true;  // float16 in float32: no native fp16 GEMM here
  using Guard = NoGuard;

  static std::tuple<at::Tensor, at::Tensor> lora_forward(const at::Tensor& x2,
                                                         const std::optional<at::Tensor>& bias,
                                                         const at::Tensor& lora_a,
                                                         const at::Tensor& lora_b, double scale,
                                                         const Dropout& drop) {
    at::Tensor y = at::empty({x2.size(0), lora_b.size(0)}, x2.options());
    at::Tensor xa = at::empty({x2.size(0), lora_a.size(0)}, x2.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kBFloat16, at::kHalf, x2.scalar_type(), "lora_ext::lora_forward",
        [&] { forward_impl<scalar_t>(x2, bias, lora_a, lora_b, scale, drop, y, xa); });
    return {y, xa};
  }

  static void lora_backward(const at::Tensor& dy, const at::Tensor& x2, const at::Tensor& xa2,
                            const at::Tensor& lora_a, const at::Tensor& lora_b, double scale,
                            const Dropout& drop, at::Tensor* grad_x, at::Tensor* grad_a,
                            at::Tensor* grad_b) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kBFloat16, at::kHalf, x2.scalar_type(), "lora_ext::lora_backward", [&] {
          backward_impl<scalar_t>(dy, x2, xa2, lora_a, lora_b, scale, drop, grad_x, grad_a, grad_b);
        });
  }
};

at::Tensor dropout_mask_cpu(const at::Tensor& like, const at::Tensor& seed, double dropout_p,
                            int64_t offset) {
  check_dropout_p(dropout_p);
  LORA_CHECK_VALUE(offset >= 0, "offset must be >= 0, got ", offset);
  const Dropout drop = make_dropout(dropout_p, seed, like.device());
  at::Tensor mask = at::empty(like.sizes(), like.options().dtype(at::kBool));
  uint8_t* mp = reinterpret_cast<uint8_t*>(mask.data_ptr<bool>());
  const int64_t numel = mask.numel();
  if (!drop.active) {
    mask.fill_(true);
    return mask;
  }
  at::parallel_for(0, numel, 1 << 14, [&](int64_t b, int64_t e) {
    keep_flags(drop.key, static_cast<uint64_t>(offset + b), e - b, mp + b);
  });
  return mask;
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CPU, m) {
  m.impl("lora_linear", &lora_linear_forward<CpuKernels>);
  m.impl("lora_linear_backward", &lora_linear_backward<CpuKernels>);
  m.impl("lora_delta", &lora_delta_forward<CpuKernels>);
  m.impl("lora_delta_backward", &lora_delta_backward<CpuKernels>);
  m.impl("dropout_mask", &dropout_mask_cpu);
}

}  // namespace cpu
}  // namespace lora_ext
