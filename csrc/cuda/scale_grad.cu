// fastkd::scale_grad_ on CUDA: the backward of every loss whose forward wrote its gradient.
//   grad *= grad_output            (a 0-d scalar; nothing is written when it is exactly 1)
//   grad[b, :] *= grad_output[b]   (one value per row, for reduction="none")
//
// The scalar is read on the device by every thread, which returns at once when it is 1: the
// common loss.backward() costs one launch and no memory traffic, and there is no host sync (the
// op stays CUDA-graph capturable). Otherwise a grid-stride loop scales 16-byte vectors in place
// (one element per access when the gradient is not 16-byte aligned), in float32 (float64 for a
// float64 gradient), rounding each element once.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "checks.h"
#include "cuda/memory.cuh"

namespace fastkd {
namespace {

constexpr int kThreads = 256;
// Grid size at most; the grid-stride loop covers the rest.
constexpr int64_t kMaxBlocks = 1 << 20;

template <typename G, typename O, int VEC, bool PER_ROW>
__global__ void __launch_bounds__(kThreads)
    scale_grad_kernel(G* grad, const O* grad_output, int64_t n, int64_t row_len) {
  using M = std::conditional_t<std::is_same_v<G, double>, double, float>;
  M f = 0;
  if constexpr (!PER_ROW) {
    const O scalar = *grad_output;
    if (scalar == O(1)) return;
    f = static_cast<M>(scalar);
  }
  const int64_t nvec = n / VEC;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = first; i < nvec; i += stride) {
    M x[VEC];
    cuda::load_as<VEC>(grad + i * VEC, x);
    if constexpr (PER_ROW) {
      // A vector may straddle rows when the row length is not a multiple of VEC.
      int64_t r = i * VEC / row_len;
      int64_t c = i * VEC - r * row_len;
      M fr = static_cast<M>(grad_output[r]);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        x[e] *= fr;
        if (++c == row_len && e + 1 < VEC) {
          c = 0;
          fr = static_cast<M>(grad_output[++r]);
        }
      }
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) x[e] *= f;
    }
    cuda::store_as<VEC>(grad + i * VEC, x);
  }
  // The last n % VEC elements, one per thread.
  const int64_t tail = nvec * VEC + first;
  if (tail < n) {
    const M scale = PER_ROW ? static_cast<M>(grad_output[tail / row_len]) : f;
    grad[tail] = static_cast<G>(static_cast<M>(grad[tail]) * scale);
  }
}

template <typename G, typename O, bool PER_ROW>
void launch(G* grad, const O* grad_output, int64_t n, int64_t row_len, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(G);
  const bool vec = cuda::is_aligned(grad, 16);
  const int64_t work = vec ? std::max<int64_t>(n / kVec, 1) : n;
  const auto blocks = static_cast<unsigned>(std::min((work + kThreads - 1) / kThreads, kMaxBlocks));
  if (vec) {
    scale_grad_kernel<G, O, kVec, PER_ROW>
        <<<blocks, kThreads, 0, stream>>>(grad, grad_output, n, row_len);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    scale_grad_kernel<G, O, 1, PER_ROW>
        <<<blocks, kThreads, 0, stream>>>(grad, grad_output, n, row_len);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename G, typename O>
void launch_for_mode(const at::Tensor& grad, const at::Tensor& grad_output, cudaStream_t stream) {
  G* g = static_cast<G*>(grad.data_ptr());
  const O* go = static_cast<const O*>(grad_output.data_ptr());
  const int64_t n = grad.numel();
  if (grad_output.dim() == 0) {
    launch<G, O, false>(g, go, n, 1, stream);
  } else {
    launch<G, O, true>(g, go, n, grad.size(-1), stream);
  }
}

template <typename G>
void launch_for_output(const at::Tensor& grad, const at::Tensor& grad_output,
                       cudaStream_t stream) {
  if (grad_output.scalar_type() == at::kDouble) {
    launch_for_mode<G, double>(grad, grad_output, stream);
  } else {
    launch_for_mode<G, float>(grad, grad_output, stream);
  }
}

}  // namespace

void scale_grad_cuda(at::Tensor& grad, const at::Tensor& grad_output) {
  check_scale_grad_args(grad, grad_output);
  if (grad.numel() == 0) return;
  TORCH_CHECK(grad.is_cuda(), "fastkd: scale_grad_ on CUDA needs a CUDA gradient, got ",
              grad.device());
  c10::cuda::CUDAGuard guard(grad.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (grad.scalar_type()) {
    case at::kFloat:
      return launch_for_output<float>(grad, grad_output, stream);
    case at::kDouble:
      return launch_for_output<double>(grad, grad_output, stream);
    case at::kBFloat16:
      return launch_for_output<c10::BFloat16>(grad, grad_output, stream);
    case at::kHalf:
      return launch_for_output<c10::Half>(grad, grad_output, stream);
    default:
      TORCH_CHECK(false, "fastkd: unsupported gradient dtype ", grad.scalar_type());
  }
}

}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) { m.impl("scale_grad_", &fastkd::scale_grad_cuda); }
