// Process-wide kernel switches (set from Python through lora_ext._C, read by the kernels).
#pragma once

namespace lora_ext {

// CUDA kernels of lora_linear / merge_: the simple ones (false, the default until a GPU has
// measured both) or the fast ones (true): the vectorised register-tile merge, the forward that
// never writes drop(x), the backward that writes the LoRA term first. LORA_EXT_CUDA_KERNELS=fast
// in the environment sets it at load; ops.cuda_kernels("fast") inside a block.
bool cuda_fast_kernels();
bool set_cuda_fast_kernels(bool enabled);  // returns the previous setting

}  // namespace lora_ext
