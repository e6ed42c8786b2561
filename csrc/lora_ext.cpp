// lora_ext: every operator schema, in one place. Kernels are registered per device in
// csrc/cpu/*.cpp (always built) and csrc/cuda/*.cu (built when torch has CUDA). Autograd and
// the fake (meta) implementations used by torch.compile live in lora_ext/ops.py, which is the
// only Python code that calls torch.ops.lora_ext.
//
// The small pybind11 module below exists so that `import lora_ext._C` loads this library (and
// with it the registrations) and to expose build facts that are not tensor ops.
#include <torch/extension.h>
#include <torch/library.h>
#include <torch/version.h>
#ifdef LORA_EXT_WITH_CUDA
#include <cuda.h>  // CUDA_VERSION
#endif

#include <atomic>
#include <cstdlib>
#include <string>
#include <vector>

#include "cpu/grid_emulator.h"
#include "cpu/rank_update_cpu.h"
#include "switches.h"

#ifndef LORA_EXT_VERSION
#define LORA_EXT_VERSION "unknown"
#endif

TORCH_LIBRARY(lora_ext, m) {
  // y = x W^T + bias + scale * (drop(x) A^T) B^T, drop(x) = x * mask(seed) / (1 - dropout_p).
  // Also returns xa = drop(x) A^T [..., r], kept for backward instead of drop(x) or the mask.
  m.def(
      "lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, "
      "float scale, float dropout_p, Tensor seed) -> (Tensor y, Tensor xa)");
  // Gradients w.r.t. (x, lora_a, lora_b); entries with output_mask false come back undefined
  // (None). xa is non-differentiable: it is an implementation detail of the autograd formula.
  m.def(
      "lora_linear_backward(Tensor grad_y, Tensor x, Tensor weight, "
      "Tensor lora_a, Tensor lora_b, Tensor xa, float scale, float dropout_p, Tensor seed, "
      "bool[3] output_mask) -> (Tensor grad_x, Tensor grad_lora_a, Tensor grad_lora_b)");
  // The LoRA branch alone, for a base layer that computes its own output (a bitsandbytes
  // 4-bit / 8-bit layer): y = scale * (drop(x) A^T) B^T, the same kernels and dropout mask as
  // lora_linear (a separate op rather than `Tensor? weight`, so lora_linear's schema, autocast
  // kernel and traced graphs stay as they are, and this one carries no unused weight/bias).
  m.def(
      "lora_delta(Tensor x, Tensor lora_a, Tensor lora_b, float scale, float dropout_p, "
      "Tensor seed) -> (Tensor y, Tensor xa)");
  m.def(
      "lora_delta_backward(Tensor grad_y, Tensor x, Tensor lora_a, Tensor lora_b, Tensor xa, "
      "float scale, float dropout_p, Tensor seed, bool[3] output_mask) -> (Tensor grad_x, "
      "Tensor grad_lora_a, Tensor grad_lora_b)");
  // In place: weight += scale * lora_b @ lora_a, accumulated in float32, rounded once, in tiles
  // (no temporary of the weight's size). weight may be any strided 2-D view.
  m.def("merge_(Tensor(a!) weight, Tensor lora_a, Tensor lora_b, float scale) -> ()");
  // True (0-d bool tensor) iff merge_ with the same arguments would produce a finite delta
  // everywhere and turn no finite weight into inf/nan. Reads weight, writes nothing.
  m.def("merge_check(Tensor weight, Tensor lora_a, Tensor lora_b, float scale) -> Tensor");
  // The dropout keep-mask (bool, like's shape, like's device) that lora_linear uses for x of
  // that shape, for flat indices offset .. offset + like.numel() - 1: for tests (including
  // indices past 2^32 without a 4 GB tensor) and for checking CPU/GPU agreement.
  m.def("dropout_mask(Tensor like, Tensor seed, float dropout_p, int offset=0) -> Tensor");
  // DoRA (csrc/dora.h): row norms n [out] of W + scale * B A (float32; float64 for a float64
  // weight) without materialising it; W <- factor * (W + scale B A) per row (inverse: W <-
  // W / factor - scale B A), rounded once; and the finiteness check of that update.
  m.def("dora_norm(Tensor weight, Tensor lora_a, Tensor lora_b, float scale) -> Tensor");
  m.def(
      "dora_merge_(Tensor(a!) weight, Tensor lora_a, Tensor lora_b, float scale, Tensor factor, "
      "bool inverse) -> ()");
  m.def(
      "dora_merge_check(Tensor weight, Tensor lora_a, Tensor lora_b, float scale, Tensor factor, "
      "bool inverse) -> Tensor");
}

namespace lora_ext {
namespace {
std::atomic<bool>& fast_flag() {
  static std::atomic<bool> flag{[] {
    const char* v = std::getenv("LORA_EXT_CUDA_KERNELS");
    return v != nullptr && std::string(v) == "fast";
  }()};
  return flag;
}
}  // namespace

bool cuda_fast_kernels() { return fast_flag().load(std::memory_order_relaxed); }
bool set_cuda_fast_kernels(bool enabled) { return fast_flag().exchange(enabled); }

}  // namespace lora_ext

namespace {

[[maybe_unused]] std::vector<std::string> split_archs(const std::string& s) {
  std::vector<std::string> out;
  std::string cur;
  for (char c : s) {
    if (c == ';' || c == ' ' || c == ',') {
      if (!cur.empty()) out.push_back(cur);
      cur.clear();
    } else {
      cur.push_back(c);
    }
  }
  if (!cur.empty()) out.push_back(cur);
  return out;
}

pybind11::dict build_info() {
  pybind11::dict d;
  d["version"] = LORA_EXT_VERSION;
  d["torch_version"] = TORCH_VERSION;  // the torch the extension was compiled against
#ifdef LORA_EXT_WITH_CUDA
  d["cuda"] = true;
  d["cuda_archs"] = split_archs(LORA_EXT_CUDA_ARCHS);
  d["cuda_kernel_variants"] = std::vector<std::string>{"simple", "fast"};
#ifdef CUDA_VERSION
  d["cuda_version"] =
      std::to_string(CUDA_VERSION / 1000) + "." + std::to_string((CUDA_VERSION % 1000) / 10);
#else
  d["cuda_version"] = pybind11::none();
#endif
#else
  d["cuda"] = false;
  d["cuda_archs"] = std::vector<std::string>{};
  d["cuda_kernel_variants"] = std::vector<std::string>{};
  d["cuda_version"] = pybind11::none();
#endif
#ifdef _OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
  d["cpu_dispatch"] = std::vector<std::string>{"avx512f", "avx2", "default"};
#else
  d["cpu_dispatch"] = std::vector<std::string>{"default"};
#endif
  d["cpu_rank_update_kernel"] = lora_ext::cpu::rank_update_kernel_enabled();
  d["compiler"] = __VERSION__;
  d["dropout_rng"] = "lowbias32x2 counter hash keyed by splitmix64(seed)";
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lora_ext compiled core: registers torch.ops.lora_ext.* and reports build info";
  m.def("build_info", &build_info, "How this extension was built (CUDA, archs, versions).");
  m.def("_set_cpu_rank_update_kernel", &lora_ext::cpu::set_rank_update_kernel,
        "Use the AVX-512 rank-r kernel (True, the default where the CPU has AVX-512) or ATen's "
        "GEMM (False) for the float32 rank-r updates; returns the previous setting. For tests "
        "and benchmarks.");
  m.def("_emulate_merge", &lora_ext::emulator::merge,
        "Run the fast CUDA merge kernel's body over a CPU-emulated grid (tests).");
  m.def("_emulate_keep_rows", &lora_ext::emulator::keep_rows,
        "Run the fast CUDA keep_rows kernel's body over a CPU-emulated grid (tests).");
  m.def("_emulate_backward_cols", &lora_ext::emulator::backward_cols,
        "Run the fast CUDA backward kernel's body over a CPU-emulated grid (tests).");
  m.def("_set_cuda_fast_kernels", &lora_ext::set_cuda_fast_kernels,
        "Use the fast CUDA kernels (True) or the simple ones (False); returns the previous "
        "setting. ops.cuda_kernels() is the public way.");
}
