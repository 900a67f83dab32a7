// fastkd::channel_attention_fwd / _bwd on the CPU: the channel-attention loss of Channel
// Distillation (Zhou et al., 2020), every (student, teacher) pair of one call in one parallel region.
//
//   w_s[b, c] = mean_{h, w} S[b, c, h, w],   w_t[b, c] = mean_{h, w} T[b, c, h, w]
//   loss = sum_i coef_i * sum_{b, c} (w_s - w_t)^2          (coef_i = weight_i / (B C) for "mean")
//   dloss/dS[b, c, h, w] = 2 coef_i (w_s - w_t)[b, c] / (Hs Ws)     (the same at every (h, w))
//
// Shapes: student [B, C, Hs, Ws] and teacher [B, C, Ht, Wt] per pair, any strides; diff is the
// concatenation of every pair's [B, C] block of 2 coef (w_s - w_t) / (Hs Ws); gradients are dense
// [B, C, Hs, Ws] in contiguous NCHW or channels_last.
//
// Forward: one task per (pair, b, block of channels) computes the block's means of both maps,
// writes its diff entries and its share of the loss. Each layout is read in its own memory order
// without a copy: a contiguous NCHW plane is one vectorized sweep (student and teacher planes of
// one size and dtype side by side, in one loop); a channels_last map is read row by row (C
// contiguous values per pixel), each row added to the task's per-channel sums; any other stride
// pattern falls back to scalar 4-D addressing. Tasks are spread over threads by their element
// count (early ResNet stages cost 16x more per task than late ones).
// Numerics: float32 accumulation (float64 for float64 maps); each task's loss share is kept in
// float64 and the shares are summed in task order, so results are bitwise identical whatever the
// number of threads. Backward: the diff is scaled by grad_output once per (b, c) and broadcast with
// vector stores (NCHW) or row copies (channels_last).
#include "cpu/capability.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "channel_attention.h"

namespace fastkd {
namespace CPU_CAPABILITY {

template <typename acc_t>
using Vec = at::vec::Vectorized<acc_t>;

// Elements per thread below which work stays on one thread: waking a thread costs more than
// streaming 1 MiB, and on a busy machine a woken thread can wait a whole scheduler tick.
constexpr int64_t kGrain = int64_t{1} << 18;

// Elements of T that one vector load covers: Vec<acc_t>::size() for acc_t inputs, twice that for
// bfloat16/float16 (one load converts to two float vectors).
template <typename T>
constexpr int64_t unit() {
  return at::vec::Vectorized<T>::size();
}

template <typename acc_t, typename T>
inline void add_unit(const T* p, Vec<acc_t>& lo, Vec<acc_t>& hi) {
  if constexpr (std::is_same_v<T, acc_t>) {
    lo += Vec<acc_t>::loadu(p);
  } else {
    static_assert(std::is_same_v<acc_t, float>, "reduced-precision maps accumulate in float32");
    auto [a, b] = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p));
    lo += a;
    hi += b;
  }
}

// n < unit<T>() elements, the rest of the unit counted as 0 (at::vec's partial loads zero it;
// with AVX-512 they are single masked loads).
template <typename acc_t, typename T>
inline void add_partial(const T* p, int64_t n, Vec<acc_t>& lo, Vec<acc_t>& hi) {
  if constexpr (std::is_same_v<T, acc_t>) {
    lo += Vec<acc_t>::loadu(p, n);
  } else {
    auto [a, b] = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p, n));
    lo += a;
    hi += b;
  }
}

template <typename acc_t>
inline acc_t hsum(const Vec<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](Vec<acc_t>& a, Vec<acc_t>& b) { return a + b; }, v);
}

// Sum of n contiguous values, four independent accumulator pairs for instruction-level parallelism.
template <typename acc_t, typename T>
inline acc_t contiguous_sum(const T* x, int64_t n) {
  constexpr int64_t U = unit<T>();
  if (n < 4 * U) {
    // Small planes (7 x 7, 4 x 4 in late ResNet stages): tens of thousands of them per map, so
    // the fixed cost per plane counts -- one accumulator pair and one combine, not eight.
    Vec<acc_t> lo(0), hi(0);
    int64_t i = 0;
    for (; i + U <= n; i += U) add_unit<acc_t>(x + i, lo, hi);
    if (i < n) add_partial<acc_t>(x + i, n - i, lo, hi);
    return hsum(lo + hi);
  }
  Vec<acc_t> a0(0), a1(0), a2(0), a3(0), b0(0), b1(0), b2(0), b3(0);
  int64_t i = 0;
  for (; i + 4 * U <= n; i += 4 * U) {
    add_unit<acc_t>(x + i, a0, b0);
    add_unit<acc_t>(x + i + U, a1, b1);
    add_unit<acc_t>(x + i + 2 * U, a2, b2);
    add_unit<acc_t>(x + i + 3 * U, a3, b3);
  }
  for (; i + U <= n; i += U) add_unit<acc_t>(x + i, a0, b0);
  if (i < n) add_partial<acc_t>(x + i, n - i, a1, b1);
  return hsum(((a0 + a1) + (a2 + a3)) + ((b0 + b1) + (b2 + b3)));
}

// channels_last: out[0, cc) += row[0, cc) for `hw` rows (row p at x + p * P), in row order. The
// sums live in `out` (L1-resident: a task covers at most kMaxRowChannels channels), so the rows are
// read front to back, one sequential stream, whatever cc is.
template <typename acc_t, typename T>
inline void add_rows(const T* x, int64_t hw, int64_t P, int64_t cc, acc_t* out) {
  constexpr int64_t U = unit<T>();
  constexpr int64_t W = Vec<acc_t>::size();
  for (int64_t p = 0; p < hw; ++p) {
    const T* row = x + p * P;
    int64_t j = 0;
    for (; j + U <= cc; j += U) {
      Vec<acc_t> lo = Vec<acc_t>::loadu(out + j), hi(0);
      if constexpr (U > W) hi = Vec<acc_t>::loadu(out + j + W);
      add_unit<acc_t>(row + j, lo, hi);
      lo.store(out + j);
      if constexpr (U > W) hi.store(out + j + W);
    }
    for (; j < cc; ++j) out[j] += static_cast<acc_t>(row[j]);
  }
}

// Means over (h, w) of channels [c0, c0 + cc) of sample b, into out[0, cc).
template <typename acc_t, typename T>
void channel_means(const CaMap& m, int64_t b, int64_t c0, int64_t cc, acc_t* out) {
  const T* base = static_cast<const T*>(m.data) + b * m.stride_b + c0 * m.stride_c;
  const int64_t hw = m.H * m.W;
  const acc_t inv = acc_t(1) / static_cast<acc_t>(hw);
  if (m.layout == CaLayout::kPlanar) {
    for (int64_t j = 0; j < cc; ++j) out[j] = contiguous_sum<acc_t>(base + j * m.stride_c, hw) * inv;
  } else if (m.layout == CaLayout::kChannelsLast) {
    std::fill(out, out + cc, acc_t(0));
    add_rows<acc_t>(base, hw, m.pixel_stride, cc, out);
    for (int64_t k = 0; k < cc; ++k) out[k] *= inv;
  } else {
    for (int64_t k = 0; k < cc; ++k) {
      const T* plane = base + k * m.stride_c;
      acc_t acc = 0;
      for (int64_t h = 0; h < m.H; ++h) {
        const T* line = plane + h * m.stride_h;
        for (int64_t w = 0; w < m.W; ++w) acc += static_cast<acc_t>(line[w * m.stride_w]);
      }
      out[k] = acc * inv;
    }
  }
}

template <typename acc_t>
void channel_means_any(const CaMap& m, int64_t b, int64_t c0, int64_t cc, acc_t* out) {
  if constexpr (std::is_same_v<acc_t, double>) {
    TORCH_CHECK(m.dtype == CaDtype::kDouble, "fastkd: float64 maps must all be float64");
    channel_means<double, double>(m, b, c0, cc, out);
  } else {
    switch (m.dtype) {
      case CaDtype::kFloat:
        return channel_means<float, float>(m, b, c0, cc, out);
      case CaDtype::kBFloat16:
        return channel_means<float, c10::BFloat16>(m, b, c0, cc, out);
      case CaDtype::kHalf:
        return channel_means<float, c10::Half>(m, b, c0, cc, out);
      default:
        TORCH_CHECK(false, "fastkd: float64 maps must all be float64");
    }
  }
}

// Means of planes of two planar maps of one plane size and dtype, both sums in one sweep: the two
// maps then stream side by side, which reads faster than one block of planes after the other.
template <typename acc_t, typename T>
void paired_plane_means(const CaMap& s, const CaMap& t, int64_t b, int64_t c0, int64_t cc,
                        acc_t* ws, acc_t* wt) {
  constexpr int64_t U = unit<T>();
  const int64_t hw = s.H * s.W;
  const acc_t inv = acc_t(1) / static_cast<acc_t>(hw);
  const T* sb = static_cast<const T*>(s.data) + b * s.stride_b + c0 * s.stride_c;
  const T* tb = static_cast<const T*>(t.data) + b * t.stride_b + c0 * t.stride_c;
  for (int64_t j = 0; j < cc; ++j) {
    const T* x = sb + j * s.stride_c;
    const T* y = tb + j * t.stride_c;
    Vec<acc_t> xa(0), xb(0), ya(0), yb(0), xc(0), xd(0), yc(0), yd(0);
    int64_t i = 0;
    for (; i + 2 * U <= hw; i += 2 * U) {
      add_unit<acc_t>(x + i, xa, xb);
      add_unit<acc_t>(y + i, ya, yb);
      add_unit<acc_t>(x + i + U, xc, xd);
      add_unit<acc_t>(y + i + U, yc, yd);
    }
    for (; i + U <= hw; i += U) {
      add_unit<acc_t>(x + i, xa, xb);
      add_unit<acc_t>(y + i, ya, yb);
    }
    if (i < hw) {
      add_partial<acc_t>(x + i, hw - i, xc, xd);
      add_partial<acc_t>(y + i, hw - i, yc, yd);
    }
    ws[j] = hsum((xa + xc) + (xb + xd)) * inv;
    wt[j] = hsum((ya + yc) + (yb + yd)) * inv;
  }
}

template <typename acc_t>
void pair_means(const CaMap& s, const CaMap& t, int64_t b, int64_t c0, int64_t cc, acc_t* ws,
                acc_t* wt) {
  const bool paired = s.layout == CaLayout::kPlanar && t.layout == CaLayout::kPlanar &&
                      s.H * s.W == t.H * t.W && s.dtype == t.dtype;
  if (paired) {
    if constexpr (std::is_same_v<acc_t, double>) {
      return paired_plane_means<double, double>(s, t, b, c0, cc, ws, wt);
    } else {
      switch (s.dtype) {
        case CaDtype::kFloat:
          return paired_plane_means<float, float>(s, t, b, c0, cc, ws, wt);
        case CaDtype::kBFloat16:
          return paired_plane_means<float, c10::BFloat16>(s, t, b, c0, cc, ws, wt);
        case CaDtype::kHalf:
          return paired_plane_means<float, c10::Half>(s, t, b, c0, cc, ws, wt);
        default:
          break;  // float64 mixed with float32: refused below
      }
    }
  }
  channel_means_any<acc_t>(s, b, c0, cc, ws);
  channel_means_any<acc_t>(t, b, c0, cc, wt);
}

// Channels per task. channels_last: whole pixel rows (up to kMaxRowChannels channels, whose sums
// stay in L1), so that every task reads its rows as one sequential stream; a batch with fewer than
// kMinRowTasks such tasks per pair is split into narrower blocks (multiples of 64 channels, every
// fetched cache line still used whole) so that it spreads over the threads. Planar maps: blocks of
// about 32k elements, so that few, large maps still spread over every thread. Neither depends on
// the thread count, which keeps the loss's summation order, and so its bits, fixed.
constexpr int64_t kMaxRowChannels = 2048;
constexpr int64_t kMinRowTasks = 64;

inline int64_t channels_per_task(const CaPair& p) {
  const bool rows = p.student.layout == CaLayout::kChannelsLast ||
                    p.teacher.layout == CaLayout::kChannelsLast;
  if (rows) {
    int64_t chunk = std::min(p.C, kMaxRowChannels);
    while (chunk > 64 && p.B * ((p.C + chunk - 1) / chunk) < kMinRowTasks) {
      chunk = std::max<int64_t>(64, (chunk / 2 + 63) / 64 * 64);
    }
    return chunk;
  }
  const int64_t cost = p.student.H * p.student.W + p.teacher.H * p.teacher.W;
  return std::min(std::max<int64_t>(1, 32768 / cost), p.C);
}

template <typename acc_t>
double fwd_impl(const std::vector<CaPair>& pairs, acc_t* diff) {
  // Task k covers (pair, b, channel block); cum[k] is the element count before it.
  struct Task {
    int pair;
    int64_t b, c0, cc;
  };
  std::vector<Task> tasks;
  std::vector<int64_t> cum{0};
  int64_t max_chunk = 1;
  for (size_t i = 0; i < pairs.size(); ++i) {
    const CaPair& p = pairs[i];
    const int64_t chunk = channels_per_task(p);
    max_chunk = std::max(max_chunk, chunk);
    const int64_t cost = p.student.H * p.student.W + p.teacher.H * p.teacher.W;
    for (int64_t b = 0; b < p.B; ++b) {
      for (int64_t c0 = 0; c0 < p.C; c0 += chunk) {
        const int64_t cc = std::min(chunk, p.C - c0);
        tasks.push_back({static_cast<int>(i), b, c0, cc});
        cum.push_back(cum.back() + cc * cost);
      }
    }
  }
  const int64_t n = static_cast<int64_t>(tasks.size());
  std::vector<double> share(n);
  at::parallel_for(0, cum.back(), kGrain, [&](int64_t begin, int64_t end) {
    // Tasks starting inside [begin, end); every task starts in exactly one range.
    int64_t k = std::lower_bound(cum.begin(), cum.begin() + n, begin) - cum.begin();
    std::vector<acc_t> ws(max_chunk), wt(max_chunk);
    for (; k < n && cum[k] < end; ++k) {
      const Task& task = tasks[k];
      const CaPair& p = pairs[task.pair];
      pair_means<acc_t>(p.student, p.teacher, task.b, task.c0, task.cc, ws.data(), wt.data());
      acc_t* out = diff + p.diff_offset + task.b * p.C + task.c0;
      const acc_t scale = static_cast<acc_t>(p.grad_scale);
      double sq = 0;
      for (int64_t j = 0; j < task.cc; ++j) {
        const acc_t d = ws[j] - wt[j];
        out[j] = d * scale;
        sq += static_cast<double>(d) * static_cast<double>(d);
      }
      share[k] = p.coef * sq;
    }
  });
  double total = 0;
  for (int64_t k = 0; k < n; ++k) total += share[k];
  return total;
}

void channel_attention_fwd_kernel(const std::vector<CaPair>& pairs, void* diff, bool f64,
                                  double* loss) {
  *loss = f64 ? fwd_impl<double>(pairs, static_cast<double*>(diff))
              : fwd_impl<float>(pairs, static_cast<float*>(diff));
}

template <typename T, typename acc_t>
void bwd_impl(const CaGrad& g, acc_t go) {
  const auto* diff = static_cast<const acc_t*>(g.diff);
  T* out = static_cast<T*>(g.data);
  const int64_t planes = g.B * g.C;
  if (!g.channels_last) {
    using VT = at::vec::Vectorized<T>;
    constexpr int64_t U = VT::size();
    const int64_t grain = std::max<int64_t>(1, kGrain / g.HW);
    at::parallel_for(0, planes, grain, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const VT v(static_cast<T>(go * diff[k]));
        T* plane = out + k * g.HW;
        int64_t i = 0;
        for (; i + U <= g.HW; i += U) v.store(plane + i);
        if (i < g.HW) v.store(plane + i, g.HW - i);
      }
    });
    return;
  }
  // channels_last: every pixel row of sample b is the same C values.
  std::vector<T> vals(planes);
  at::parallel_for(0, planes, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) vals[k] = static_cast<T>(go * diff[k]);
  });
  const int64_t rows = g.B * g.HW;
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / g.C), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      std::memcpy(out + r * g.C, vals.data() + (r / g.HW) * g.C, g.C * sizeof(T));
    }
  });
}

void channel_attention_bwd_kernel(const std::vector<CaGrad>& grads, double grad_output) {
  for (const CaGrad& g : grads) {
    switch (g.dtype) {
      case CaDtype::kDouble:
        bwd_impl<double, double>(g, grad_output);
        break;
      case CaDtype::kFloat:
        bwd_impl<float, float>(g, static_cast<float>(grad_output));
        break;
      case CaDtype::kBFloat16:
        bwd_impl<c10::BFloat16, float>(g, static_cast<float>(grad_output));
        break;
      case CaDtype::kHalf:
        bwd_impl<c10::Half, float>(g, static_cast<float>(grad_output));
        break;
    }
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace fastkd

#ifdef FASTKD_CPU_DISPATCH
#include <torch/library.h>

#include "channel_attention_op.h"

FASTKD_CPU_DECLARE_VARIANTS(void channel_attention_fwd_kernel(const std::vector<CaPair>&, void*,
                                                              bool, double*))
FASTKD_CPU_DECLARE_VARIANTS(void channel_attention_bwd_kernel(const std::vector<CaGrad>&, double))

namespace fastkd {

std::tuple<at::Tensor, at::Tensor> channel_attention_fwd_cpu(at::TensorList students,
                                                             at::TensorList teachers,
                                                             at::ArrayRef<double> weights,
                                                             bool mean) {
  at::Tensor diff;
  const std::vector<CaPair> pairs =
      prepare_channel_attention_fwd(students, teachers, weights, mean, diff);
  const bool f64 = diff.scalar_type() == at::kDouble;
  double total = 0;
  FASTKD_CPU_DISPATCH_CALL(channel_attention_fwd_kernel, pairs, diff.data_ptr(), f64, &total);
  at::Tensor loss = at::empty({}, diff.options());
  if (f64) {
    *loss.data_ptr<double>() = total;
  } else {
    *loss.data_ptr<float>() = static_cast<float>(total);
  }
  return {loss, diff};
}

std::vector<at::Tensor> channel_attention_bwd_cpu(at::TensorList diffs,
                                                  const at::Tensor& grad_output,
                                                  at::IntArrayRef sizes,
                                                  const c10::List<bool>& channels_last,
                                                  at::ScalarType dtype) {
  std::vector<at::Tensor> grads;
  const std::vector<CaGrad> args =
      prepare_channel_attention_bwd(diffs, grad_output, sizes, channels_last, dtype, grads);
  // A CPU scalar: reading it is not a device synchronisation.
  const double go = grad_output.scalar_type() == at::kDouble
                        ? *grad_output.data_ptr<double>()
                        : static_cast<double>(*grad_output.data_ptr<float>());
  FASTKD_CPU_DISPATCH_CALL(channel_attention_bwd_kernel, args, go);
  return grads;
}

}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("channel_attention_fwd", &fastkd::channel_attention_fwd_cpu);
  m.impl("channel_attention_bwd", &fastkd::channel_attention_bwd_cpu);
}
#endif  // FASTKD_CPU_DISPATCH
