// Host-side argument checks. Every message names the argument, what it got and what it needs,
// so a wrong call fails with a RuntimeError/ValueError in Python instead of a crash or a
// silently wrong result.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>
#include <c10/util/accumulate.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>

#include "rng.h"

// RuntimeError in Python
#define LORA_CHECK(cond, ...) TORCH_CHECK(cond, "lora_ext: ", __VA_ARGS__)
// ValueError in Python
#define LORA_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, "lora_ext: ", __VA_ARGS__)

namespace lora_ext {

inline void check_floating(const at::Tensor& t, const char* name) {
  LORA_CHECK(at::isFloatingType(t.scalar_type()), name,
             " must be a floating-point tensor (float32, bfloat16, float16 or float64), got ",
             t.scalar_type());
}

inline void check_device(const at::Tensor& t, const char* name, const at::Tensor& ref,
                         const char* ref_name) {
  LORA_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name, " is on ",
             ref.device(), ": all tensors must be on one device");
}

inline void check_same(const at::Tensor& t, const char* name, const at::Tensor& ref,
                       const char* ref_name) {
  check_device(t, name, ref, ref_name);
  LORA_CHECK(t.scalar_type() == ref.scalar_type(), name, " has dtype ", t.scalar_type(), " but ",
             ref_name, " has dtype ", ref.scalar_type(),
             ": cast them to one dtype (the LoRA layer does this)");
}

inline void check_scale(double scale) {
  LORA_CHECK_VALUE(std::isfinite(scale), "scale must be a finite number, got ", scale);
}

inline void check_dropout_p(double p) {
  LORA_CHECK_VALUE(p >= 0.0 && p < 1.0, "dropout_p must be in [0, 1), got ", p);
}

// The seed travels as a one-element int64 tensor (so torch.compile traces a fresh seed per step
// and CUDA graphs replay a fresh one). On the CPU it is read on the host; a CUDA kernel reads a
// seed that lives on its device in the kernel itself (no .item(), no sync: graph-safe).
inline void check_seed(const at::Tensor& seed) {
  LORA_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1,
             "seed must be a one-element int64 tensor, got dtype ", seed.scalar_type(),
             " and shape ", seed.sizes());
}

inline uint64_t read_seed(const at::Tensor& seed) {
  check_seed(seed);
  LORA_CHECK(seed.device().is_cpu(), "seed must be on the CPU (or, for a CUDA kernel, on x's ",
             "device), got a seed on ", seed.device());
  return static_cast<uint64_t>(seed.item<int64_t>());
}

struct LinearShapes {
  int64_t n;    // tokens: product of x's leading dims
  int64_t in;   // in_features
  int64_t out;  // out_features
  int64_t r;    // LoRA rank
};

// x [..., in], weight [out, in] or undefined (the LoRA-only op lora_delta: out comes from
// lora_b), bias [out] or none, lora_a [r, in], lora_b [out, r]
inline LinearShapes check_linear_args(const at::Tensor& x, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias,
                                      const at::Tensor& lora_a, const at::Tensor& lora_b,
                                      double scale, double dropout_p) {
  const bool has_weight = weight.defined();
  // devices first: a kernel for the wrong device (and its device guard) must never start
  if (has_weight) check_device(weight, "weight", x, "x");
  check_device(lora_a, "lora_a", x, "x");
  check_device(lora_b, "lora_b", x, "x");
  if (bias.has_value() && bias->defined()) check_device(*bias, "bias", x, "x");
  LORA_CHECK(x.dim() >= 1, "x must have shape [..., in_features], got a 0-d tensor");
  check_floating(x, "x");
  LORA_CHECK(!has_weight || weight.dim() == 2,
             "weight must be 2-D [out_features, in_features], got shape ", weight.sizes());
  LORA_CHECK(lora_a.dim() == 2, "lora_a must be 2-D [r, in_features], got shape ", lora_a.sizes());
  LORA_CHECK(lora_b.dim() == 2, "lora_b must be 2-D [out_features, r], got shape ", lora_b.sizes());
  const int64_t in = x.size(-1), r = lora_a.size(0);
  const int64_t out = has_weight ? weight.size(0) : lora_b.size(0);
  LORA_CHECK(!has_weight || weight.size(1) == in, "weight must have shape [out_features, ", in,
             "] to match x of shape ", x.sizes(), ", got ", weight.sizes());
  LORA_CHECK(r > 0, "the LoRA rank must be at least 1, got lora_a of shape ", lora_a.sizes());
  LORA_CHECK(lora_a.size(1) == in, "lora_a must have shape [r, ", in, "] to match x of shape ",
             x.sizes(), ", got ", lora_a.sizes());
  if (has_weight) {
    LORA_CHECK(lora_b.size(0) == out && lora_b.size(1) == r, "lora_b must have shape [", out, ", ",
               r, "] to match weight ", weight.sizes(), " and lora_a ", lora_a.sizes(), ", got ",
               lora_b.sizes());
    check_same(weight, "weight", x, "x");
  } else {
    LORA_CHECK(lora_b.size(1) == r, "lora_b must have shape [out_features, ", r,
               "] to match lora_a ", lora_a.sizes(), ", got ", lora_b.sizes());
  }
  check_same(lora_a, "lora_a", x, "x");
  check_same(lora_b, "lora_b", x, "x");
  if (bias.has_value() && bias->defined()) {
    LORA_CHECK(bias->dim() == 1 && bias->size(0) == out, "bias must have shape [", out,
               "] to match weight ", weight.sizes(), ", got ", bias->sizes());
    check_same(*bias, "bias", x, "x");
  }
  check_scale(scale);
  check_dropout_p(dropout_p);
  const int64_t n = c10::multiply_integers(x.sizes().slice(0, x.dim() - 1));
  return LinearShapes{n, in, out, r};
}

// Whether b may read memory that a writes: same storage and not provably disjoint.
inline bool shares_memory(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || !a.has_storage() || !b.has_storage()) return false;
  if (!a.storage().is_alias_of(b.storage())) return false;
  return at::get_overlap_status(a, b) != at::MemOverlapStatus::No;
}

// weight [out, in] (any strides), lora_a [r, in], lora_b [out, r]; A and B may have another
// floating dtype than weight (adapters are often kept in float32 over a bfloat16 base).
inline void check_merge_args(const at::Tensor& weight, const at::Tensor& lora_a,
                             const at::Tensor& lora_b, double scale) {
  LORA_CHECK(lora_a.device() == weight.device() && lora_b.device() == weight.device(),
             "weight, lora_a and lora_b must be on one device, got ", weight.device(), ", ",
             lora_a.device(), " and ", lora_b.device());
  LORA_CHECK(weight.dim() == 2, "weight must be 2-D [out_features, in_features], got shape ",
             weight.sizes());
  LORA_CHECK(lora_a.dim() == 2 && lora_b.dim() == 2,
             "lora_a and lora_b must be 2-D ([r, in] and [out, r]), got shapes ", lora_a.sizes(),
             " and ", lora_b.sizes());
  check_floating(weight, "weight");
  check_floating(lora_a, "lora_a");
  check_floating(lora_b, "lora_b");
  const int64_t out = weight.size(0), in = weight.size(1), r = lora_a.size(0);
  LORA_CHECK(r > 0, "the LoRA rank must be at least 1, got lora_a of shape ", lora_a.sizes());
  LORA_CHECK(lora_a.size(1) == in, "lora_a must have shape [r, ", in, "] to match weight ",
             weight.sizes(), ", got ", lora_a.sizes());
  LORA_CHECK(lora_b.size(0) == out && lora_b.size(1) == r, "lora_b must have shape [", out, ", ", r,
             "] to match weight ", weight.sizes(), " and lora_a ", lora_a.sizes(), ", got ",
             lora_b.sizes());
  // in place: as PyTorch's own in-place ops, refuse a weight whose elements share memory
  // (row.expand(3, 4): every row would be updated three times) or factors that alias it
  LORA_CHECK(at::has_internal_overlap(weight) != at::MemOverlap::Yes,
             "weight has elements that share memory (strides ", weight.strides(),
             ", e.g. an expanded tensor): merge_ writes each element once; pass .contiguous()");
  LORA_CHECK(!shares_memory(weight, lora_a),
             "lora_a shares memory with weight: merge_ would read it while writing weight");
  LORA_CHECK(!shares_memory(weight, lora_b),
             "lora_b shares memory with weight: merge_ would read it while writing weight");
  check_scale(scale);
}

}  // namespace lora_ext
