// Arguments of the fused feature-regression kernels (fastkd::feature_regression_fwd), shared by the
// CPU and CUDA implementations. Plain data, so it can be passed to a CUDA kernel by value.
//
// One call holds several (student, teacher) pairs of equal shape [B, ...]; per pair, with
// D = numel / B elements per sample, c = weight / (B * D) ("mean") or weight ("sum"):
//   normalize = false:  loss = c * sum |a - b|^p,           grad = c * p * |d|^(p-1) sign(d)
//   normalize = true:   u = a / max(||a||, eps), v = b / max(||b||, eps) per sample (eps 1e-12),
//                       loss = c * sum |u - v|^p,
//                       grad = c * k * (g - u <u, g>) / ||a||   if ||a|| >= eps
//                              c * k * g / eps                   otherwise (u = a / eps is linear)
//                       with g = sign(u - v) (p = 1) or u - v (p = 2), k = p.
// sign(0) = 0, as in torch's abs backward. The total loss is the sum over pairs.
//
// Layout: each tensor is dense and sample-blocked (sample b occupies elements [b * D, (b + 1) * D)
// of its storage, in any order inside the block -- contiguous NCHW and channels_last both are),
// and a pair's student and teacher share one layout, so a pair is processed as two flat arrays and
// the gradient, allocated with the student's strides, is written at the same flat offsets.
#pragma once

#include <cstdint>

namespace fastkd {

// Pairs one CUDA launch takes (the launch arguments are passed by value).
constexpr int kMaxRegressionPairs = 8;
// F.normalize's default eps: norms below it are clamped to it.
constexpr double kRegressionEps = 1e-12;

struct RegressionPair {
  const void* student = nullptr;
  const void* teacher = nullptr;
  void* grad = nullptr;     // student's dtype and strides, or nullptr when not asked for
  int64_t samples = 0;      // B
  int64_t sample_len = 0;   // D
  double loss_scale = 0.0;  // c: weight / (B * D) for "mean", weight for "sum"
};

}  // namespace fastkd
