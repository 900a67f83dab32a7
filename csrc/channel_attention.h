// Arguments of the channel-attention (Channel Distillation) kernels, shared by the CPU and CUDA
// implementations of fastkd::channel_attention_fwd / _bwd. Plain data, so it can be passed to a
// CUDA kernel by value.
//
// For pair i with student S [B, C, Hs, Ws] and teacher T [B, C, Ht, Wt]:
//   w_s[b, c] = mean_{h, w} S[b, c, h, w],   w_t[b, c] = mean_{h, w} T[b, c, h, w]
//   d[b, c] = w_s[b, c] - w_t[b, c]
//   loss = sum_i coef_i * sum_{b, c} d_i[b, c]^2          (coef_i = weight_i / (B C) for "mean")
//   diff_i[b, c] = grad_scale_i * d_i[b, c],   grad_scale_i = 2 coef_i / (Hs Ws)
//   dloss/dS[b, c, h, w] = diff_i[b, c]                   (the same value at every (h, w))
#pragma once

#include <cstdint>

namespace fastkd {

enum class CaDtype : int32_t { kFloat = 0, kBFloat16 = 1, kHalf = 2, kDouble = 3 };

// How a map's (H, W) plane is laid out. Pixel p = h * W + w.
//   kPlanar:       each (b, c) plane is contiguous: pixel p at p (contiguous NCHW, C/B slices).
//   kChannelsLast: channel stride 1 and pixels evenly spaced: pixel p at p * pixel_stride
//                  (channels_last, and its slices along B or C).
//   kStrided:      anything else (e.g. a crop in H or W): full 4-D addressing.
enum class CaLayout : int32_t { kPlanar = 0, kChannelsLast = 1, kStrided = 2 };

struct CaMap {
  const void* data = nullptr;
  CaDtype dtype = CaDtype::kFloat;
  CaLayout layout = CaLayout::kStrided;
  // kChannelsLast only: every 16-byte group of channels starting at a multiple of 16 bytes / the
  // element size is 16-byte aligned in every row (base, batch stride and pixel stride aligned).
  bool vec_aligned = false;
  int64_t stride_b = 0, stride_c = 0, stride_h = 0, stride_w = 0;  // in elements
  int64_t H = 0, W = 0;
  int64_t pixel_stride = 0;  // kPlanar (1) and kChannelsLast
};

struct CaPair {
  CaMap student, teacher;
  int64_t B = 0, C = 0;
  double coef = 0.0;        // see above
  double grad_scale = 0.0;  // 2 coef / (Hs Ws)
  int64_t diff_offset = 0;  // start of this pair's [B, C] block in the diff buffer
};

// One student gradient of fastkd::channel_attention_bwd: a fresh dense [B, C, H, W] tensor in
// contiguous NCHW or channels_last, filled with grad_output * diff[b, c].
struct CaGrad {
  void* data = nullptr;
  CaDtype dtype = CaDtype::kFloat;
  bool channels_last = false;
  const void* diff = nullptr;  // [B, C] contiguous, float32 (float64 for float64 gradients)
  int64_t B = 0, C = 0, HW = 0;
};

inline int64_t ca_element_size(CaDtype t) {
  return t == CaDtype::kDouble ? 8 : t == CaDtype::kFloat ? 4 : 2;
}

// Classifies a [B, C, H, W] map from its sizes and strides.
inline CaMap ca_make_map(const void* data, CaDtype dtype, const int64_t* sizes,
                         const int64_t* strides) {
  CaMap m;
  m.data = data;
  m.dtype = dtype;
  m.stride_b = strides[0];
  m.stride_c = strides[1];
  m.stride_h = strides[2];
  m.stride_w = strides[3];
  m.H = sizes[2];
  m.W = sizes[3];
  const int64_t C = sizes[1], HW = m.H * m.W;
  // Pixels evenly spaced, so pixel p = h * W + w sits at p * pixel_stride. Size-1 dims carry
  // arbitrary strides and are ignored.
  bool uniform = true;
  int64_t P = 0;
  if (HW == 1) {
    P = 0;
  } else if (m.W == 1) {
    P = m.stride_h;
  } else if (m.H == 1) {
    P = m.stride_w;
  } else {
    P = m.stride_w;
    uniform = m.stride_h == m.W * m.stride_w;
  }
  const bool channel_inner = C == 1 || m.stride_c == 1;
  if (uniform && HW > 1 && P == 1) {
    m.layout = CaLayout::kPlanar;
  } else if (uniform && channel_inner) {
    m.layout = CaLayout::kChannelsLast;
  } else if (HW == 1) {
    m.layout = CaLayout::kPlanar;  // one-element planes
  } else {
    m.layout = CaLayout::kStrided;
  }
  m.pixel_stride = m.layout == CaLayout::kPlanar ? 1 : P;
  const int64_t es = ca_element_size(dtype);
  m.vec_aligned = m.layout == CaLayout::kChannelsLast &&
                  reinterpret_cast<uintptr_t>(data) % 16 == 0 && (m.stride_b * es) % 16 == 0 &&
                  (m.pixel_stride * es) % 16 == 0;
  return m;
}

}  // namespace fastkd
