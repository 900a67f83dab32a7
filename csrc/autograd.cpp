// Autograd registrations of the C++ ops. The ops are not differentiable themselves: a one-pass
// loss returns (loss, grad) and fastkd's Python layer differentiates it with an autograd.Function
// whose backward rescales the saved `grad` (fastkd/ops.py). Registering autograd's
// "not implemented" kernel makes that explicit -- a direct call with inputs that require grad
// fails loudly at backward instead of silently returning no gradient -- and the in-place
// scale_grad_ bumps its tensor's version counter, so that autograd refuses a second backward
// through a graph whose saved gradient was already rescaled (retain_graph=True).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

namespace fastkd {
namespace {

// What a generated ADInplaceOrView kernel does for an in-place op: run it below this key, then
// record the mutation.
void scale_grad_inplace_or_view(at::Tensor& grad, const at::Tensor& grad_output) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastkd::scale_grad_", "")
                             .typed<void(at::Tensor&, const at::Tensor&)>();
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.call(grad, grad_output);
  }
  torch::autograd::impl::bump_version(grad);
}

}  // namespace
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, Autograd, m) {
  m.impl("kd_loss_fwd", torch::autograd::autogradNotImplementedFallback());
}

TORCH_LIBRARY_IMPL(fastkd, ADInplaceOrView, m) {
  m.impl("scale_grad_", &fastkd::scale_grad_inplace_or_view);
}
