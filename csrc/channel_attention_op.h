// Shared by the CPU and CUDA implementations of fastkd::channel_attention_fwd / _bwd: checks the
// ops' arguments, allocates their outputs and fills CaPair / CaGrad. Device-specific code only
// runs the kernels.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/MemoryFormat.h>

#include <cmath>
#include <vector>

#include "block_cache.h"
#include "channel_attention.h"
#include "checks.h"

namespace fastkd {

inline CaDtype ca_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return CaDtype::kFloat;
    case at::kBFloat16:
      return CaDtype::kBFloat16;
    case at::kHalf:
      return CaDtype::kHalf;
    case at::kDouble:
      return CaDtype::kDouble;
    default:
      TORCH_CHECK(false, "fastkd: channel attention takes float32, bfloat16, float16 or float64 "
                  "maps, got ", t);
  }
}

inline void check_feature_map(const at::Tensor& t, const char* name, size_t i) {
  TORCH_CHECK(t.dim() == 4, "fastkd: ", name, "[", i, "] must be 4-D [B, C, H, W], got ", t.dim(),
              "-D");
  TORCH_CHECK(is_float_dtype(t.scalar_type()), "fastkd: ", name, "[", i,
              "] must be float32, bfloat16, float16 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.numel() > 0, "fastkd: ", name, "[", i, "] must not be empty, got shape ",
              t.sizes());
  const int64_t es = t.element_size();
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % es == 0, "fastkd: ", name, "[", i,
              "] is not aligned to its element size");
}

// Fills one CaPair per (student, teacher) and allocates `diff`: [sum_i B_i C_i], float32 (float64
// for float64 maps).
inline std::vector<CaPair> prepare_channel_attention_fwd(at::TensorList students,
                                                         at::TensorList teachers,
                                                         at::ArrayRef<double> weights, bool mean,
                                                         at::Tensor& diff) {
  const size_t n = students.size();
  TORCH_CHECK(n >= 1, "fastkd: channel_attention_fwd needs at least one (student, teacher) pair");
  TORCH_CHECK(teachers.size() == n, "fastkd: channel_attention_fwd got ", n, " students but ",
              teachers.size(), " teachers");
  TORCH_CHECK(weights.size() == n, "fastkd: channel_attention_fwd needs one weight per pair (", n,
              "), got ", weights.size());
  const bool f64 = students[0].scalar_type() == at::kDouble;
  std::vector<CaPair> pairs(n);
  int64_t offset = 0;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& s = students[i];
    const at::Tensor& t = teachers[i];
    check_feature_map(s, "students", i);
    check_feature_map(t, "teachers", i);
    check_same_device(students[0], s, "student");
    check_same_device(students[0], t, "teacher");
    TORCH_CHECK(s.size(0) == t.size(0) && s.size(1) == t.size(1), "fastkd: pair ", i,
                ": student and teacher must share batch size and channel count, got student ",
                s.sizes(), " and teacher ", t.sizes());
    TORCH_CHECK((s.scalar_type() == at::kDouble) == f64 && (t.scalar_type() == at::kDouble) == f64,
                "fastkd: float64 maps must be float64 for every student and teacher alike");
    TORCH_CHECK(std::isfinite(weights[i]), "fastkd: weights must be finite, got ", weights[i]);
    CaPair& p = pairs[i];
    p.student = ca_make_map(s.data_ptr(), ca_dtype(s.scalar_type()), s.sizes().data(),
                            s.strides().data());
    p.teacher = ca_make_map(t.data_ptr(), ca_dtype(t.scalar_type()), t.sizes().data(),
                            t.strides().data());
    p.B = s.size(0);
    p.C = s.size(1);
    p.coef = mean ? weights[i] / static_cast<double>(p.B * p.C) : weights[i];
    p.grad_scale = 2.0 * p.coef / static_cast<double>(s.size(2) * s.size(3));
    p.diff_offset = offset;
    offset += p.B * p.C;
  }
  diff = at::empty({offset}, students[0].options().dtype(f64 ? at::kDouble : at::kFloat));
  return pairs;
}

// Checks the backward's arguments and allocates every gradient (dense, contiguous NCHW or
// channels_last as asked).
inline std::vector<CaGrad> prepare_channel_attention_bwd(at::TensorList diffs,
                                                         const at::Tensor& grad_output,
                                                         at::IntArrayRef sizes,
                                                         const c10::List<bool>& channels_last,
                                                         at::ScalarType dtype,
                                                         std::vector<at::Tensor>& grads) {
  const size_t n = diffs.size();
  TORCH_CHECK(sizes.size() == 4 * n && channels_last.size() == n,
              "fastkd: channel_attention_bwd needs 4 sizes and one channels_last flag per diff (", n,
              " diffs), got ", sizes.size(), " and ", channels_last.size());
  TORCH_CHECK(is_float_dtype(dtype), "fastkd: channel_attention_bwd writes float32, bfloat16, "
              "float16 or float64 gradients, got ", dtype);
  const bool f64 = dtype == at::kDouble;
  TORCH_CHECK(grad_output.dim() == 0 && (grad_output.scalar_type() == at::kFloat ||
                                         grad_output.scalar_type() == at::kDouble),
              "fastkd: grad_output must be a float32 or float64 scalar, got ",
              grad_output.scalar_type(), " of shape ", grad_output.sizes());
  std::vector<CaGrad> out(n);
  grads.clear();
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& d = diffs[i];
    const int64_t B = sizes[4 * i], C = sizes[4 * i + 1], H = sizes[4 * i + 2],
                  W = sizes[4 * i + 3];
    TORCH_CHECK(B > 0 && C > 0 && H > 0 && W > 0, "fastkd: gradient ", i,
                " must not be empty, got sizes [", B, ", ", C, ", ", H, ", ", W, "]");
    TORCH_CHECK(d.device() == grad_output.device(), "fastkd: diff ", i, " is on ", d.device(),
                " but grad_output is on ", grad_output.device());
    TORCH_CHECK(d.scalar_type() == (f64 ? at::kDouble : at::kFloat), "fastkd: diff ", i, " must be ",
                (f64 ? "float64" : "float32"), " for a ", dtype, " gradient, got ",
                d.scalar_type());
    TORCH_CHECK(d.dim() == 2 && d.size(0) == B && d.size(1) == C && d.is_contiguous(),
                "fastkd: diff ", i, " must be a contiguous [", B, ", ", C, "] tensor, got shape ",
                d.sizes());
    const bool cl = channels_last.get(i) && C > 1 && H * W > 1;
    grads.push_back(empty_output({B, C, H, W},
                              d.options().dtype(dtype).memory_format(
                                  cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous)));
    CaGrad& g = out[i];
    g.data = grads.back().data_ptr();
    g.dtype = ca_dtype(dtype);
    g.channels_last = cl;
    g.diff = d.data_ptr();
    g.B = B;
    g.C = C;
    g.HW = H * W;
  }
  return out;
}

}  // namespace fastkd
