// CPU evaluation of the dropout mask (csrc/rng.h) over runs of consecutive flat indices.
#pragma once

#include <cstdint>

#include "../rng.h"

namespace lora_ext {
namespace cpu {

// keep[j] = 1 if element idx0 + j is kept, else 0, for 0 <= j < n. Vectorized; the hot loop is
// compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time.
void keep_flags(const rng::DropoutKey& key, uint64_t idx0, int64_t n, uint8_t* keep);

}  // namespace cpu
}  // namespace lora_ext
