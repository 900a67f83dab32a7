// fastkd::kd_loss_fwd on CUDA: temperature-scaled KD (soft-target cross-entropy) with optional
// hard-label CE, per-row weights (ignore_index, guided KD) and up to 8 teachers. The contract is
// csrc/kd_loss.h's, row for row the same as the CPU kernel (csrc/cpu/kd_loss.cpp):
//
//   q = softmax(s / T), p_k = softmax(t_k / T), w_k = kd_coef[k] * kd_row_weights[k, b]
//   loss_b = T * sum_k w_k * KL(p_k || q) + v * CE(softmax(s), target),  v = ce_coef * ce_w[b]
//   grad_b = sum_k w_k * (q - p_k) + v * (softmax(s) - target),  target = (1-eps) onehot(y) + eps/C
//   KL(p_k || q) = sum_c p_kc (t_kc - s_c) / T + lse(s / T) - lse(t_k / T)
//   CE = lse(s) - (1 - eps) * s_y - eps / C * sum_c s_c
//
// The divergence (KDLossArgs::divergence) is a template parameter of the kernels: forward KL above;
// reverse KL and JSD(beta) (math in "Reverse KL and JSD" below) replace each teacher's KL term and
// its gradient term, everything else (CE, smoothing, row weights, sparse teachers) unchanged.
//
// Shapes: student and teachers [outer, inner, C] with stride 1 over C and any outer/inner strides;
// labels and row weights [rows]; per-row losses [rows] float32; gradient [rows, C] contiguous in
// the student's dtype. float16/bfloat16/float32 logits, any student x teacher combination; float64
// runs on the CPU backend.
//
// The loss is memory-bound: the student and each teacher are read once from DRAM and the gradient
// written once, all math in float32. Three kernels, chosen on the host (plan_launch):
//  * resident (C <= kResidentMaxCols): a row lives in registers. A warp holds a row of up to
//    32 * kResidentElems classes (several rows per block); wider rows take a block of up to
//    kResidentMaxThreads threads. With the whole row at hand the statistics are exact two-pass
//    ones (max first, then the sums), as on the CPU.
//  * split (wider rows): a row is cut into slices, one per CTA of a thread-block cluster (sm_90;
//    a CTA per row elsewhere). One sweep gathers the online softmax statistics of the student and
//    every dense teacher, the cluster combines them, and a second sweep writes the gradient, from
//    L2: the host sizes the cluster so that the rows in flight fit. Sparse teachers take their k
//    entries and the row's statistics.
//  * streaming (reverse KL and JSD on rows wider than their resident limit): one block per row,
//    see "Reverse KL and JSD" below.
// Rows are addressed with 64-bit offsets. 16-byte vector accesses are used when every row start is
// 16-byte aligned and C is a multiple of the vector width (checked on the host); otherwise the
// same kernels run with one element per access.
//
// Numerics: maxima are taken over the raw logits and replaced by 0 when not finite (a row of -inf
// then gives exp() = 0, not NaN). Entries with p = 0 (teacher logit -inf, or underflow) contribute
// exactly 0 to the cross term, even where the student is -inf, and a weight of exactly 0 skips the
// teacher's loads and contributes exactly 0. A row whose weights are all 0 writes loss 0 and a zero
// gradient. An out-of-range label on a row that uses CE cannot raise without a host sync: that
// row's loss is NaN and its CE gradient is dropped (as in the Triton kernel). Each row is reduced
// by a fixed set of threads in a fixed order (butterfly shuffles, then warps in index order) and
//
// This header holds the kernels and their launch plan and depends on no torch library code (only
// on c10's header-only Half/BFloat16 types), so the launcher (kd_loss.cu) and a check that runs the
// kernels outside torch share exactly the same code.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "cuda/memory.cuh"
#include "kd_loss.h"

// How a kernel is launched: CUDA's triple chevrons here; a check that runs the kernels through
// another runtime defines its own launch before including this header.
#ifndef FASTKD_LAUNCH
#define FASTKD_LAUNCH(kernel, blocks, threads, stream, ...) \
  kernel<<<blocks, threads, 0, stream>>>(__VA_ARGS__)
#endif

namespace fastkd::kd_cuda {

using cuda::load_as;
using cuda::store_as;


// ---- Launch shapes (all tuning knobs are here) -------------------------------------------------
// Classes of one row a thread of the resident kernel keeps in registers, for the student and for
// the teacher in hand (and, with several teachers, for their running gradient term): 3 x 16
// floats leave room below the 128 registers a 512-thread block allows.
constexpr int kResidentElems = 16;
// Threads per row at most in the resident kernel; wider rows stream.
constexpr int kResidentMaxThreads = 512;
constexpr int kResidentMaxCols = kResidentElems * kResidentMaxThreads;
// The same for reverse KL and JSD (csrc/kd_loss.h's divergence), whose resident kernel keeps the
// same three register rows (student, teacher, acc) with one element per access: 8 classes per
// thread (rows up to 4096 classes; wider ones stream). At 16 the JSD kernel spilled on sm_80.
constexpr int kDivResidentElems = 8;
constexpr int resident_elems(int divergence) {
  return divergence == kForwardKL ? kResidentElems : kDivResidentElems;
}
static_assert(kResidentElems % 8 == 0, "a thread's share is a whole number of 16-byte vectors");
static_assert(kResidentMaxThreads >= 64 && kResidentMaxThreads <= 1024 &&
                  (kResidentMaxThreads & (kResidentMaxThreads - 1)) == 0,
              "threads per row double from one warp up to kResidentMaxThreads");
// Rows per block when one warp holds a row (C <= 32 * kResidentElems).
constexpr int kWarpRowsPerBlock = 8;
// Threads per row (= per block) of the streaming kernel, and the classes each thread loads per
// step of a sweep (several independent 16-byte loads in flight per thread).
constexpr int kStreamThreads = 512;
constexpr int kStreamElems = 16;
// At least two warps, so that every reduction is a block barrier: the per-teacher values one
// thread leaves in shared memory for the gradient sweep rely on it.
static_assert(kStreamThreads % 32 == 0 && kStreamThreads >= 64 && kStreamThreads <= 1024,
              "the streaming kernel needs whole warps, at least two of them");
static_assert(kStreamElems % 8 == 0, "a step is a whole number of 16-byte vectors");
// The split kernel (forward KL, wide rows): threads per CTA and the CTAs per SM
// its registers are budgeted for (65536 / (256 * 2) = 128 per thread), so that two rows' slices
// or more are in flight on every SM; at most kMaxSplit CTAs (a portable cluster) share a row, and
// each takes at least one step (kSplitThreads * kStreamElems classes) of it.
constexpr int kSplitThreads = 256;
constexpr int kSplitBlocksPerSM = 2;
constexpr int kMaxSplit = 8;
constexpr int kSplitMinSlice = kSplitThreads * kStreamElems;
static_assert(kSplitThreads % 32 == 0 && kSplitThreads >= 64, "whole warps, at least two");
// Grid size at most; the kernels loop over rows beyond it.
constexpr int64_t kMaxBlocks = std::numeric_limits<int32_t>::max();

// ---- Row helpers ------------------------------------------------------------------------------

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }

// The reference point of a softmax: the row maximum, or 0 when that is not finite, so that an
// all -inf row gives exp(-inf - 0) = 0 instead of exp(-inf + inf) = NaN (as on the CPU).
__device__ __forceinline__ float finite_or_zero(float m) { return isfinite(m) ? m : 0.0f; }

// lse(s / T) - lse(t / T) from the row maxima (m_s, m_t) and the logs of the sums taken relative to
// them. The maxima cancel before anything else, so a large common logit offset (1e4) costs no
// precision: adding m / T + log z as absolute values would round each to the offset's ulp.
__device__ __forceinline__ float lse_diff(float m_s, float log_zs, float m_t, float log_zt,
                                          float inv_T) {
  return (m_s - m_t) * inv_T + (log_zs - log_zt);
}

// CE = lse(s) - (1 - eps) s_y - eps / C sum_c s_c with m_s taken out of every term; log_z1 is the
// log of sum exp(s - m_s). The smoothing term only with smoothing: a masked (-inf) logit makes
// sum_s -inf, and 0 * -inf is NaN.
__device__ __forceinline__ float cross_entropy(float m_s, float log_z1, float s_y, float sum_s,
                                               float eps, int C) {
  float ce = log_z1 + (1.0f - eps) * (m_s - s_y);
  if (eps != 0.0f) ce += eps * (m_s - sum_s / static_cast<float>(C));
  return ce;
}

// The weights of one row, read by every thread of the row (the same addresses: one transaction).
struct RowPlan {
  unsigned active = 0;  // bit k: dense teacher k has a nonzero weight on this row
  unsigned sparse = 0;  // bit j: sparse teacher j (teacher num_teachers + j) likewise
  float w_sum = 0.0f;   // sum_k w_k over dense and sparse teachers
  float v = 0.0f;       // CE weight of the loss
  float v_g = 0.0f;     // CE weight of the gradient: v, or 0 when the label is out of range
  int64_t y = -1;       // the label's column when the CE term is on and the label is in range

  __device__ bool skip() const { return active == 0 && sparse == 0 && v == 0.0f; }
  __device__ bool bad_label() const { return v != 0.0f && y < 0; }
};

__device__ __forceinline__ float teacher_weight(const KDLossArgs& a, int k, int64_t row) {
  const float w = static_cast<float>(a.kd_coef[k]);
  if (a.kd_row_weights == nullptr) return w;
  return w * static_cast<const float*>(a.kd_row_weights)[k * a.kd_row_weights_stride + row];
}

__device__ __forceinline__ RowPlan plan_row(const KDLossArgs& a, int64_t row) {
  RowPlan p;
  for (int k = 0; k < a.num_teachers; ++k) {
    const float w = teacher_weight(a, k, row);
    p.w_sum += w;
    if (w != 0.0f) p.active |= 1u << k;
  }
  for (int j = 0; j < a.num_sparse; ++j) {
    const float w = teacher_weight(a, a.num_teachers + j, row);
    p.w_sum += w;
    if (w != 0.0f) p.sparse |= 1u << j;
  }
  if (a.ce_coef != 0.0) {
    p.v = static_cast<float>(a.ce_coef);
    if (a.ce_row_weights != nullptr) p.v *= static_cast<const float*>(a.ce_row_weights)[row];
    if (p.v != 0.0f) {
      const int64_t y = a.labels[row];
      if (y >= 0 && y < a.cols) {
        p.y = y;
        p.v_g = p.v;
      }
    }
  }
  return p;
}

template <typename T>
__device__ __forceinline__ const T* student_row(const KDLossArgs& a, int64_t row) {
  return static_cast<const T*>(a.student) +
         row_offset(row, a.inner, a.s_stride_outer, a.s_stride_inner);
}

template <typename T>
__device__ __forceinline__ const T* teacher_row(const KDLossArgs& a, int k, int64_t row) {
  return static_cast<const T*>(a.teachers[k]) +
         row_offset(row, a.inner, a.t_stride_outer[k], a.t_stride_inner[k]);
}

struct Sum {
  __device__ float operator()(float x, float y) const { return x + y; }
};
struct Max {
  __device__ float operator()(float x, float y) const { return fmaxf(x, y); }
};

// All-reductions over the threads that share a row: one warp (shuffles only, so the rows of a
// block's warps never wait for each other), or a whole block (shuffles, then the warps' partials
// through shared memory, combined by every thread in warp order). The butterfly leaves the same
// bits in every lane, so all threads of a row agree exactly. Shared memory has two slots used in
// turn: a slot is rewritten two reductions later, after a barrier that every reader of its
// previous contents reached only once done reading, so one __syncthreads per reduction suffices.
// Every thread of a block-wide group must make the same sequence of calls.
template <int kMaxWarps, int kMaxValues>
class RowGroup {
 public:
  static constexpr int kSmemFloats = 2 * kMaxWarps * kMaxValues;

  __device__ RowGroup(int threads, float* smem) : warps_(threads / 32), smem_(smem) {}

  template <int N>
  __device__ void sum(float (&x)[N]) {
    reduce(x, Sum{});
  }
  template <int N>
  __device__ void max(float (&x)[N]) {
    reduce(x, Max{});
  }
  __device__ float max(float x) {
    float v[1] = {x};
    reduce(v, Max{});
    return v[0];
  }

 private:
  template <int N, typename Op>
  __device__ void reduce(float (&x)[N], Op op) {
    static_assert(N <= kMaxValues, "RowGroup holds at most kMaxValues values per reduction");
#pragma unroll
    for (int i = 0; i < N; ++i) {
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) x[i] = op(x[i], __shfl_xor_sync(0xffffffffu, x[i], o));
    }
    if (warps_ == 1) return;
    float* slot = smem_ + parity_ * (kMaxWarps * kMaxValues);
    parity_ ^= 1;
    const int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) {
#pragma unroll
      for (int i = 0; i < N; ++i) slot[warp * N + i] = x[i];
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < N; ++i) {
      float r = slot[i];
      for (int w = 1; w < warps_; ++w) r = op(r, slot[w * N + i]);
      x[i] = r;
    }
  }

  int warps_;
  float* smem_;
  int parity_ = 0;
};

// ---- Sparse teachers (see csrc/kd_loss.h) ------------------------------------------------------
//
// A sparse teacher's k entries are shared out among the threads of the row (entry i to thread
// i % threads); its statistics then come from two all-reductions. Each thread of the row ends with
// the same SparseRow, which the gradient sweep (the tail probability, a per-row constant) and the
// fix-up of the k entries afterwards use.

struct SparseRow {
  float m;       // reference point of d: max(max values, tail), or 0 when not finite
  float inv_z;   // 1 / sum_c exp((d_c - m) / T)
  float p_tail;  // probability of each class outside the ids
  float w;       // the teacher's weight on the row
};

// Teacher num_teachers + j's term of the row's loss (w T KL(p || q)); fills `r`. `s_rel` is
// sum_c (s_c - m_s) over the row. `bad` is set when an id lies outside [0, C).
template <typename S, typename Group>
__device__ float sparse_teacher_loss(const KDLossArgs& a, int j, int64_t row, const S* s_row,
                                     float m_s, float log_zs, float s_rel, float w, float T,
                                     float inv_T, int lane, int threads, Group& group,
                                     SparseRow& r, bool& bad) {
  const int C = static_cast<int>(a.cols);
  const int64_t k = a.sparse_k[j];
  const int32_t* ids = a.sparse_ids[j] + row * k;
  const float* vals = static_cast<const float*>(a.sparse_values[j]) + row * k;
  const float tail = static_cast<const float*>(a.sparse_tails[j])[row];
  float mb[2] = {neg_inf(), 0.0f};  // max of the values, and whether an id is out of range
  for (int64_t i = lane; i < k; i += threads) {
    mb[0] = fmaxf(mb[0], vals[i]);
    if (ids[i] < 0 || ids[i] >= C) mb[1] = 1.0f;
  }
  group.max(mb);
  bad = bad || mb[1] != 0.0f;
  const float m = finite_or_zero(fmaxf(mb[0], tail));
  // KL = sum_c p_c ((d_c - m) - (s_c - m_s)) / T + log z_s - log z: the maxima's own terms,
  // (m - m_s) (sum_c p_c - 1) / T, vanish exactly, so no difference of large numbers is formed
  // even when the student's logits and d sit at different offsets.
  // acc: sum e_i, sum e_i ((v_i - m) - (s[id_i] - m_s)) / T (0 where e_i = 0, even if s is -inf),
  // sum (s[id_i] - m_s).
  float acc[3] = {0.0f, 0.0f, 0.0f};
  for (int64_t i = lane; i < k; i += threads) {
    const int id = ids[i];
    const float x = id >= 0 && id < C ? static_cast<float>(s_row[id]) - m_s : 0.0f;
    const float v = vals[i] - m;
    const float e = __expf(v * inv_T);
    acc[0] += e;
    acc[1] += e > 0.0f ? e * ((v - x) * inv_T) : 0.0f;
    acc[2] += x;
  }
  group.sum(acc);
  // The C - k classes outside the ids share the tail: their cross term is
  // e_tail sum_{c not in ids} ((tail - m) - (s_c - m_s)) / T, the sum of s_c - m_s taken as the
  // row's minus the ids'.
  const float n_tail = static_cast<float>(C - k);
  const float e_tail = n_tail > 0.0f ? __expf((tail - m) * inv_T) : 0.0f;
  // With a finite tail, a masked (-inf) student logit among the ids makes both sums -inf and
  // their difference NaN: the row's loss is NaN where the CPU kernel, which recounts the row,
  // gives the true value (finite when the teacher's value there is -inf too, else +inf). A
  // recount here pushed these kernels past their register budget (ptxas spilled on sm_80).
  const float rest = s_rel - acc[2];
  const float z = acc[0] + n_tail * e_tail;
  float cross = acc[1];
  if (e_tail > 0.0f) cross += e_tail * ((n_tail * (tail - m) - rest) * inv_T);
  r.m = m;
  r.inv_z = 1.0f / z;
  r.p_tail = e_tail * r.inv_z;
  r.w = w;
  return w * T * (cross * r.inv_z + (log_zs - __logf(z)));
}

// The split kernel's gradient-sweep coefficients of a row, to recompute one entry.
struct SweepCoefs {
  float m_s, c_q, c_off, c_1, c_y;
  int64_t y;
  bool use_e1;
  unsigned active;      // dense teachers with a nonzero weight
  const float* t_coef;  // per dense teacher: w / z and its maximum (shared memory)
  const float* t_ref;
};

// What the split kernel's gradient sweep wrote at class c, in float32 before rounding: the
// same operations in the same order, so the same bits.
template <typename S, typename Tt>
__device__ float sweep_value(const KDLossArgs& a, int64_t row, const S* s_row, int c, float inv_T,
                             const SweepCoefs& k) {
  const float x = static_cast<float>(s_row[c]);
  float o = __expf((x - k.m_s) * inv_T) * k.c_q - k.c_off;
  if (k.use_e1) o += __expf(x - k.m_s) * k.c_1;
  if (c == k.y) o -= k.c_y;
  for (unsigned b = k.active; b != 0; b &= b - 1) {
    const int t = __ffs(b) - 1;
    const float xt = static_cast<float>(teacher_row<Tt>(a, t, row)[c]);
    o -= k.t_coef[t] * __expf((xt - k.t_ref[t]) * inv_T);
  }
  return o;
}

// After the gradient sweep wrote w (q - p_tail) for this teacher everywhere: adds
// w (p_tail - p_i) at its in-range ids, each entry read, corrected in float32 and stored. With
// `sweep` (the split kernel) a bf16/fp16 entry is not read back, which would round it twice
// where q - p cancels (a teacher's likely classes): the sweep's float32 value is recomputed and
// only what earlier sparse teachers added there (nothing, for the first) is taken from the stored
// entry. The resident kernel reads back (a recompute there pushed it past its register budget:
// ptxas spilled on sm_80), so its bf16/fp16 entries at the ids are rounded twice. Only ids in
// [lo, hi) are fixed: the columns this block's gradient sweep wrote (a slice, in the split kernel).
template <typename S, typename Tt>
__device__ void sparse_teacher_fixup(const KDLossArgs& a, int j, bool first, int64_t row,
                                     const SparseRow& r, float inv_T, const S* s_row,
                                     const SweepCoefs* sweep, S* g_row, int lane, int threads,
                                     int lo, int hi) {
  const int64_t k = a.sparse_k[j];
  const int32_t* ids = a.sparse_ids[j] + row * k;
  const float* vals = static_cast<const float*>(a.sparse_values[j]) + row * k;
  for (int64_t i = lane; i < k; i += threads) {
    const int id = ids[i];
    if (id < lo || id >= hi) continue;
    const float fix = r.w * (r.p_tail - __expf((vals[i] - r.m) * inv_T) * r.inv_z);
    if (std::is_same_v<S, float> || sweep == nullptr) {
      g_row[id] = static_cast<S>(static_cast<float>(g_row[id]) + fix);
    } else {
      const float base = sweep_value<S, Tt>(a, row, s_row, id, inv_T, *sweep);
      const float earlier =
          first ? 0.0f
                : static_cast<float>(g_row[id]) - static_cast<float>(static_cast<S>(base));
      g_row[id] = static_cast<S>(base + earlier + fix);
    }
  }
}

// ---- Reverse KL and JSD (KDLossArgs::divergence 1 and 2) ---------------------------------------
//
// Per row, with e_c = exp((s_c - m_s) / T), q = e / z_s, lq = (s - m_s) / T - log z_s (e_t, p and
// lp likewise for a teacher), each teacher's D and its gradient term w dD/dz are
//   reverse KL: u_c = (s_c - m_s) - (t_c - m_t),  X = sum_c q_c u_c,  D = X / T + log z_t - log z_s
//               grad term  w q_c (u_c - X) / T
//   JSD(beta):  mix_c = beta p_c + (1 - beta) q_c,  u_c = lq_c - log mix_c,  Y = sum_c q_c u_c
//               D = beta sum_c p_c (lp_c - log mix_c) + (1 - beta) Y
//               grad term  w (1 - beta) q_c (u_c - Y)
// (relative to both maxima: no difference of logit-sized numbers). A term whose weight (q_c, or
// p_c for JSD's p term) is 0, or where mix_c is 0, contributes exactly 0 (a select, not a product),
// and so does the gradient entry of a class with q_c = 0. The teachers' gradient terms add up to
//   q_c g_div (acc_c + w_sp (s_c - m_s) - R),  g_div = 1 / T (reverse KL) or 1 - beta (JSD),
// acc_c = sum_k w_k u_kc (a register row in the resident kernel, recomputed per step in the
// streaming one), R = sum_k w_k X_k (Y_k) and w_sp the reverse-KL sparse teachers' weight (below).
//
// Sparse teachers (d = values at the ids, tail elsewhere; m the reference point of d):
//   reverse KL: X = [A - sum_i e[id_i] (v_i - m) - (tail - m) (z_s - sum_i e[id_i])] / z_s with
//     A = sum_c e_c (s_c - m_s) (no tail term when C = k). In the gradient, u_c = (s_c - m_s) -
//     (tail - m) is w_sp (s_c - m_s) and a row constant in R; the ids then add
//     w q_id ((tail - m) - (v_i - m)) / T (with tail - m read as 0 when C = k).
//   JSD: every class outside the ids has p = p_tail, so a full sweep over the student computes
//     the tail-based terms (and adds their u to acc_c), and the k ids replace theirs by the real
//     ones: in the loss from the ids' two reductions, in the gradient by a fix-up
//     w (1 - beta) q_id (u_id - u_tail,id) after the row's stores (read back, in the student's
//     dtype: a bf16/fp16 entry at an id is rounded twice).
// These kernels take one element per access (VEC = 1) and the resident kernel always keeps the
// acc row (MULTI), with kDivResidentElems classes per thread: every layout runs on the
// instantiations one divergence adds (resident and streaming kernel per student x teacher dtype,
// 36 in all for the two), at the cost of the 16-byte vector accesses.

// A sparse teacher's statistics on a row for reverse KL and JSD, the same in every thread.
struct DivSparseRow {
  float m;        // reference point of d: max(max values, tail when C > k), or 0 when not finite
  float log_z;    // log sum_c exp((d_c - m) / T)
  float inv_z;    // 1 / that sum
  float p_tail;   // JSD: the probability of each class outside the ids (0 when C = k)
  float base;     // reverse KL: tail - m (0 when C = k); JSD: lp of the tail
  float w;        // the teacher's weight on the row
};

// JSD's terms at one class: p (lp - log mix) into `pt` and u = lq - log mix, each 0 where its
// weight (p, q) or mix is 0 (then log mix is -inf and the other factor may be too).
__device__ __forceinline__ void jsd_terms(float p, float lp, float q, float lq, float beta,
                                          float omb, float& pt, float& u) {
  const float mix = beta * p + omb * q;
  const float lm = __logf(mix);
  pt = p > 0.0f && mix > 0.0f ? p * (lp - lm) : 0.0f;
  u = q > 0.0f && mix > 0.0f ? lq - lm : 0.0f;
}

// The max of a sparse teacher's values (all threads of the row) and whether an id lies outside
// [0, C): shared by both divergences.
template <typename Group>
__device__ float sparse_max(const KDLossArgs& a, int j, int64_t row, int lane, int threads,
                            Group& group, bool& bad) {
  const int C = static_cast<int>(a.cols);
  const int64_t k = a.sparse_k[j];
  const int32_t* ids = a.sparse_ids[j] + row * k;
  const float* vals = static_cast<const float*>(a.sparse_values[j]) + row * k;
  const float tail = static_cast<const float*>(a.sparse_tails[j])[row];
  float mb[2] = {neg_inf(), 0.0f};
  for (int64_t i = lane; i < k; i += threads) {
    mb[0] = fmaxf(mb[0], vals[i]);
    if (ids[i] < 0 || ids[i] >= C) mb[1] = 1.0f;
  }
  group.max(mb);
  bad = bad || mb[1] != 0.0f;
  return finite_or_zero(k < C ? fmaxf(mb[0], tail) : mb[0]);
}

// Reverse KL: teacher num_teachers + j's term of the row's loss (w T D); fills `r` and returns in
// `x_out` X (+ tail - m), its share of R. `a_s` is A = sum_c e_c (s_c - m_s).
template <typename S, typename Group>
__device__ float sparse_rkl_loss(const KDLossArgs& a, int j, int64_t row, const S* s_row,
                                 float m_s, float z_s, float log_zs, float a_s, float w, float T,
                                 float inv_T, int lane, int threads, Group& group, DivSparseRow& r,
                                 float& r_out, bool& bad) {
  const int C = static_cast<int>(a.cols);
  const int64_t k = a.sparse_k[j];
  const int32_t* ids = a.sparse_ids[j] + row * k;
  const float* vals = static_cast<const float*>(a.sparse_values[j]) + row * k;
  const float tail = static_cast<const float*>(a.sparse_tails[j])[row];
  const float m = sparse_max(a, j, row, lane, threads, group, bad);
  // acc: sum_i exp((v_i - m) / T), sum_i e[id_i], sum_i e[id_i] (v_i - m) (0 where e = 0).
  float acc[3] = {0.0f, 0.0f, 0.0f};
  for (int64_t i = lane; i < k; i += threads) {
    const int id = ids[i];
    const float v = vals[i] - m;
    acc[0] += __expf(v * inv_T);
    if (id >= 0 && id < C) {
      const float e = __expf((static_cast<float>(s_row[id]) - m_s) * inv_T);
      acc[1] += e;
      acc[2] += e > 0.0f ? e * v : 0.0f;
    }
  }
  group.sum(acc);
  const bool has_tail = k < C;
  const float base = has_tail ? tail - m : 0.0f;
  const float z = acc[0] + (has_tail ? static_cast<float>(C - k) * __expf(base * inv_T) : 0.0f);
  float cross = a_s - acc[2];
  const float rest = z_s - acc[1];  // the student's mass outside the ids (times z_s)
  if (has_tail && rest > 0.0f) cross -= base * rest;
  const float x = cross / z_s;
  r.m = m;
  r.log_z = __logf(z);
  r.inv_z = 1.0f / z;
  r.p_tail = 0.0f;
  r.base = base;
  r.w = w;
  r_out = x + base;
  return w * (x + T * (r.log_z - log_zs));
}

// JSD, first part: the statistics of teacher num_teachers + j's d on the row (fills `r`).
template <typename Group>
__device__ void sparse_jsd_stats(const KDLossArgs& a, int j, int64_t row, float w, float inv_T,
                                 int lane, int threads, Group& group, DivSparseRow& r, bool& bad) {
  const int C = static_cast<int>(a.cols);
  const int64_t k = a.sparse_k[j];
  const float* vals = static_cast<const float*>(a.sparse_values[j]) + row * k;
  const float tail = static_cast<const float*>(a.sparse_tails[j])[row];
  const float m = sparse_max(a, j, row, lane, threads, group, bad);
  float z[1] = {0.0f};
  for (int64_t i = lane; i < k; i += threads) z[0] += __expf((vals[i] - m) * inv_T);
  group.sum(z);
  const bool has_tail = k < C;
  const float e_tail = has_tail ? __expf((tail - m) * inv_T) : 0.0f;
  const float zt = z[0] + (has_tail ? static_cast<float>(C - k) * e_tail : 0.0f);
  r.m = m;
  r.log_z = __logf(zt);
  r.inv_z = 1.0f / zt;
  r.p_tail = e_tail * r.inv_z;
  r.base = has_tail ? (tail - m) * inv_T - r.log_z : 0.0f;
  r.w = w;
}

// JSD at one id: q there and the changes (real minus tail-based) of the p term and of u.
template <typename S>
__device__ __forceinline__ float jsd_id_terms(const DivSparseRow& r, float v, const S* s_row,
                                              int id, float m_s, float inv_zs, float log_zs,
                                              float inv_T, float beta, float omb, float& d_pt,
                                              float& d_u) {
  const float xs = (static_cast<float>(s_row[id]) - m_s) * inv_T;
  const float q = __expf(xs) * inv_zs;
  const float lq = xs - log_zs;
  const float lp = (v - r.m) * inv_T;
  float pt_i, u_i, pt_t, u_t;
  jsd_terms(__expf(lp) * r.inv_z, lp - r.log_z, q, lq, beta, omb, pt_i, u_i);
  jsd_terms(r.p_tail, r.base, q, lq, beta, omb, pt_t, u_t);
  d_pt = pt_i - pt_t;
  d_u = u_i - u_t;
  return q;
}

// JSD, second part: this thread's share of the ids' corrections to sum p (lp - log mix) and Y,
// added to part[0] and part[1] (the tail-based sweep over the row adds the rest).
template <typename S>
__device__ void sparse_jsd_ids(const KDLossArgs& a, int j, int64_t row, const S* s_row,
                               const DivSparseRow& r, float m_s, float inv_zs, float log_zs,
                               float inv_T, float beta, float omb, int lane, int threads,
                               float (&part)[2]) {
  const int C = static_cast<int>(a.cols);
  const int64_t k = a.sparse_k[j];
  const int32_t* ids = a.sparse_ids[j] + row * k;
  const float* vals = static_cast<const float*>(a.sparse_values[j]) + row * k;
  for (int64_t i = lane; i < k; i += threads) {
    const int id = ids[i];
    if (id < 0 || id >= C) continue;
    float d_pt, d_u;
    const float q =
        jsd_id_terms(r, vals[i], s_row, id, m_s, inv_zs, log_zs, inv_T, beta, omb, d_pt, d_u);
    part[0] += d_pt;
    part[1] += q * d_u;
  }
}

// After the gradient sweep: a sparse teacher's corrections at its in-range ids (reverse KL:
// w q (tail - v) / T; JSD: w (1 - beta) q (u_id - u_tail)), each entry read, corrected in float32
// and stored; one teacher at a time, as their ids may overlap.
template <int DIV, typename S>
__device__ void div_sparse_fixup(const KDLossArgs& a, int j, int64_t row, const DivSparseRow& r,
                                 const S* s_row, float m_s, float inv_zs, float log_zs,
                                 float inv_T, float beta, float omb, S* g_row, int lane,
                                 int threads) {
  const int C = static_cast<int>(a.cols);
  const int64_t k = a.sparse_k[j];
  const int32_t* ids = a.sparse_ids[j] + row * k;
  const float* vals = static_cast<const float*>(a.sparse_values[j]) + row * k;
  for (int64_t i = lane; i < k; i += threads) {
    const int id = ids[i];
    if (id < 0 || id >= C) continue;
    float fix;
    if constexpr (DIV == kReverseKL) {
      const float q = __expf((static_cast<float>(s_row[id]) - m_s) * inv_T) * inv_zs;
      fix = q > 0.0f ? r.w * inv_T * q * (r.base - (vals[i] - r.m)) : 0.0f;
    } else {
      float d_pt, d_u;
      const float q =
          jsd_id_terms(r, vals[i], s_row, id, m_s, inv_zs, log_zs, inv_T, beta, omb, d_pt, d_u);
      fix = r.w * omb * q * d_u;
    }
    g_row[id] = static_cast<S>(static_cast<float>(g_row[id]) + fix);
  }
}

// ---- Resident kernel: a row in registers --------------------------------------------------------
//
// `tpr` threads (a power of two, 32 to kResidentMaxThreads) hold one row: thread `lane` holds the
// VEC-wide vectors j * tpr + lane, j < CH, so every access of a warp is contiguous. A block holds
// kWarpRowsPerBlock rows when tpr = 32 and one row otherwise. MULTI (more than one teacher) adds a
// register array for sum_k (w_k / z_k) exp_k. DIV is the divergence (see above: reverse KL and JSD
// run with VEC = 1 and MULTI, the array then holding acc_c, and kDivResidentElems per thread).
template <int CH, int VEC, typename T>
__device__ __forceinline__ void load_resident(const T* row, float (&x)[CH][VEC], int nch, int tpr,
                                              int lane, int C) {
#pragma unroll
  for (int j = 0; j < CH; ++j) {
    const int col = (j * tpr + lane) * VEC;
    if (j < nch && col < C) {
      load_as<VEC>(row + col, x[j]);
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) x[j][e] = neg_inf();
    }
  }
}

template <typename S, typename Tt, int VEC, bool MULTI, int DIV>
__global__ void __launch_bounds__(kResidentMaxThreads)
    kd_loss_resident_kernel(const __grid_constant__ KDLossArgs a, int tpr) {
  static_assert(DIV == kForwardKL || (VEC == 1 && MULTI), "see resident_elems");
  constexpr int CH = resident_elems(DIV) / VEC;
  using Group = RowGroup<kResidentMaxThreads / 32, 4>;
  __shared__ float smem[Group::kSmemFloats];
  // Each row's sparse-teacher statistics, for the fix-up after its gradient sweep.
  using SRow = std::conditional_t<DIV == kForwardKL, SparseRow, DivSparseRow>;
  __shared__ SRow sparse_rows[kWarpRowsPerBlock][kMaxTeachers];
  Group group(tpr, smem);

  const int C = static_cast<int>(a.cols);
  const int lane = threadIdx.x % tpr;
  const int rows_per_block = blockDim.x / tpr;
  const int slot = threadIdx.x / tpr;
  // Chunks that hold any of the row's columns; later ones are skipped (all threads alike).
  const int nch = min(CH, (C + tpr * VEC - 1) / (tpr * VEC));
  const float T = static_cast<float>(a.temperature);
  const float inv_T = 1.0f / T;
  const bool unit_T = a.temperature == 1.0;
  const float eps = static_cast<float>(a.label_smoothing);
  const float beta = static_cast<float>(a.beta);  // JSD only
  const float omb = static_cast<float>(1.0 - a.beta);
  auto* row_loss = static_cast<float*>(a.row_loss);

  for (int64_t row = static_cast<int64_t>(blockIdx.x) * rows_per_block + threadIdx.x / tpr;
       row < a.rows; row += static_cast<int64_t>(gridDim.x) * rows_per_block) {
    const RowPlan p = plan_row(a, row);
    S* g_row = a.grad != nullptr ? static_cast<S*>(a.grad) + row * a.cols : nullptr;

    if (p.skip()) {
      if (g_row != nullptr) {
        const float zero[VEC] = {};
#pragma unroll
        for (int j = 0; j < CH; ++j) {
          const int col = (j * tpr + lane) * VEC;
          if (j < nch && col < C) store_as<VEC>(g_row + col, zero);
        }
      }
      if (lane == 0) row_loss[row] = 0.0f;
      continue;
    }

    // Student: exact max, then sum exp((s - m) / T), sum exp(s - m) for CE at T != 1, sum s for
    // label smoothing, sum (s - m) for sparse teachers.
    const S* s_row = student_row<S>(a, row);
    float s[CH][VEC];
    load_resident(s_row, s, nch, tpr, lane, C);
    float mx = neg_inf();
#pragma unroll
    for (int j = 0; j < CH; ++j) {
      if (j < nch) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) mx = fmaxf(mx, s[j][e]);
      }
    }
    const float m_s = finite_or_zero(group.max(mx));
    const bool need_e1 = p.v != 0.0f && !unit_T;
    const bool need_sum = p.v != 0.0f && eps != 0.0f;
    const bool need_rel = DIV == kForwardKL && p.sparse != 0;
    float st[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int j = 0; j < CH; ++j) {
      if (j < nch) {
        const bool valid = (j * tpr + lane) * VEC < C;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float x = s[j][e];
          st[0] += __expf((x - m_s) * inv_T);
          if (need_e1) st[1] += __expf(x - m_s);
          if (need_sum && valid) st[2] += x;
          if (need_rel && valid) st[3] += x - m_s;
        }
      }
    }
    group.sum(st);
    const float z_s = st[0], z_1 = st[1], sum_s = st[2], s_rel = st[3];
    const float log_zs = __logf(z_s);
    const float inv_zs = 1.0f / z_s;  // reverse KL and JSD
    // Reverse KL and JSD: R, w_sp (see above), and A = sum_c e_c (s_c - m_s) for sparse teachers.
    float r_sum = 0.0f, w_sp = 0.0f, a_s = 0.0f;
    if constexpr (DIV == kReverseKL) {
      if (p.sparse != 0) {
        float as[1] = {0.0f};
#pragma unroll
        for (int j = 0; j < CH; ++j) {
          if (j < nch) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
              const float x = s[j][e] - m_s;
              const float ex = __expf(x * inv_T);
              as[0] += ex > 0.0f ? ex * x : 0.0f;
            }
          }
        }
        group.sum(as);
        a_s = as[0];
      }
    }

    // Teachers with a nonzero weight, one at a time: exact max, then the normaliser and the cross
    // term sum_c e_c (t_c - s_c) / T from the same exponentials, which stay in t[] (one teacher)
    // or are added into acc[] (several) for the gradient.
    float loss = 0.0f;
    float p_coef = 0.0f;
    float t[CH][VEC];
    float acc[MULTI ? CH : 1][VEC];
    if constexpr (MULTI) {
#pragma unroll
      for (int j = 0; j < CH; ++j) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[j][e] = 0.0f;
      }
    }
    if constexpr (DIV == kForwardKL) {
      for (unsigned bits = p.active; bits != 0; bits &= bits - 1) {
        const int k = __ffs(bits) - 1;
        const float w = teacher_weight(a, k, row);
        load_resident(teacher_row<Tt>(a, k, row), t, nch, tpr, lane, C);
        float mt = neg_inf();
#pragma unroll
        for (int j = 0; j < CH; ++j) {
          if (j < nch) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) mt = fmaxf(mt, t[j][e]);
          }
        }
        const float m_t = finite_or_zero(group.max(mt));
        float zc[2] = {0.0f, 0.0f};
#pragma unroll
        for (int j = 0; j < CH; ++j) {
          if (j < nch) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
              const float x = t[j][e];
              const float ex = __expf((x - m_t) * inv_T);
              zc[0] += ex;
              // p = 0 contributes 0 even where t - s is inf or NaN (a select, not a product).
              zc[1] += ex > 0.0f ? ex * ((x - s[j][e]) * inv_T) : 0.0f;
              t[j][e] = ex;
            }
          }
        }
        group.sum(zc);
        loss += w * T * (zc[1] / zc[0] + lse_diff(m_s, log_zs, m_t, __logf(zc[0]), inv_T));
        const float coef = w / zc[0];
        if constexpr (MULTI) {
#pragma unroll
          for (int j = 0; j < CH; ++j) {
            if (j < nch) {
#pragma unroll
              for (int e = 0; e < VEC; ++e) acc[j][e] += coef * t[j][e];
            }
          }
        } else {
          p_coef = coef;
        }
      }
    } else {
      for (unsigned bits = p.active; bits != 0; bits &= bits - 1) {
        const int k = __ffs(bits) - 1;
        const float w = teacher_weight(a, k, row);
        load_resident(teacher_row<Tt>(a, k, row), t, nch, tpr, lane, C);
        float mt = neg_inf();
#pragma unroll
        for (int j = 0; j < CH; ++j) {
          if (j < nch) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) mt = fmaxf(mt, t[j][e]);
          }
        }
        const float m_t = finite_or_zero(group.max(mt));
        if constexpr (DIV == kReverseKL) {
          // z_t and sum_c e_c u_c, u = (s - m_s) - (t - m_t); acc += w u.
          float zc[2] = {0.0f, 0.0f};
#pragma unroll
          for (int j = 0; j < CH; ++j) {
            if (j < nch) {
#pragma unroll
              for (int e = 0; e < VEC; ++e) {
                const float xt = t[j][e] - m_t;
                const float xs = s[j][e] - m_s;
                const float es = __expf(xs * inv_T);
                const float u = xs - xt;
                zc[0] += __expf(xt * inv_T);
                zc[1] += es > 0.0f ? es * u : 0.0f;
                acc[j][e] += w * u;
              }
            }
          }
          group.sum(zc);
          const float x = zc[1] / z_s;
          loss += w * (x + T * (__logf(zc[0]) - log_zs));
          r_sum += w * x;
        } else {
          float zt[1] = {0.0f};
#pragma unroll
          for (int j = 0; j < CH; ++j) {
            if (j < nch) {
#pragma unroll
              for (int e = 0; e < VEC; ++e) zt[0] += __expf((t[j][e] - m_t) * inv_T);
            }
          }
          group.sum(zt);
          const float log_zt = __logf(zt[0]);
          const float inv_zt = 1.0f / zt[0];
          // sum_c p_c (lp_c - log mix_c) and Y; acc += w u.
          float part[2] = {0.0f, 0.0f};
#pragma unroll
          for (int j = 0; j < CH; ++j) {
            if (j < nch) {
#pragma unroll
              for (int e = 0; e < VEC; ++e) {
                const float xt = (t[j][e] - m_t) * inv_T;
                const float xs = (s[j][e] - m_s) * inv_T;
                const float q = __expf(xs) * inv_zs;
                float pt, u;
                jsd_terms(__expf(xt) * inv_zt, xt - log_zt, q, xs - log_zs, beta, omb, pt, u);
                part[0] += pt;
                part[1] += q * u;
                acc[j][e] += w * u;
              }
            }
          }
          group.sum(part);
          loss += w * T * (beta * part[0] + omb * part[1]);
          r_sum += w * part[1];
        }
      }
    }

    // Sparse teachers: their tail probability joins the gradient's per-row constant.
    float c_tail = 0.0f;
    bool bad_id = false;
    for (unsigned bits = p.sparse; bits != 0; bits &= bits - 1) {
      const int j = __ffs(bits) - 1;
      if constexpr (DIV == kForwardKL) {
        SparseRow r;
        loss += sparse_teacher_loss(a, j, row, s_row, m_s, log_zs, s_rel,
                                    teacher_weight(a, a.num_teachers + j, row), T, inv_T, lane,
                                    tpr, group, r, bad_id);
        c_tail += r.w * r.p_tail;
        if (lane == 0) sparse_rows[slot][j] = r;
      } else {
        const float w = teacher_weight(a, a.num_teachers + j, row);
        DivSparseRow r;
        if constexpr (DIV == kReverseKL) {
          float r_j;
          loss += sparse_rkl_loss(a, j, row, s_row, m_s, z_s, log_zs, a_s, w, T, inv_T, lane, tpr,
                                  group, r, r_j, bad_id);
          r_sum += w * r_j;
          w_sp += w;
        } else {
          sparse_jsd_stats(a, j, row, w, inv_T, lane, tpr, group, r, bad_id);
          // The tail-based terms over the whole row (acc += w u), then the ids' corrections.
          float part[2] = {0.0f, 0.0f};
#pragma unroll
          for (int c = 0; c < CH; ++c) {
            if (c < nch && (c * tpr + lane) * VEC < C) {
#pragma unroll
              for (int e = 0; e < VEC; ++e) {
                const float xs = (s[c][e] - m_s) * inv_T;
                const float q = __expf(xs) * inv_zs;
                float pt, u;
                jsd_terms(r.p_tail, r.base, q, xs - log_zs, beta, omb, pt, u);
                part[0] += pt;
                part[1] += q * u;
                acc[c][e] += w * u;
              }
            }
          }
          sparse_jsd_ids(a, j, row, s_row, r, m_s, inv_zs, log_zs, inv_T, beta, omb, lane, tpr,
                         part);
          group.sum(part);
          loss += w * T * (beta * part[0] + omb * part[1]);
          r_sum += w * part[1];
        }
        if (lane == 0) sparse_rows[slot][j] = r;
      }
    }

    if (p.v != 0.0f) {
      if (p.bad_label()) {
        loss = quiet_nan();
      } else {
        loss += p.v * cross_entropy(m_s, unit_T ? log_zs : __logf(z_1),
                                    static_cast<float>(s_row[p.y]), sum_s, eps, C);
      }
    }
    if (bad_id) loss = quiet_nan();
    if (lane == 0) row_loss[row] = loss;

    if (g_row != nullptr) {
      // g = (sum_k w_k) q - sum_k w_k p_k + v (softmax(s) - eps / C) - v (1 - eps) onehot(y),
      // each entry rounded to the student's dtype once. Reverse KL and JSD: the teachers' terms
      // are q g_div (acc + w_sp (s - m_s) - R) instead of (sum_k w_k) q - sum_k w_k p_k.
      const bool use_e1 = p.v_g != 0.0f && !unit_T;
      const float c_q = (DIV == kForwardKL ? p.w_sum / z_s : 0.0f) +
                        (p.v_g != 0.0f && unit_T ? p.v_g / z_s : 0.0f);
      const float c_1 = use_e1 ? p.v_g / z_1 : 0.0f;
      const float c_off = p.v_g * eps / static_cast<float>(C) + c_tail;
      const float c_y = p.v_g * (1.0f - eps);
      const float g_div = (DIV == kReverseKL ? inv_T : omb) * inv_zs;
#pragma unroll
      for (int j = 0; j < CH; ++j) {
        const int col = (j * tpr + lane) * VEC;
        if (j < nch && col < C) {
          float out[VEC];
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            const float x = s[j][e];
            const float ex = __expf((x - m_s) * inv_T);
            float o = ex * c_q - c_off;
            if constexpr (DIV != kForwardKL) {
              if (ex > 0.0f) o += ex * g_div * (acc[j][e] + w_sp * (x - m_s) - r_sum);
            } else if constexpr (MULTI) {
              o -= acc[j][e];
            } else {
              if (p.active != 0) o -= p_coef * t[j][e];
            }
            if (use_e1) o += __expf(x - m_s) * c_1;
            if (col + e == p.y) o -= c_y;
            out[e] = o;
          }
          store_as<VEC>(g_row + col, out);
        }
      }
      // The sparse teachers' ids, one teacher at a time (their ids may overlap), after the row's
      // stores: a warp's own barrier when a warp holds the row (the block's warps hold different
      // rows and may run different numbers of rows), the block's otherwise.
      for (unsigned bits = p.sparse; bits != 0; bits &= bits - 1) {
        tpr == 32 ? __syncwarp() : __syncthreads();
        const int j = __ffs(bits) - 1;
        if constexpr (DIV == kForwardKL) {
          sparse_teacher_fixup<S, Tt>(a, j, false, row, sparse_rows[slot][j], inv_T, s_row,
                                      nullptr, g_row, lane, tpr, 0, static_cast<int>(a.cols));
        } else {
          div_sparse_fixup<DIV>(a, j, row, sparse_rows[slot][j], s_row, m_s, inv_zs, log_zs,
                                inv_T, beta, omb, g_row, lane, tpr);
        }
      }
      // No thread of the row reads sparse_rows any more when the next row overwrites it.
      if (p.sparse != 0) tpr == 32 ? __syncwarp() : __syncthreads();
    }
  }
}

// ---- Streaming kernel: one block per row, online softmax ----------------------------------------
//
// Thread `tid` takes the VEC-wide vectors tid + u * kStreamThreads (u < U) of each step of
// U * kStreamThreads vectors, so U independent accesses per tensor are in flight per thread. Each
// thread keeps running statistics relative to its running maximum; the block combines them after
// the sweep by rescaling every thread's sums to the row maximum.

// Running sums of one thread relative to its running maximum m of the raw logits.
struct StudentRun {
  float m, z, z1, sum;  // z: sum exp((s - m) / T); z1: sum exp(s - m); sum: sum s
  float rel, n;         // sum (s - ref) over n classes, ref = finite_or_zero(m) (sparse teachers)
};
struct TeacherRun {
  float m, z, cross;  // z: sum exp((t - m) / T); cross: sum exp((t - m) / T) (t - s) / T
};

// exp((m_old - m_new) * scale): the factor that moves sums taken relative to m_old to m_new.
// Exactly 1 when the maximum did not change, and 0 when m_old = -inf (the sums are 0 then).
__device__ __forceinline__ float rescale(float m_old, float m_new, float scale) {
  return m_old == m_new ? 1.0f : __expf((m_old - finite_or_zero(m_new)) * scale);
}

template <int U, int VEC>
__device__ __forceinline__ float max_of(const float (&x)[U][VEC]) {
  float m = neg_inf();
#pragma unroll
  for (int u = 0; u < U; ++u) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) m = fmaxf(m, x[u][e]);
  }
  return m;
}

template <int THREADS = kStreamThreads, int U, int VEC, typename T>
__device__ __forceinline__ void load_step(const T* row, int base, int nvec, float (&x)[U][VEC]) {
  const T* p = row + static_cast<int64_t>(base) * VEC;
#pragma unroll
  for (int u = 0; u < U; ++u) {
    if (base + u * THREADS < nvec) {
      load_as<VEC>(p + u * THREADS * VEC, x[u]);
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) x[u][e] = neg_inf();
    }
  }
}

// One step of a sweep (the vectors `base + u * THREADS` of the row, as load_step) into the
// student's running sums.
template <int THREADS, int U, int VEC>
__device__ __forceinline__ void student_step(const float (&xs)[U][VEC], int base, int nvec,
                                             float inv_T, bool need_e1, bool need_sum,
                                             bool need_rel, StudentRun& sr) {
  const float m_new = fmaxf(sr.m, max_of(xs));
  const float ref = finite_or_zero(m_new);
  sr.z *= rescale(sr.m, m_new, inv_T);
  if (need_e1) sr.z1 *= rescale(sr.m, m_new, 1.0f);
  if (need_rel) sr.rel += sr.n * (finite_or_zero(sr.m) - ref);
  sr.m = m_new;
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const bool valid = base + u * THREADS < nvec;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float x = xs[u][e];
      sr.z += __expf((x - ref) * inv_T);
      if (need_e1) sr.z1 += __expf(x - ref);
      if (need_sum && valid) sr.sum += x;
      if (need_rel && valid) {
        sr.rel += x - ref;
        sr.n += 1.0f;
      }
    }
  }
}

// The same step into a teacher's running sums and cross term (xs: the student's step).
template <int U, int VEC>
__device__ __forceinline__ void teacher_step(const float (&xt)[U][VEC], const float (&xs)[U][VEC],
                                             float inv_T, TeacherRun& tr) {
  const float m_new = fmaxf(tr.m, max_of(xt));
  const float ref = finite_or_zero(m_new);
  const float f = rescale(tr.m, m_new, inv_T);
  tr.z *= f;
  // A cross term whose weights all underflow to 0 is 0, even if it was inf.
  tr.cross = f > 0.0f ? tr.cross * f : 0.0f;
  tr.m = m_new;
#pragma unroll
  for (int u = 0; u < U; ++u) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float x = xt[u][e];
      const float ex = __expf((x - ref) * inv_T);
      tr.z += ex;
      tr.cross += ex > 0.0f ? ex * ((x - xs[u][e]) * inv_T) : 0.0f;
    }
  }
}

// Zeros over nvec vectors of a gradient row (a row whose weights are all 0).
template <int THREADS, int VEC, typename S>
__device__ void store_zeros(S* g, int nvec) {
  const float zero[VEC] = {};
  for (int i = threadIdx.x; i < nvec; i += THREADS) {
    store_as<VEC>(g + static_cast<int64_t>(i) * VEC, zero);
  }
}

// The split kernel's gradient sweep over nvec vectors of a row starting at class c0 (s, t_ptr[k]
// and g point there): q and the CE term from the student, minus w_k p_k for every active teacher
// k, with c.t_coef / c.t_ref in shared memory; c.y is the label's column in the row.
template <int THREADS, int U, int VEC, typename S, typename Tt>
__device__ void gradient_sweep(const S* s, const Tt* const* t_ptr, S* g, int nvec, int64_t c0,
                               float inv_T, const SweepCoefs& c) {
  for (int base = threadIdx.x; base < nvec; base += U * THREADS) {
    float xs[U][VEC];
    float out[U][VEC];
    load_step<THREADS>(s, base, nvec, xs);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t col = c0 + (base + u * THREADS) * VEC;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float x = xs[u][e];
        float o = __expf((x - c.m_s) * inv_T) * c.c_q - c.c_off;
        if (c.use_e1) o += __expf(x - c.m_s) * c.c_1;
        if (col + e == c.y) o -= c.c_y;
        out[u][e] = o;
      }
    }
    for (unsigned tb = c.active; tb != 0; tb &= tb - 1) {
      const int k = __ffs(tb) - 1;
      const float coef = c.t_coef[k];
      const float ref = c.t_ref[k];
      float xt[U][VEC];
      load_step<THREADS>(t_ptr[k], base, nvec, xt);
#pragma unroll
      for (int u = 0; u < U; ++u) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) out[u][e] -= coef * __expf((xt[u][e] - ref) * inv_T);
      }
    }
    S* gp = g + static_cast<int64_t>(base) * VEC;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (base + u * THREADS < nvec) store_as<VEC>(gp + u * THREADS * VEC, out[u]);
    }
  }
}

// ---- Split kernel: forward KL on wide rows, a row shared by a cluster ------------------------------
//
// A row is cut into `split` slices of whole vectors, one per CTA of a cluster of `split` CTAs
// (thread-block clusters, sm_90; split = 1 elsewhere, a CTA per row). Each CTA sweeps its slice
// once for the running statistics of the student and of every active dense teacher together, so
// that the student is loaded once per sweep whatever the number of teachers. The CTAs' statistics
// are combined through distributed shared memory, and each CTA sweeps its slice again for the
// gradient. Sparse teachers take the row's statistics: every CTA reads their k entries (small next
// to C) for the row's tail probability, and fixes the ids that fall in its own slice after its
// sweep. The host picks `split` (plan_split) so that the slices of all the rows in flight fit
// in half the L2: the second sweep then reads from L2, and each input byte comes from DRAM once.
// Two or more 256-thread CTAs fit on an SM (the launch bounds cap the registers at 128), so
// several rows are in flight per SM either way.

// Per CTA and row: the maxima of the student and of each teacher, then the sums relative to them
// (z_s, z_1, sum_s, rel = sum (s - m_s) and its count n for sparse teachers, each teacher's z,
// then each teacher's cross term).
constexpr int kSplitMaxima = 1 + kMaxTeachers;
constexpr int kSplitSums = 5 + 2 * kMaxTeachers;
constexpr int kSplitValues = kSplitMaxima + kSplitSums;
static_assert(kSplitValues <= kSplitThreads, "one thread combines each value");

// Cluster plumbing: a CTA posts its values in its own shared memory, the cluster synchronises
// (barrier.cluster with release / acquire semantics, which is also a CTA barrier), and any CTA then
// reads a peer's posted values through distributed shared memory (mapa + ld.shared::cluster).
// Two buffers are used in turn: a buffer is posted again two exchanges later, after a cluster
// barrier that every reader of its previous contents reached only once done reading. A check that
// runs these kernels without clusters defines FASTKD_CLUSTER_EXCHANGE as the name of a header with
// its own class of the same members.
#ifdef FASTKD_CLUSTER_EXCHANGE
#include FASTKD_CLUSTER_EXCHANGE
#else
class ClusterExchange {
 public:
  __device__ explicit ClusterExchange(float (*buf)[kSplitValues]) : buf_(buf) {}
  __device__ void post(int i, float v) { buf_[parity_][i] = v; }
  __device__ void sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.arrive.release.aligned;\n"
                 "barrier.cluster.wait.acquire.aligned;" ::: "memory");
#else
    __trap();  // the host launches split > 1 only where clusters exist
#endif
  }
  __device__ float peer(unsigned rank, int i) const {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    const auto local = static_cast<unsigned>(__cvta_generic_to_shared(&buf_[parity_][i]));
    unsigned remote;
    float v;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"(rank));
    asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(remote) : "memory");
    return v;
#else
    __trap();
    return 0.0f;
#endif
  }
  __device__ void next() { parity_ ^= 1; }

 private:
  float (*buf_)[kSplitValues];
  int parity_ = 0;
};
#endif

// The CTAs' posted values of a row combined into `out` (kSplitValues floats in shared memory), in
// rank order, one thread per value: maxima as they are, sums moved to the row's maxima (as the
// block moves every thread's). Every CTA computes the same bits.
__device__ __forceinline__ void combine_cluster(const ClusterExchange& ex, int split, float inv_T,
                                                float* out) {
  const int l = static_cast<int>(threadIdx.x);
  if (l >= kSplitValues) return;
  if (l < kSplitMaxima) {
    float m = neg_inf();
    for (int r = 0; r < split; ++r) m = fmaxf(m, ex.peer(r, l));
    out[l] = m;
    return;
  }
  const int i = l - kSplitMaxima;
  // The maximum this sum is relative to (none for the plain sums sum_s and n), and its scale.
  const int mi = i < 2 || i == 3 ? 0 : i < 5 ? -1 : 1 + (i - 5) % kMaxTeachers;
  const float scale = i == 1 ? 1.0f : inv_T;
  const bool cross = i >= 5 + kMaxTeachers;
  float m_row = neg_inf();
  if (mi >= 0) {
    for (int r = 0; r < split; ++r) m_row = fmaxf(m_row, ex.peer(r, mi));
  }
  float sum = 0.0f;
  for (int r = 0; r < split; ++r) {
    float v = ex.peer(r, l);
    if (i == 3) {
      // rel: n classes move from the CTA's reference to the row's, each by the difference.
      const float n = ex.peer(r, kSplitMaxima + 4);
      v = n > 0.0f ? v + n * (finite_or_zero(ex.peer(r, 0)) - finite_or_zero(m_row)) : 0.0f;
    } else if (mi >= 0) {
      const float f = rescale(ex.peer(r, mi), m_row, scale);
      v = cross && !(f > 0.0f) ? 0.0f : v * f;
    }
    sum += v;
  }
  out[l] = sum;
}

// SPARSE: the call has sparse teachers (their code in a separate instantiation, so that the dense
// one keeps its registers; see launch).
template <typename S, typename Tt, int VEC, bool SPARSE>
__global__ void __launch_bounds__(kSplitThreads, kSplitBlocksPerSM)
    kd_loss_split_kernel(const __grid_constant__ KDLossArgs a, int split) {
  constexpr int U = kStreamElems / VEC;
  using Group = RowGroup<kSplitThreads / 32, kSplitSums>;
  __shared__ float smem[Group::kSmemFloats];
  __shared__ float posted[2][kSplitValues];
  __shared__ float row_stats[kSplitValues];
  // Per active teacher, for the gradient sweep: w_k / z_k, the max of t_k, its slice.
  __shared__ float t_coef[kMaxTeachers];
  __shared__ float t_ref[kMaxTeachers];
  __shared__ const Tt* t_ptr[kMaxTeachers];
  // Per active sparse teacher, for the fix-up after the gradient sweep.
  __shared__ SparseRow sparse_rows[kMaxTeachers];
  Group group(kSplitThreads, smem);
  ClusterExchange ex(posted);

  const int C = static_cast<int>(a.cols);
  const int nvec = C / VEC;
  // A 1-D grid with clusters of `split` CTAs: a cluster is `split` consecutive blocks.
  const int rank = static_cast<int>(blockIdx.x % split);
  const int v0 = static_cast<int>(static_cast<int64_t>(nvec) * rank / split);
  const int nv = static_cast<int>(static_cast<int64_t>(nvec) * (rank + 1) / split) - v0;
  const int64_t c0 = static_cast<int64_t>(v0) * VEC;  // the slice's first class
  const float T = static_cast<float>(a.temperature);
  const float inv_T = 1.0f / T;
  const bool unit_T = a.temperature == 1.0;
  const float eps = static_cast<float>(a.label_smoothing);
  auto* row_loss = static_cast<float*>(a.row_loss);
  const bool writes_loss = rank == 0 && threadIdx.x == 0;

  for (int64_t row = blockIdx.x / split; row < a.rows; row += gridDim.x / split) {
    const RowPlan p = plan_row(a, row);
    S* g_row = a.grad != nullptr ? static_cast<S*>(a.grad) + row * a.cols + c0 : nullptr;
    // Every CTA of the cluster takes the same branches: p is the row's.
    if (p.skip()) {
      if (g_row != nullptr) store_zeros<kSplitThreads, VEC>(g_row, nv);
      if (writes_loss) row_loss[row] = 0.0f;
      continue;
    }

    const S* s_row = student_row<S>(a, row);
    const bool need_e1 = p.v != 0.0f && !unit_T;
    const bool need_sum = p.v != 0.0f && eps != 0.0f;
    const bool need_rel = SPARSE && p.sparse != 0;
    StudentRun sr{neg_inf(), 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    TeacherRun tr[kMaxTeachers];
#pragma unroll
    for (int k = 0; k < kMaxTeachers; ++k) tr[k] = {neg_inf(), 0.0f, 0.0f};
    for (int base = threadIdx.x; base < nv; base += U * kSplitThreads) {
      float xs[U][VEC];
      load_step<kSplitThreads>(s_row + c0, base, nv, xs);
      student_step<kSplitThreads>(xs, base, nv, inv_T, need_e1, need_sum, need_rel, sr);
#pragma unroll
      for (int k = 0; k < kMaxTeachers; ++k) {
        if ((p.active >> k) & 1u) {
          float xt[U][VEC];
          load_step<kSplitThreads>(teacher_row<Tt>(a, k, row) + c0, base, nv, xt);
          teacher_step(xt, xs, inv_T, tr[k]);
        }
      }
    }

    // The CTA's statistics: every thread's sums moved to the CTA's maxima, then added up.
    float mx[kSplitMaxima];
    mx[0] = sr.m;
#pragma unroll
    for (int k = 0; k < kMaxTeachers; ++k) mx[1 + k] = tr[k].m;
    group.max(mx);
    float sums[kSplitSums];
    sums[0] = sr.z * rescale(sr.m, mx[0], inv_T);
    sums[1] = sr.z1 * rescale(sr.m, mx[0], 1.0f);
    sums[2] = sr.sum;
    // Every thread's sum of s - ref moved to the CTA's reference (n = 0: nothing to move).
    sums[3] = sr.n > 0.0f ? sr.rel + sr.n * (finite_or_zero(sr.m) - finite_or_zero(mx[0])) : 0.0f;
    sums[4] = sr.n;
#pragma unroll
    for (int k = 0; k < kMaxTeachers; ++k) {
      const float f = rescale(tr[k].m, mx[1 + k], inv_T);
      sums[5 + k] = tr[k].z * f;
      sums[5 + kMaxTeachers + k] = f > 0.0f ? tr[k].cross * f : 0.0f;
    }
    group.sum(sums);
    // The row's statistics: the cluster's CTAs combined, or this CTA's when it holds the row.
    if (split > 1) {
      if (threadIdx.x == 0) {
#pragma unroll
        for (int i = 0; i < kSplitMaxima; ++i) ex.post(i, mx[i]);
#pragma unroll
        for (int i = 0; i < kSplitSums; ++i) ex.post(kSplitMaxima + i, sums[i]);
      }
      ex.sync();
      combine_cluster(ex, split, inv_T, row_stats);
      ex.next();
      __syncthreads();
#pragma unroll
      for (int i = 0; i < kSplitMaxima; ++i) mx[i] = row_stats[i];
#pragma unroll
      for (int i = 0; i < kSplitSums; ++i) sums[i] = row_stats[kSplitMaxima + i];
    }
    const float m_s = finite_or_zero(mx[0]);
    const float z_s = sums[0];
    const float z_1 = sums[1];

    // Sparse teachers, in every CTA (each needs the tail probabilities for its sweep and its
    // teachers' statistics for its fix-up); their tail probability joins the gradient's per-row
    // constant.
    float loss = 0.0f, c_tail = 0.0f;
    bool bad_id = false;
    for (unsigned sb = SPARSE ? p.sparse : 0u; sb != 0; sb &= sb - 1) {
      const int j = __ffs(sb) - 1;
      SparseRow r;
      loss += sparse_teacher_loss(a, j, row, s_row, m_s, __logf(z_s), sums[3],
                                  teacher_weight(a, a.num_teachers + j, row), T, inv_T,
                                  static_cast<int>(threadIdx.x), kSplitThreads, group, r, bad_id);
      c_tail += r.w * r.p_tail;
      if (threadIdx.x == 0) sparse_rows[j] = r;
    }

    if (writes_loss) {
      // Unrolled over all teachers, so that mx and sums stay in registers (static indices).
#pragma unroll
      for (int k = 0; k < kMaxTeachers; ++k) {
        if ((p.active >> k) & 1u) {
          const float z_t = sums[5 + k];
          loss += teacher_weight(a, k, row) * T *
                  (sums[5 + kMaxTeachers + k] / z_t +
                   lse_diff(m_s, __logf(z_s), finite_or_zero(mx[1 + k]), __logf(z_t), inv_T));
        }
      }
      if (p.v != 0.0f) {
        loss = p.bad_label() ? quiet_nan()
                             : loss + p.v * cross_entropy(m_s, __logf(unit_T ? z_s : z_1),
                                                          static_cast<float>(s_row[p.y]),
                                                          sums[2], eps, C);
      }
      row_loss[row] = bad_id ? quiet_nan() : loss;
    }

    if (g_row != nullptr) {
      if (threadIdx.x == 0) {
#pragma unroll
        for (int k = 0; k < kMaxTeachers; ++k) {
          if ((p.active >> k) & 1u) {
            t_coef[k] = teacher_weight(a, k, row) / sums[5 + k];
            t_ref[k] = finite_or_zero(mx[1 + k]);
            t_ptr[k] = teacher_row<Tt>(a, k, row) + c0;
          }
        }
      }
      __syncthreads();  // t_coef / t_ref / t_ptr / sparse_rows of this row are visible to all
      const bool use_e1 = p.v_g != 0.0f && !unit_T;
      const float c_q = p.w_sum / z_s + (p.v_g != 0.0f && unit_T ? p.v_g / z_s : 0.0f);
      const float c_1 = use_e1 ? p.v_g / z_1 : 0.0f;
      const float c_off = p.v_g * eps / static_cast<float>(C) + c_tail;
      const float c_y = p.v_g * (1.0f - eps);
      const SweepCoefs sweep{m_s, c_q, c_off, c_1, c_y, p.y, use_e1, p.active, t_coef, t_ref};
      gradient_sweep<kSplitThreads, U, VEC>(s_row + c0, t_ptr, g_row, nv, c0, inv_T, sweep);
      // The sparse teachers' ids in this slice, one teacher at a time (their ids may overlap),
      // after the slice's stores. The next row's first writes to sparse_rows come after its
      // reductions' barriers.
      for (unsigned sb = SPARSE ? p.sparse : 0u; sb != 0; sb &= sb - 1) {
        __syncthreads();
        const int j = __ffs(sb) - 1;
        sparse_teacher_fixup<S, Tt>(a, j, sb == p.sparse, row, sparse_rows[j], inv_T, s_row,
                                    &sweep, g_row - c0, static_cast<int>(threadIdx.x),
                                    kSplitThreads, static_cast<int>(c0),
                                    static_cast<int>(c0) + nv * VEC);
      }
    }
  }
  // No CTA leaves while a peer may still read its posted values.
  if (split > 1) ex.sync();
}

// Reverse KL and JSD on wide rows (see above), one element per access: a sweep for the student's
// statistics, then per dense teacher one sweep (reverse KL: online max and sums) or two (JSD: its
// max and normaliser, then the terms, which need both), per sparse teacher its ids (and for JSD a
// sweep over the student), then the gradient sweep, which recomputes every teacher's u. The sweeps
// after the first re-read the row from L2 (one row per block in flight).
template <typename S, typename Tt, int DIV>
__global__ void __launch_bounds__(kStreamThreads)
    kd_loss_div_stream_kernel(const __grid_constant__ KDLossArgs a) {
  static_assert(DIV == kReverseKL || DIV == kJSD, "forward KL runs the split kernel");
  constexpr int U = kStreamElems;
  using Group = RowGroup<kStreamThreads / 32, 6>;
  __shared__ float smem[Group::kSmemFloats];
  // Per active teacher, for the gradient sweep: the max of t_k and log z_k (JSD).
  __shared__ float t_ref[kMaxTeachers];
  __shared__ float t_lz[kMaxTeachers];
  __shared__ DivSparseRow sparse_rows[kMaxTeachers];
  Group group(kStreamThreads, smem);

  const int C = static_cast<int>(a.cols);
  const float T = static_cast<float>(a.temperature);
  const float inv_T = 1.0f / T;
  const bool unit_T = a.temperature == 1.0;
  const float eps = static_cast<float>(a.label_smoothing);
  const float beta = static_cast<float>(a.beta);
  const float omb = static_cast<float>(1.0 - a.beta);
  const int tid = static_cast<int>(threadIdx.x);
  auto* row_loss = static_cast<float*>(a.row_loss);

  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const RowPlan p = plan_row(a, row);
    S* g_row = a.grad != nullptr ? static_cast<S*>(a.grad) + row * a.cols : nullptr;

    if (p.skip()) {
      if (g_row != nullptr) {
        for (int i = tid; i < C; i += kStreamThreads) g_row[i] = static_cast<S>(0.0f);
      }
      if (tid == 0) row_loss[row] = 0.0f;
      continue;
    }

    const S* s_row = student_row<S>(a, row);
    const bool need_e1 = p.v != 0.0f && !unit_T;
    const bool need_sum = p.v != 0.0f && eps != 0.0f;
    float m_s, z_s, z_1, sum_s;
    {
      StudentRun sr{neg_inf(), 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
      for (int base = tid; base < C; base += U * kStreamThreads) {
        float xs[U][1];
        load_step(s_row, base, C, xs);
        student_step<kStreamThreads>(xs, base, C, inv_T, need_e1, need_sum, false, sr);
      }
      const float mm = group.max(sr.m);
      float sums[3] = {sr.z * rescale(sr.m, mm, inv_T), sr.z1 * rescale(sr.m, mm, 1.0f), sr.sum};
      group.sum(sums);
      m_s = finite_or_zero(mm);
      z_s = sums[0];
      z_1 = sums[1];
      sum_s = sums[2];
    }
    const float log_zs = __logf(z_s);
    const float inv_zs = 1.0f / z_s;
    float loss = 0.0f, r_sum = 0.0f, w_sp = 0.0f;

    for (unsigned bits = p.active; bits != 0; bits &= bits - 1) {
      const int k = __ffs(bits) - 1;
      const float w = teacher_weight(a, k, row);
      const Tt* t_row = teacher_row<Tt>(a, k, row);
      float m_t, log_zt;
      if constexpr (DIV == kReverseKL) {
        // Online over the teacher, with the student's final maximum: z_t and
        // sum_c e_c ((s_c - m_s) - (t_c - ref)) relative to the running reference ref, moved
        // with sum_c e_c (-(t - ref') = -(t - ref) + (ref' - ref)).
        float tm = neg_inf(), tz = 0.0f, cr = 0.0f, es_sum = 0.0f;
        for (int base = tid; base < C; base += U * kStreamThreads) {
          float xs[U][1], xt[U][1];
          load_step(s_row, base, C, xs);
          load_step(t_row, base, C, xt);
          const float m_new = fmaxf(tm, max_of(xt));
          const float ref = finite_or_zero(m_new);
          tz *= rescale(tm, m_new, inv_T);
          if (es_sum > 0.0f) cr += (ref - finite_or_zero(tm)) * es_sum;
          tm = m_new;
#pragma unroll
          for (int u = 0; u < U; ++u) {
            const float x = xs[u][0] - m_s;
            const float es = __expf(x * inv_T);
            tz += __expf((xt[u][0] - ref) * inv_T);
            cr += es > 0.0f ? es * (x - (xt[u][0] - ref)) : 0.0f;
            es_sum += es;
          }
        }
        const float mt = group.max(tm);
        float zc[2] = {tz * rescale(tm, mt, inv_T),
                       es_sum > 0.0f ? cr + (finite_or_zero(mt) - finite_or_zero(tm)) * es_sum
                                     : 0.0f};
        group.sum(zc);
        m_t = finite_or_zero(mt);
        log_zt = __logf(zc[0]);
        const float x = zc[1] * inv_zs;
        loss += w * (x + T * (log_zt - log_zs));
        r_sum += w * x;
      } else {
        float tm = neg_inf(), tz = 0.0f;
        for (int base = tid; base < C; base += U * kStreamThreads) {
          float xt[U][1];
          load_step(t_row, base, C, xt);
          const float m_new = fmaxf(tm, max_of(xt));
          const float ref = finite_or_zero(m_new);
          tz *= rescale(tm, m_new, inv_T);
          tm = m_new;
#pragma unroll
          for (int u = 0; u < U; ++u) tz += __expf((xt[u][0] - ref) * inv_T);
        }
        const float mt = group.max(tm);
        float zt[1] = {tz * rescale(tm, mt, inv_T)};
        group.sum(zt);
        m_t = finite_or_zero(mt);
        log_zt = __logf(zt[0]);
        const float inv_zt = 1.0f / zt[0];
        float part[2] = {0.0f, 0.0f};
        for (int base = tid; base < C; base += U * kStreamThreads) {
          float xs[U][1], xt[U][1];
          load_step(s_row, base, C, xs);
          load_step(t_row, base, C, xt);
#pragma unroll
          for (int u = 0; u < U; ++u) {
            const float ls = (xs[u][0] - m_s) * inv_T;
            const float lt = (xt[u][0] - m_t) * inv_T;
            const float q = __expf(ls) * inv_zs;
            float pt, uu;
            jsd_terms(__expf(lt) * inv_zt, lt - log_zt, q, ls - log_zs, beta, omb, pt, uu);
            part[0] += pt;
            part[1] += q * uu;
          }
        }
        group.sum(part);
        loss += w * T * (beta * part[0] + omb * part[1]);
        r_sum += w * part[1];
      }
      if (tid == 0) {
        t_ref[k] = m_t;
        t_lz[k] = log_zt;
      }
    }

    bool bad_id = false;
    if (p.sparse != 0) {
      float a_s = 0.0f;
      if constexpr (DIV == kReverseKL) {
        float as[1] = {0.0f};
        for (int base = tid; base < C; base += U * kStreamThreads) {
          float xs[U][1];
          load_step(s_row, base, C, xs);
#pragma unroll
          for (int u = 0; u < U; ++u) {
            const float x = xs[u][0] - m_s;
            const float es = __expf(x * inv_T);
            as[0] += es > 0.0f ? es * x : 0.0f;
          }
        }
        group.sum(as);
        a_s = as[0];
      }
      for (unsigned sb = p.sparse; sb != 0; sb &= sb - 1) {
        const int j = __ffs(sb) - 1;
        const float w = teacher_weight(a, a.num_teachers + j, row);
        DivSparseRow r;
        if constexpr (DIV == kReverseKL) {
          float r_j;
          loss += sparse_rkl_loss(a, j, row, s_row, m_s, z_s, log_zs, a_s, w, T, inv_T, tid,
                                  kStreamThreads, group, r, r_j, bad_id);
          r_sum += w * r_j;
          w_sp += w;
        } else {
          sparse_jsd_stats(a, j, row, w, inv_T, tid, kStreamThreads, group, r, bad_id);
          float part[2] = {0.0f, 0.0f};
          for (int base = tid; base < C; base += U * kStreamThreads) {
            float xs[U][1];
            load_step(s_row, base, C, xs);
#pragma unroll
            for (int u = 0; u < U; ++u) {
              if (base + u * kStreamThreads < C) {
                const float ls = (xs[u][0] - m_s) * inv_T;
                const float q = __expf(ls) * inv_zs;
                float pt, uu;
                jsd_terms(r.p_tail, r.base, q, ls - log_zs, beta, omb, pt, uu);
                part[0] += pt;
                part[1] += q * uu;
              }
            }
          }
          sparse_jsd_ids(a, j, row, s_row, r, m_s, inv_zs, log_zs, inv_T, beta, omb, tid,
                         kStreamThreads, part);
          group.sum(part);
          loss += w * T * (beta * part[0] + omb * part[1]);
          r_sum += w * part[1];
        }
        if (tid == 0) sparse_rows[j] = r;
      }
    }

    if (p.v != 0.0f) {
      if (p.bad_label()) {
        loss = quiet_nan();
      } else {
        loss += p.v * cross_entropy(m_s, __logf(unit_T ? z_s : z_1),
                                    static_cast<float>(s_row[p.y]), sum_s, eps, C);
      }
    }
    if (bad_id) loss = quiet_nan();
    if (tid == 0) row_loss[row] = loss;

    if (g_row != nullptr) {
      __syncthreads();  // t_ref / t_lz / sparse_rows of this row are visible to every thread
      const bool use_e1 = p.v_g != 0.0f && !unit_T;
      const float c_q = p.v_g != 0.0f && unit_T ? p.v_g * inv_zs : 0.0f;
      const float c_1 = use_e1 ? p.v_g / z_1 : 0.0f;
      const float c_off = p.v_g * eps / static_cast<float>(C);
      const float c_y = p.v_g * (1.0f - eps);
      const float g_div = (DIV == kReverseKL ? inv_T : omb) * inv_zs;
      for (int base = tid; base < C; base += U * kStreamThreads) {
        float xs[U][1];
        float acc[U];
        load_step(s_row, base, C, xs);
#pragma unroll
        for (int u = 0; u < U; ++u) acc[u] = 0.0f;
        for (unsigned tb = p.active; tb != 0; tb &= tb - 1) {
          const int k = __ffs(tb) - 1;
          const float w = teacher_weight(a, k, row);
          const float m_t = t_ref[k];
          float xt[U][1];
          load_step(teacher_row<Tt>(a, k, row), base, C, xt);
#pragma unroll
          for (int u = 0; u < U; ++u) {
            if constexpr (DIV == kReverseKL) {
              acc[u] += w * ((xs[u][0] - m_s) - (xt[u][0] - m_t));
            } else {
              const float ls = (xs[u][0] - m_s) * inv_T;
              const float lt = (xt[u][0] - m_t) * inv_T;
              const float lz = t_lz[k];
              float pt, uu;
              jsd_terms(__expf(lt - lz), lt - lz, __expf(ls) * inv_zs, ls - log_zs, beta, omb, pt,
                        uu);
              acc[u] += w * uu;
            }
          }
        }
        if constexpr (DIV == kJSD) {
          for (unsigned sb = p.sparse; sb != 0; sb &= sb - 1) {
            const DivSparseRow& r = sparse_rows[__ffs(sb) - 1];
#pragma unroll
            for (int u = 0; u < U; ++u) {
              const float ls = (xs[u][0] - m_s) * inv_T;
              float pt, uu;
              jsd_terms(r.p_tail, r.base, __expf(ls) * inv_zs, ls - log_zs, beta, omb, pt, uu);
              acc[u] += r.w * uu;
            }
          }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int col = base + u * kStreamThreads;
          if (col < C) {
            const float x = xs[u][0];
            const float ex = __expf((x - m_s) * inv_T);
            float o = ex * c_q - c_off;
            if (ex > 0.0f) o += ex * g_div * (acc[u] + w_sp * (x - m_s) - r_sum);
            if (use_e1) o += __expf(x - m_s) * c_1;
            if (col == p.y) o -= c_y;
            g_row[col] = static_cast<S>(o);
          }
        }
      }
      // The sparse teachers' ids, one teacher at a time, after the row's stores. The next row's
      // first writes to the shared arrays come after its reductions' barriers.
      for (unsigned sb = p.sparse; sb != 0; sb &= sb - 1) {
        __syncthreads();
        const int j = __ffs(sb) - 1;
        div_sparse_fixup<DIV>(a, j, row, sparse_rows[j], s_row, m_s, inv_zs, log_zs, inv_T, beta,
                              omb, g_row, tid, kStreamThreads);
      }
    }
  }
}

// ---- Launch plan (torch-free, so that a launcher and a check outside torch share it) -----------

// What the plan needs to know of the GPU.
struct DeviceShape {
  int sms = 1;            // streaming multiprocessors
  int64_t l2_bytes = 0;   // L2 cache
  bool clusters = false;  // thread-block clusters in the kernels this GPU runs (sm_90 code)
};

// The values are KDCudaLaunchPlan::kernel's (csrc/kd_loss.h).
enum class KernelKind { resident = 0, split = 1, stream = 2 };

struct LaunchPlan {
  KernelKind kernel;
  int threads_per_row;  // resident: 32 .. kResidentMaxThreads; otherwise the block size
  unsigned blocks;
  unsigned threads;     // per block
  int split = 1;        // split kernel: CTAs (a cluster) per row
};

// CTAs per row for the split kernel: doubled (up to kMaxSplit, and while every CTA keeps at least
// kSplitMinSlice classes) while the rows in flight (kSplitBlocksPerSM CTAs per SM) would touch
// more than half the L2 between their two sweeps, or while there are fewer CTAs than CTA slots.
inline int plan_split(const KDLossArgs& a, int student_bytes, int teacher_bytes,
                      const DeviceShape& d) {
  if (!d.clusters) return 1;
  const int64_t row_bytes =
      a.cols * (student_bytes * (a.grad != nullptr ? 2 : 1) + a.num_teachers * teacher_bytes);
  const int64_t slots = static_cast<int64_t>(d.sms) * kSplitBlocksPerSM;
  int split = 1;
  while (split < kMaxSplit && a.cols / (2 * split) >= kSplitMinSlice) {
    const int64_t in_flight = std::min<int64_t>(a.rows, std::max<int64_t>(slots / split, 1));
    const bool misses_l2 = in_flight * row_bytes > d.l2_bytes / 2;
    const bool idle_slots = a.rows * split < slots;
    if (!misses_l2 && !idle_slots) break;
    split *= 2;
  }
  return split;
}

inline LaunchPlan plan_launch(const KDLossArgs& a, const DeviceShape& d = {},
                              int student_bytes = 4, int teacher_bytes = 4) {
  const int elems = resident_elems(a.divergence);
  if (a.cols <= static_cast<int64_t>(elems) * kResidentMaxThreads) {
    int tpr = 32;
    while (tpr * elems < a.cols) tpr *= 2;
    const int rows_per_block = tpr == 32 ? kWarpRowsPerBlock : 1;
    const auto blocks = static_cast<unsigned>(
        std::min<int64_t>((a.rows + rows_per_block - 1) / rows_per_block, kMaxBlocks));
    return {KernelKind::resident, tpr, blocks, static_cast<unsigned>(tpr * rows_per_block)};
  }
  // Forward KL: the split kernel; the other divergences stream a row per block.
  if (a.divergence == kForwardKL) {
    const int split = plan_split(a, student_bytes, teacher_bytes, d);
    const auto blocks = static_cast<unsigned>(std::min<int64_t>(a.rows, kMaxBlocks / split) * split);
    return {KernelKind::split, kSplitThreads, blocks, static_cast<unsigned>(kSplitThreads), split};
  }
  const auto blocks = static_cast<unsigned>(std::min<int64_t>(a.rows, kMaxBlocks));
  return {KernelKind::stream, kStreamThreads, blocks, static_cast<unsigned>(kStreamThreads)};
}

// A launch with clusters of `cluster` consecutive blocks (the split kernel when split > 1). A
// check that runs the kernels without clusters defines FASTKD_LAUNCH_CLUSTER.
#ifndef FASTKD_LAUNCH_CLUSTER
template <typename Kernel, typename... Args>
cudaError_t launch_cluster(Kernel kernel, unsigned blocks, unsigned threads, unsigned cluster,
                           cudaStream_t stream, Args... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(blocks);
  config.blockDim = dim3(threads);
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeClusterDimension;
  attribute[0].val.clusterDim.x = cluster;
  attribute[0].val.clusterDim.y = 1;
  attribute[0].val.clusterDim.z = 1;
  config.attrs = attribute;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, args...);
}
#define FASTKD_LAUNCH_CLUSTER(kernel, blocks, threads, cluster, stream, ...) \
  launch_cluster(kernel, blocks, threads, cluster, stream, __VA_ARGS__)
#endif

// Launches the planned kernel; returns the launch's error code.
template <typename S, typename Tt, int VEC>
cudaError_t launch(const KDLossArgs& a, const DeviceShape& d, cudaStream_t stream) {
  const LaunchPlan p = plan_launch(a, d, sizeof(S), sizeof(Tt));
  if (p.kernel == KernelKind::resident) {
    auto* kernel = a.num_teachers > 1 ? kd_loss_resident_kernel<S, Tt, VEC, true, kForwardKL>
                                      : kd_loss_resident_kernel<S, Tt, VEC, false, kForwardKL>;
    FASTKD_LAUNCH(kernel, p.blocks, p.threads, stream, a, p.threads_per_row);
  } else if (p.kernel == KernelKind::split) {
    // Sparse teachers have their own instantiation, which with a float32 student takes one
    // element per access (its 16-byte vectors pushed ptxas past the register budget).
    constexpr int kSparseVec = std::is_same_v<S, float> ? 1 : VEC;
    auto* kernel = a.num_sparse > 0 ? kd_loss_split_kernel<S, Tt, kSparseVec, true>
                                    : kd_loss_split_kernel<S, Tt, VEC, false>;
    if (p.split > 1) {
      const cudaError_t e =
          FASTKD_LAUNCH_CLUSTER(kernel, p.blocks, p.threads, p.split, stream, a, p.split);
      if (e == cudaErrorInvalidClusterSize || e == cudaErrorLaunchOutOfResources) {
        // A partitioned GPU (MPS, green contexts) may hold no cluster this size: a CTA per row
        // (whose own launch error, if any, cudaGetLastError returns below).
        (void)cudaGetLastError();
        const LaunchPlan one = plan_launch(a, DeviceShape{d.sms, d.l2_bytes, false}, sizeof(S),
                                           sizeof(Tt));
        FASTKD_LAUNCH(kernel, one.blocks, one.threads, stream, a, 1);
      } else if (e != cudaSuccess) {
        return e;
      }
    } else {
      FASTKD_LAUNCH(kernel, p.blocks, p.threads, stream, a, 1);
    }
  }
  return cudaGetLastError();
}

// Reverse KL and JSD: one element per access, any layout (see above).
template <typename S, typename Tt, int DIV>
cudaError_t launch_divergence(const KDLossArgs& a, cudaStream_t stream) {
  const LaunchPlan p = plan_launch(a);
  if (p.kernel == KernelKind::resident) {
    auto* kernel = kd_loss_resident_kernel<S, Tt, 1, true, DIV>;
    FASTKD_LAUNCH(kernel, p.blocks, p.threads, stream, a, p.threads_per_row);
  } else {
    auto* kernel = kd_loss_div_stream_kernel<S, Tt, DIV>;
    FASTKD_LAUNCH(kernel, p.blocks, p.threads, stream, a);
  }
  return cudaGetLastError();
}

// Whether every row of a [outer, inner, C] tensor starts on a 16-byte boundary.
inline bool rows_aligned(const void* base, int64_t stride_outer, int64_t stride_inner,
                         int64_t outer, int64_t inner, int64_t elem_size) {
  return cuda::is_aligned(base, 16) && (outer == 1 || stride_outer * elem_size % 16 == 0) &&
         (inner == 1 || stride_inner * elem_size % 16 == 0);
}

// Picks 16-byte vectors when every row, the gradient and C allow them, else one element per
// access; launches and returns the launch's error code.
template <typename S, typename Tt>
cudaError_t launch_for_layout(const KDLossArgs& a, int64_t outer, const DeviceShape& d,
                              cudaStream_t stream) {
  if (a.divergence == kReverseKL) return launch_divergence<S, Tt, kReverseKL>(a, stream);
  if (a.divergence == kJSD) return launch_divergence<S, Tt, kJSD>(a, stream);
  constexpr int kVec = 16 / sizeof(S);
  bool vec = a.cols % kVec == 0 && (a.grad == nullptr || cuda::is_aligned(a.grad, 16)) &&
             rows_aligned(a.student, a.s_stride_outer, a.s_stride_inner, outer, a.inner,
                          sizeof(S));
  for (int k = 0; k < a.num_teachers; ++k) {
    vec = vec && rows_aligned(a.teachers[k], a.t_stride_outer[k], a.t_stride_inner[k], outer,
                              a.inner, sizeof(Tt));
  }
  return vec ? launch<S, Tt, kVec>(a, d, stream) : launch<S, Tt, 1>(a, d, stream);
}

}  // namespace fastkd::kd_cuda
