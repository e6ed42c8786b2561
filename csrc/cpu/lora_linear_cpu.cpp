// CPU kernels of lora_linear / lora_linear_backward / dropout_mask.
//
// The dense GEMMs are ATen's (MKL / oneDNN). Dropout is applied on the fly, block by block of
// kRows rows: a block of drop(x) lives in a small per-thread buffer (accumulation dtype) and is
// consumed by a GEMM right away, so no tensor of x's size is kept, and the mask of a block is
// computed once for both the grad_x and the grad_a use in backward.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../lora_linear.h"
#include "mask_cpu.h"

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

void keep_flags(const rng::DropoutKey& key, uint64_t idx0, int64_t n, uint8_t* keep) {
  int64_t done = 0;
  while (done < n) {
    const uint64_t idx = idx0 + static_cast<uint64_t>(done);
    const uint32_t lo = static_cast<uint32_t>(idx);
    const int64_t room = static_cast<int64_t>((uint64_t{1} << 32) - lo);
    const int64_t chunk = std::min<int64_t>(n - done, room);
    keep_flags_lo(key.k0, rng::hi_key(key, static_cast<uint32_t>(idx >> 32)), key.threshold, lo,
                  chunk, keep + done);
    done += chunk;
  }
}

namespace {

constexpr int64_t kRows = 64;  // rows per dropout block: 64 x in floats stay in L2

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

// xa = drop(x2) @ A^T  ->  [n, r]
template <typename scalar_t>
void masked_xa_impl(const at::Tensor& x2, const at::Tensor& lora_a, const Dropout& drop,
                    at::Tensor& xa) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = x2.size(0), in = x2.size(1), r = lora_a.size(0);
  const auto acc_opts = x2.options().dtype(acc_type(x2.scalar_type()));
  const at::Tensor a_t = lora_a.to(acc_opts.dtype()).t();  // [in, r]
  const bool direct = xa.scalar_type() == acc_opts.dtype();   // GEMM can write into xa
  const scalar_t* xp = x2.const_data_ptr<scalar_t>();
  const int64_t ldx = x2.stride(0);
  const acc_t inv = static_cast<acc_t>(drop.inv_keep);
  const int64_t nblocks = (n + kRows - 1) / kRows;
  for_each_group(nblocks, [&](int64_t, int64_t b0, int64_t b1) {
    if (b0 == b1) return;
    at::Tensor buf = at::empty({kRows, in}, acc_opts);
    at::Tensor out = direct ? at::Tensor() : at::empty({kRows, r}, acc_opts);
    std::vector<uint8_t> keep(in);
    acc_t* bp = buf.data_ptr<acc_t>();
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t i0 = blk * kRows, rows = std::min(kRows, n - i0);
      for (int64_t i = 0; i < rows; ++i) {
        keep_flags(drop.key, static_cast<uint64_t>(i0 + i) * in, in, keep.data());
        const scalar_t* xr = xp + (i0 + i) * ldx;
        acc_t* br = bp + i * in;
        for (int64_t j = 0; j < in; ++j) {
          br[j] = static_cast<acc_t>(xr[j]) * (keep[j] ? inv : acc_t(0));
        }
      }
      at::Tensor dst = xa.narrow(0, i0, rows);
      if (direct) {
        at::mm_out(dst, buf.narrow(0, 0, rows), a_t);
      } else {
        at::Tensor o = out.narrow(0, 0, rows);
        at::mm_out(o, buf.narrow(0, 0, rows), a_t);
        dst.copy_(o);
      }
    }
  });
}

// grad_x += g_scale * mask * (g @ A) / (1 - p);  grad_a = g_scale * g^T @ drop(x2)
template <typename scalar_t>
void masked_backward_impl(const at::Tensor& x2, const at::Tensor& g, double g_scale,
                          const at::Tensor& lora_a, const Dropout& drop, at::Tensor* grad_x,
                          at::Tensor* grad_a) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = x2.size(0), in = x2.size(1), r = lora_a.size(0);
  const auto acc_opts = x2.options().dtype(acc_type(x2.scalar_type()));
  const at::Tensor g32 = g.to(acc_opts.dtype()).mul(g_scale);  // [n, r], contiguous
  const at::Tensor a32 = lora_a.to(acc_opts.dtype()).contiguous();  // [r, in]
  const bool need_x = grad_x != nullptr, need_a = grad_a != nullptr;
  const scalar_t* xp = x2.const_data_ptr<scalar_t>();
  const int64_t ldx = x2.stride(0);
  scalar_t* gxp = need_x ? grad_x->data_ptr<scalar_t>() : nullptr;  // contiguous [n, in]
  const acc_t inv = static_cast<acc_t>(drop.inv_keep);
  const int64_t nblocks = (n + kRows - 1) / kRows;
  const int64_t max_groups = std::max<int64_t>(1, std::min<int64_t>(nblocks, at::get_num_threads()));
  at::Tensor partial = need_a ? at::zeros({max_groups, r, in}, acc_opts) : at::Tensor();

  const int64_t ngroups = for_each_group(nblocks, [&](int64_t grp, int64_t b0, int64_t b1) {
    if (b0 == b1) return;
    at::Tensor tbuf = need_x ? at::empty({kRows, in}, acc_opts) : at::Tensor();
    at::Tensor dbuf = need_a ? at::empty({kRows, in}, acc_opts) : at::Tensor();
    at::Tensor part = need_a ? partial.select(0, grp) : at::Tensor();
    std::vector<uint8_t> keep(in);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t i0 = blk * kRows, rows = std::min(kRows, n - i0);
      const at::Tensor gb = g32.narrow(0, i0, rows);
      if (need_x) {
        at::Tensor t = tbuf.narrow(0, 0, rows);
        at::mm_out(t, gb, a32);
      }
      for (int64_t i = 0; i < rows; ++i) {
        keep_flags(drop.key, static_cast<uint64_t>(i0 + i) * in, in, keep.data());
        if (need_x) {
          const acc_t* tr = tbuf.const_data_ptr<acc_t>() + i * in;
          scalar_t* dxr = gxp + (i0 + i) * in;
          for (int64_t j = 0; j < in; ++j) {
            dxr[j] = static_cast<scalar_t>(static_cast<acc_t>(dxr[j]) +
                                           (keep[j] ? inv : acc_t(0)) * tr[j]);
          }
        }
        if (need_a) {
          const scalar_t* xr = xp + (i0 + i) * ldx;
          acc_t* dr = dbuf.data_ptr<acc_t>() + i * in;
          for (int64_t j = 0; j < in; ++j) {
            dr[j] = static_cast<acc_t>(xr[j]) * (keep[j] ? inv : acc_t(0));
          }
        }
      }
      if (need_a) part.addmm_(gb.t(), dbuf.narrow(0, 0, rows));
    }
  });
  if (need_a) {
    *grad_a = (ngroups == 1 ? partial.select(0, 0) : partial.narrow(0, 0, ngroups).sum(0))
                  .to(lora_a.scalar_type());
  }
}

struct CpuKernels {
  static at::Tensor masked_xa(const at::Tensor& x2, const at::Tensor& lora_a,
                              const Dropout& drop) {
    at::Tensor xa = at::empty({x2.size(0), lora_a.size(0)}, x2.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x2.scalar_type(),
                                    "lora_ext::masked_xa",
                                    [&] { masked_xa_impl<scalar_t>(x2, lora_a, drop, xa); });
    return xa;
  }

  static void masked_backward(const at::Tensor& x2, const at::Tensor& g, double g_scale,
                              const at::Tensor& lora_a, const Dropout& drop, at::Tensor* grad_x,
                              at::Tensor* grad_a) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x2.scalar_type(),
                                    "lora_ext::masked_backward", [&] {
                                      masked_backward_impl<scalar_t>(x2, g, g_scale, lora_a, drop,
                                                                     grad_x, grad_a);
                                    });
  }
};

at::Tensor dropout_mask_cpu(const at::Tensor& like, const at::Tensor& seed, double dropout_p,
                            int64_t offset) {
  check_dropout_p(dropout_p);
  LORA_CHECK_VALUE(offset >= 0, "offset must be >= 0, got ", offset);
  const Dropout drop = make_dropout(dropout_p, seed);
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
  m.impl("dropout_mask", &dropout_mask_cpu);
}

}  // namespace cpu
}  // namespace lora_ext
