// Shared by the CPU and CUDA implementations of fastkd::feature_regression_fwd: checks the op's
// arguments, allocates the gradients and fills one RegressionPair per (student, teacher) pair.
// Device-specific code only runs the kernels and writes the scalar loss.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <vector>

#include "block_cache.h"
#include "checks.h"
#include "feature_regression.h"

namespace fastkd {

// Dense, and sample b occupies storage elements [b * D, (b + 1) * D): contiguous and
// channels_last tensors are; a slice along a non-leading dim or a transposed batch dim is not.
inline bool sample_blocked(const at::Tensor& t) {
  if (!t.is_non_overlapping_and_dense()) return false;
  return t.size(0) <= 1 || t.stride(0) * t.size(0) == t.numel();
}

// Equal strides wherever the size is not 1: the same flat offset holds the same element.
inline bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

struct RegressionCall {
  std::vector<RegressionPair> pairs;
  at::ScalarType student_dtype = at::kFloat;
  at::ScalarType teacher_dtype = at::kFloat;
  int p = 2;
  bool normalize = false;
};

inline RegressionCall prepare_feature_regression(at::TensorList students, at::TensorList teachers,
                                                 at::ArrayRef<double> weights, int64_t p,
                                                 bool normalize, bool mean,
                                                 const c10::List<bool>& compute_grad,
                                                 std::vector<at::Tensor>& grads) {
  const size_t n = students.size();
  TORCH_CHECK(n >= 1, "fastkd: feature_regression needs at least one (student, teacher) pair");
  TORCH_CHECK(teachers.size() == n, "fastkd: feature_regression got ", n, " students but ",
              teachers.size(), " teachers");
  TORCH_CHECK(weights.size() == n, "fastkd: feature_regression needs one weight per pair (", n,
              "), got ", weights.size());
  TORCH_CHECK(compute_grad.size() == n, "fastkd: feature_regression needs one compute_grad flag "
              "per pair (", n, "), got ", compute_grad.size());
  TORCH_CHECK(p == 1 || p == 2, "fastkd: feature_regression supports p = 1 or 2, got ", p);

  RegressionCall call;
  call.student_dtype = students[0].scalar_type();
  call.teacher_dtype = teachers[0].scalar_type();
  call.p = static_cast<int>(p);
  call.normalize = normalize;
  const bool f64 = call.student_dtype == at::kDouble;
  grads.clear();
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& s = students[i];
    const at::Tensor& t = teachers[i];
    TORCH_CHECK(is_float_dtype(s.scalar_type()) && is_float_dtype(t.scalar_type()),
                "fastkd: pair ", i, " must hold float32, bfloat16, float16 or float64 tensors, "
                "got ", s.scalar_type(), " and ", t.scalar_type());
    TORCH_CHECK(s.scalar_type() == call.student_dtype && t.scalar_type() == call.teacher_dtype,
                "fastkd: all students must share one dtype and all teachers another, got pair ", i,
                " with ", s.scalar_type(), " and ", t.scalar_type());
    TORCH_CHECK((t.scalar_type() == at::kDouble) == f64, "fastkd: float64 features must be "
                "float64 for student and teacher alike, got ", s.scalar_type(), " and ",
                t.scalar_type());
    check_same_device(students[0], s, "a student");
    check_same_device(students[0], t, "a teacher");
    TORCH_CHECK(s.dim() >= 2, "fastkd: features must be at least 2-D [B, ...], got pair ", i,
                " of shape ", s.sizes());
    TORCH_CHECK(s.sizes() == t.sizes(), "fastkd: pair ", i, ": the teacher has shape ", t.sizes(),
                " but the student has shape ", s.sizes());
    TORCH_CHECK(s.numel() > 0, "fastkd: pair ", i, " is empty (shape ", s.sizes(), ")");
    TORCH_CHECK(sample_blocked(s) && sample_blocked(t) && same_layout(s, t), "fastkd: pair ", i,
                " must be dense with each sample contiguous (e.g. NCHW-contiguous or "
                "channels_last), student and teacher in the same layout; got strides ",
                s.strides(), " and ", t.strides());
    TORCH_CHECK(std::isfinite(weights[i]) && weights[i] >= 0.0,
                "fastkd: weights must be finite and >= 0, got ", weights[i], " for pair ", i);

    RegressionPair pair;
    pair.student = s.data_ptr();
    pair.teacher = t.data_ptr();
    pair.samples = s.size(0);
    pair.sample_len = s.numel() / s.size(0);
    pair.loss_scale = mean ? weights[i] / static_cast<double>(s.numel()) : weights[i];
    if (compute_grad.get(i)) {
      // Dense inputs keep their exact strides, so the gradient has the student's layout.
      grads.push_back(empty_output_like(s));
      pair.grad = grads.back().data_ptr();
    } else {
      grads.push_back(at::empty({0}, s.options()));
    }
    call.pairs.push_back(pair);
  }
  return call;
}

}  // namespace fastkd
