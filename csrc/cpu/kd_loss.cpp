// fastkd::kd_loss_fwd on the CPU: temperature-scaled KD (soft-target cross-entropy) with optional
// hard-label CE, per-row weights (ignore_index, guided KD) and up to 8 teachers, one row per task.
//
//   q = softmax(s / T), p_k = softmax(t_k / T), w_k = kd_coef[k] * kd_row_weights[k, b]
//   loss_b = T * sum_k w_k * KL(p_k || q) + v * CE(softmax(s), target),  v = ce_coef * ce_w[b]
//   grad_b = sum_k w_k * (q - p_k) + v * (softmax(s) - target)
//   KL(p_k || q) = sum_c p_kc (t_kc - s_c) / T + lse(s / T) - lse(t_k / T)
//   CE = lse(s) - (1 - eps) * s_y - eps / C * sum_c s_c
//
// Sparse (top-k) teachers, after the dense ones in kd_coef / kd_row_weights: the dense logits d of
// C classes with d[ids_i] = values_i (i < k) and d[c] = tail elsewhere (csrc/kd_loss.h). From the
// k entries, the tail and the student row's statistics (m_s, z, and sum_c (s_c - m_s) when the tail
// has mass), never a C-sized teacher row:
//   Z = sum_i e_i + (C - k) e_tail,  e = exp((d - m_d) / T)
//   KL = [sum_i e_i ((v_i - m_d) - (s[id_i] - m_s)) + e_tail ((C - k)(tail - m_d) - (S - S_ids))]
//        / (T Z) + log z_s - log Z,   S = sum_c (s_c - m_s), S_ids its k gathered terms
// (relative to both maxima, no difference of logit-sized numbers: a student at another offset
// than d, e.g. logits of 1e4 against log-probabilities, keeps float32 precision).
//   grad: w (q - p_tail) everywhere (p_tail a per-row constant of the sweep) + w (p_tail - p_i)
//   at ids_i, added in acc_t to the row before it is rounded to the student's dtype.
//
// Reverse KL and JSD(beta) (KDLossArgs::divergence) take the same sweeps with other terms; see
// dense_divergence, sparse_divergence and other_grad below.
//
// Shapes: student and teachers [outer, inner, C] with stride 1 over C and any outer/inner strides;
// labels and row weights [rows]; sparse ids and values [rows, k] contiguous, tails [rows]; per-row
// losses [rows]; gradient [rows, C] in the student's dtype.
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

// sum_c (s_c - m_s) over the finite entries of a student row, and how many entries are -inf: the
// sparse teachers' tail sum when the row holds -inf logits (where the row's plain sum is -inf, and
// taking the ids' entries out of it would give -inf - (-inf) = NaN).
template <typename acc_t, typename T>
inline acc_t finite_sum(const T* s, int64_t cols, acc_t m_s, int64_t& neg_inf) {
  acc_t sum = 0;
  neg_inf = 0;
  for (int64_t c = 0; c < cols; ++c) {
    const acc_t x = static_cast<acc_t>(s[c]);
    if (x == -std::numeric_limits<acc_t>::infinity()) {
      ++neg_inf;
    } else {
      sum += x - m_s;
    }
  }
  return sum;
}

// Reverse KL and JSD (csrc/kd_loss.h). Each teacher's term is computed from the student row's
// statistics (m_s, z_s and its exps e_s, kept in scratch) and its own sweep; its gradient needs the
// term's value first, so each teacher adds its part to an accumulator row `acc` (kept in cache,
// with e_s) and the gradient is written by one final sweep (other_grad):
//   reverse KL: acc += w (t - m_t),  x_sum += w X,  X = sum_c e_s ((s - m_s) - (t - m_t)) / z_s
//               grad = (q / T) (W (s - m_s) - acc - x_sum)          W = sum_k w_k
//   JSD:        acc += w (lq - lm),  x_sum += w KL(q || m)
//               grad = (1 - beta) q (acc - x_sum)
// No exponential is recomputed; JSD takes one log per element and teacher, for log m.

// The D_k of a dense teacher, for reverse KL or JSD; `acc` (null without a gradient) and `x_sum`
// take its gradient terms as above. `e_t` is scratch for the teacher's exps.
template <typename acc_t, typename S, typename Tt>
acc_t dense_divergence(int div, acc_t beta, acc_t w, const S* s, const Tt* t, int64_t C,
                       acc_t m_s, acc_t zs, acc_t m_t, acc_t inv_T, const acc_t* e_s, acc_t* e_t,
                       acc_t* acc, acc_t& x_sum) {
  using V = Vec<acc_t>;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const V vm_s(m_s), vm_t(m_t), vw(w), zero(0);
  const ScaledExp<acc_t> exp_p(inv_T, m_t);
  const acc_t log_zs = std::log(zs);
  if (div == kReverseKL) {
    // KL(q || p) = sum_c e_s ((s - m_s) - (t - m_t)) / (T z_s) + log z_t - log z_s: relative to
    // both maxima, and no exponential beyond the teacher's normaliser.
    V z_t(0), cross(0);
    for_blocks<acc_t>(C, [&](int64_t c, int64_t n) {
      const V x = load<acc_t>(t + c, n, kNegInf);
      z_t += exp_p(x);
      const V es = V::loadu(e_s + c, n);
      const V rel_t = x - vm_t;
      const V diff = (load<acc_t>(s + c, n, kNegInf) - vm_s) - rel_t;
      // q = 0 contributes 0, even where the difference is inf or NaN.
      cross = V::blendv(cross, at::vec::fmadd(es, diff, cross), es > zero);
      if (acc) at::vec::fmadd(rel_t, vw, V::loadu(acc + c, n)).store(acc + c, n);
    });
    const acc_t cr = hsum(cross);
    x_sum += w * cr / zs;
    return cr * inv_T / zs + (std::log(hsum(z_t)) - log_zs);
  }
  V z_t(0);
  for_blocks<acc_t>(C, [&](int64_t c, int64_t n) {
    const V e = exp_p(load<acc_t>(t + c, n, kNegInf));
    z_t += e;
    e.store(e_t + c, n);
  });
  const acc_t zt = hsum(z_t);
  const V inv_zt(acc_t(1) / zt), inv_zs(acc_t(1) / zs), log_zt(std::log(zt)), vlog_zs(log_zs);
  const V vb(beta), vb1(acc_t(1) - beta), vinv_T(inv_T);
  V d_sum(0), y_sum(0);
  for_blocks<acc_t>(C, [&](int64_t c, int64_t n) {
    const V p = V::loadu(e_t + c, n) * inv_zt;
    const V q = V::loadu(e_s + c, n) * inv_zs;
    const V m = at::vec::fmadd(vb, p, vb1 * q);
    const V lm = m.log();
    const V lp = (load<acc_t>(t + c, n, kNegInf) - vm_t) * vinv_T - log_zt;
    const V lq = (load<acc_t>(s + c, n, kNegInf) - vm_s) * vinv_T - vlog_zs;
    // A weight (p or q) of 0, or an m that underflowed to 0, contributes exactly 0.
    const V live = m > zero;
    const V dq = V::blendv(zero, lq - lm, (q > zero) & live);
    const V dp = V::blendv(zero, lp - lm, (p > zero) & live);
    const V tq = q * dq;
    d_sum += at::vec::fmadd(vb, p * dp, vb1 * tq);
    y_sum += tq;
    if (acc) at::vec::fmadd(dq, vw, V::loadu(acc + c, n)).store(acc + c, n);
  });
  const acc_t kl_qm = hsum(y_sum);
  x_sum += w * kl_qm;
  return hsum(d_sum);
}

// A sparse teacher's row as its KL code sees it: k ids and values, the tail constant on the other
// n_tail = C - k classes, the maximum m_d, normaliser Z and exp((tail - m_d) / T) (0 when
// n_tail = 0).
template <typename acc_t>
struct SparseRow {
  const int32_t* ids;
  const acc_t* vals;
  int64_t k, n_tail;
  acc_t tail, m_d, z, e_tail;
};

// The D_k of a sparse teacher for reverse KL or JSD, with its gradient terms as dense_divergence.
// `a_s` is sum_c e_s (s_c - m_s) (reverse KL's student term).
template <typename acc_t, typename S>
acc_t sparse_divergence(int div, acc_t beta, acc_t w, const S* s, int64_t C, acc_t m_s, acc_t zs,
                        acc_t a_s, acc_t inv_T, const acc_t* e_s, const SparseRow<acc_t>& d,
                        acc_t* acc, acc_t& x_sum) {
  using V = Vec<acc_t>;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const acc_t log_zs = std::log(zs), log_zd = std::log(d.z);
  if (div == kReverseKL) {
    // sum_c e_s ((s - m_s) - (d - m_d)) = a_s - (tail - m_d) (z_s - E_ids)
    //                                       - sum_i e_s[id_i] (v_i - m_d),  E_ids = sum_i e_s[id_i]
    acc_t cr = a_s, e_ids = 0;
    for (int64_t i = 0; i < d.k; ++i) {
      const acc_t es = e_s[d.ids[i]];
      e_ids += es;
      if (es > 0) cr -= es * (d.vals[i] - d.m_d);
    }
    if (d.n_tail > 0) {
      const acc_t rest = zs - e_ids;  // z_s times the student's mass outside the ids
      if (d.tail == kNegInf) {
        if (rest > 0) cr = std::numeric_limits<acc_t>::infinity();
      } else {
        cr -= rest * (d.tail - d.m_d);
      }
    }
    x_sum += w * cr / zs;
    if (acc) {
      // acc += w (d - m_d): the tail's value on every class, then each id's own.
      const acc_t base = d.n_tail > 0 ? d.tail : d.m_d;
      const V shift(w * (base - d.m_d));
      for_blocks<acc_t>(C, [&](int64_t c, int64_t n) {
        (V::loadu(acc + c, n) + shift).store(acc + c, n);
      });
      for (int64_t i = 0; i < d.k; ++i) acc[d.ids[i]] += w * (d.vals[i] - base);
    }
    return cr * inv_T / zs + (log_zd - log_zs);
  }
  // JSD: every class as a tail class (p = p_tail), then each id's terms replaced by its own.
  const acc_t p_t = d.e_tail / d.z;
  const acc_t l_t = p_t > 0 ? (d.tail - d.m_d) * inv_T - log_zd : acc_t(0);
  const V inv_zs(acc_t(1) / zs), vlog_zs(log_zs), vm_s(m_s), vinv_T(inv_T), zero(0), vw(w);
  const V vb(beta), vb1(acc_t(1) - beta), vl_t(l_t), vbp_t(beta * p_t);
  const bool tail_mass = p_t > 0;
  V d_sum(0), y_sum(0);
  const V lane = V::arange(0, 1);
  for_blocks<acc_t>(C, [&](int64_t c, int64_t n) {
    const V q = V::loadu(e_s + c, n) * inv_zs;
    const V m = at::vec::fmadd(vb1, q, vbp_t);
    const V lm = m.log();
    const V lq = (load<acc_t>(s + c, n, kNegInf) - vm_s) * vinv_T - vlog_zs;
    const V live = m > zero;
    const V dq = V::blendv(zero, lq - lm, (q > zero) & live);
    const V tq = q * dq;
    V term = vb1 * tq;
    if (tail_mass) {
      // Every class has p = p_tail here, the -inf ones of the student too; the lanes past the
      // row's end have none.
      const V in_row = n == V::size() ? live : live & (lane < V(static_cast<acc_t>(n)));
      term = at::vec::fmadd(vbp_t, V::blendv(zero, vl_t - lm, in_row), term);
    }
    d_sum += term;
    y_sum += tq;
    if (acc) at::vec::fmadd(dq, vw, V::loadu(acc + c, n)).store(acc + c, n);
  });
  acc_t div_sum = hsum(d_sum), kl_qm = hsum(y_sum);
  // The ids: their sweep terms (p = p_tail) out, their own (p = p_i) in.
  const auto terms = [&](acc_t p, acc_t lp, acc_t q, acc_t lq, acc_t& dq) {
    const acc_t m = beta * p + (acc_t(1) - beta) * q;
    const acc_t lm = std::log(m);
    dq = q > 0 && m > 0 ? lq - lm : acc_t(0);
    const acc_t dp = p > 0 && m > 0 ? lp - lm : acc_t(0);
    return beta * p * dp + (acc_t(1) - beta) * q * dq;
  };
  for (int64_t i = 0; i < d.k; ++i) {
    const int32_t id = d.ids[i];
    const acc_t q = e_s[id] / zs;
    const acc_t lq = (static_cast<acc_t>(s[id]) - m_s) * inv_T - log_zs;
    const acc_t rel = d.vals[i] - d.m_d;
    const acc_t p = std::exp(rel * inv_T) / d.z;
    acc_t dq_tail = 0, dq_own = 0;
    div_sum -= terms(p_t, l_t, q, lq, dq_tail);
    div_sum += terms(p, rel * inv_T - log_zd, q, lq, dq_own);
    kl_qm += q * (dq_own - dq_tail);
    if (acc) acc[id] += w * (dq_own - dq_tail);
  }
  x_sum += w * kl_qm;
  return div_sum;
}

// The gradient row for reverse KL or JSD (see above), plus CE's v (softmax(s) - target); the
// label's column is recomputed in acc_t so it is rounded once. `e_1` is exp(s - m_s) when CE runs
// at T != 1 (null otherwise: softmax(s) is q).
template <typename scalar_t, typename acc_t>
void other_grad(int div, acc_t beta, acc_t w_sum, acc_t x_sum, acc_t v, acc_t eps, int64_t y,
                const scalar_t* s, int64_t C, acc_t m_s, acc_t zs, acc_t z1, acc_t inv_T,
                const acc_t* e_s, const acc_t* e_1, const acc_t* acc, scalar_t* g) {
  using V = Vec<acc_t>;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const V inv_zs(acc_t(1) / zs), vm_s(m_s), vw(w_sum), vx(x_sum), vinv_T(inv_T), zero(0);
  const V vb1(acc_t(1) - beta);
  const acc_t* e_ce = e_1 ? e_1 : e_s;
  const V vc_ce(v != 0 ? v / (e_1 ? z1 : zs) : acc_t(0));
  const V v_off(v * eps / static_cast<acc_t>(C));
  const auto grad_at = [&](int64_t c, int64_t n) {
    const V q = V::loadu(e_s + c, n) * inv_zs;
    const V a = V::loadu(acc + c, n);
    const V term = div == kReverseKL
                       ? q * vinv_T * (at::vec::fmsub(load<acc_t>(s + c, n, kNegInf) - vm_s, vw, a) - vx)
                       : vb1 * q * (a - vx);
    V out = V::blendv(zero, term, q > zero);
    if (v != 0) out = at::vec::fmadd(V::loadu(e_ce + c, n), vc_ce, out) - v_off;
    return out;
  };
  for_blocks<acc_t>(C, [&](int64_t c, int64_t n) { store<scalar_t>(g + c, grad_at(c, n), n); });
  if (v != 0) {
    acc_t lanes[V::size()];
    grad_at(y, 1).store(lanes);
    g[y] = static_cast<scalar_t>(lanes[0] - v * (acc_t(1) - eps));
  }
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
  const int div = a.divergence;
  const bool forward_kl = div == kForwardKL;
  const acc_t beta = static_cast<acc_t>(a.beta);

  // Scratch rows: exp of the student at T, exp of the current teacher, the teachers' summed
  // gradient term (when K > 1 for forward KL; always for the other divergences), and exp of the
  // student at T = 1 for CE when T != 1. Reverse KL and JSD read the student's exps in their
  // losses too.
  const bool keep_rows = has_grad || !forward_kl;
  std::vector<acc_t> scratch(keep_rows ? 4 * C : 0);
  acc_t* e_s = scratch.data();
  acc_t* e_t = e_s + (keep_rows ? C : 0);
  acc_t* acc_p = e_t + (keep_rows ? C : 0);
  acc_t* e_1 = acc_p + (keep_rows ? C : 0);

  // Sparse teachers' scratch: the student's logits at the current teacher's ids and, for the
  // gradient, every teacher's k exponentials (applied after the gradient sweep).
  const int J = a.num_sparse;
  int64_t max_k = 0, sum_k = 0;
  int64_t e_off[kMaxTeachers] = {};
  for (int j = 0; j < J; ++j) {
    e_off[j] = sum_k;
    sum_k += a.sparse_k[j];
    max_k = std::max(max_k, a.sparse_k[j]);
  }
  std::vector<acc_t> sparse_scratch(max_k + (has_grad ? sum_k : 0));
  acc_t* s_at = sparse_scratch.data();
  acc_t* e_d = s_at + max_k;

  auto* row_loss = static_cast<acc_t*>(a.row_loss);
  const auto* kd_rw = static_cast<const acc_t*>(a.kd_row_weights);
  const auto* ce_rw = static_cast<const acc_t*>(a.ce_row_weights);
  for (int64_t b = begin; b < end; ++b) {
    const auto* s =
        static_cast<const scalar_t*>(a.student) + row_offset(b, a.inner, a.s_stride_outer, a.s_stride_inner);
    scalar_t* g = has_grad ? static_cast<scalar_t*>(a.grad) + b * C : nullptr;

    acc_t w[kMaxTeachers];  // dense teachers, then sparse ones
    acc_t w_sum = 0;
    for (int k = 0; k < K + J; ++k) {
      const acc_t rw = kd_rw ? kd_rw[k * a.kd_row_weights_stride + b] : acc_t(1);
      w[k] = static_cast<acc_t>(a.kd_coef[k]) * rw;
      w_sum += w[k];
    }
    const acc_t v =
        has_ce ? static_cast<acc_t>(a.ce_coef) * (ce_rw ? ce_rw[b] : acc_t(1)) : acc_t(0);
    // An ignored row, or a guided row that every teacher got wrong.
    if (v == 0 && std::all_of(w, w + K + J, [](acc_t x) { return x == 0; })) {
      row_loss[b] = 0;
      if (has_grad) std::fill(g, g + C, scalar_t(0));
      continue;
    }
    // The row's sum of s - m_s: label smoothing, and the tail of a sparse teacher with mass there.
    bool need_sum = v != 0 && eps != 0;
    for (int j = 0; j < J; ++j) {
      need_sum = need_sum || (w[K + j] != 0 && a.sparse_k[j] < C &&
                              static_cast<const acc_t*>(a.sparse_tails[j])[b] > kNegInf);
    }

    // Student: max, then exp(s/T - max/T) (and exp(s - max) for CE at T != 1) in one sweep.
    const acc_t m_s = finite_or_zero(row_max<acc_t>(s, C));
    const bool need_e1 = v != 0 && !unit_T;
    // A: sum_c e_s (s_c - m_s), reverse KL's student term against sparse teachers.
    const bool need_a = div == kReverseKL && J > 0;
    V z_s(0), z_1(0), sum_s(0), a_s(0);  // sum_s: sum of s - m_s (label smoothing)
    const V vm_s(m_s);
    const ScaledExp<acc_t> exp_q(inv_T, m_s), exp_1(1, m_s);
    for_blocks<acc_t>(C, [&](int64_t c, int64_t n) {
      const V x = load<acc_t>(s + c, n, kNegInf);
      const V e = exp_q(x);
      z_s += e;
      if (keep_rows) e.store(e_s + c, n);
      if (need_a) a_s = V::blendv(a_s, at::vec::fmadd(e, x - vm_s, a_s), e > V(0));
      if (need_e1) {
        const V e1 = exp_1(x);
        z_1 += e1;
        if (has_grad) e1.store(e_1 + c, n);
      }
      if (need_sum) sum_s += load<acc_t>(s + c, n, m_s) - vm_s;
    });
    // Log-sum-exps are kept relative to the row maxima (lse(s / T) = m_s / T + log_zs), and the
    // maxima cancel before anything is added to them: with a large common offset in the logits,
    // adding the absolute log-sum-exps would round the loss to the offset's ulp.
    const acc_t zs = hsum(z_s);
    const acc_t log_zs = std::log(zs);
    const acc_t z1 = need_e1 ? hsum(z_1) : acc_t(0);
    // Reverse KL and JSD: the teachers' gradient terms accumulate in acc_p (see other_grad).
    if (!forward_kl && has_grad) std::fill(acc_p, acc_p + C, acc_t(0));
    acc_t x_sum = 0;  // sum_k w_k X_k (reverse KL) or sum_k w_k KL_k(q || m) (JSD)

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
      if (!forward_kl) {
        loss += w[k] * T *
                dense_divergence<acc_t>(div, beta, w[k], s, t, C, m_s, zs, m_t, inv_T, e_s, e_t,
                                        has_grad ? acc_p : nullptr, x_sum);
        continue;
      }
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

    // Sparse teachers: d's maximum, normaliser and cross term from its k values and tail.
    const acc_t s_rel = need_sum ? hsum(sum_s) : acc_t(0);
    int64_t row_neg_inf = -1;  // -inf entries of the student row, counted when first needed
    acc_t row_finite = 0;
    acc_t c_tail = 0;  // sum_j w_j p_tail_j, a constant of the row's gradient
    acc_t sp_inv_z[kMaxTeachers] = {};
    acc_t sp_p_tail[kMaxTeachers] = {};
    int sparse_active = 0;
    for (int j = 0; j < J; ++j) {
      const acc_t wj = w[K + j];
      if (wj == 0) continue;
      ++sparse_active;
      const int64_t kj = a.sparse_k[j];
      const int64_t n_tail = C - kj;
      const int32_t* ids = a.sparse_ids[j] + b * kj;
      const acc_t* vals = static_cast<const acc_t*>(a.sparse_values[j]) + b * kj;
      const acc_t tail = static_cast<const acc_t*>(a.sparse_tails[j])[b];
      for (int64_t i = 0; i < kj; ++i) {
        const int32_t id = ids[i];
        TORCH_CHECK(id >= 0 && id < C, "fastkd: sparse_ids must be in [0, ", C,
                    "); sparse teacher ", j, " has id ", id, " on row ", b);
        s_at[i] = static_cast<acc_t>(s[id]);
      }
      // The tail takes part only when some class holds it; a NaN in it propagates.
      acc_t m_d = row_max<acc_t>(vals, kj);
      if (n_tail > 0 && (tail > m_d || std::isnan(tail))) m_d = tail;
      m_d = finite_or_zero(m_d);
      const ScaledExp<acc_t> exp_d(inv_T, m_d);
      const V vm_d(m_d);
      const acc_t e_tail = n_tail > 0 ? std::exp((tail - m_d) * inv_T) : acc_t(0);
      const bool tail_mass = e_tail > 0;
      acc_t* e_j = e_d + e_off[j];
      V z_d(0), cross(0), at_ids(0);  // at_ids: sum_i (s[id_i] - m_s)
      for_blocks<acc_t>(kj, [&](int64_t c, int64_t n) {
        const V x = load<acc_t>(vals + c, n, kNegInf);
        const V e = exp_d(x);
        z_d += e;
        // As for a dense teacher: p_i = 0 contributes 0 even where the difference is inf or NaN.
        const V diff = (x - vm_d) - (load<acc_t>(s_at + c, n, kNegInf) - vm_s);
        cross = V::blendv(cross, at::vec::fmadd(e, diff, cross), e > V(0));
        if (tail_mass) at_ids += load<acc_t>(s_at + c, n, m_s) - vm_s;
        if (has_grad) e.store(e_j + c, n);
      });
      const acc_t zd = hsum(z_d) + static_cast<acc_t>(n_tail) * e_tail;
      if (!forward_kl) {
        const SparseRow<acc_t> d{ids, vals, kj, n_tail, tail, m_d, zd, e_tail};
        loss += wj * T *
                sparse_divergence<acc_t>(div, beta, wj, s, C, m_s, zs, hsum(a_s), inv_T, e_s, d,
                                         has_grad ? acc_p : nullptr, x_sum);
        continue;
      }
      acc_t cr = hsum(cross);
      if (tail_mass) {
        // sum over the tail classes of (tail - m_d) - (s_c - m_s) = n_tail (tail - m_d) - rest.
        acc_t rest = s_rel - hsum(at_ids);
        if (s_rel == kNegInf) {
          if (row_neg_inf < 0) row_finite = finite_sum<acc_t>(s, C, m_s, row_neg_inf);
          acc_t ids_finite = 0;
          int64_t ids_neg_inf = 0;
          for (int64_t i = 0; i < kj; ++i) {
            if (s_at[i] == kNegInf) {
              ++ids_neg_inf;
            } else {
              ids_finite += s_at[i] - m_s;
            }
          }
          rest = row_neg_inf > ids_neg_inf ? kNegInf : row_finite - ids_finite;
        }
        cr += e_tail * (static_cast<acc_t>(n_tail) * (tail - m_d) - rest);
      }
      const acc_t kl = cr * inv_T / zd + (log_zs - std::log(zd));
      loss += wj * T * kl;
      sp_inv_z[j] = acc_t(1) / zd;
      sp_p_tail[j] = e_tail / zd;
      c_tail += wj * sp_p_tail[j];
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

    if (has_grad && !forward_kl) {
      other_grad<scalar_t, acc_t>(div, beta, w_sum, x_sum, v, eps, y, s, C, m_s, zs, z1,
                                  inv_T, e_s, need_e1 ? e_1 : nullptr, acc_p, g);
    } else if (has_grad) {
      // g = (sum_k w_k) q - sum_k w_k p_k + v (softmax(s) - eps / C) - v (1 - eps) onehot(y)
      const acc_t c_q = w_sum / zs + (v != 0 && unit_T ? v / zs : acc_t(0));
      const acc_t c_1 = need_e1 ? v / z1 : acc_t(0);
      const acc_t c_off = v * eps / static_cast<acc_t>(C) + c_tail;
      const acc_t* p_src = active > 1 ? acc_p : e_t;
      const acc_t c_p = active > 1 ? acc_t(1) : p_coef;
      const V vc_q(c_q), vc_1(c_1), vc_off(c_off), vc_p(c_p);
      // With sparse teachers, k columns per teacher take a correction after the sweep: a
      // reduced-precision row is first written in acc_t over e_s (each entry read before it is
      // overwritten), corrected there and then rounded once.
      constexpr bool kAccRow = std::is_same_v<scalar_t, acc_t>;
      const bool buffered = !kAccRow && sparse_active > 0;
      for_blocks<acc_t>(C, [&](int64_t c, int64_t n) {
        V out = V::loadu(e_s + c, n) * vc_q - vc_off;
        if (active > 0) out = out - V::loadu(p_src + c, n) * vc_p;
        if (need_e1) out = out + V::loadu(e_1 + c, n) * vc_1;
        if (buffered) {
          out.store(e_s + c, n);
        } else {
          store<scalar_t>(g + c, out, n);
        }
      });
      if (sparse_active > 0) {
        acc_t* row = nullptr;  // the row in acc_t: the gradient itself, or e_s
        if constexpr (kAccRow) {
          row = g;
        } else {
          row = e_s;
        }
        if (v != 0) row[y] -= v * (acc_t(1) - eps);
        for (int j = 0; j < J; ++j) {
          const acc_t wj = w[K + j];
          if (wj == 0) continue;
          const int64_t kj = a.sparse_k[j];
          const int32_t* ids = a.sparse_ids[j] + b * kj;
          const acc_t* e_j = e_d + e_off[j];
          for (int64_t i = 0; i < kj; ++i) {
            row[ids[i]] += wj * (sp_p_tail[j] - e_j[i] * sp_inv_z[j]);
          }
        }
        if constexpr (!kAccRow) {
          for_blocks<acc_t>(C, [&](int64_t c, int64_t n) {
            store<scalar_t>(g + c, V::loadu(e_s + c, n), n);
          });
        }
      } else if (v != 0) {  // the label's column, recomputed in acc_t so it is rounded only once
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
    bool per_row, bool compute_grad, at::TensorList sparse_ids, at::TensorList sparse_values,
    at::TensorList sparse_tails, int64_t divergence, double beta) {
  KDLossBuffers out;
  const KDLossArgs a =
      prepare_kd_loss(student, teachers, labels, kd_row_weights, ce_row_weights, kd_coefs, ce_coef,
                      temperature, label_smoothing, ignore_index, compute_grad, sparse_ids,
                      sparse_values, sparse_tails, divergence, beta, out);
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
  // Ids outside [0, C) are rejected here for every row, like labels (the kernel re-checks the
  // rows it reads); one branch-free pass per teacher, the error's row found only on failure.
  for (int j = 0; j < a.num_sparse; ++j) {
    const int32_t* ids = a.sparse_ids[j];
    const int64_t n = a.rows * a.sparse_k[j];
    bool bad = false;
    for (int64_t i = 0; i < n; ++i) bad |= ids[i] < 0 || ids[i] >= a.cols;
    for (int64_t i = 0; bad && i < n; ++i) {
      TORCH_CHECK(ids[i] >= 0 && ids[i] < a.cols, "fastkd: sparse_ids must be in [0, ", a.cols,
                  "); sparse teacher ", j, " has id ", ids[i], " on row ", i / a.sparse_k[j]);
    }
  }
  // With sparse teachers alone no dense teacher row is read: the student's type stands in.
  const at::ScalarType teacher_dtype =
      teachers.empty() ? student.scalar_type() : teachers[0].scalar_type();
  FASTKD_CPU_DISPATCH_CALL(kd_loss_kernel, a, student.scalar_type(), teacher_dtype);
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
