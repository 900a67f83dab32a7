// fastkd::scale_grads_ on the CPU: the backward of a one-pass loss that returns one gradient per
// input tensor (fastkd::feature_regression_fwd).
//   grads[i] *= grad_output   for every i; skipped when grad_output is exactly 1
// ATen's vectorized, parallel mul_ already runs at memory speed here, in any memory format;
// reading the CPU scalar is not a device synchronisation. As for scale_grad_, the version counters
// are bumped only when the gradients were written (csrc/autograd.cpp).
#include "cpu/capability.h"

#ifdef FASTKD_CPU_DISPATCH
#include <ATen/core/Tensor.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include "checks.h"

namespace fastkd {

void scale_grads_cpu(at::TensorList grads, const at::Tensor& grad_output) {
  check_scale_grads_args(grads, grad_output);
  if (grad_output.item<double>() == 1.0) return;
  for (const at::Tensor& g : grads) {
    if (g.numel() == 0) continue;
    g.mul_(grad_output);
    torch::autograd::impl::bump_version(g);
  }
}

}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CPU, m) { m.impl("scale_grads_", &fastkd::scale_grads_cpu); }
#endif  // FASTKD_CPU_DISPATCH
