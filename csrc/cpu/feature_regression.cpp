// fastkd::feature_regression_fwd on the CPU: FitNet hints / neighbourhood distillation (MSE), L1,
// and the FEED / Factor-Transfer loss (L1 between per-sample L2-normalised maps), for a list of
// (student, teacher) pairs in one call.
//
//   per pair, c = weight / (B * D) ("mean") or weight ("sum"), D = numel / B:
//   normalize = false:  loss = c * sum |a - b|^p,  grad = c * p * |d|^(p-1) sign(d),  d = a - b
//   normalize = true:   u = a / max(||a||, eps), v = b / max(||b||, eps) per sample, d = u - v,
//                       g = sign(d) (p = 1) or d (p = 2), loss = c * sum |d|^p,
//                       grad = c * p * (g - u <u, g>) / ||a||   (||a|| >= eps)
//                              c * p * g / eps                   (||a|| < eps: u = a / eps)
//
// Shapes: each pair is two tensors of one shape [B, ...] in one dense, sample-blocked layout
// (csrc/feature_regression.h), processed as flat arrays; the gradient has the student's strides.
//
// Numerics and schedule. Every sum is defined canonically, independently of the thread count: the
// elements are cut into chunks of kChunk (per pair for normalize = false, per sample for
// normalize = true), each chunk is reduced with at::vec vectors in float32 (float64 for float64
// inputs), and chunk partials are added in chunk order in float64. Threads only decide which
// chunks run where, so the loss and the gradient are bitwise reproducible.
//
// normalize = true needs three sweeps of each sample: the two norms before any difference, and
// <u, g> before any gradient. With enough samples to keep every thread busy, one thread takes a
// whole sample and sweeps it three times back to back -- forward, backward, forward, so each sweep
// starts on the chunks the previous one touched last and the re-reads come from L2/L3 instead of
// DRAM (a [256, 28, 28] fp32 sample pair is 1.6 MB). With fewer samples than that (a few very
// large maps), each sweep runs in parallel over the chunks of all samples instead; the per-chunk
// partials are the same, so are the results.
#include "cpu/capability.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/dtype_dispatch.h"
#include "feature_regression.h"

namespace fastkd {
namespace CPU_CAPABILITY {

namespace {

// Elements per chunk: 64 KiB of float32, a few microseconds of work -- coarse enough for
// parallel_for, fine enough that chunk partials keep float32 rounding small.
constexpr int64_t kChunk = 16384;

template <typename acc_t>
using Vec = at::vec::Vectorized<acc_t>;

// Elements per vector step: two acc_t vectors, which is exactly one vector of a 16-bit type.
template <typename acc_t>
constexpr int64_t kStep = 2 * Vec<acc_t>::size();

template <typename acc_t, typename T>
inline void load_step(const T* p, Vec<acc_t>& lo, Vec<acc_t>& hi) {
  if constexpr (std::is_same_v<T, acc_t>) {
    lo = Vec<acc_t>::loadu(p);
    hi = Vec<acc_t>::loadu(p + Vec<acc_t>::size());
  } else {
    static_assert(std::is_same_v<acc_t, float>, "16-bit inputs accumulate in float32");
    static_assert(at::vec::Vectorized<T>::size() == kStep<float>);
    std::tie(lo, hi) = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p));
  }
}

// float16 tops out at 65504; the gradient of an all-zero sample under normalize=True is about
// c / eps, so it saturates there instead of turning into inf. NaN stays NaN.
template <typename acc_t>
inline Vec<acc_t> saturate_half(const Vec<acc_t>& x) {
  const Vec<acc_t> hi(acc_t(65504)), lo(acc_t(-65504));
  return Vec<acc_t>::blendv(Vec<acc_t>::blendv(x, hi, x > hi), lo, x < lo);
}

template <typename T, typename acc_t>
inline void store_step(T* p, Vec<acc_t> lo, Vec<acc_t> hi) {
  if constexpr (std::is_same_v<T, acc_t>) {
    lo.store(p);
    hi.store(p + Vec<acc_t>::size());
  } else {
    if constexpr (std::is_same_v<T, c10::Half>) {
      lo = saturate_half(lo);
      hi = saturate_half(hi);
    }
    at::vec::convert_from_float<T>(lo, hi).store(p);
  }
}

template <typename T, typename acc_t>
inline T to_out(acc_t x) {
  if constexpr (std::is_same_v<T, c10::Half>) {
    x = x > acc_t(65504) ? acc_t(65504) : (x < acc_t(-65504) ? acc_t(-65504) : x);
  }
  return static_cast<T>(x);
}

template <typename acc_t>
inline acc_t hsum(const Vec<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](Vec<acc_t>& a, Vec<acc_t>& b) { return a + b; }, v);
}

// |d|^p and the loss's derivative direction g: sign(d) for p = 1 (sign(0) = 0), d for p = 2.
template <int P, typename acc_t>
inline Vec<acc_t> err(const Vec<acc_t>& d) {
  if constexpr (P == 2) {
    return d * d;
  } else {
    return d.abs();
  }
}

template <int P, typename acc_t>
inline Vec<acc_t> dir(const Vec<acc_t>& d) {
  if constexpr (P == 2) {
    return d;
  } else {
    const Vec<acc_t> zero(0), one(1);
    return Vec<acc_t>::blendv(zero, one, d > zero) - Vec<acc_t>::blendv(zero, one, d < zero);
  }
}

template <int P, typename acc_t>
inline acc_t err(acc_t d) {
  return P == 2 ? d * d : std::abs(d);
}

template <int P, typename acc_t>
inline acc_t dir(acc_t d) {
  if constexpr (P == 2) {
    return d;
  } else {
    return static_cast<acc_t>((d > 0) - (d < 0));
  }
}

// ---------------------------------------------------------------------------------------------
// Chunk kernels: n elements at s, t (and g); vector steps, then a scalar tail.

// normalize = false: returns sum |a - b|^p and writes gscale * g.
template <int P, bool GRAD, typename acc_t, typename S, typename T>
acc_t plain_chunk(const S* s, const T* t, S* g, int64_t n, acc_t gscale) {
  using V = Vec<acc_t>;
  constexpr int64_t K = kStep<acc_t>;
  const V vg(gscale);
  V acc_lo(0), acc_hi(0);
  int64_t i = 0;
  for (; i + K <= n; i += K) {
    V s0, s1, t0, t1;
    load_step<acc_t>(s + i, s0, s1);
    load_step<acc_t>(t + i, t0, t1);
    const V d0 = s0 - t0, d1 = s1 - t1;
    acc_lo += err<P>(d0);
    acc_hi += err<P>(d1);
    if constexpr (GRAD) store_step<S>(g + i, dir<P>(d0) * vg, dir<P>(d1) * vg);
  }
  acc_t tail = 0;
  for (; i < n; ++i) {
    const acc_t d = static_cast<acc_t>(s[i]) - static_cast<acc_t>(t[i]);
    tail += err<P>(d);
    if constexpr (GRAD) g[i] = to_out<S>(dir<P>(d) * gscale);
  }
  return hsum(acc_lo + acc_hi) + tail;
}

// normalize = true, sweep 1: sums of squares of a and b.
template <typename acc_t, typename S, typename T>
void norms_chunk(const S* s, const T* t, int64_t n, acc_t& sa, acc_t& sb) {
  using V = Vec<acc_t>;
  constexpr int64_t K = kStep<acc_t>;
  V a_lo(0), a_hi(0), b_lo(0), b_hi(0);
  int64_t i = 0;
  for (; i + K <= n; i += K) {
    V s0, s1, t0, t1;
    load_step<acc_t>(s + i, s0, s1);
    load_step<acc_t>(t + i, t0, t1);
    a_lo = at::vec::fmadd(s0, s0, a_lo);
    a_hi = at::vec::fmadd(s1, s1, a_hi);
    b_lo = at::vec::fmadd(t0, t0, b_lo);
    b_hi = at::vec::fmadd(t1, t1, b_hi);
  }
  acc_t ta = 0, tb = 0;
  for (; i < n; ++i) {
    const acc_t x = static_cast<acc_t>(s[i]), y = static_cast<acc_t>(t[i]);
    ta += x * x;
    tb += y * y;
  }
  sa = hsum(a_lo + a_hi) + ta;
  sb = hsum(b_lo + b_hi) + tb;
}

// normalize = true, sweep 2: sum |u - v|^p and (when DOT) <u, g>. The difference is taken as
// d = (a - r b) / ||a|| with r = ||a|| / ||b|| rather than a / ||a|| - b / ||b||: the compiler may
// fuse either product of the latter into the subtraction, which would make d nonzero for equal
// samples (and sign(d) = +-1 where it must be 0); the former is exact there (r = 1).
template <int P, bool DOT, typename acc_t, typename S, typename T>
void loss_dot_chunk(const S* s, const T* t, int64_t n, acc_t ia, acc_t r, acc_t& loss,
                    acc_t& dot) {
  using V = Vec<acc_t>;
  constexpr int64_t K = kStep<acc_t>;
  const V via(ia), vr(r);
  V l_lo(0), l_hi(0), d_lo(0), d_hi(0);
  int64_t i = 0;
  for (; i + K <= n; i += K) {
    V s0, s1, t0, t1;
    load_step<acc_t>(s + i, s0, s1);
    load_step<acc_t>(t + i, t0, t1);
    const V u0 = s0 * via, u1 = s1 * via;
    const V e0 = (s0 - t0 * vr) * via, e1 = (s1 - t1 * vr) * via;
    l_lo += err<P>(e0);
    l_hi += err<P>(e1);
    if constexpr (DOT) {
      d_lo = at::vec::fmadd(u0, dir<P>(e0), d_lo);
      d_hi = at::vec::fmadd(u1, dir<P>(e1), d_hi);
    }
  }
  acc_t tl = 0, td = 0;
  for (; i < n; ++i) {
    const acc_t a = static_cast<acc_t>(s[i]);
    const acc_t u = a * ia;
    const acc_t e = (a - static_cast<acc_t>(t[i]) * r) * ia;
    tl += err<P>(e);
    if constexpr (DOT) td += u * dir<P>(e);
  }
  loss = hsum(l_lo + l_hi) + tl;
  dot = DOT ? hsum(d_lo + d_hi) + td : acc_t(0);
}

// normalize = true, sweep 3: grad = k * (g - u * dot) with k = c * p / max(||a||, eps) and dot =
// <u, g> (0 when ||a|| < eps, where the normalisation is linear).
template <int P, typename acc_t, typename S, typename T>
void grad_chunk(const S* s, const T* t, S* g, int64_t n, acc_t ia, acc_t r, acc_t k, acc_t dot) {
  using V = Vec<acc_t>;
  constexpr int64_t K = kStep<acc_t>;
  const V via(ia), vr(r), vk(k), vdot(dot);
  int64_t i = 0;
  for (; i + K <= n; i += K) {
    V s0, s1, t0, t1;
    load_step<acc_t>(s + i, s0, s1);
    load_step<acc_t>(t + i, t0, t1);
    const V u0 = s0 * via, u1 = s1 * via;
    const V e0 = (s0 - t0 * vr) * via, e1 = (s1 - t1 * vr) * via;
    store_step<S>(g + i, (dir<P>(e0) - u0 * vdot) * vk, (dir<P>(e1) - u1 * vdot) * vk);
  }
  for (; i < n; ++i) {
    const acc_t a = static_cast<acc_t>(s[i]);
    const acc_t u = a * ia;
    const acc_t e = (a - static_cast<acc_t>(t[i]) * r) * ia;
    g[i] = to_out<S>((dir<P>(e) - u * dot) * k);
  }
}

// ---------------------------------------------------------------------------------------------
// Schedules.

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Index of the segment holding global item `i`, given prefix[k] = first item of segment k.
inline size_t segment_of(const std::vector<int64_t>& prefix, int64_t i) {
  return static_cast<size_t>(std::upper_bound(prefix.begin(), prefix.end(), i) - prefix.begin()) -
         1;
}

template <int P, typename acc_t, typename S, typename T>
void run_plain(const RegressionPair* pairs, int64_t num_pairs, double* pair_sum) {
  std::vector<int64_t> first(num_pairs + 1, 0);
  for (int64_t i = 0; i < num_pairs; ++i) {
    first[i + 1] = first[i] + ceil_div(pairs[i].samples * pairs[i].sample_len, kChunk);
  }
  std::vector<double> partial(first[num_pairs]);
  at::parallel_for(0, first[num_pairs], 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const size_t k = segment_of(first, item);
      const RegressionPair& pr = pairs[k];
      const int64_t off = (item - first[k]) * kChunk;
      const int64_t n = std::min(kChunk, pr.samples * pr.sample_len - off);
      const S* s = static_cast<const S*>(pr.student) + off;
      const T* t = static_cast<const T*>(pr.teacher) + off;
      const acc_t gscale = static_cast<acc_t>(pr.loss_scale * P);
      partial[item] =
          pr.grad != nullptr
              ? plain_chunk<P, true>(s, t, static_cast<S*>(pr.grad) + off, n, gscale)
              : plain_chunk<P, false>(s, t, static_cast<S*>(nullptr), n, gscale);
    }
  });
  for (int64_t i = 0; i < num_pairs; ++i) {
    double sum = 0;
    for (int64_t c = first[i]; c < first[i + 1]; ++c) sum += partial[c];
    pair_sum[i] = sum;
  }
}

// Per-sample factors derived from the canonical float64 sums of its chunk partials.
template <typename acc_t>
struct SampleNorms {
  acc_t ia = 0;            // 1 / max(||a||, eps)
  acc_t r = 0;             // max(||a||, eps) / max(||b||, eps)
  bool projected = false;  // ||a|| >= eps: the gradient is projected off u
};

template <typename acc_t>
inline SampleNorms<acc_t> sample_norms(double sa, double sb) {
  SampleNorms<acc_t> out;
  const double na = std::sqrt(sa), nb = std::sqrt(sb);
  const double ca = std::max(na, kRegressionEps), cb = std::max(nb, kRegressionEps);
  out.ia = static_cast<acc_t>(1.0 / ca);
  out.r = static_cast<acc_t>(ca / cb);
  out.projected = na >= kRegressionEps;
  return out;
}

template <int P, typename acc_t, typename S, typename T>
struct NormalizedSample {
  const S* s;
  const T* t;
  S* g;  // nullptr: loss only
  int64_t len;
  int64_t chunks;
  acc_t gscale;  // c * p

  int64_t chunk_len(int64_t c) const { return std::min(kChunk, len - c * kChunk); }

  void sweep_norms(int64_t c, acc_t& sa, acc_t& sb) const {
    norms_chunk<acc_t>(s + c * kChunk, t + c * kChunk, chunk_len(c), sa, sb);
  }
  void sweep_loss(int64_t c, const SampleNorms<acc_t>& nm, acc_t& loss, acc_t& dot) const {
    if (g != nullptr && nm.projected) {
      loss_dot_chunk<P, true>(s + c * kChunk, t + c * kChunk, chunk_len(c), nm.ia, nm.r, loss,
                              dot);
    } else {
      loss_dot_chunk<P, false>(s + c * kChunk, t + c * kChunk, chunk_len(c), nm.ia, nm.r, loss,
                               dot);
    }
  }
  void sweep_grad(int64_t c, const SampleNorms<acc_t>& nm, double dot) const {
    grad_chunk<P>(s + c * kChunk, t + c * kChunk, g + c * kChunk, chunk_len(c), nm.ia, nm.r,
                  gscale * nm.ia, nm.projected ? static_cast<acc_t>(dot) : acc_t(0));
  }
};

template <int P, typename acc_t, typename S, typename T>
void run_normalized(const RegressionPair* pairs, int64_t num_pairs, double* pair_sum) {
  using Sample = NormalizedSample<P, acc_t, S, T>;
  // Global sample index -> pair, and global chunk index -> sample.
  std::vector<int64_t> first_sample(num_pairs + 1, 0);
  for (int64_t i = 0; i < num_pairs; ++i) first_sample[i + 1] = first_sample[i] + pairs[i].samples;
  const int64_t num_samples = first_sample[num_pairs];
  auto sample = [&](int64_t j) {
    const size_t k = segment_of(first_sample, j);
    const RegressionPair& pr = pairs[k];
    const int64_t off = (j - first_sample[k]) * pr.sample_len;
    return Sample{static_cast<const S*>(pr.student) + off, static_cast<const T*>(pr.teacher) + off,
                  pr.grad != nullptr ? static_cast<S*>(pr.grad) + off : nullptr, pr.sample_len,
                  ceil_div(pr.sample_len, kChunk), static_cast<acc_t>(pr.loss_scale * P)};
  };
  std::vector<double> sample_loss(num_samples);
  int64_t total = 0;
  for (int64_t i = 0; i < num_pairs; ++i) total += pairs[i].samples * pairs[i].sample_len;

  if (num_samples >= 4 * static_cast<int64_t>(at::get_num_threads())) {
    // One thread per sample, three sweeps while it is cached; tasks of at least two chunks'
    // worth of elements, so small calls stay on one thread.
    const int64_t grain =
        std::max<int64_t>(1, 2 * kChunk * num_samples / std::max<int64_t>(1, total));
    at::parallel_for(0, num_samples, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> ca, cb;
      for (int64_t j = begin; j < end; ++j) {
        const Sample smp = sample(j);
        ca.resize(smp.chunks);
        cb.resize(smp.chunks);
        for (int64_t c = 0; c < smp.chunks; ++c) smp.sweep_norms(c, ca[c], cb[c]);
        double sa = 0, sb = 0;
        for (int64_t c = 0; c < smp.chunks; ++c) {
          sa += ca[c];
          sb += cb[c];
        }
        const SampleNorms<acc_t> nm = sample_norms<acc_t>(sa, sb);
        for (int64_t c = smp.chunks - 1; c >= 0; --c) smp.sweep_loss(c, nm, ca[c], cb[c]);
        double loss = 0, dot = 0;
        for (int64_t c = 0; c < smp.chunks; ++c) {
          loss += ca[c];
          dot += cb[c];
        }
        sample_loss[j] = loss;
        if (smp.g != nullptr) {
          for (int64_t c = 0; c < smp.chunks; ++c) smp.sweep_grad(c, nm, dot);
        }
      }
    });
  } else {
    // Few samples: every sweep runs in parallel over all chunks of all samples.
    std::vector<int64_t> first_chunk(num_samples + 1, 0);
    for (int64_t j = 0; j < num_samples; ++j) {
      first_chunk[j + 1] = first_chunk[j] + sample(j).chunks;
    }
    const int64_t num_chunks = first_chunk[num_samples];
    // Tasks of at least two full chunks' worth of elements: small calls stay on one thread.
    const int64_t grain =
        std::max<int64_t>(1, 2 * kChunk * num_chunks / std::max<int64_t>(1, total));
    std::vector<acc_t> ca(num_chunks), cb(num_chunks);
    std::vector<SampleNorms<acc_t>> norms(num_samples);
    std::vector<double> dots(num_samples);
    auto over_chunks = [&](const auto& f) {
      at::parallel_for(0, num_chunks, grain, [&](int64_t begin, int64_t end) {
        for (int64_t item = begin; item < end; ++item) {
          const int64_t j = static_cast<int64_t>(segment_of(first_chunk, item));
          f(j, sample(j), item - first_chunk[j], item);
        }
      });
    };
    over_chunks([&](int64_t, const Sample& smp, int64_t c, int64_t item) {
      smp.sweep_norms(c, ca[item], cb[item]);
    });
    for (int64_t j = 0; j < num_samples; ++j) {
      double sa = 0, sb = 0;
      for (int64_t i = first_chunk[j]; i < first_chunk[j + 1]; ++i) {
        sa += ca[i];
        sb += cb[i];
      }
      norms[j] = sample_norms<acc_t>(sa, sb);
    }
    over_chunks([&](int64_t j, const Sample& smp, int64_t c, int64_t item) {
      smp.sweep_loss(c, norms[j], ca[item], cb[item]);
    });
    bool any_grad = false;
    for (int64_t j = 0; j < num_samples; ++j) {
      double loss = 0, dot = 0;
      for (int64_t i = first_chunk[j]; i < first_chunk[j + 1]; ++i) {
        loss += ca[i];
        dot += cb[i];
      }
      sample_loss[j] = loss;
      dots[j] = dot;
      any_grad = any_grad || sample(j).g != nullptr;
    }
    if (any_grad) {
      over_chunks([&](int64_t j, const Sample& smp, int64_t c, int64_t) {
        if (smp.g != nullptr) smp.sweep_grad(c, norms[j], dots[j]);
      });
    }
  }
  for (int64_t i = 0; i < num_pairs; ++i) {
    double sum = 0;
    for (int64_t j = first_sample[i]; j < first_sample[i + 1]; ++j) sum += sample_loss[j];
    pair_sum[i] = sum;
  }
}

}  // namespace

// pair_sum[i] = sum of |d|^p over pair i (before its loss_scale); gradients written in place.
void feature_regression_kernel(const RegressionPair* pairs, int64_t num_pairs, int p,
                               bool normalize, c10::ScalarType student_dtype,
                               c10::ScalarType teacher_dtype, double* pair_sum) {
  auto run = [&](auto student_tag, auto teacher_tag) {
    using S = decltype(student_tag);
    using T = decltype(teacher_tag);
    using acc_t = std::conditional_t<std::is_same_v<S, double>, double, float>;
    if (normalize) {
      if (p == 1) return run_normalized<1, acc_t, S, T>(pairs, num_pairs, pair_sum);
      return run_normalized<2, acc_t, S, T>(pairs, num_pairs, pair_sum);
    }
    if (p == 1) return run_plain<1, acc_t, S, T>(pairs, num_pairs, pair_sum);
    return run_plain<2, acc_t, S, T>(pairs, num_pairs, pair_sum);
  };
  dispatch_student_teacher(student_dtype, teacher_dtype, run);
}

}  // namespace CPU_CAPABILITY
}  // namespace fastkd

#ifdef FASTKD_CPU_DISPATCH
#include <torch/library.h>

#include "feature_regression_op.h"

FASTKD_CPU_DECLARE_VARIANTS(void feature_regression_kernel(const RegressionPair*, int64_t, int,
                                                           bool, c10::ScalarType,
                                                           c10::ScalarType, double*))

namespace fastkd {

std::tuple<at::Tensor, std::vector<at::Tensor>> feature_regression_fwd_cpu(
    at::TensorList students, at::TensorList teachers, at::ArrayRef<double> weights, int64_t p,
    bool normalize, bool mean, const c10::List<bool>& compute_grad) {
  std::vector<at::Tensor> grads;
  const RegressionCall call = prepare_feature_regression(students, teachers, weights, p, normalize,
                                                         mean, compute_grad, grads);
  const int64_t n = static_cast<int64_t>(call.pairs.size());
  std::vector<double> pair_sum(n);
  FASTKD_CPU_DISPATCH_CALL(feature_regression_kernel, call.pairs.data(), n, call.p, call.normalize,
                           call.student_dtype, call.teacher_dtype, pair_sum.data());
  double total = 0;
  for (int64_t i = 0; i < n; ++i) total += call.pairs[i].loss_scale * pair_sum[i];
  const bool f64 = call.student_dtype == at::kDouble;
  at::Tensor loss = at::empty({}, students[0].options().dtype(f64 ? at::kDouble : at::kFloat));
  if (f64) {
    *loss.data_ptr<double>() = total;
  } else {
    *loss.data_ptr<float>() = static_cast<float>(total);
  }
  return {loss, grads};
}

}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("feature_regression_fwd", &fastkd::feature_regression_fwd_cpu);
}
#endif  // FASTKD_CPU_DISPATCH
