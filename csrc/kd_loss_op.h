// Shared by the CPU and CUDA implementations of fastkd::kd_loss_fwd: checks the op's arguments,
// allocates its outputs and fills KDLossArgs. Device-specific code only launches the kernel and
// reduces the per-row losses.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Optional.h>

#include <cmath>

#include "block_cache.h"
#include "checks.h"
#include "kd_loss.h"

namespace fastkd {

struct KDLossBuffers {
  at::Tensor row_loss;  // [rows], float32 or float64
  at::Tensor grad;      // student-shaped, or an empty [0] tensor when no gradient is asked for
};

inline KDLossArgs prepare_kd_loss(const at::Tensor& student, at::TensorList teachers,
                                  const std::optional<at::Tensor>& labels,
                                  const std::optional<at::Tensor>& kd_row_weights,
                                  const std::optional<at::Tensor>& ce_row_weights,
                                  at::ArrayRef<double> kd_coefs, double ce_coef, double temperature,
                                  double label_smoothing, int64_t ignore_index, bool compute_grad,
                                  KDLossBuffers& out) {
  check_rows3d(student, "student");
  const int64_t outer = student.size(0), inner = student.size(1), cols = student.size(2);
  const int64_t rows = outer * inner;
  TORCH_CHECK(rows > 0 && cols > 0, "fastkd: kd_loss needs at least one row and one class, got ",
              "student of shape ", student.sizes());
  const int k = static_cast<int>(teachers.size());
  TORCH_CHECK(k >= 1 && k <= kMaxTeachers, "fastkd: kd_loss takes 1 to ", kMaxTeachers,
              " teachers, got ", k);
  TORCH_CHECK(static_cast<int64_t>(kd_coefs.size()) == k, "fastkd: kd_coefs must hold one value "
              "per teacher (", k, "), got ", kd_coefs.size());
  const bool f64 = student.scalar_type() == at::kDouble;
  const at::ScalarType acc_dtype = f64 ? at::kDouble : at::kFloat;
  for (int i = 0; i < k; ++i) {
    const at::Tensor& t = teachers[i];
    check_rows3d(t, "teacher");
    check_same_device(student, t, "teacher");
    TORCH_CHECK(t.sizes() == student.sizes(), "fastkd: teacher ", i, " has shape ", t.sizes(),
                " but the student has shape ", student.sizes());
    TORCH_CHECK(t.scalar_type() == teachers[0].scalar_type(),
                "fastkd: all teachers must share one dtype, got ", teachers[0].scalar_type(),
                " and ", t.scalar_type());
    TORCH_CHECK((t.scalar_type() == at::kDouble) == f64,
                "fastkd: float64 logits must be float64 for student and teachers alike, got "
                "student ", student.scalar_type(), " and teacher ", t.scalar_type());
    TORCH_CHECK(std::isfinite(kd_coefs[i]), "fastkd: kd_coefs must be finite");
  }
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0.0,
              "fastkd: temperature must be a finite number > 0, got ", temperature);
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0,
              "fastkd: label_smoothing must be in [0, 1], got ", label_smoothing);
  TORCH_CHECK(std::isfinite(ce_coef), "fastkd: ce_coef must be finite");
  TORCH_CHECK(ce_coef == 0.0 || labels.has_value(), "fastkd: ce_coef != 0 needs labels");
  if (labels.has_value()) {
    const at::Tensor& y = *labels;
    check_same_device(student, y, "labels");
    TORCH_CHECK(y.scalar_type() == at::kLong, "fastkd: labels must be int64, got ",
                y.scalar_type());
    TORCH_CHECK(y.dim() == 1 && y.size(0) == rows && y.stride(0) == 1,
                "fastkd: labels must be a contiguous vector of ", rows, " values, got shape ",
                y.sizes());
  }
  if (kd_row_weights.has_value()) {
    check_same_device(student, *kd_row_weights, "kd_row_weights");
    check_row_weights(*kd_row_weights, k, rows, acc_dtype, "kd_row_weights");
  }
  if (ce_row_weights.has_value()) {
    check_same_device(student, *ce_row_weights, "ce_row_weights");
    check_row_weights(*ce_row_weights, -1, rows, acc_dtype, "ce_row_weights");
  }

  KDLossArgs a;
  a.rows = rows;
  a.inner = inner;
  a.cols = cols;
  a.student = student.data_ptr();
  a.s_stride_outer = student.stride(0);
  a.s_stride_inner = student.stride(1);
  a.num_teachers = k;
  for (int i = 0; i < k; ++i) {
    a.teachers[i] = teachers[i].data_ptr();
    a.t_stride_outer[i] = teachers[i].stride(0);
    a.t_stride_inner[i] = teachers[i].stride(1);
    a.kd_coef[i] = kd_coefs[i];
  }
  if (kd_row_weights.has_value()) {
    a.kd_row_weights = kd_row_weights->data_ptr();
    a.kd_row_weights_stride = kd_row_weights->stride(0);
  }
  if (ce_coef != 0.0) a.labels = labels->data_ptr<int64_t>();
  if (ce_row_weights.has_value()) a.ce_row_weights = ce_row_weights->data_ptr();
  a.ce_coef = ce_coef;
  a.temperature = temperature;
  a.label_smoothing = label_smoothing;
  a.ignore_index = ignore_index;

  out.row_loss = at::empty({rows}, student.options().dtype(acc_dtype));
  a.row_loss = out.row_loss.data_ptr();
  if (compute_grad) {
    out.grad = empty_output(student.sizes(), student.options());
    a.grad = out.grad.data_ptr();
  } else {
    out.grad = at::empty({0}, student.options());
  }
  return a;
}

}  // namespace fastkd
