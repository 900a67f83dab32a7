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
                                  at::TensorList sparse_ids, at::TensorList sparse_values,
                                  at::TensorList sparse_tails, int64_t divergence, double beta,
                                  KDLossBuffers& out) {
  check_rows3d(student, "student");
  const int64_t outer = student.size(0), inner = student.size(1), cols = student.size(2);
  const int64_t rows = outer * inner;
  TORCH_CHECK(rows > 0 && cols > 0, "fastkd: kd_loss needs at least one row and one class, got ",
              "student of shape ", student.sizes());
  const int64_t k = static_cast<int64_t>(teachers.size());
  const int64_t num_sparse = static_cast<int64_t>(sparse_ids.size());
  TORCH_CHECK(static_cast<int64_t>(sparse_values.size()) == num_sparse &&
                  static_cast<int64_t>(sparse_tails.size()) == num_sparse,
              "fastkd: sparse_ids, sparse_values and sparse_tails must hold one tensor per sparse "
              "teacher each, got ", num_sparse, ", ", sparse_values.size(), " and ",
              sparse_tails.size());
  const int64_t total = k + num_sparse;
  TORCH_CHECK(total >= 1 && total <= kMaxTeachers, "fastkd: kd_loss takes 1 to ", kMaxTeachers,
              " teachers, got ", total, " (", k, " dense, ", num_sparse, " sparse)");
  TORCH_CHECK(static_cast<int64_t>(kd_coefs.size()) == total, "fastkd: kd_coefs must hold one "
              "value per teacher (", total, ": ", k, " dense, then ", num_sparse, " sparse), got ",
              kd_coefs.size());
  for (double c : kd_coefs) TORCH_CHECK(std::isfinite(c), "fastkd: kd_coefs must be finite");
  const bool f64 = student.scalar_type() == at::kDouble;
  const at::ScalarType acc_dtype = f64 ? at::kDouble : at::kFloat;
  for (int64_t i = 0; i < k; ++i) {
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
  }
  // Sparse teacher j: ids int32 and values [rows, k_j] (1 <= k_j <= C), tails [rows], all
  // contiguous; values and tails in the accumulation dtype (see kd_loss.h).
  for (int64_t j = 0; j < num_sparse; ++j) {
    const at::Tensor& ids = sparse_ids[j];
    const at::Tensor& vals = sparse_values[j];
    const at::Tensor& tails = sparse_tails[j];
    TORCH_CHECK(ids.device() == student.device(), "fastkd: sparse_ids[", j, "] is on ",
                ids.device(), " but the student is on ", student.device());
    TORCH_CHECK(vals.device() == student.device(), "fastkd: sparse_values[", j, "] is on ",
                vals.device(), " but the student is on ", student.device());
    TORCH_CHECK(tails.device() == student.device(), "fastkd: sparse_tails[", j, "] is on ",
                tails.device(), " but the student is on ", student.device());
    TORCH_CHECK(ids.scalar_type() == at::kInt, "fastkd: sparse_ids[", j, "] must be int32, got ",
                ids.scalar_type());
    TORCH_CHECK(ids.dim() == 2 && ids.size(0) == rows && ids.size(1) >= 1 &&
                    ids.size(1) <= cols && ids.is_contiguous(),
                "fastkd: sparse_ids[", j, "] must be a contiguous [", rows, ", k] tensor with 1 <= k "
                "<= ", cols, " (rows and classes of the student), got shape ", ids.sizes(),
                " strides ", ids.strides());
    TORCH_CHECK(vals.scalar_type() == acc_dtype, "fastkd: sparse_values[", j, "] must be ",
                acc_dtype, " (the accumulation dtype of a ", student.scalar_type(),
                " student), got ", vals.scalar_type());
    TORCH_CHECK(vals.sizes() == ids.sizes() && vals.is_contiguous(), "fastkd: sparse_values[", j,
                "] must be contiguous with the shape of sparse_ids[", j, "] ", ids.sizes(),
                ", got shape ", vals.sizes(), " strides ", vals.strides());
    TORCH_CHECK(tails.scalar_type() == acc_dtype, "fastkd: sparse_tails[", j, "] must be ",
                acc_dtype, " (the accumulation dtype of a ", student.scalar_type(),
                " student), got ", tails.scalar_type());
    TORCH_CHECK(tails.dim() == 1 && tails.size(0) == rows && tails.is_contiguous(),
                "fastkd: sparse_tails[", j, "] must be a contiguous vector of ", rows,
                " values, got shape ", tails.sizes());
  }
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0.0,
              "fastkd: temperature must be a finite number > 0, got ", temperature);
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0,
              "fastkd: label_smoothing must be in [0, 1], got ", label_smoothing);
  TORCH_CHECK(std::isfinite(ce_coef), "fastkd: ce_coef must be finite");
  TORCH_CHECK(divergence == kForwardKL || divergence == kReverseKL || divergence == kJSD,
              "fastkd: divergence must be 0 (forward KL), 1 (reverse KL) or 2 (JSD), got ",
              divergence);
  TORCH_CHECK(divergence != kJSD || (beta > 0.0 && beta < 1.0),
              "fastkd: beta must be in (0, 1) for the JSD divergence, got ", beta);
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
    check_row_weights(*kd_row_weights, total, rows, acc_dtype, "kd_row_weights");
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
  a.num_teachers = static_cast<int>(k);
  for (int64_t i = 0; i < k; ++i) {
    a.teachers[i] = teachers[i].data_ptr();
    a.t_stride_outer[i] = teachers[i].stride(0);
    a.t_stride_inner[i] = teachers[i].stride(1);
  }
  for (int64_t i = 0; i < total; ++i) a.kd_coef[i] = kd_coefs[i];
  a.num_sparse = static_cast<int>(num_sparse);
  for (int64_t j = 0; j < num_sparse; ++j) {
    a.sparse_ids[j] = sparse_ids[j].data_ptr<int32_t>();
    a.sparse_values[j] = sparse_values[j].data_ptr();
    a.sparse_tails[j] = sparse_tails[j].data_ptr();
    a.sparse_k[j] = sparse_ids[j].size(1);
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
  a.divergence = static_cast<int>(divergence);
  a.beta = beta;

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
