// Input checks shared by every op. The Python API validates first and names the user's argument;
// these checks keep a direct call of torch.ops.fastkd.* from crashing or reading out of bounds.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

namespace fastkd {

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

// Logits as the ops take them: [outer, inner, classes], classes contiguous (stride 1). Leading
// dims of the user's tensor are folded into (outer, inner) by the Python layer without a copy
// wherever the strides allow.
inline void check_rows3d(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 3, "fastkd: ", name, " must be 3-D [outer, inner, classes], got ",
              t.dim(), "-D");
  TORCH_CHECK(is_float_dtype(t.scalar_type()), "fastkd: ", name,
              " must be float32, bfloat16, float16 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.size(2) == 1 || t.stride(2) == 1, "fastkd: ", name,
              " must have a contiguous last dimension (stride 1), got stride ", t.stride(2));
}

inline void check_same_device(const at::Tensor& ref, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), "fastkd: ", name, " is on ", t.device(),
              " but the student is on ", ref.device());
}

// A vector of `n` per-row weights (or [k, n] with any stride between the k rows), float32, or
// float64 alongside float64 logits.
inline void check_row_weights(const at::Tensor& w, int64_t k, int64_t n, at::ScalarType dtype,
                              const char* name) {
  TORCH_CHECK(w.scalar_type() == dtype, "fastkd: ", name, " must be ", dtype, ", got ",
              w.scalar_type());
  if (k < 0) {
    TORCH_CHECK(w.dim() == 1 && w.size(0) == n && w.stride(0) == 1, "fastkd: ", name,
                " must be a contiguous vector of ", n, " values, got shape ", w.sizes());
  } else {
    TORCH_CHECK(w.dim() == 2 && w.size(0) == k && w.size(1) == n && (n <= 1 || w.stride(1) == 1),
                "fastkd: ", name, " must be [", k, ", ", n,
                "] with contiguous rows, got shape ", w.sizes(), " strides ", w.strides());
  }
}

// fastkd::scale_grad_: a contiguous gradient, and a scalar or one value per row (last dim = row).
inline void check_scale_grad_args(const at::Tensor& grad, const at::Tensor& grad_output) {
  TORCH_CHECK(is_float_dtype(grad.scalar_type()) && grad.is_contiguous(),
              "fastkd: scale_grad_ needs a contiguous floating-point gradient");
  TORCH_CHECK(grad_output.device() == grad.device(), "fastkd: grad_output is on ",
              grad_output.device(), " but the gradient is on ", grad.device());
  TORCH_CHECK(grad_output.scalar_type() == at::kFloat || grad_output.scalar_type() == at::kDouble,
              "fastkd: grad_output must be float32 or float64, got ", grad_output.scalar_type());
  const int64_t rows = grad.dim() == 0 || grad.size(-1) == 0 ? 0 : grad.numel() / grad.size(-1);
  TORCH_CHECK(grad_output.dim() == 0 || (grad_output.numel() == rows && grad_output.is_contiguous()),
              "fastkd: grad_output must be a scalar or hold one value per row (", rows,
              "), got shape ", grad_output.sizes());
}

// fastkd::scale_grads_: dense floating-point gradients (any memory format: the scale is
// elementwise, so each is processed as its flat storage) and one scalar for all of them.
inline void check_scale_grads_args(at::TensorList grads, const at::Tensor& grad_output) {
  TORCH_CHECK(grad_output.scalar_type() == at::kFloat || grad_output.scalar_type() == at::kDouble,
              "fastkd: grad_output must be float32 or float64, got ", grad_output.scalar_type());
  TORCH_CHECK(grad_output.dim() == 0, "fastkd: scale_grads_ takes a scalar grad_output, got shape ",
              grad_output.sizes());
  for (const at::Tensor& g : grads) {
    TORCH_CHECK(is_float_dtype(g.scalar_type()) && g.is_non_overlapping_and_dense(),
                "fastkd: scale_grads_ needs dense floating-point gradients, got ", g.scalar_type(),
                " with shape ", g.sizes(), " and strides ", g.strides());
    TORCH_CHECK(g.device() == grad_output.device(), "fastkd: grad_output is on ",
                grad_output.device(), " but a gradient is on ", g.device());
  }
}

}  // namespace fastkd
