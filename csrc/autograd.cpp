// Autograd registration of the C++ ops. The ops are not differentiable themselves: a one-pass
// loss returns (loss, grad) and fastkd's Python layer differentiates it with an autograd.Function
// whose backward rescales the saved `grad` with scale_grad_ (fastkd/ops.py). Registering
// autograd's "not implemented" kernel makes that explicit: a direct call with inputs that require
// grad fails loudly at backward instead of silently returning no gradient.
//
// scale_grad_ records its mutation (a version-counter bump), so that autograd refuses a second
// backward through a graph whose saved gradient was already rescaled (retain_graph=True). The CPU
// kernel bumps the counter itself, and only when it wrote: a skipped write (grad_output exactly 1)
// is no mutation, so repeated backward passes with grad_output 1 (as gradcheck makes) stay legal.
// On a GPU whether it wrote is only known on the device, so every call counts, here.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

namespace fastkd {
namespace {

void scale_grad_inplace_or_view(at::Tensor& grad, const at::Tensor& grad_output) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastkd::scale_grad_", "")
                             .typed<void(at::Tensor&, const at::Tensor&)>();
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.call(grad, grad_output);
  }
  if (!grad.is_cpu()) torch::autograd::impl::bump_version(grad);
}

// scale_grads_, the grouped form (feature regression), records its mutations the same way.
void scale_grads_inplace_or_view(at::TensorList grads, const at::Tensor& grad_output) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastkd::scale_grads_", "")
                             .typed<void(at::TensorList, const at::Tensor&)>();
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.call(grads, grad_output);
  }
  if (!grad_output.is_cpu()) {
    for (const at::Tensor& g : grads) torch::autograd::impl::bump_version(g);
  }
}

}  // namespace
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, Autograd, m) {
  m.impl("kd_loss_fwd", torch::autograd::autogradNotImplementedFallback());
  m.impl("feature_regression_fwd", torch::autograd::autogradNotImplementedFallback());
}

TORCH_LIBRARY_IMPL(fastkd, ADInplaceOrView, m) {
  m.impl("scale_grad_", &fastkd::scale_grad_inplace_or_view);
  m.impl("scale_grads_", &fastkd::scale_grads_inplace_or_view);
}
