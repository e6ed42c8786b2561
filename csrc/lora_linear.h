// Device-independent orchestration of the fused LoRA linear op. The big GEMMs go through ATen
// (MKL/oneDNN on the CPU, cuBLAS on the GPU); only the parts with dropout differ per device and
// come from a `Kernels` policy (csrc/cpu/lora_linear_cpu.cpp, csrc/cuda/lora_linear_cuda.cu):
//
//   static at::Tensor masked_xa(const at::Tensor& x2, const at::Tensor& lora_a,
//                               const Dropout& drop);
//       drop(x2) @ lora_a^T  ->  [n, r], without keeping drop(x2)
//   static void masked_backward(const at::Tensor& x2, const at::Tensor& g, double g_scale,
//                               const at::Tensor& lora_a, const Dropout& drop,
//                               at::Tensor* grad_x, at::Tensor* grad_a);
//       grad_x += g_scale * mask * (g @ lora_a) / (1 - p)   (grad_x already holds dY @ W)
//       grad_a  = g_scale * g^T @ drop(x2)
//
// Notation: x2 = x viewed as [n, in]; g = dY @ B [n, r].
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <optional>
#include <tuple>
#include <vector>

#include "checks.h"
#include "rng.h"

namespace lora_ext {

struct Dropout {
  bool active = false;
  rng::DropoutKey key{0, 0, 0};
  double inv_keep = 1.0;  // 1 / (1 - p)
};

inline Dropout make_dropout(double p, const at::Tensor& seed) {
  Dropout d;
  d.active = p > 0.0;
  if (d.active) {
    d.key = rng::make_key(read_seed(seed), rng::threshold_for(p));
    d.inv_keep = 1.0 / (1.0 - p);
  }
  return d;
}

// x [..., in] -> [n, in] with unit stride along in (a copy only for exotic layouts).
inline at::Tensor as_rows(const at::Tensor& x, int64_t n, int64_t in) {
  at::Tensor x2 = x.reshape({n, in});
  if (in > 1 && x2.stride(1) != 1) x2 = x2.contiguous();
  return x2;
}

inline std::vector<int64_t> with_last(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> v(sizes.begin(), sizes.end());
  v.back() = last;
  return v;
}

// y = x W^T + bias + scale * (drop(x) A^T) B^T; also returns xa = drop(x) A^T [..., r], the
// only activation-sized tensor besides x that backward needs (r columns, not in).
template <class Kernels>
std::tuple<at::Tensor, at::Tensor> lora_linear_forward(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_a, const at::Tensor& lora_b, double scale, double dropout_p,
    const at::Tensor& seed) {
  const LinearShapes s = check_linear_args(x, weight, bias, lora_a, lora_b, scale, dropout_p);
  // autograd is handled in Python (ops.py); the ATen calls below must not record a graph
  at::AutoDispatchBelowADInplaceOrView guard;
  const Dropout drop = make_dropout(dropout_p, seed);
  const at::Tensor x2 = as_rows(x, s.n, s.in);
  at::Tensor y = (bias.has_value() && bias->defined()) ? at::addmm(*bias, x2, weight.t())
                                                       : at::mm(x2, weight.t());
  const at::Tensor xa = drop.active ? Kernels::masked_xa(x2, lora_a, drop) : at::mm(x2, lora_a.t());
  // the LoRA term is accumulated into y by the GEMM itself (beta = 1): no [n, out] temporary
  y.addmm_(xa, lora_b.t(), /*beta=*/1.0, /*alpha=*/scale);
  return {y.view(with_last(x.sizes(), s.out)), xa.view(with_last(x.sizes(), s.r))};
}

// Gradients w.r.t. x, lora_a, lora_b (weight and bias are frozen). output_mask says which are
// wanted; the others come back undefined (None in Python) and cost nothing.
template <class Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_linear_backward(
    const at::Tensor& grad_y, const at::Tensor& x,
    const at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
    const at::Tensor& xa, double scale, double dropout_p, const at::Tensor& seed,
    std::array<bool, 3> output_mask) {
  const LinearShapes s =
      check_linear_args(x, weight, std::nullopt, lora_a, lora_b, scale, dropout_p);
  LORA_CHECK(grad_y.sizes() == at::IntArrayRef(with_last(x.sizes(), s.out)),
             "grad_y must have shape ", at::IntArrayRef(with_last(x.sizes(), s.out)), ", got ",
             grad_y.sizes());
  LORA_CHECK(xa.sizes() == at::IntArrayRef(with_last(x.sizes(), s.r)), "xa must have shape ",
             at::IntArrayRef(with_last(x.sizes(), s.r)), ", got ", xa.sizes());
  check_same(grad_y, "grad_y", x, "x");
  check_same(xa, "xa", x, "x");
  const bool need_x = output_mask[0], need_a = output_mask[1], need_b = output_mask[2];
  at::AutoDispatchBelowADInplaceOrView guard;
  const Dropout drop = make_dropout(dropout_p, seed);
  const at::Tensor dy = grad_y.reshape({s.n, s.out});

  at::Tensor grad_x, grad_a, grad_b;
  if (need_x) grad_x = at::mm(dy, weight);  // [n, in]; the LoRA term is added in place below
  if (need_x || need_a) {
    // g = dY B is computed once and shared by grad_x and grad_a; scale is applied by the GEMMs
    const at::Tensor g = at::mm(dy, lora_b);  // [n, r]
    const double g_scale = scale;
    const at::Tensor x2 = as_rows(x, s.n, s.in);
    if (drop.active) {
      Kernels::masked_backward(x2, g, g_scale, lora_a, drop, need_x ? &grad_x : nullptr,
                               need_a ? &grad_a : nullptr);
    } else {
      if (need_x) grad_x.addmm_(g, lora_a, /*beta=*/1.0, /*alpha=*/g_scale);
      if (need_a) {
        grad_a = at::addmm(at::zeros({}, lora_a.options()), g.t(), x2, /*beta=*/0.0,
                           /*alpha=*/g_scale);
      }
    }
  }
  if (need_b) {
    grad_b = at::addmm(at::zeros({}, lora_b.options()), dy.t(), xa.reshape({s.n, s.r}),
                       /*beta=*/0.0, /*alpha=*/scale);
  }
  if (need_x) grad_x = grad_x.view(x.sizes());
  return {grad_x, grad_a, grad_b};
}

// merge_ works on a row-major problem: rows of `w` are tiles, columns have the smallest stride.
// A weight stored transposed (GPT-2 Conv1D: merge_(conv.weight.t(), ...)) is handled by merging
// into its transpose with the factors swapped: W^T += s * A^T B^T.
struct MergeProblem {
  at::Tensor w;   // [m, k] view of the weight, stride(1) <= stride(0)
  at::Tensor bs;  // [m, r] left factor, scaled by `scale`, accumulation dtype, contiguous
  at::Tensor a;   // [r, k] right factor, accumulation dtype, contiguous
};

inline MergeProblem make_merge_problem(const at::Tensor& weight, const at::Tensor& lora_a,
                                       const at::Tensor& lora_b, double scale) {
  check_merge_args(weight, lora_a, lora_b, scale);
  at::AutoDispatchBelowADInplaceOrView guard;
  // accumulate in float32 (float64 for float64 weights), round once into the weight's dtype
  const auto acc = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor a = lora_a.to(acc), b = lora_b.to(acc).mul(scale);
  if (weight.stride(0) < weight.stride(1)) {
    return MergeProblem{weight.t(), a.t().contiguous(), b.t().contiguous()};
  }
  return MergeProblem{weight, b.contiguous(), a.contiguous()};
}

}  // namespace lora_ext
