// fastkd::feature_regression_fwd on CUDA: FitNet hints / neighbourhood distillation (MSE), L1, and
// the FEED / Factor-Transfer loss (L1 between per-sample L2-normalised maps), all pairs of one call
// in one launch.
//
//   per pair, c = weight / (B * D) ("mean") or weight ("sum"), D = numel / B:
//   normalize = false:  loss = c * sum |a - b|^p,  grad = c * p * |d|^(p-1) sign(d),  d = a - b
//   normalize = true:   u = a / max(||a||, eps), v = b / max(||b||, eps) per sample, d = u - v,
//                       g = sign(d) (p = 1) or d (p = 2), loss = c * sum |d|^p,
//                       grad = c * p * (g - u <u, g>) / ||a||   (||a|| >= eps)
//                              c * p * g / eps                   (||a|| < eps: u = a / eps)
//
// Shapes: each pair is two tensors of one shape [B, ...] in one dense, sample-blocked layout
// (csrc/feature_regression.h), read as flat arrays; the gradient has the student's strides.
//
// Grouped launch: the grid is the concatenation of every pair's blocks; a block finds its pair by
// scanning the (at most 8) pairs' first block indices, which travel by value in the launch
// arguments. Loads are 16 bytes per tensor and thread step (8 elements: one 16-byte load of a
// 16-bit type, two of float32), consecutive threads on consecutive bytes, whenever a block's start
// addresses are 16-byte aligned; otherwise (odd views, odd sample sizes) element loads.
//
// normalize = false: a block owns kPlainItem consecutive elements, issues all its loads before
// using them, writes the gradient and one loss partial. Every element is read once.
// normalize = true: a block (128 to 1024 threads, by sample length) owns one sample, because the
// per-sample sums gate the next sweep: sweep 1 takes ||a|| and ||b||; sweep 2 the loss and <u, g>,
// running backwards so that it starts on the data sweep 1 read last; sweep 3 writes the gradient.
// The re-reads come from L2 while the samples in flight fit in it (estimated: ResNet stages 3-4
// and token features at B = 64 on a 50 MB L2; for stage 1, 102 MB of fp32 inputs, only the part
// each block read last), otherwise from DRAM. Parallelism is the total number of samples, so a
// call with fewer samples than SMs underuses the GPU.
//
// Determinism: every sum is a fixed-shape block reduction (butterfly shuffles, then warp partials
// added in warp order); each block stores its loss partial in its own slot, and the last block to
// finish (an integer ticket, no float atomics) adds the slots in a fixed order in float64. No host
// synchronisation; the ticket counter is cleared with cudaMemsetAsync on the current stream, so
// the call is CUDA-graph capturable.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>

#include "cuda/memory.cuh"
#include "feature_regression_op.h"

namespace fastkd {
namespace {

constexpr int kVec = 8;  // elements per thread step
constexpr int kPlainThreads = 256;
constexpr int kPlainUnroll = 4;
constexpr int64_t kPlainItem = int64_t{kPlainThreads} * kVec * kPlainUnroll;  // 8192
constexpr int kNormMaxThreads = 1024;
constexpr int kMaxWarps = 32;
constexpr float kEps = static_cast<float>(kRegressionEps);

struct LaunchPair {
  const void* student;
  const void* teacher;
  void* grad;            // nullptr: no gradient for this pair
  int64_t len;           // numel (plain) or D (normalized)
  int64_t first_block;   // first block of this pair in the grid
  float loss_scale;      // c
  float grad_scale;      // c * p
};

struct LaunchArgs {
  LaunchPair pairs[kMaxRegressionPairs];
  int num_pairs;
  float* partials;         // [gridDim.x]
  unsigned int* counter;   // zero before the launch
  float* loss;             // scalar
};

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&out)[kVec]) {
  cuda::load_as<kVec>(p, out);
}

// float16 saturates at +-65504 (an all-zero sample's gradient under normalisation is about
// c / eps); NaN stays NaN.
template <typename T>
__device__ __forceinline__ float saturate(float x) {
  if constexpr (std::is_same_v<T, c10::Half>) {
    x = x > 65504.f ? 65504.f : (x < -65504.f ? -65504.f : x);
  }
  return x;
}

template <typename T>
__device__ __forceinline__ T to_out(float x) {
  return static_cast<T>(saturate<T>(x));
}

template <typename T>
__device__ __forceinline__ void store8(T* p, float (&in)[kVec]) {
#pragma unroll
  for (int e = 0; e < kVec; ++e) in[e] = saturate<T>(in[e]);
  cuda::store_as<kVec>(p, in);
}

template <int P>
__device__ __forceinline__ float err(float d) {
  return P == 2 ? d * d : fabsf(d);
}

// The loss's derivative direction: d for p = 2, sign(d) for p = 1 with sign(0) = 0.
template <int P>
__device__ __forceinline__ float dir(float d) {
  if constexpr (P == 2) {
    return d;
  } else {
    return static_cast<float>((d > 0.f) - (d < 0.f));
  }
}

// Sums N values over the block; every thread gets the same bits. smem holds N * kMaxWarps.
template <int N, typename acc_t>
__device__ __forceinline__ void block_sum(acc_t (&v)[N], acc_t* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
  for (int k = 0; k < N; ++k) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v[k] += __shfl_xor_sync(0xffffffffu, v[k], off);
  }
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) smem[k * kMaxWarps + warp] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < N; ++k) {
    acc_t total = 0;
    for (int w = 0; w < warps; ++w) total += smem[k * kMaxWarps + w];
    v[k] = total;
  }
  __syncthreads();
}

// Calls f(a, b, offset) for each aligned 8-element group of [0, n) and f1(a, b, offset) for
// every other element, block-strided. Backwards when `reverse` (whole block steps reversed).
template <typename S, typename T, typename F8, typename F1>
__device__ __forceinline__ void sweep(const S* s, const T* t, int64_t n, bool vec, bool reverse,
                                      const F8& f8, const F1& f1) {
  int64_t scalar_from = 0;
  if (vec) {
    const int64_t groups = n / kVec;
    const int64_t steps = (groups + blockDim.x - 1) / blockDim.x;
    for (int64_t i = 0; i < steps; ++i) {
      const int64_t q = (reverse ? steps - 1 - i : i) * blockDim.x + threadIdx.x;
      if (q < groups) {
        float a[kVec], b[kVec];
        load8(s + q * kVec, a);
        load8(t + q * kVec, b);
        f8(a, b, q * kVec);
      }
    }
    scalar_from = groups * kVec;
  }
  for (int64_t i = scalar_from + threadIdx.x; i < n; i += blockDim.x) {
    f1(static_cast<float>(s[i]), static_cast<float>(t[i]), i);
  }
}

// One block per sample of a normalized pair; returns the sample's loss partial (times c).
template <int P, typename S, typename T>
__device__ float normalized_sample(const LaunchPair& pr, int64_t sample, float* smem) {
  const int64_t D = pr.len;
  const S* s = static_cast<const S*>(pr.student) + sample * D;
  const T* t = static_cast<const T*>(pr.teacher) + sample * D;
  S* g = pr.grad != nullptr ? static_cast<S*>(pr.grad) + sample * D : nullptr;
  const bool vec = aligned16(s) && aligned16(t) && (g == nullptr || aligned16(g));

  float sq[2] = {0.f, 0.f};
  sweep(
      s, t, D, vec, false,
      [&](const float (&a)[kVec], const float (&b)[kVec], int64_t) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          sq[0] = fmaf(a[e], a[e], sq[0]);
          sq[1] = fmaf(b[e], b[e], sq[1]);
        }
      },
      [&](float a, float b, int64_t) {
        sq[0] = fmaf(a, a, sq[0]);
        sq[1] = fmaf(b, b, sq[1]);
      });
  block_sum<2>(sq, smem);
  // IEEE sqrt and division: the build uses --use_fast_math, whose approximations would differ
  // from the reference by more than rounding at these per-sample factors.
  const float na = __fsqrt_rn(sq[0]), nb = __fsqrt_rn(sq[1]);
  const float ia = __fdiv_rn(1.f, fmaxf(na, kEps));
  // d = (a - r b) / ||a|| with r = ||a|| / ||b||, not a / ||a|| - b / ||b||: nvcc fuses one of
  // the latter's products into the subtraction, which would make d nonzero for equal samples
  // (sign(d) = +-1 where it must be 0); the former is exact there (r = 1).
  const float r = __fdiv_rn(fmaxf(na, kEps), fmaxf(nb, kEps));
  const bool want_dot = g != nullptr && na >= kEps;

  float ld[2] = {0.f, 0.f};
  sweep(
      s, t, D, vec, true,
      [&](const float (&a)[kVec], const float (&b)[kVec], int64_t) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          const float u = a[e] * ia, d = (a[e] - b[e] * r) * ia;
          ld[0] += err<P>(d);
          if (want_dot) ld[1] = fmaf(u, dir<P>(d), ld[1]);
        }
      },
      [&](float a, float b, int64_t) {
        const float u = a * ia, d = (a - b * r) * ia;
        ld[0] += err<P>(d);
        if (want_dot) ld[1] = fmaf(u, dir<P>(d), ld[1]);
      });
  block_sum<2>(ld, smem);

  if (g != nullptr) {
    // Below eps the normalisation is the linear map a / eps: no projection (ld[1] is 0 then).
    const float k = pr.grad_scale * ia, dot = ld[1];
    sweep(
        s, t, D, vec, false,
        [&](const float (&a)[kVec], const float (&b)[kVec], int64_t off) {
          float out[kVec];
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            const float u = a[e] * ia, d = (a[e] - b[e] * r) * ia;
            out[e] = (dir<P>(d) - u * dot) * k;
          }
          store8(g + off, out);
        },
        [&](float a, float b, int64_t i) {
          const float u = a * ia, d = (a - b * r) * ia;
          g[i] = to_out<S>((dir<P>(d) - u * dot) * k);
        });
  }
  return ld[0] * pr.loss_scale;
}

// One block per kPlainItem elements of a pair; returns the item's loss partial (times c).
template <int P, typename S, typename T>
__device__ float plain_item(const LaunchPair& pr, int64_t item, float* smem) {
  const int64_t begin = item * kPlainItem;
  const int64_t n = pr.len - begin < kPlainItem ? pr.len - begin : kPlainItem;
  const S* s = static_cast<const S*>(pr.student) + begin;
  const T* t = static_cast<const T*>(pr.teacher) + begin;
  S* g = pr.grad != nullptr ? static_cast<S*>(pr.grad) + begin : nullptr;
  const float gs = pr.grad_scale;
  float acc[1] = {0.f};
  if (n == kPlainItem && aligned16(s) && aligned16(t) && (g == nullptr || aligned16(g))) {
    // Full item: every load in flight before the first use.
    float a[kPlainUnroll][kVec], b[kPlainUnroll][kVec];
#pragma unroll
    for (int u = 0; u < kPlainUnroll; ++u) {
      const int64_t off = (int64_t{u} * kPlainThreads + threadIdx.x) * kVec;
      load8(s + off, a[u]);
      load8(t + off, b[u]);
    }
#pragma unroll
    for (int u = 0; u < kPlainUnroll; ++u) {
      float out[kVec];
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const float d = a[u][e] - b[u][e];
        acc[0] += err<P>(d);
        out[e] = dir<P>(d) * gs;
      }
      if (g != nullptr) store8(g + (int64_t{u} * kPlainThreads + threadIdx.x) * kVec, out);
    }
  } else {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const float d = static_cast<float>(s[i]) - static_cast<float>(t[i]);
      acc[0] += err<P>(d);
      if (g != nullptr) g[i] = to_out<S>(dir<P>(d) * gs);
    }
  }
  block_sum<1>(acc, smem);
  return acc[0] * pr.loss_scale;
}

template <int P, bool NORMALIZE, typename S, typename T>
__global__ void __launch_bounds__(NORMALIZE ? kNormMaxThreads : kPlainThreads)
    feature_regression_fwd_kernel(const LaunchArgs args) {
  __shared__ float smem[2 * kMaxWarps];
  __shared__ double dsmem[kMaxWarps];
  __shared__ bool is_last;

  const int64_t block = blockIdx.x;
  int k = 0;
  while (k + 1 < args.num_pairs && block >= args.pairs[k + 1].first_block) ++k;
  const LaunchPair& pr = args.pairs[k];
  const float part = NORMALIZE ? normalized_sample<P, S, T>(pr, block - pr.first_block, smem)
                               : plain_item<P, S, T>(pr, block - pr.first_block, smem);

  // The last block to finish adds every block's partial, in block order, in float64.
  if (threadIdx.x == 0) {
    args.partials[blockIdx.x] = part;
    __threadfence();
    is_last = atomicAdd(args.counter, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  double total[1] = {0.0};
  for (int64_t i = threadIdx.x; i < gridDim.x; i += blockDim.x) {
    total[0] += static_cast<double>(__ldcg(args.partials + i));
  }
  block_sum<1>(total, dsmem);
  if (threadIdx.x == 0) *args.loss = static_cast<float>(total[0]);
}

// Normalized blocks get one thread per 8-element group of the longest sample, 128 to 1024.
int norm_threads(int64_t max_len) {
  int threads = 128;
  while (threads < kNormMaxThreads && int64_t{threads} * kVec < max_len) threads *= 2;
  return threads;
}

template <int P, bool NORMALIZE, typename S, typename T>
void launch(const LaunchArgs& args, int64_t blocks, cudaStream_t stream) {
  int threads = kPlainThreads;
  if constexpr (NORMALIZE) {
    int64_t max_len = 0;
    for (int i = 0; i < args.num_pairs; ++i) {
      max_len = args.pairs[i].len > max_len ? args.pairs[i].len : max_len;
    }
    threads = norm_threads(max_len);
  }
  feature_regression_fwd_kernel<P, NORMALIZE, S, T>
      <<<static_cast<unsigned int>(blocks), threads, 0, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename S, typename T>
void launch_typed(int p, bool normalize, const LaunchArgs& args, int64_t blocks,
                  cudaStream_t stream) {
  if (normalize) {
    if (p == 1) return launch<1, true, S, T>(args, blocks, stream);
    return launch<2, true, S, T>(args, blocks, stream);
  }
  if (p == 1) return launch<1, false, S, T>(args, blocks, stream);
  return launch<2, false, S, T>(args, blocks, stream);
}

template <typename S>
void launch_student(at::ScalarType teacher, int p, bool normalize, const LaunchArgs& args,
                    int64_t blocks, cudaStream_t stream) {
  switch (teacher) {
    case at::kFloat:
      return launch_typed<S, float>(p, normalize, args, blocks, stream);
    case at::kBFloat16:
      return launch_typed<S, c10::BFloat16>(p, normalize, args, blocks, stream);
    case at::kHalf:
      return launch_typed<S, c10::Half>(p, normalize, args, blocks, stream);
    default:
      TORCH_CHECK(false, "fastkd: unsupported teacher dtype ", teacher, " on CUDA");
  }
}

}  // namespace

std::tuple<at::Tensor, std::vector<at::Tensor>> feature_regression_fwd_cuda(
    at::TensorList students, at::TensorList teachers, at::ArrayRef<double> weights, int64_t p,
    bool normalize, bool mean, const c10::List<bool>& compute_grad) {
  TORCH_CHECK(!students.empty(), "fastkd: feature_regression needs at least one pair");
  const c10::cuda::CUDAGuard guard(students[0].device());
  std::vector<at::Tensor> grads;
  const RegressionCall call = prepare_feature_regression(students, teachers, weights, p, normalize,
                                                         mean, compute_grad, grads);
  const int n = static_cast<int>(call.pairs.size());
  TORCH_CHECK(n <= kMaxRegressionPairs, "fastkd: the CUDA kernel takes at most ",
              kMaxRegressionPairs, " pairs per call, got ", n);
  TORCH_CHECK(call.student_dtype != at::kDouble, "fastkd: float64 runs on the CPU backend only");

  LaunchArgs args{};
  args.num_pairs = n;
  int64_t blocks = 0;
  for (int i = 0; i < n; ++i) {
    const RegressionPair& src = call.pairs[i];
    LaunchPair& dst = args.pairs[i];
    dst.student = src.student;
    dst.teacher = src.teacher;
    dst.grad = src.grad;
    dst.len = normalize ? src.sample_len : src.samples * src.sample_len;
    dst.first_block = blocks;
    dst.loss_scale = static_cast<float>(src.loss_scale);
    dst.grad_scale = static_cast<float>(src.loss_scale * p);
    blocks += normalize ? src.samples : (dst.len + kPlainItem - 1) / kPlainItem;
  }
  TORCH_CHECK(blocks <= 0x7fffffff, "fastkd: feature_regression input too large for one launch (",
              blocks, " blocks)");

  const auto opts = students[0].options();
  at::Tensor loss = at::empty({}, opts.dtype(at::kFloat));
  at::Tensor partials = at::empty({blocks}, opts.dtype(at::kFloat));
  at::Tensor counter = at::empty({1}, opts.dtype(at::kInt));
  args.partials = partials.data_ptr<float>();
  args.counter = reinterpret_cast<unsigned int*>(counter.data_ptr<int>());
  args.loss = loss.data_ptr<float>();

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(cudaMemsetAsync(args.counter, 0, sizeof(unsigned int), stream));
  switch (call.student_dtype) {
    case at::kFloat:
      launch_student<float>(call.teacher_dtype, call.p, normalize, args, blocks, stream);
      break;
    case at::kBFloat16:
      launch_student<c10::BFloat16>(call.teacher_dtype, call.p, normalize, args, blocks, stream);
      break;
    case at::kHalf:
      launch_student<c10::Half>(call.teacher_dtype, call.p, normalize, args, blocks, stream);
      break;
    default:
      TORCH_CHECK(false, "fastkd: unsupported student dtype ", call.student_dtype, " on CUDA");
  }
  return {loss, grads};
}

}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("feature_regression_fwd", &fastkd::feature_regression_fwd_cuda);
}
