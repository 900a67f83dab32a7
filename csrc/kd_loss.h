// Arguments of the fused soft-target cross-entropy kernels (fastkd::kd_loss_fwd), shared by the
// CPU and CUDA implementations. Plain data, so it can be passed to a CUDA kernel by value.
//
// For row b (b < rows; row b lives at (b / inner) * stride_outer + (b % inner) * stride_inner):
//   q = softmax(s / T), p_k = softmax(t_k / T), w_k = kd_coef[k] * kd_row_weights[k, b],
//   v = ce_coef * ce_row_weights[b], target = (1 - eps) * onehot(y_b) + eps / C
//   loss_b = T * sum_k w_k * KL(p_k || q) + v * CE(softmax(s), target)
//   grad_b = sum_k w_k * (q - p_k) + v * (softmax(s) - target)
// A term whose weight is 0 contributes exactly 0 (never 0 * inf), so ignored rows and guided rows
// the teacher got wrong cost nothing and produce no NaN.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FASTKD_HOST_DEVICE __host__ __device__
#else
#define FASTKD_HOST_DEVICE
#endif

namespace fastkd {

// Teachers one kd_loss_fwd call takes: the one definition of the limit, read by Python as
// fastkd._C.max_teachers (the Triton kernel has one pointer argument per teacher, t0..t7).
constexpr int kMaxTeachers = 8;

// The divergence between each teacher's p and the student's q (KDLossArgs::divergence). The
// codes are the indices of fastkd.functional.kd_loss.DIVERGENCES.
enum Divergence : int { kForwardKL = 0, kReverseKL = 1, kJSD = 2 };

struct KDLossArgs {
  int64_t rows = 0;
  int64_t inner = 1;  // rows are [outer, inner]; see above
  int64_t cols = 0;
  const void* student = nullptr;
  int64_t s_stride_outer = 0, s_stride_inner = 0;
  int num_teachers = 0;
  const void* teachers[kMaxTeachers] = {};
  int64_t t_stride_outer[kMaxTeachers] = {};
  int64_t t_stride_inner[kMaxTeachers] = {};
  double kd_coef[kMaxTeachers] = {};
  // Row weights are float32 (float64 for float64 logits).
  const void* kd_row_weights = nullptr;   // [K, rows] or nullptr (all 1)
  int64_t kd_row_weights_stride = 0;      // elements between teachers' rows (0: shared)
  const int64_t* labels = nullptr;        // [rows]; read only when ce_coef != 0
  const void* ce_row_weights = nullptr;   // [rows] or nullptr (all 1)
  double ce_coef = 0.0;
  double temperature = 1.0;
  double label_smoothing = 0.0;
  int64_t ignore_index = -100;
  // Sparse teachers (fastkd.SparseTeacher, normalised by the Python layer), after the dense ones:
  // teacher num_teachers + j of kd_coef / kd_row_weights is the dense logit vector d of C classes
  // with d[ids[b, i]] = values[b, i] for i < sparse_k[j] and d[c] = tails[b] for every other class,
  // all at temperature 1 (log-probabilities or logits; -inf means probability 0). Its KL term and
  // gradient are the dense ones of d, computed from the k entries, the tail constant and the
  // student row's statistics, without materialising d:
  //   Z = sum_i e_i + (C - k) e_tail,  e = exp((d - m_d) / T),  m_d = max(max_i values, tail)
  //   KL = [sum_i p_i (v_i - s[id_i]) + p_tail sum_{c not in ids} (tail - s_c)] / T
  //        + lse(s / T) - lse(d / T),   p = e / Z
  //      = [sum_i p_i ((v_i - m_d) - (s[id_i] - m_s)) + p_tail sum_{c not in ids} ((tail - m_d)
  //        - (s_c - m_s))] / T + log z_s - log Z   (the maxima's terms vanish as sum p = 1; this
  //        form never subtracts numbers of the logits' size, so it keeps float32 precision when
  //        the student sits at another offset than d, e.g. logits of 1e4 against log-probs)
  //   grad: w (q - p_tail) on every class, plus w (p_tail - p_i) at ids[i].
  // The sum over the classes outside ids is taken as the whole row's sum minus the k gathered
  // entries, both relative to the student's maximum. Ids are distinct per row (duplicates are
  // invalid input); an id outside [0, C) raises on the CPU and, on a GPU, makes the row's loss NaN
  // and drops that teacher's corrections on the row (like an out-of-range label).
  int num_sparse = 0;
  const int32_t* sparse_ids[kMaxTeachers] = {};  // [rows, k_j], contiguous
  const void* sparse_values[kMaxTeachers] = {};  // [rows, k_j], contiguous, float32 (float64)
  const void* sparse_tails[kMaxTeachers] = {};   // [rows], float32 (float64 for float64 logits)
  int64_t sparse_k[kMaxTeachers] = {};
  // Divergence of every teacher's term (dense and sparse alike), with D_k its value on row b:
  //   kForwardKL: D = KL(p || q)            grad term  w (q - p)
  //   kReverseKL: D = KL(q || p)            grad term  w q (lq - lp - D)          (l = log)
  //   kJSD:       D = beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q
  //                                         grad term  w (1 - beta) q (lq - lm - KL(q || m))
  // in loss_b = T * sum_k w_k * D_k + ...; each grad term is w dD/dz with z = s / T (the
  // gradient of T w D with respect to s), as for forward KL, so kd_coef keeps its meaning. beta is
  // read only for kJSD and lies in (0, 1). Entries with q = 0 (and p = 0) contribute exactly 0.
  // Reverse KL against a teacher with p = 0 where q > 0 is +inf (a sparse teacher with a -inf
  // tail is refused by the Python layer for that reason).
  int divergence = kForwardKL;
  double beta = 0.5;
  void* row_loss = nullptr;  // [rows], float32 (float64 for float64 inputs)
  void* grad = nullptr;      // contiguous [rows, cols] in the student's dtype, or nullptr
};

// The CUDA kernels' launch plan for a call of this shape on a GPU of this shape (csrc/cuda/
// kd_loss_kernels.cuh, plan_launch), defined by the CUDA launcher so that tests on machines
// without a GPU can check it (fastkd._C.kd_cuda_launch_plan). kernel: 0 resident, 1 split,
// 2 streaming.
struct KDCudaLaunchPlan {
  int kernel;
  int threads_per_row;
  int64_t blocks;
  int threads;
  int split;
};
KDCudaLaunchPlan kd_cuda_launch_plan(const KDLossArgs& a, int student_bytes, int teacher_bytes,
                                     int sms, int64_t l2_bytes, bool clusters);

FASTKD_HOST_DEVICE inline int64_t row_offset(int64_t row, int64_t inner, int64_t stride_outer,
                                             int64_t stride_inner) {
  return inner == 1 ? row * stride_outer
                    : (row / inner) * stride_outer + (row % inner) * stride_inner;
}

}  // namespace fastkd
