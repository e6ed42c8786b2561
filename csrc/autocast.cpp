// Autocast kernels of lora_linear (CUDA and CPU), the way ATen registers its own linear: inside
// torch.autocast(device, dtype) every floating-point input on that device is cast to the
// autocast dtype (bfloat16 / float16) and the op runs in it, accumulating in float32 as it
// always does. The casts are ordinary differentiable ops, so LoRA parameters kept in float32
// (the "masters") get float32 gradients; autocast's cache casts each leaf parameter once per
// autocast region. Outside autocast nothing changes.
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace lora_ext {
namespace {

using LinearFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                    const std::optional<at::Tensor>&,
                                                    const at::Tensor&, const at::Tensor&, double,
                                                    double, const at::Tensor&);

template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor> lora_linear_autocast(const at::Tensor& x,
                                                        const at::Tensor& weight,
                                                        const std::optional<at::Tensor>& bias,
                                                        const at::Tensor& lora_a,
                                                        const at::Tensor& lora_b, double scale,
                                                        double dropout_p, const at::Tensor& seed) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(
      at::autocast::get_autocast_dispatch_key_from_device_type(kDevice));
  const auto dtype = at::autocast::get_lower_precision_fp_from_device_type(kDevice);
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("lora_ext::lora_linear", "").typed<LinearFn>();
  const auto cast = [&](const at::Tensor& t) {
    return at::autocast::cached_cast(dtype, t, kDevice);
  };
  std::optional<at::Tensor> bias_cast;
  if (bias.has_value() && bias->defined()) bias_cast = cast(*bias);
  // tensors on another device are left as they are: the op's device check then names them
  return op.call(cast(x), cast(weight), bias_cast, cast(lora_a), cast(lora_b), scale, dropout_p,
                 seed);
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, AutocastCUDA, m) {
  m.impl("lora_linear", &lora_linear_autocast<c10::DeviceType::CUDA>);
}

TORCH_LIBRARY_IMPL(lora_ext, AutocastCPU, m) {
  m.impl("lora_linear", &lora_linear_autocast<c10::DeviceType::CPU>);
}

}  // namespace lora_ext
