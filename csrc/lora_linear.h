// Device-independent orchestration of the fused LoRA linear op. The two big GEMMs (x W^T in
// forward, dY W in backward) go through ATen (MKL/oneDNN on the CPU, cuBLAS on the GPU); the
// LoRA branch comes from a `Kernels` policy (csrc/cpu/lora_linear_cpu.cpp,
// csrc/cuda/lora_linear_cuda.cu):
//
//   Guard: constructed from x's device after all checks (c10::cuda::CUDAGuard on the GPU)
//   kUpcastHalf: float16 runs in float32 (the CPU, where float16 GEMMs are no faster)
//   static std::tuple<at::Tensor, at::Tensor> lora_forward(x2, bias, lora_a, lora_b, scale, drop);
//       xa = drop(x2) @ A^T [n, r];  y = bias + scale * xa @ B^T [n, out], in x's dtype or in
//       float32 (then the caller adds x W^T in float32 and rounds once)
//   static void lora_backward(dy, x2, xa2, lora_a, lora_b, scale, drop, grad_x*, grad_a*, grad_b*);
//       g = scale * dY @ B (once);  grad_x += mask * (g @ A) / (1 - p)  (grad_x holds dY W), or
//       with kLoraTermFirst, grad_x = that term (grad_x comes in uninitialised; dY W is
//       accumulated into it afterwards);
//       grad_a = g^T @ drop(x2);  grad_b = scale * dY^T @ xa.  A null pointer: not wanted.
//
// Notation: x2 = x viewed as [n, in], dy = grad_y viewed as [n, out], xa2 = xa as [n, r].
//
// An undefined weight is the LoRA-only op lora_delta (y = scale * (drop(x) A^T) B^T, for a base
// layer that computes its own output, e.g. a bitsandbytes 4-bit one): the same kernels, without
// the big GEMMs.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <optional>
#include <tuple>
#include <vector>

#include "checks.h"
#include "rng.h"

namespace lora_ext {

// The device guard of kernels that need none (the CPU's).
struct NoGuard {
  explicit NoGuard(const at::Device&) {}
};

struct Dropout {
  bool active = false;
  rng::DropoutKey key{0, 0, 0};
  double inv_keep = 1.0;  // 1 / (1 - p)
  // CUDA: the seed on the device (key.k0/k1 are then made in the kernel from it, key.threshold
  // is set); nullptr: key is complete
  const int64_t* seed_dev = nullptr;
};

// The seed is read on the host when it is on the CPU; a seed on x's CUDA device stays there and
// the kernels read it (kernels that cannot, the CPU's, refuse a seed that is not on the CPU).
inline Dropout make_dropout(double p, const at::Tensor& seed, const at::Device& device) {
  LORA_CHECK(seed.device().is_cpu() || seed.device() == device, "seed is on ", seed.device(),
             " but x is on ", device, ": the seed is a CPU tensor or lives on x's device");
  Dropout d;
  d.active = p > 0.0;
  if (!d.active) return d;
  d.inv_keep = 1.0 / (1.0 - p);
  check_seed(seed);
  if (device.is_cuda() && seed.device() == device) {
    d.key = rng::DropoutKey{0, 0, rng::threshold_for(p)};
    d.seed_dev = seed.const_data_ptr<int64_t>();
  } else {
    d.key = rng::make_key(read_seed(seed), rng::threshold_for(p));
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
std::tuple<at::Tensor, at::Tensor> lora_linear_forward(const at::Tensor& x,
                                                       const at::Tensor& weight,
                                                       const std::optional<at::Tensor>& bias,
                                                       const at::Tensor& lora_a,
                                                       const at::Tensor& lora_b, double scale,
                                                       double dropout_p, const at::Tensor& seed) {
  const LinearShapes s = check_linear_args(x, weight, bias, lora_a, lora_b, scale, dropout_p);
  const Dropout drop = make_dropout(dropout_p, seed, x.device());  // checks the seed
  const typename Kernels::Guard device_guard(x.device());          // after every check
  // autograd is handled in Python (ops.py); the ATen calls below must not record a graph
  at::AutoDispatchBelowADInplaceOrView guard;
  if (Kernels::kUpcastHalf && x.scalar_type() == at::kHalf) {
    // float16 on the CPU: partial sums such as bias + s xa B^T can leave float16's range where
    // the result does not; compute in float32 and round once at the end
    const auto f = [](const at::Tensor& t) { return t.defined() ? t.to(at::kFloat) : t; };
    std::optional<at::Tensor> bias32;
    if (bias.has_value() && bias->defined()) bias32 = f(*bias);
    auto [y, xa] = lora_linear_forward<Kernels>(f(x), f(weight), bias32, f(lora_a), f(lora_b),
                                                scale, dropout_p, seed);
    return {y.to(at::kHalf), xa.to(at::kHalf)};
  }
  const at::Tensor x2 = as_rows(x, s.n, s.in);
  // y starts as bias + scale * xa B^T (what addmm's broadcast copy of the bias would cost
  // anyway); the big GEMM then accumulates x W^T into it with beta = 1: no extra pass over y.
  auto [y, xa] = Kernels::lora_forward(x2, bias, lora_a, lora_b, scale, drop);
  if (!weight.defined()) {  // lora_delta: no base GEMM
    if (y.scalar_type() != x.scalar_type()) y = y.to(x.scalar_type());
  } else if (y.scalar_type() != x.scalar_type()) {
    // the kernels kept bias + s xa B^T in float32 (float16 on the GPU): add x W^T and round once
    y = y.add_(at::mm(x2, weight.t())).to(x.scalar_type());
  } else {
    y.addmm_(x2, weight.t());
  }
  return {y.view(with_last(x.sizes(), s.out)), xa.view(with_last(x.sizes(), s.r))};
}

// Gradients w.r.t. x, lora_a, lora_b (weight and bias are frozen). output_mask says which are
// wanted; the others come back undefined (None in Python) and cost nothing.
template <class Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_linear_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& xa, double scale,
    double dropout_p, const at::Tensor& seed, std::array<bool, 3> output_mask) {
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
  const Dropout drop = make_dropout(dropout_p, seed, x.device());
  const typename Kernels::Guard device_guard(x.device());  // after every check
  at::AutoDispatchBelowADInplaceOrView guard;
  if (Kernels::kUpcastHalf && x.scalar_type() == at::kHalf) {  // as in the forward
    const auto f = [](const at::Tensor& t) { return t.defined() ? t.to(at::kFloat) : t; };
    auto [gx, ga, gb] =
        lora_linear_backward<Kernels>(f(grad_y), f(x), f(weight), f(lora_a), f(lora_b), f(xa),
                                      scale, dropout_p, seed, output_mask);
    const auto h = [](const at::Tensor& t) { return t.defined() ? t.to(at::kHalf) : t; };
    return {h(gx), h(ga), h(gb)};
  }
  const at::Tensor dy = grad_y.reshape({s.n, s.out});

  at::Tensor grad_x, grad_a, grad_b;
  if (need_x) {
    // [n, in], contiguous: written row block by row block by the LoRA kernel
    grad_x = Kernels::kLoraTermFirst ? at::empty({s.n, s.in}, x.options())
             : weight.defined()      ? at::mm(dy, weight)
                                     : at::zeros({s.n, s.in}, x.options());
  }
  if (need_x || need_a || need_b) {
    Kernels::lora_backward(dy, as_rows(x, s.n, s.in), xa.reshape({s.n, s.r}), lora_a, lora_b, scale,
                           drop, need_x ? &grad_x : nullptr, need_a ? &grad_a : nullptr,
                           need_b ? &grad_b : nullptr);
  }
  // beta = 1: the GEMM reads the LoRA term as its C operand, no extra pass over grad_x
  if (need_x && Kernels::kLoraTermFirst && weight.defined()) grad_x.addmm_(dy, weight);
  if (need_x) grad_x = grad_x.view(x.sizes());
  return {grad_x, grad_a, grad_b};
}

// lora_delta: y = scale * (drop(x) A^T) B^T [..., out] and xa [..., r], lora_linear without the
// base weight and bias (the base layer adds its own output).
template <class Kernels>
std::tuple<at::Tensor, at::Tensor> lora_delta_forward(const at::Tensor& x, const at::Tensor& lora_a,
                                                      const at::Tensor& lora_b, double scale,
                                                      double dropout_p, const at::Tensor& seed) {
  return lora_linear_forward<Kernels>(x, at::Tensor(), std::nullopt, lora_a, lora_b, scale,
                                      dropout_p, seed);
}

template <class Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_delta_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& xa, double scale, double dropout_p,
    const at::Tensor& seed, std::array<bool, 3> output_mask) {
  return lora_linear_backward<Kernels>(grad_y, x, at::Tensor(), lora_a, lora_b, xa, scale,
                                       dropout_p, seed, output_mask);
}

// merge_ works on a row-major problem: rows of `w` are tiles, columns have the smallest stride.
// A weight stored transposed (GPT-2 Conv1D: merge_(conv.weight.t(), ...)) is handled by merging
// into its transpose with the factors swapped: W^T += s * A^T B^T.
struct MergeProblem {
  at::Tensor w;   // [m, k] view of the weight, stride(1) <= stride(0)
  at::Tensor bs;  // [m, r] left factor, scaled by `scale`, accumulation dtype, contiguous
  at::Tensor a;   // [r, k] right factor, accumulation dtype, contiguous
};

// Call check_merge_args first (before any device guard).
inline MergeProblem make_merge_problem(const at::Tensor& weight, const at::Tensor& lora_a,
                                       const at::Tensor& lora_b, double scale) {
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
