// Autograd registration of the C++ ops. The ops are not differentiable themselves: a one-pass
// loss returns (loss, grad) and fastkd's Python layer differentiates it with an autograd.Function
// whose backward rescales the saved `grad` with scale_grad_ (fastkd/ops.py). Registering
// autograd's "not implemented" kernel makes that explicit: a direct call with inputs that require
// grad fails loudly at backward instead of silently returning no gradient.
//
// scale_grad_ records its mutation itself (each device kernel bumps the version counter when it
// may have written), so that autograd refuses a second backward through a graph whose saved
// gradient was already rescaled (retain_graph=True).
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

TORCH_LIBRARY_IMPL(fastkd, Autograd, m) {
  m.impl("kd_loss_fwd", torch::autograd::autogradNotImplementedFallback());
}
