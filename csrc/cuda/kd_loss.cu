// fastkd::kd_loss_fwd on CUDA: the torch launcher of the kernels in kd_loss_kernels.cuh (which
// documents the math, the three kernels and their numerics): checks, device guard, stream, dtype
// dispatch, and a checked launch.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <atomic>

#include "cuda/kd_loss_kernels.cuh"
#include "kd_loss_op.h"

namespace fastkd {
namespace {

// Whether the kernels this GPU runs were compiled for sm_90 (which has clusters): a newer GPU
// that JIT-compiles the extension's compute_80 PTX runs them without. Asked once per device (the
// query may load the module, which should not first happen inside a CUDA graph capture).
bool runs_sm90_code(int device) {
  static std::array<std::atomic<int>, 64> known{};  // 0: not asked yet, 1: no, 2: yes
  if (device < 0 || device >= static_cast<int>(known.size())) return false;
  int v = known[device].load(std::memory_order_relaxed);
  if (v == 0) {
    cudaFuncAttributes attr{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kd_cuda::kd_loss_split_kernel<float, float, 4, false>));
    v = attr.ptxVersion >= 90 ? 2 : 1;
    known[device].store(v, std::memory_order_relaxed);
  }
  return v == 2;
}

// The launch plan's view of the current GPU.
kd_cuda::DeviceShape device_shape(int device) {
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(device);
  kd_cuda::DeviceShape d;
  d.sms = prop->multiProcessorCount;
  d.l2_bytes = prop->l2CacheSize;
  d.clusters = prop->major >= 9 && runs_sm90_code(device);
  return d;
}

template <typename S>
void launch_for_teacher(const KDLossArgs& a, int64_t outer, at::ScalarType teacher_dtype,
                        const kd_cuda::DeviceShape& d, cudaStream_t stream) {
  switch (teacher_dtype) {
    case at::kFloat:
      C10_CUDA_CHECK((kd_cuda::launch_for_layout<S, float>(a, outer, d, stream)));
      return;
    case at::kBFloat16:
      C10_CUDA_CHECK((kd_cuda::launch_for_layout<S, c10::BFloat16>(a, outer, d, stream)));
      return;
    case at::kHalf:
      C10_CUDA_CHECK((kd_cuda::launch_for_layout<S, c10::Half>(a, outer, d, stream)));
      return;
    default:
      TORCH_CHECK(false, "fastkd: unsupported teacher dtype ", teacher_dtype, " on CUDA");
  }
}

}  // namespace

KDCudaLaunchPlan kd_cuda_launch_plan(const KDLossArgs& a, int student_bytes, int teacher_bytes,
                                     int sms, int64_t l2_bytes, bool clusters) {
  kd_cuda::DeviceShape d;
  d.sms = sms;
  d.l2_bytes = l2_bytes;
  d.clusters = clusters;
  const kd_cuda::LaunchPlan p = kd_cuda::plan_launch(a, d, student_bytes, teacher_bytes);
  return {static_cast<int>(p.kernel), p.threads_per_row, static_cast<int64_t>(p.blocks),
          static_cast<int>(p.threads), p.split};
}

std::tuple<at::Tensor, at::Tensor> kd_loss_fwd_cuda(
    const at::Tensor& student, at::TensorList teachers, const std::optional<at::Tensor>& labels,
    const std::optional<at::Tensor>& kd_row_weights,
    const std::optional<at::Tensor>& ce_row_weights, at::ArrayRef<double> kd_coefs,
    double ce_coef, double temperature, double label_smoothing, int64_t ignore_index,
    bool per_row, bool compute_grad, at::TensorList sparse_ids, at::TensorList sparse_values,
    at::TensorList sparse_tails, int64_t divergence, double beta) {
  TORCH_CHECK(student.is_cuda(), "fastkd: kd_loss_fwd on CUDA needs a CUDA student, got ",
              student.device());
  TORCH_CHECK(student.scalar_type() != at::kDouble,
              "fastkd: the CUDA kernel does not take float64 logits; run float64 on the CPU "
              "backend (fastkd.kd_loss does so for float64 inputs)");
  for (const at::Tensor& t : teachers) {
    TORCH_CHECK(t.scalar_type() != at::kDouble,
                "fastkd: the CUDA kernel does not take float64 teacher logits; convert them to "
                "float32 or run on the CPU backend");
  }
  c10::cuda::CUDAGuard guard(student.device());
  KDLossBuffers out;
  const KDLossArgs a =
      prepare_kd_loss(student, teachers, labels, kd_row_weights, ce_row_weights, kd_coefs, ce_coef,
                      temperature, label_smoothing, ignore_index, compute_grad, sparse_ids,
                      sparse_values, sparse_tails, divergence, beta, out);
  // Column indices inside a row are 32-bit (with headroom for a sweep's last step).
  TORCH_CHECK(a.cols <= (int64_t{1} << 30), "fastkd: the CUDA kernel takes at most 2^30 classes, "
              "got ", a.cols);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const kd_cuda::DeviceShape device = device_shape(student.get_device());
  const int64_t outer = student.size(0);
  // With sparse teachers alone there is no dense teacher row to read: any teacher type will do.
  const at::ScalarType teacher_dtype =
      teachers.empty() ? student.scalar_type() : teachers[0].scalar_type();
  switch (student.scalar_type()) {
    case at::kFloat:
      launch_for_teacher<float>(a, outer, teacher_dtype, device, stream);
      break;
    case at::kBFloat16:
      launch_for_teacher<c10::BFloat16>(a, outer, teacher_dtype, device, stream);
      break;
    case at::kHalf:
      launch_for_teacher<c10::Half>(a, outer, teacher_dtype, device, stream);
      break;
    default:
      TORCH_CHECK(false, "fastkd: unsupported student dtype ", student.scalar_type(), " on CUDA");
  }
  if (per_row) return {out.row_loss, out.grad};
  return {at::sum(out.row_loss), out.grad};
}

}  // namespace fastkd
