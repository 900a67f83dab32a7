// fastkd::scale_grad_ on the CPU: the backward of every loss whose forward wrote its gradient.
//   grad *= grad_output            (a scalar: skipped when it is exactly 1)
//   grad[b, :] *= grad_output[b]   (one value per row, for reduction="none")
// ATen's vectorized, parallel mul_ already runs at memory speed here; reading the CPU scalar is
// not a device synchronisation.
//
// The version counter is bumped only when the gradient was written: a skipped write is no
// mutation, so repeated backward passes with grad_output 1 (as gradcheck makes) stay legal, while
// a graph whose saved gradient was rescaled refuses a second backward.
#include "cpu/capability.h"

#ifdef FASTKD_CPU_DISPATCH
#include <ATen/core/Tensor.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include "checks.h"

namespace fastkd {

void scale_grad_cpu(at::Tensor& grad, const at::Tensor& grad_output) {
  check_scale_grad_args(grad, grad_output);
  if (grad.numel() == 0) return;
  if (grad_output.dim() == 0) {
    if (grad_output.item<double>() == 1.0) return;
    grad.mul_(grad_output);
  } else {
    grad.view({grad_output.numel(), -1}).mul_(grad_output.reshape({-1, 1}));
  }
  torch::autograd::impl::bump_version(grad);
}

}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CPU, m) { m.impl("scale_grad_", &fastkd::scale_grad_cpu); }
#endif  // FASTKD_CPU_DISPATCH
