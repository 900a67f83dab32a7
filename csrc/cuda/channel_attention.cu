// fastkd::channel_attention_fwd / _bwd on CUDA: the channel-attention loss of Channel Distillation
// (Zhou et al., 2020) for every (student, teacher) pair of one call in one grouped launch per
// direction.
//
//   w_s[b, c] = mean_{h, w} S[b, c, h, w],   w_t[b, c] = mean_{h, w} T[b, c, h, w]
//   loss = sum_i coef_i * sum_{b, c} (w_s - w_t)^2          (coef_i = weight_i / (B C) for "mean")
//   dloss/dS[b, c, h, w] = diff[b, c] = 2 coef_i (w_s - w_t)[b, c] / (Hs Ws)
//
// Shapes: student [B, C, Hs, Ws] and teacher [B, C, Ht, Wt] per pair, float32/bfloat16/float16,
// any strides; diff: every pair's [B, C] block, float32; gradients: dense [B, C, Hs, Ws] in
// contiguous NCHW or channels_last.
//
// Forward: a flat grid over all pairs; block -> (pair, b, block of cb channels) through the
// pairs' block offsets (pairs passed by value). Each block reduces its channels of the student
// and then of the teacher, each map in its own memory order, with 16-byte loads:
//   * NCHW planes: a group of G = 256 / cb lanes per channel streams the plane's contiguous H*W
//     values -- a scalar head up to the first 16-byte boundary, 16-byte vectors, a scalar tail --
//     so adjacent lanes read adjacent vectors whatever H*W is (7 x 7 planes are not aligned);
//   * channels_last: cb / VEC lanes cover the block's channels with one 16-byte vector each (a
//     128-byte segment of the row at least) and the block's 256 / (cb / VEC) lane rows walk the
//     pixels; per-channel partials are then summed over the rows from shared memory;
//   * any other strides (crops in H or W): the NCHW grouping with 4-D scalar addressing.
// Then the block writes its diff entries and one float loss partial; a one-block kernel sums the
// partials in a fixed order in float64. No atomics anywhere, so results are bitwise reproducible.
// Backward: blocks over (pair, b, channel block, pixel span) write grad_output * diff with 16-byte
// stores in the gradient's memory format; grad_output is read on the device.
// Not split along pixels in the forward: a reduction over a split would need a second pass, and
// the stages of a CNN at training batch sizes give thousands of blocks per call already; a call
// with very few (b, c) planes of very large maps therefore runs on few SMs.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "channel_attention_op.h"

namespace fastkd {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxPairs = 8;
// Largest VEC (16-byte vector of 2-byte values): the channels_last row partials per block.
constexpr int kMaxVec = 8;
// 16-byte vectors (or rows) each thread stores per backward block.
constexpr int kStoresPerThread = 4;

template <typename T>
constexpr int vec_of() {
  return 16 / static_cast<int>(sizeof(T));
}

template <typename T>
__device__ __forceinline__ int64_t head_to_16(const T* x, int64_t n) {
  const int64_t head =
      static_cast<int64_t>((16 - (reinterpret_cast<uintptr_t>(x) & 15)) & 15) / sizeof(T);
  return head < n ? head : n;
}

// This lane's share of the sum of n contiguous values read by a group of G lanes.
template <typename T>
__device__ __forceinline__ float segment_sum(const T* x, int64_t n, int lane, int G) {
  constexpr int VEC = vec_of<T>();
  const int64_t head = head_to_16(x, n);
  float acc = 0.f;
  for (int64_t i = lane; i < head; i += G) acc += static_cast<float>(x[i]);
  const int64_t nvec = (n - head) / VEC;
  const uint4* v = reinterpret_cast<const uint4*>(x + head);
#pragma unroll 4
  for (int64_t i = lane; i < nvec; i += G) {
    const uint4 raw = __ldg(v + i);
    T e[VEC];
    memcpy(e, &raw, sizeof(raw));
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc += static_cast<float>(e[k]);
  }
  for (int64_t i = head + nvec * VEC + lane; i < n; i += G) acc += static_cast<float>(x[i]);
  return acc;
}

// Sum over each aligned group of G lanes (G a power of two <= 32); every lane of the warp calls it.
__device__ __forceinline__ float group_sum(float v, int G) {
  for (int off = G >> 1; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Means over (h, w) of channels [c0, c0 + cc) of sample b into out[0, cc). Every thread of the
// block calls it (shuffles and barriers inside).
template <typename T>
__device__ void channel_means_t(const CaMap& m, int64_t b, int64_t c0, int cc, int cb, float* red,
                                float* out) {
  const int64_t hw = m.H * m.W;
  const T* base = static_cast<const T*>(m.data) + b * m.stride_b + c0 * m.stride_c;
  if (m.layout == CaLayout::kChannelsLast) {
    constexpr int VEC = vec_of<T>();
    const int tc = cb / VEC;
    const int rows = kThreads / tc;
    const int r = threadIdx.x / tc;
    const int j0 = (threadIdx.x % tc) * VEC;
    const int64_t P = m.pixel_stride;
    float acc[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[k] = 0.f;
    if (j0 < cc) {
      const T* x = base + j0 * m.stride_c;
      if (m.vec_aligned && j0 + VEC <= cc) {
#pragma unroll 4
        for (int64_t p = r; p < hw; p += rows) {
          const uint4 raw = __ldg(reinterpret_cast<const uint4*>(x + p * P));
          T e[VEC];
          memcpy(e, &raw, sizeof(raw));
#pragma unroll
          for (int k = 0; k < VEC; ++k) acc[k] += static_cast<float>(e[k]);
        }
      } else {
        for (int64_t p = r; p < hw; p += rows) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            if (j0 + k < cc) acc[k] += static_cast<float>(x[p * P + k * m.stride_c]);
          }
        }
      }
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) red[r * cb + j0 + k] = acc[k];
    __syncthreads();
    if (threadIdx.x < cc) {
      float s = 0.f;
      for (int i = 0; i < rows; ++i) s += red[i * cb + threadIdx.x];
      out[threadIdx.x] = s / static_cast<float>(hw);
    }
    __syncthreads();  // `red` is reused by the next map
    return;
  }
  const int G = kThreads / cb;
  const int group = threadIdx.x / G;
  const int lane = threadIdx.x % G;
  float acc = 0.f;
  if (group < cc) {
    const T* plane = base + group * m.stride_c;
    if (m.layout == CaLayout::kPlanar) {
      acc = segment_sum(plane, hw, lane, G);
    } else {
      for (int64_t h = 0; h < m.H; ++h) {
        const T* line = plane + h * m.stride_h;
        for (int64_t w = lane; w < m.W; w += G) acc += static_cast<float>(line[w * m.stride_w]);
      }
    }
  }
  acc = group_sum(acc, G);
  if (lane == 0 && group < cc) out[group] = acc / static_cast<float>(hw);
}

__device__ void channel_means(const CaMap& m, int64_t b, int64_t c0, int cc, int cb, float* red,
                              float* out) {
  switch (m.dtype) {
    case CaDtype::kBFloat16:
      return channel_means_t<c10::BFloat16>(m, b, c0, cc, cb, red, out);
    case CaDtype::kHalf:
      return channel_means_t<c10::Half>(m, b, c0, cc, cb, red, out);
    default:
      return channel_means_t<float>(m, b, c0, cc, cb, red, out);
  }
}

// Sum over the block in a fixed order; the result is valid in thread 0.
__device__ __forceinline__ float block_sum(float v, float* warp_sums) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = v;
  __syncthreads();
  float total = 0.f;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kWarps; ++w) total += warp_sums[w];
  }
  return total;
}

__device__ __forceinline__ int find_pair(int num_pairs, const int64_t* block_begin, int64_t block) {
  int k = 0;
  while (k + 1 < num_pairs && block >= block_begin[k + 1]) ++k;
  return k;
}

struct FwdParams {
  int num_pairs;
  CaMap s[kMaxPairs], t[kMaxPairs];
  int64_t C[kMaxPairs];
  int cb[kMaxPairs];  // channels per block: a power of two in [8, 256]
  int64_t c_blocks[kMaxPairs];
  int64_t block_begin[kMaxPairs + 1];
  float coef[kMaxPairs], grad_scale[kMaxPairs];
  int64_t diff_offset[kMaxPairs];
  float* diff;
  float* block_loss;  // one partial per block of this launch
};

__global__ void __launch_bounds__(kThreads)
    channel_attention_fwd_kernel(const __grid_constant__ FwdParams p) {
  __shared__ float w_s[kThreads];
  __shared__ float w_t[kThreads];
  __shared__ float red[kThreads * kMaxVec];
  __shared__ float warp_sums[kWarps];
  const int64_t block = blockIdx.x;
  const int k = find_pair(p.num_pairs, p.block_begin, block);
  const int64_t local = block - p.block_begin[k];
  const int64_t b = local / p.c_blocks[k];
  const int cb = p.cb[k];
  const int64_t C = p.C[k];
  const int64_t c0 = (local - b * p.c_blocks[k]) * cb;
  const int cc = static_cast<int>(C - c0 < cb ? C - c0 : cb);
  channel_means(p.s[k], b, c0, cc, cb, red, w_s);
  channel_means(p.t[k], b, c0, cc, cb, red, w_t);
  __syncthreads();
  float sq = 0.f;
  if (static_cast<int>(threadIdx.x) < cc) {
    const float d = w_s[threadIdx.x] - w_t[threadIdx.x];
    p.diff[p.diff_offset[k] + b * C + c0 + threadIdx.x] = d * p.grad_scale[k];
    sq = d * d;
  }
  const float total = block_sum(sq, warp_sums);
  if (threadIdx.x == 0) p.block_loss[block] = p.coef[k] * total;
}

__global__ void __launch_bounds__(kThreads)
    channel_attention_loss_kernel(const float* __restrict__ block_loss, int64_t n,
                                  float* __restrict__ loss) {
  __shared__ double part[kThreads];
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) acc += block_loss[i];
  part[threadIdx.x] = acc;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (static_cast<int>(threadIdx.x) < s) part[threadIdx.x] += part[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) *loss = static_cast<float>(part[0]);
}

struct BwdParams {
  int num_pairs;
  void* grad[kMaxPairs];
  const float* diff[kMaxPairs];
  CaDtype dtype[kMaxPairs];
  bool channels_last[kMaxPairs];
  int64_t C[kMaxPairs], HW[kMaxPairs];
  int cb[kMaxPairs];
  int64_t c_blocks[kMaxPairs], splits[kMaxPairs], span[kMaxPairs];  // span: pixels per block
  int64_t block_begin[kMaxPairs + 1];
  const float* grad_output;
};

template <typename T>
__device__ __forceinline__ uint4 splat(const T (&e)[vec_of<T>()]) {
  uint4 raw;
  memcpy(&raw, e, sizeof(raw));
  return raw;
}

template <typename T>
__device__ void fill_block(const BwdParams& p, int k, int64_t b, int64_t c0, int cc, int64_t q0,
                           int64_t q1, float g) {
  constexpr int VEC = vec_of<T>();
  const int cb = p.cb[k];
  const int64_t C = p.C[k], HW = p.HW[k];
  const float* diff = p.diff[k] + b * C + c0;
  T* grad = static_cast<T*>(p.grad[k]);
  if (p.channels_last[k]) {
    const int tc = cb / VEC;
    const int rows = kThreads / tc;
    const int r = threadIdx.x / tc;
    const int j0 = (threadIdx.x % tc) * VEC;
    if (j0 >= cc) return;
    T e[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) e[i] = static_cast<T>(j0 + i < cc ? g * diff[j0 + i] : 0.f);
    T* x = grad + b * HW * C + c0 + j0;
    if (j0 + VEC <= cc && C % VEC == 0) {
      const uint4 raw = splat<T>(e);
#pragma unroll 4
      for (int64_t q = q0 + r; q < q1; q += rows) *reinterpret_cast<uint4*>(x + q * C) = raw;
    } else {
      for (int64_t q = q0 + r; q < q1; q += rows) {
        for (int i = 0; i < VEC && j0 + i < cc; ++i) x[q * C + i] = e[i];
      }
    }
    return;
  }
  const int G = kThreads / cb;
  const int group = threadIdx.x / G;
  const int lane = threadIdx.x % G;
  if (group >= cc) return;
  const T v = static_cast<T>(g * diff[group]);
  T* x = grad + (b * C + c0 + group) * HW + q0;
  const int64_t n = q1 - q0;
  const int64_t head = head_to_16(x, n);
  for (int64_t i = lane; i < head; i += G) x[i] = v;
  T e[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) e[i] = v;
  const uint4 raw = splat<T>(e);
  const int64_t nvec = (n - head) / VEC;
  uint4* out = reinterpret_cast<uint4*>(x + head);
#pragma unroll 4
  for (int64_t i = lane; i < nvec; i += G) out[i] = raw;
  for (int64_t i = head + nvec * VEC + lane; i < n; i += G) x[i] = v;
}

__global__ void __launch_bounds__(kThreads)
    channel_attention_bwd_kernel(const __grid_constant__ BwdParams p) {
  const int64_t block = blockIdx.x;
  const int k = find_pair(p.num_pairs, p.block_begin, block);
  int64_t local = block - p.block_begin[k];
  const int64_t split = local % p.splits[k];
  local /= p.splits[k];
  const int64_t b = local / p.c_blocks[k];
  const int cb = p.cb[k];
  const int64_t c0 = (local - b * p.c_blocks[k]) * cb;
  const int cc = static_cast<int>(p.C[k] - c0 < cb ? p.C[k] - c0 : cb);
  const int64_t q0 = split * p.span[k];
  const int64_t q1 = q0 + p.span[k] < p.HW[k] ? q0 + p.span[k] : p.HW[k];
  const float g = *p.grad_output;
  switch (p.dtype[k]) {
    case CaDtype::kBFloat16:
      return fill_block<c10::BFloat16>(p, k, b, c0, cc, q0, q1, g);
    case CaDtype::kHalf:
      return fill_block<c10::Half>(p, k, b, c0, cc, q0, q1, g);
    default:
      return fill_block<float>(p, k, b, c0, cc, q0, q1, g);
  }
}

int pow2_at_least(int64_t x, int cap) {
  int v = 1;
  while (v < x && v < cap) v <<= 1;
  return v;
}

// Channels per block a map prefers: channels_last wants a 128-byte segment of every row (one
// 16-byte vector per lane); NCHW wants lanes per plane so that each does at least two vectors.
int preferred_channels(CaLayout layout, CaDtype dtype, int64_t hw) {
  const int es = static_cast<int>(ca_element_size(dtype));
  if (layout == CaLayout::kChannelsLast) return 128 / es;
  const int64_t vec = 16 / es;
  return kThreads / pow2_at_least((hw + 2 * vec - 1) / (2 * vec), 32);
}

int channels_per_block(int preferred, int64_t C) {
  return std::min(preferred, std::max(8, pow2_at_least(C, kThreads)));
}

void check_grid(int64_t blocks) {
  TORCH_CHECK(blocks <= INT_MAX, "fastkd: channel attention input too large for one launch (",
              blocks, " blocks)");
}

std::tuple<at::Tensor, at::Tensor> channel_attention_fwd_cuda(at::TensorList students,
                                                              at::TensorList teachers,
                                                              at::ArrayRef<double> weights,
                                                              bool mean) {
  at::Tensor diff;
  const std::vector<CaPair> pairs =
      prepare_channel_attention_fwd(students, teachers, weights, mean, diff);
  TORCH_CHECK(diff.scalar_type() == at::kFloat,
              "fastkd: float64 channel attention runs on the CPU backend only");
  TORCH_CHECK(students[0].is_cuda(), "fastkd: channel_attention_fwd (CUDA) got maps on ",
              students[0].device());
  const c10::cuda::CUDAGuard guard(students[0].device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  const int64_t n = static_cast<int64_t>(pairs.size());
  std::vector<int> cb(n);
  std::vector<int64_t> c_blocks(n), blocks(n);
  int64_t total_blocks = 0;
  for (int64_t i = 0; i < n; ++i) {
    const CaPair& q = pairs[i];
    const int pref = std::max(
        preferred_channels(q.student.layout, q.student.dtype, q.student.H * q.student.W),
        preferred_channels(q.teacher.layout, q.teacher.dtype, q.teacher.H * q.teacher.W));
    cb[i] = channels_per_block(pref, q.C);
    c_blocks[i] = (q.C + cb[i] - 1) / cb[i];
    blocks[i] = q.B * c_blocks[i];
    total_blocks += blocks[i];
  }
  at::Tensor block_loss = at::empty({total_blocks}, diff.options());
  at::Tensor loss = at::empty({}, diff.options());
  int64_t done = 0;
  for (int64_t first = 0; first < n; first += kMaxPairs) {
    FwdParams prm{};
    prm.num_pairs = static_cast<int>(std::min<int64_t>(kMaxPairs, n - first));
    prm.block_begin[0] = 0;
    for (int j = 0; j < prm.num_pairs; ++j) {
      const CaPair& q = pairs[first + j];
      prm.s[j] = q.student;
      prm.t[j] = q.teacher;
      prm.C[j] = q.C;
      prm.cb[j] = cb[first + j];
      prm.c_blocks[j] = c_blocks[first + j];
      prm.block_begin[j + 1] = prm.block_begin[j] + blocks[first + j];
      prm.coef[j] = static_cast<float>(q.coef);
      prm.grad_scale[j] = static_cast<float>(q.grad_scale);
      prm.diff_offset[j] = q.diff_offset;
    }
    prm.diff = diff.data_ptr<float>();
    prm.block_loss = block_loss.data_ptr<float>() + done;
    const int64_t grid = prm.block_begin[prm.num_pairs];
    check_grid(grid);
    channel_attention_fwd_kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(prm);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    done += grid;
  }
  channel_attention_loss_kernel<<<1, kThreads, 0, stream>>>(block_loss.data_ptr<float>(), done,
                                                             loss.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, diff};
}

std::vector<at::Tensor> channel_attention_bwd_cuda(at::TensorList diffs,
                                                   const at::Tensor& grad_output,
                                                   at::IntArrayRef sizes,
                                                   const c10::List<bool>& channels_last,
                                                   at::ScalarType dtype) {
  std::vector<at::Tensor> grads;
  const std::vector<CaGrad> args =
      prepare_channel_attention_bwd(diffs, grad_output, sizes, channels_last, dtype, grads);
  if (args.empty()) return grads;
  TORCH_CHECK(grad_output.is_cuda() && grad_output.scalar_type() == at::kFloat,
              "fastkd: channel_attention_bwd (CUDA) needs a float32 CUDA grad_output, got ",
              grad_output.scalar_type(), " on ", grad_output.device());
  const c10::cuda::CUDAGuard guard(grad_output.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  const int64_t n = static_cast<int64_t>(args.size());
  for (int64_t first = 0; first < n; first += kMaxPairs) {
    BwdParams prm{};
    prm.num_pairs = static_cast<int>(std::min<int64_t>(kMaxPairs, n - first));
    prm.block_begin[0] = 0;
    for (int j = 0; j < prm.num_pairs; ++j) {
      const CaGrad& g = args[first + j];
      TORCH_CHECK(g.dtype != CaDtype::kDouble,
                  "fastkd: float64 channel attention runs on the CPU backend only");
      const CaLayout layout = g.channels_last ? CaLayout::kChannelsLast : CaLayout::kPlanar;
      const int cb = channels_per_block(preferred_channels(layout, g.dtype, g.HW), g.C);
      const int vec = 16 / static_cast<int>(ca_element_size(g.dtype));
      const int64_t span = g.channels_last ? int64_t{kThreads / (cb / vec)} * kStoresPerThread
                                           : int64_t{kThreads / cb} * vec * kStoresPerThread;
      prm.grad[j] = g.data;
      prm.diff[j] = static_cast<const float*>(g.diff);
      prm.dtype[j] = g.dtype;
      prm.channels_last[j] = g.channels_last;
      prm.C[j] = g.C;
      prm.HW[j] = g.HW;
      prm.cb[j] = cb;
      prm.c_blocks[j] = (g.C + cb - 1) / cb;
      prm.span[j] = span;
      prm.splits[j] = (g.HW + span - 1) / span;
      prm.block_begin[j + 1] = prm.block_begin[j] + g.B * prm.c_blocks[j] * prm.splits[j];
    }
    prm.grad_output = grad_output.data_ptr<float>();
    const int64_t grid = prm.block_begin[prm.num_pairs];
    check_grid(grid);
    channel_attention_bwd_kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(prm);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return grads;
}

}  // namespace
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("channel_attention_fwd", &fastkd::channel_attention_fwd_cuda);
  m.impl("channel_attention_bwd", &fastkd::channel_attention_bwd_cuda);
}
