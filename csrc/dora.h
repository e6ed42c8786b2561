// DoRA (weight-decomposed LoRA) helpers shared by the CPU and CUDA kernels of dora_norm,
// dora_merge_ and dora_merge_check.
//
// Every op works on the [out, in] view of the weight (any strides: a GPT-2 Conv1D passes
// conv.weight.t()) and on V = W + s B A without ever materialising V: the CPU kernel forms the
// delta of a tile of rows in float32, the CUDA kernels form each element's delta on the fly
// (delta_at). Per-element logic is LORA_HD code, compiled for both.
//
//   dora_norm:        n_i = ||W_i + s B_i A||_2 over the input dim, accumulated in float32
//                     (float64 for float64 weights; the CPU sums squares in float64)
//   dora_merge_:      W_ij <- f_i (W_ij + s (B A)_ij)          (merge, f = m / n)
//                     W_ij <- W_ij / f_i - s (B A)_ij          (inverse = unmerge)
//                     in the accumulation dtype, rounded once into W's dtype
//   dora_merge_check: whether dora_merge_ with the same arguments keeps every finite weight
//                     finite, with a finite delta and finite factors; writes nothing
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <cstdint>

#include "checks.h"
#include "rng.h"  // LORA_HD

namespace lora_ext {
namespace dora {

// delta of element (i, j): sum_c bs_row[c] * a[c * k + j], bs_row = s B_i (accumulation dtype)
template <typename acc_t>
LORA_HD acc_t delta_at(const acc_t* bs_row, const acc_t* a, int64_t j, int64_t k, int64_t r) {
  acc_t d = acc_t(0);
  for (int64_t c = 0; c < r; ++c) d += bs_row[c] * a[c * k + j];
  return d;
}

// The new value of one weight element: f (w + d), or for the inverse (unmerge) w / f - d.
template <typename acc_t>
LORA_HD acc_t merged_value(acc_t w, acc_t d, acc_t f, bool inverse) {
  return inverse ? w / f - d : f * (w + d);
}

// dora_merge_check's rule for one element: the delta and the factor are finite, and a finite
// weight stays finite after rounding (new_rounded is the value rounded to the weight dtype).
template <typename acc_t>
LORA_HD bool element_ok(acc_t w, acc_t d, acc_t f, acc_t new_rounded) {
  const bool w_finite = w - w == acc_t(0);
  const bool d_finite = d - d == acc_t(0);
  const bool f_finite = f - f == acc_t(0);
  const bool n_finite = new_rounded - new_rounded == acc_t(0);
  return d_finite && f_finite && (!w_finite || n_finite);
}

// The operands in the accumulation dtype: w the [out, in] weight view (strides as given),
// bs = scale * B [out, r] and a = A [r, in], both contiguous.
struct Problem {
  at::Tensor w;
  at::Tensor bs;
  at::Tensor a;
};

// Call check_merge_args first (before any device guard).
inline Problem make_problem(const at::Tensor& weight, const at::Tensor& lora_a,
                            const at::Tensor& lora_b, double scale) {
  at::AutoDispatchBelowADInplaceOrView guard;
  const auto acc = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return Problem{weight, lora_b.to(acc).mul(scale).contiguous(), lora_a.to(acc).contiguous()};
}

inline at::ScalarType acc_type(const at::Tensor& weight) {
  return weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// factor [out]: floating, on weight's device; returned in the accumulation dtype, contiguous.
inline at::Tensor check_factor(const at::Tensor& weight, const at::Tensor& factor) {
  LORA_CHECK(factor.device() == weight.device(), "factor is on ", factor.device(),
             " but weight is on ", weight.device(), ": all tensors must be on one device");
  check_floating(factor, "factor");
  LORA_CHECK(factor.dim() == 1 && factor.size(0) == weight.size(0), "factor must have shape [",
             weight.size(0), "] (one per output row of weight ", weight.sizes(), "), got ",
             factor.sizes());
  at::AutoDispatchBelowADInplaceOrView guard;
  return factor.to(acc_type(weight)).contiguous();
}

}  // namespace dora
}  // namespace lora_ext
