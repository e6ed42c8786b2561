// Counter-based dropout mask shared by the CPU and CUDA kernels (and mirrored bit for bit by
// lora_ext/reference.py). keep(seed, i) is a pure function of the seed and the flat element
// index i of x viewed as a contiguous [tokens, in] matrix: it never depends on thread layout,
// tile sizes or the device, so backward can recompute the mask instead of storing it, and a
// CPU run pins down what the GPU computes.
//
// The hash is two rounds of Chris Wellons' "lowbias32" (a bijective 32-bit integer hash with
// near-ideal avalanche), keyed by the two halves of splitmix64(seed). It costs four 32-bit
// multiplies per element and vectorizes (AVX2/AVX-512 on the CPU), unlike a 10-round Philox.
// For a fixed seed and fixed high index word the map from the low word to the hash is a
// bijection, so within 2^32 consecutive elements no two share a random value.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LORA_HD __host__ __device__ __forceinline__
#else
#define LORA_HD inline
#endif

namespace lora_ext {
namespace rng {

LORA_HD uint32_t lowbias32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

LORA_HD uint64_t splitmix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// Everything a kernel needs to evaluate the mask: two 32-bit keys and the drop threshold.
struct DropoutKey {
  uint32_t k0;
  uint32_t k1;
  uint32_t threshold;  // element i is dropped iff hash(i) < threshold (threshold ~ p * 2^32)
};

LORA_HD DropoutKey make_key(uint64_t seed, uint32_t threshold) {
  const uint64_t z = splitmix64(seed);
  return DropoutKey{static_cast<uint32_t>(z), static_cast<uint32_t>(z >> 32), threshold};
}

// Key for the block of 2^32 indices that share the high word `hi` (hoisted out of inner loops).
LORA_HD uint32_t hi_key(const DropoutKey& key, uint32_t hi) { return key.k1 ^ (hi * 0x9e3779b9U); }

LORA_HD uint32_t hash32(uint32_t k0, uint32_t khi, uint32_t lo) {
  return lowbias32(lowbias32(lo ^ k0) ^ khi);
}

LORA_HD uint32_t hash(const DropoutKey& key, uint64_t idx) {
  return hash32(key.k0, hi_key(key, static_cast<uint32_t>(idx >> 32)), static_cast<uint32_t>(idx));
}

LORA_HD bool keep(const DropoutKey& key, uint64_t idx) { return hash(key, idx) >= key.threshold; }

// Host only: threshold for drop probability p in [0, 1). P(keep) = 1 - threshold / 2^32.
inline uint32_t threshold_for(double p) {
  const double t = p * 4294967296.0 + 0.5;
  return t >= 4294967295.0 ? 0xffffffffU : static_cast<uint32_t>(t);
}

}  // namespace rng
}  // namespace lora_ext
