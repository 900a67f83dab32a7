// fastkd::kd_loss_fwd on the CPU: temperature-scaled KD (soft-target cross-entropy) with optional
// hard-label CE, per-row weights (ignore_index, guided KD) and up to 8 teachers, one row per task.
//
//   q = softmax(s / T), p_k = softmax(t_k / T), w_k = kd_coef[k] * kd_row_weights[k, b]
//   loss_b = T * sum_k w_k * KL(p_k || q) + v * CE(softmax(s), target),  v = ce_coef * ce_w[b]
//   grad_b = sum_k w_k * (q - p_k) + v * (softmax(s) - target)
//   KL(p_k || q) = sum_c p_kc (t_kc - s_c) / T + lse(s / T) - lse(t_k / T)
//   CE = lse(s) - (1 - eps) * s_y - eps / C * sum_c s_c
//
// Shapes: student and teachers [outer, inner, C] with stride 1 over C and any outer/inner strides;
// labels and row weights [rows]; per-row losses [rows]; gradient [rows, C] in the student's dtype.
//
// Numerics: every row is swept with at::vec vectors in float32 (float64 for float64 inputs).
// Sweep 1 takes the maxima, so sweep 2 computes each exponential exactly once, relative to the
// final maximum, and can keep it in a per-thread scratch row; the gradient sweep then needs no
// exponential at all (2 exps per element and teacher, not 4 as with an online softmax that
// recomputes). A row of C = 32768 floats is 128 KiB, so the repeated sweeps hit L2, not DRAM.
// Entries of -inf (masked vocabulary) give p = 0 and contribute exactly 0. Each row is computed by
// one thread in a fixed order, and the scalar loss is summed in float64 in row order, so results
// are bitwise reproducible whatever the thread count.
#include "cpu/capability.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/dtype_dispatch.h"
#include "kd_loss.h"

namespace fastkd {
namespace CPU_CAPABILITY {

template <typename acc_t>
using Vec = at::vec::Vectorized<acc_t>;

// Loads n (<= Vec::size()) elements of T as acc_t lanes; lanes past n hold `fill`.
template <typename acc_t, typename T>
inline Vec<acc_t> load(const T* p, int64_t n, acc_t fill) {
  constexpr int64_t W = Vec<acc_t>::size();
  Vec<acc_t> v;
  if constexpr (std::is_same_v<T, acc_t>) {
    v = n == W ? Vec<acc_t>::loadu(p) : Vec<acc_t>::loadu(p, n);
  } else {
    static_assert(std::is_same_v<acc_t, float>, "reduced-precision inputs accumulate in float32");
    v = std::get<0>(at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p, n)));
  }
  return n == W ? v : Vec<acc_t>::set(Vec<acc_t>(fill), v, n);
}

template <typename T, typename acc_t>
inline void store(T* p, const Vec<acc_t>& v, int64_t n) {
  if constexpr (std::is_same_v<T, acc_t>) {
    v.store(p, n);
  } else {
    at::vec::convert_from_float<T>(v, v).store(p, n);
  }
}

// exp((x - max) * scale) lane by lane: the exponentials of every row sweep (scale = 1/T, or 1 for
// CE), where `max` is the row's maximum, so every argument is <= 0.
template <typename acc_t>
class ScaledExp {
 public:
  ScaledExp(acc_t scale, acc_t max) : scale_(scale), max_(max) {}
  Vec<acc_t> operator()(const Vec<acc_t>& x) const {
    if constexpr (std::is_same_v<acc_t, float>) {
      // ATen's fast float exp (max error 20 ulp, about 2e-6 relative).
      return ((x - max_) * scale_).exp_u20();
    } else {
      // float64 keeps the exact exp, so that gradcheck sees the true derivative.
      return ((x - max_) * scale_).exp();
    }
  }

 private:
  Vec<acc_t> scale_, max_;
};

#if defined(CPU_CAPABILITY_AVX512)
// With AVX-512 the sweeps are bound by the exponential (two per element and teacher), so float
// gets its own: exp(y) = 2^t with t = (x - max) * (scale * log2(e)), 2^t = 2^n 2^f with
// n = round(t) and f in [-1/2, 1/2], 2^f by a degree-6 polynomial (within 1e-7 relative, a
// near-minimax fit), and 2^n applied by vscalefps, which underflows to 0 and overflows to inf by
// itself. 13 instructions where exp_u20 plus the subtract and scale take 20; about 1 ulp, where
// exp_u20 allows 20. The subtraction comes first, as in the generic path, so that logits with a
// large common offset (|max| / T in the thousands) lose no precision to it; folding it into the
// FMA would cost 1e-4 relative error there.
template <>
class ScaledExp<float> {
 public:
  ScaledExp(float scale, float max)
      : a_(_mm512_set1_ps(static_cast<float>(scale * kLog2e))), max_(_mm512_set1_ps(max)) {}
  Vec<float> operator()(const Vec<float>& x) const {
    __m512 t = _mm512_mul_ps(_mm512_sub_ps(x, max_), a_);
    // Clamped so that -inf gives 2^-151 = 0 and +inf gives inf rather than NaN from inf - inf;
    // the operand order keeps a NaN (max/min return their second operand when one is NaN).
    t = _mm512_min_ps(_mm512_set1_ps(128.f), _mm512_max_ps(_mm512_set1_ps(-151.f), t));
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(1.533757750e-04f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339985989e-03f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618519805e-03f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550329015e-02f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264625e-01f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931471825e-01f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
  }

 private:
  static constexpr double kLog2e = 1.4426950408889634;
  __m512 a_, max_;
};
#endif

template <typename acc_t>
inline acc_t hsum(const Vec<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](Vec<acc_t>& a, Vec<acc_t>& b) { return a + b; }, v);
}

template <typename acc_t>
inline acc_t hmax(const Vec<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>(
      [](Vec<acc_t>& a, Vec<acc_t>& b) { return at::vec::maximum(a, b); }, v);
}

// Calls f(c, n) for every block of n <= Vec::size() consecutive columns.
template <typename acc_t, typename F>
inline void for_blocks(int64_t cols, const F& f) {
  constexpr int64_t W = Vec<acc_t>::size();
  int64_t c = 0;
  for (; c + W <= cols; c += W) f(c, W);
  if (c < cols) f(c, cols - c);
}

template <typename acc_t, typename T>
inline acc_t row_max(const T* x, int64_t cols) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  Vec<acc_t> m(kNegInf);
  for_blocks<acc_t>(cols, [&](int64_t c, int64_t n) {
    m = at::vec::maximum(m, load<acc_t>(x + c, n, kNegInf));
  });
  return hmax(m);
}

// A row whose every entry is -inf has no softmax; treating its maximum as 0 keeps exp() at 0
// instead of NaN, and the row's loss then reports inf, not NaN.
template <typename acc_t>
inline acc_t finite_or_zero(acc_t m) {
  return std::isfinite(m) ? m : acc_t(0);
}

template <typename scalar_t, typename teacher_t>
void kd_loss_rows(const KDLossArgs& a, int64_t begin, int64_t end) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  using V = Vec<acc_t>;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const int64_t C = a.cols;
  const int K = a.num_teachers;
  const acc_t T = static_cast<acc_t>(a.temperature);
  const acc_t inv_T = acc_t(1) / T;
  const bool unit_T = a.temperature == 1.0;
  const acc_t eps = static_cast<acc_t>(a.label_smoothing);
  const bool has_ce = a.ce_coef != 0.0;
  const bool has_grad = a.grad != nullptr;

  // Scratch rows: exp of the student at T, exp of the current teacher, the teachers' summed
  // gradient term when K > 1, and exp of the student at T = 1 for CE when T != 1.
  std::vector<acc_t> scratch(has_grad ? 4 * C : 0);
  acc_t* e_s = scratch.data();
  acc_t* e_t = e_s + (has_grad ? C : 0);
  acc_t* acc_p = e_t + (has_grad ? C : 0);
  acc_t* e_1 = acc_p + (has_grad ? C : 0);

  auto* row_loss = static_cast<acc_t*>(a.row_loss);
  const auto* kd_rw = static_cast<const acc_t*>(a.kd_row_weights);
  const auto* ce_rw = static_cast<const acc_t*>(a.ce_row_weights);
  for (int64_t b = begin; b < end; ++b) {
    const auto* s =
        static_cast<const scalar_t*>(a.student) + row_offset(b, a.inner, a.s_stride_outer, a.s_stride_inner);
    scalar_t* g = has_grad ? static_cast<scalar_t*>(a.grad) + b * C : nullptr;

    acc_t w[kMaxTeachers];
    acc_t w_sum = 0;
    for (int k = 0; k < K; ++k) {
      const acc_t rw = kd_rw ? kd_rw[k * a.kd_row_weights_stride + b] : acc_t(1);
      w[k] = static_cast<acc_t>(a.kd_coef[k]) * rw;
      w_sum += w[k];
    }
    const acc_t v =
        has_ce ? static_cast<acc_t>(a.ce_coef) * (ce_rw ? ce_rw[b] : acc_t(1)) : acc_t(0);
    // An ignored row, or a guided row that every teacher got wrong.
    if (v == 0 && std::all_of(w, w + K, [](acc_t x) { return x == 0; })) {
      row_loss[b] = 0;
      if (has_grad) std::fill(g, g + C, scalar_t(0));
      continue;
    }

    // Student: max, then exp(s/T - max/T) (and exp(s - max) for CE at T != 1) in one sweep.
    const acc_t m_s = finite_or_zero(row_max<acc_t>(s, C));
    const bool need_e1 = v != 0 && !unit_T;
    V z_s(0), z_1(0), sum_s(0);  // sum_s: sum of s - m_s (label smoothing)
    const V vm_s(m_s);
    const ScaledExp<acc_t> exp_q(inv_T, m_s), exp_1(1, m_s);
    for_blocks<acc_t>(C, [&](int64_t c, int64_t n) {
      const V x = load<acc_t>(s + c, n, kNegInf);
      const V e = exp_q(x);
      z_s += e;
      if (has_grad) e.store(e_s + c, n);
      if (need_e1) {
        const V e1 = exp_1(x);
        z_1 += e1;
        if (has_grad) e1.store(e_1 + c, n);
      }
      if (v != 0 && eps != 0) sum_s += load<acc_t>(s + c, n, m_s) - vm_s;
    });
    // Log-sum-exps are kept relative to the row maxima (lse(s / T) = m_s / T + log_zs), and the
    // maxima cancel before anything is added to them: with a large common offset in the logits,
    // adding the absolute log-sum-exps would round the loss to the offset's ulp.
    const acc_t log_zs = std::log(hsum(z_s));
    const acc_t z1 = need_e1 ? hsum(z_1) : acc_t(0);

    // With one active teacher its exps stay in e_t and are scaled in the gradient sweep; with
    // several, acc_p accumulates sum_k (w_k / z_k) exp_k.
    int active = 0;
    for (int k = 0; k < K; ++k) active += w[k] != 0;
    acc_t loss = 0;
    acc_t p_coef = 0;
    bool first = true;
    for (int k = 0; k < K; ++k) {
      if (w[k] == 0) continue;
      const auto* t = static_cast<const teacher_t*>(a.teachers[k]) +
                      row_offset(b, a.inner, a.t_stride_outer[k], a.t_stride_inner[k]);
      const acc_t m_t = finite_or_zero(row_max<acc_t>(t, C));
      const ScaledExp<acc_t> exp_p(inv_T, m_t);
      V z_t(0), cross(0);
      for_blocks<acc_t>(C, [&](int64_t c, int64_t n) {
        const V x = load<acc_t>(t + c, n, kNegInf);
        const V e = exp_p(x);
        z_t += e;
        // p_c * (t_c - s_c) (the 1/T is applied to the sum), where p_c = 0 must contribute 0
        // even if t_c - s_c is inf or NaN.
        const V diff = x - load<acc_t>(s + c, n, kNegInf);
        cross = V::blendv(cross, at::vec::fmadd(e, diff, cross), e > V(0));
        if (has_grad) e.store(e_t + c, n);
      });
      const acc_t zt = hsum(z_t);
      const acc_t kl = hsum(cross) * inv_T / zt + (m_s - m_t) * inv_T + (log_zs - std::log(zt));
      loss += w[k] * T * kl;
      if (has_grad && active > 1) {
        const V coef(w[k] / zt);
        for_blocks<acc_t>(C, [&](int64_t c, int64_t n) {
          const V p = V::loadu(e_t + c, n) * coef;
          (first ? p : V::loadu(acc_p + c, n) + p).store(acc_p + c, n);
        });
      } else {
        p_coef = w[k] / zt;
      }
      first = false;
    }

    acc_t y_logit = 0;
    int64_t y = -1;
    if (v != 0) {
      y = a.labels[b];
      TORCH_CHECK(y >= 0 && y < C, "fastkd: labels must be in [0, ", C,
                  ") or equal ignore_index (", a.ignore_index, "); row ", b, " has label ", y);
      y_logit = static_cast<acc_t>(s[y]);
      // CE = lse(s) - (1 - eps) s_y - eps / C sum_c s_c, with m_s taken out of every term.
      const acc_t log_z1 = unit_T ? log_zs : std::log(z1);
      const acc_t smooth = eps != 0 ? eps / static_cast<acc_t>(C) * hsum(sum_s) : acc_t(0);
      loss += v * (log_z1 + (acc_t(1) - eps) * (m_s - y_logit) - smooth);
    }
    row_loss[b] = loss;

    if (has_grad) {
      // g = (sum_k w_k) q - sum_k w_k p_k + v (softmax(s) - eps / C) - v (1 - eps) onehot(y)
      const acc_t zs = hsum(z_s);
      const acc_t c_q = w_sum / zs + (v != 0 && unit_T ? v / zs : acc_t(0));
      const acc_t c_1 = need_e1 ? v / z1 : acc_t(0);
      const acc_t c_off = v * eps / static_cast<acc_t>(C);
      const acc_t* p_src = active > 1 ? acc_p : e_t;
      const acc_t c_p = active > 1 ? acc_t(1) : p_coef;
      const V vc_q(c_q), vc_1(c_1), vc_off(c_off), vc_p(c_p);
      for_blocks<acc_t>(C, [&](int64_t c, int64_t n) {
        V out = V::loadu(e_s + c, n) * vc_q - vc_off;
        if (active > 0) out = out - V::loadu(p_src + c, n) * vc_p;
        if (need_e1) out = out + V::loadu(e_1 + c, n) * vc_1;
        store<scalar_t>(g + c, out, n);
      });
      if (v != 0) {  // the label's column, recomputed in acc_t so it is rounded only once
        acc_t out = e_s[y] * c_q - c_off - v * (acc_t(1) - eps);
        if (active > 0) out -= p_src[y] * c_p;
        if (need_e1) out += e_1[y] * c_1;
        g[y] = static_cast<scalar_t>(out);
      }
    }
  }
}

void kd_loss_kernel(const KDLossArgs& a, c10::ScalarType student_dtype,
                    c10::ScalarType teacher_dtype) {
  // A grain of at least one row and ~16k elements keeps small batches on one thread.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(a.cols, 1));
  auto run = [&](auto student_tag, auto teacher_tag) {
    using S = decltype(student_tag);
    using T = decltype(teacher_tag);
    at::parallel_for(0, a.rows, grain,
                     [&](int64_t begin, int64_t end) { kd_loss_rows<S, T>(a, begin, end); });
  };
  dispatch_student_teacher(student_dtype, teacher_dtype, run);
}

}  // namespace CPU_CAPABILITY
}  // namespace fastkd

#ifdef FASTKD_CPU_DISPATCH
#include <torch/library.h>

#include "kd_loss_op.h"

FASTKD_CPU_DECLARE_VARIANTS(void kd_loss_kernel(const KDLossArgs&, c10::ScalarType, c10::ScalarType))

namespace fastkd {

std::tuple<at::Tensor, at::Tensor> kd_loss_fwd_cpu(
    const at::Tensor& student, at::TensorList teachers, const std::optional<at::Tensor>& labels,
    const std::optional<at::Tensor>& kd_row_weights,
    const std::optional<at::Tensor>& ce_row_weights, at::ArrayRef<double> kd_coefs,
    double ce_coef, double temperature, double label_smoothing, int64_t ignore_index,
    bool per_row, bool compute_grad) {
  KDLossBuffers out;
  const KDLossArgs a =
      prepare_kd_loss(student, teachers, labels, kd_row_weights, ce_row_weights, kd_coefs, ce_coef,
                      temperature, label_smoothing, ignore_index, compute_grad, out);
  if (labels.has_value()) {
    // Out-of-range labels are rejected here for every mode (CE or not); the kernel re-checks the
    // rows it reads.
    const int64_t* y = labels->data_ptr<int64_t>();
    for (int64_t b = 0; b < a.rows; ++b) {
      TORCH_CHECK(y[b] == ignore_index || (y[b] >= 0 && y[b] < a.cols),
                  "fastkd: labels must be in [0, ", a.cols, ") or equal ignore_index (",
                  ignore_index, "); row ", b, " has label ", y[b]);
    }
  }
  FASTKD_CPU_DISPATCH_CALL(kd_loss_kernel, a, student.scalar_type(), teachers[0].scalar_type());
  if (per_row) return {out.row_loss, out.grad};
  // Row order, float64: the same bits whatever the number of threads.
  double total = 0;
  if (out.row_loss.scalar_type() == at::kDouble) {
    const double* r = out.row_loss.data_ptr<double>();
    for (int64_t b = 0; b < a.rows; ++b) total += r[b];
  } else {
    const float* r = out.row_loss.data_ptr<float>();
    for (int64_t b = 0; b < a.rows; ++b) total += r[b];
  }
  at::Tensor loss = at::empty({}, out.row_loss.options());
  if (loss.scalar_type() == at::kDouble) {
    *loss.data_ptr<double>() = total;
  } else {
    *loss.data_ptr<float>() = static_cast<float>(total);
  }
  return {loss, out.grad};
}

}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CPU, m) { m.impl("kd_loss_fwd", &fastkd::kd_loss_fwd_cpu); }
#endif  // FASTKD_CPU_DISPATCH
