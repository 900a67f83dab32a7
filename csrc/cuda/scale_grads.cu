// fastkd::scale_grads_ on CUDA: the backward of a one-pass loss with several gradients (one per
// student tensor, e.g. fastkd::feature_regression_fwd), in one launch per dtype.
//   grads[i] *= grad_output   for every i (a scalar)
// Every block reads grad_output on the device and returns at once when it is exactly 1, so the
// common loss.backward() writes nothing and never synchronises with the host. Gradients are dense
// in any memory format and are scaled as flat storage; the grid concatenates every tensor's
// blocks (the tensors travel by value in the launch arguments), with 16-byte accesses where the
// addresses allow.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cuda/memory.cuh"

namespace fastkd {
namespace {

constexpr int kMaxTensors = 8;
constexpr int kThreads = 256;
constexpr int64_t kItem = 4096;  // elements per block: 1 to 4 16-byte accesses per thread

struct ScaleArgs {
  void* grads[kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t first_block[kMaxTensors];
  int num;
};

template <typename T, typename G>
__global__ void __launch_bounds__(kThreads)
    scale_grads_kernel(const ScaleArgs args, const G* __restrict__ grad_output) {
  using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const G go = *grad_output;
  if (go == G(1)) return;
  const acc_t f = static_cast<acc_t>(go);
  const int64_t block = blockIdx.x;
  int k = 0;
  while (k + 1 < args.num && block >= args.first_block[k + 1]) ++k;
  const int64_t begin = (block - args.first_block[k]) * kItem;
  const int64_t rest = args.numel[k] - begin;
  const int64_t n = rest < kItem ? rest : kItem;
  T* g = static_cast<T*>(args.grads[k]) + begin;
  constexpr int kPer = 16 / sizeof(T);  // one 16-byte access
  if (n == kItem && (reinterpret_cast<uintptr_t>(g) & 15) == 0) {
    for (int64_t q = threadIdx.x; q < kItem / kPer; q += kThreads) {
      acc_t v[kPer];
      cuda::load_as<kPer>(g + q * kPer, v);
#pragma unroll
      for (int e = 0; e < kPer; ++e) v[e] *= f;
      cuda::store_as<kPer>(g + q * kPer, v);
    }
  } else {
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      g[i] = static_cast<T>(static_cast<acc_t>(g[i]) * f);
    }
  }
}

template <typename T>
void launch(const std::vector<at::Tensor>& grads, const at::Tensor& grad_output,
            cudaStream_t stream) {
  for (size_t start = 0; start < grads.size(); start += kMaxTensors) {
    ScaleArgs args{};
    int64_t blocks = 0;
    for (size_t i = start; i < grads.size() && i < start + kMaxTensors; ++i) {
      const int j = static_cast<int>(i - start);
      args.grads[j] = grads[i].data_ptr();
      args.numel[j] = grads[i].numel();
      args.first_block[j] = blocks;
      blocks += (grads[i].numel() + kItem - 1) / kItem;
      args.num = j + 1;
    }
    TORCH_CHECK(blocks <= 0x7fffffff, "fastkd: scale_grads_: gradients too large for one launch");
    if (grad_output.scalar_type() == at::kDouble) {
      scale_grads_kernel<T, double><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
          args, grad_output.data_ptr<double>());
    } else {
      scale_grads_kernel<T, float><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
          args, grad_output.data_ptr<float>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

void scale_grads_cuda(at::TensorList grads, const at::Tensor& grad_output) {
  check_scale_grads_args(grads, grad_output);
  const c10::cuda::CUDAGuard guard(grad_output.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // One launch per dtype present (a loss's gradients share the student's dtype: one launch).
  for (const at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble}) {
    std::vector<at::Tensor> group;
    for (const at::Tensor& g : grads) {
      if (g.scalar_type() == dtype && g.numel() != 0) group.push_back(g);
    }
    if (group.empty()) continue;
    switch (dtype) {
      case at::kFloat:
        launch<float>(group, grad_output, stream);
        break;
      case at::kBFloat16:
        launch<c10::BFloat16>(group, grad_output, stream);
        break;
      case at::kHalf:
        launch<c10::Half>(group, grad_output, stream);
        break;
      default:
        launch<double>(group, grad_output, stream);
    }
  }
}

}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) { m.impl("scale_grads_", &fastkd::scale_grads_cuda); }
