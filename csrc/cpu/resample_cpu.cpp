// CPU backend: runs jobs (see msfast/ops.h). One parallel region covers every output row of
// every job of a call (all pyramid levels, all concatenated features), so a call is one
// "launch". Each output row is computed start to finish by one thread in a fixed order:
//   1. vertical pass: tmp = sum_k wh[k] * src_row(y0 + k), over the whole row (vectorizes)
//   2. horizontal pass: acc[x] = sum_k ww[k] * tmp[x0 + k]  (fixed tap count per table)
//   3. write: dst_row = cast(acc * scale[c] + shift[c])
// Results therefore do not depend on the number of threads, and backward (the same gather
// with transposed tables) needs no atomics.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "msfast/ops.h"

namespace msfast {
namespace {

template <typename acc_t>
struct TermPlan {
  View v;
  Table<acc_t> th, tw;
};

template <typename acc_t>
struct JobPlan {
  View dst;
  std::vector<TermPlan<acc_t>> terms;
  std::vector<acc_t> scale, shift;
};

template <typename acc_t>
Table<acc_t> table_for(const Axis& a, bool adjoint) {
  // A gradient runs the forward axis (in -> out) transposed: it maps out -> in.
  return adjoint ? adjoint_table(forward_table<acc_t>(a)) : forward_table<acc_t>(a);
}

// Visits a row of a view as `runs` runs of `len` contiguous values, `step` elements apart:
// one run when the pixels are packed (NCHW, or channels_last with px == C), one run per
// pixel when they are not (a channel slice of a channels_last tensor).
struct RowShape {
  int64_t runs, len, step;
};
inline RowShape row_shape(const View& v) {
  if (v.px == v.cp) return {1, v.W * v.cp, 0};
  return {v.W, v.cp, v.px};
}

template <bool kAccumulate, typename src_t, typename acc_t>
inline void axpy_row(const src_t* r, const RowShape& s, acc_t w, acc_t* tmp) {
  for (int64_t x = 0; x < s.runs; ++x) {
    const src_t* rr = r + x * s.step;
    acc_t* t = tmp + x * s.len;
    for (int64_t c = 0; c < s.len; ++c) {
      const acc_t v = w * static_cast<acc_t>(rr[c]);
      t[c] = kAccumulate ? t[c] + v : v;
    }
  }
}

template <typename src_t, typename acc_t>
void vertical(const src_t* plane, const View& v, const Table<acc_t>& th, int64_t oy, acc_t* tmp) {
  const RowShape s = row_shape(v);
  const int64_t y0 = th.start[oy];
  const acc_t* w = th.w.data() + oy * th.K;
  axpy_row<false>(plane + y0 * v.row, s, w[0], tmp);
  for (int64_t k = 1; k < th.K; ++k) axpy_row<true>(plane + (y0 + k) * v.row, s, w[k], tmp);
}

// KW > 0: the table has exactly KW taps (the common 1, 2, 3, 4), so the tap loop unrolls.
template <int KW, bool kPacked1, typename acc_t>
void horizontal_impl(const acc_t* tmp, const Table<acc_t>& tw, int64_t cp, bool add, acc_t* acc) {
  const int64_t K = KW > 0 ? KW : tw.K;
  const int64_t cpp = kPacked1 ? 1 : cp;
  const int64_t* start = tw.start.data();
  const acc_t* wt = tw.w.data();
  for (int64_t ox = 0; ox < tw.out; ++ox) {
    const acc_t* t = tmp + start[ox] * cpp;
    const acc_t* w = wt + ox * K;
    acc_t* a = acc + ox * cpp;
    for (int64_t c = 0; c < cpp; ++c) {
      acc_t s = w[0] * t[c];
      for (int64_t k = 1; k < K; ++k) s += w[k] * t[k * cpp + c];
      a[c] = add ? a[c] + s : s;
    }
  }
}

template <typename acc_t>
void horizontal(const acc_t* tmp, const Table<acc_t>& tw, int64_t cp, bool add, acc_t* acc) {
#define MSFAST_H(KW)                                                      \
  if (cp == 1) return horizontal_impl<KW, true>(tmp, tw, cp, add, acc); \
  return horizontal_impl<KW, false>(tmp, tw, cp, add, acc);
  switch (tw.K) {
    case 1: MSFAST_H(1)
    case 2: MSFAST_H(2)
    case 3: MSFAST_H(3)
    case 4: MSFAST_H(4)
    default: MSFAST_H(0)
  }
#undef MSFAST_H
}

template <typename dst_t, typename acc_t>
void write_row(dst_t* out, const View& d, int64_t plane, const acc_t* acc, const JobPlan<acc_t>& j) {
  const RowShape s = row_shape(d);
  const bool affine = !j.scale.empty();
  for (int64_t x = 0; x < s.runs; ++x) {
    dst_t* o = out + x * s.step;
    const acc_t* a = acc + x * s.len;
    if (!affine) {
      for (int64_t c = 0; c < s.len; ++c) o[c] = static_cast<dst_t>(a[c]);
    } else if (!d.cl) {  // NCHW: the whole row is one channel
      const int64_t ch = plane % d.pdiv;
      const acc_t m = j.scale[ch], b = j.shift[ch];
      for (int64_t c = 0; c < s.len; ++c) o[c] = static_cast<dst_t>(a[c] * m + b);
    } else {  // channels_last: channel = position within the pixel
      for (int64_t c = 0; c < s.len; ++c) {
        const int64_t ch = c % d.cp;
        o[c] = static_cast<dst_t>(a[c] * j.scale[ch] + j.shift[ch]);
      }
    }
  }
}

template <typename src_t, typename dst_t, typename acc_t>
void run_typed(const std::vector<Job>& jobs) {
  std::vector<JobPlan<acc_t>> plans;
  std::vector<int64_t> first_item{0};  // prefix sums of rows (planes * H_out) per job
  int64_t max_tmp = 1, max_acc = 1, total_values = 0;
  for (const auto& job : jobs) {
    JobPlan<acc_t> p;
    p.dst = make_view(job.dst, job.channels_last);
    for (double v : job.scale) p.scale.push_back(static_cast<acc_t>(v));
    for (double v : job.shift) p.shift.push_back(static_cast<acc_t>(v));
    for (const auto& t : job.terms) {
      TermPlan<acc_t> tp{make_view(t.src, job.channels_last), table_for<acc_t>(t.h, t.adjoint),
                         table_for<acc_t>(t.w, t.adjoint)};
      max_tmp = std::max(max_tmp, tp.v.W * tp.v.cp);
      p.terms.push_back(std::move(tp));
    }
    max_acc = std::max(max_acc, p.dst.W * p.dst.cp);
    total_values += p.dst.planes * p.dst.H * p.dst.W * p.dst.cp;
    first_item.push_back(first_item.back() + p.dst.planes * p.dst.H);
    plans.push_back(std::move(p));
  }
  const int64_t items = first_item.back();
  if (items == 0) return;
  // About 32K output values per task: enough to amortize the scheduling, small enough to
  // balance two to a few dozen threads.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) * items / std::max<int64_t>(total_values, 1));
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> tmp(max_tmp), acc(max_acc);
    size_t j = std::upper_bound(first_item.begin(), first_item.end(), begin) - first_item.begin() - 1;
    for (int64_t item = begin; item < end; ++item) {
      while (item >= first_item[j + 1]) ++j;
      const JobPlan<acc_t>& p = plans[j];
      const int64_t local = item - first_item[j];
      const int64_t plane = local / p.dst.H, oy = local % p.dst.H;
      for (size_t t = 0; t < p.terms.size(); ++t) {
        const TermPlan<acc_t>& tp = p.terms[t];
        const src_t* src = static_cast<const src_t*>(tp.v.data) + tp.v.plane_offset(plane);
        vertical(src, tp.v, tp.th, oy, tmp.data());
        horizontal(tmp.data(), tp.tw, tp.v.cp, t > 0, acc.data());
      }
      dst_t* out = static_cast<dst_t*>(p.dst.data) + p.dst.plane_offset(plane) + oy * p.dst.row;
      write_row(out, p.dst, plane, acc.data(), p);
    }
  });
}

// Calls f(T{}) with the C++ type of dtype t.
template <typename F>
void with_type(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kByte: return f(uint8_t{});
    case at::kHalf: return f(at::Half{});
    case at::kBFloat16: return f(at::BFloat16{});
    case at::kFloat: return f(float{});
    case at::kDouble: return f(double{});
    default: TORCH_CHECK_TYPE(false, "msfast: unsupported dtype ", t);
  }
}

void run_cpu(const std::vector<Job>& jobs) {
  if (jobs.empty() || jobs[0].terms.empty()) return;
  const auto st = jobs[0].terms[0].src.scalar_type(), dt = jobs[0].dst.scalar_type();
  for (const auto& j : jobs) {
    TORCH_CHECK(j.dst.scalar_type() == dt, "msfast: internal: mixed destination dtypes");
    for (const auto& t : j.terms) {
      TORCH_CHECK(t.src.scalar_type() == st, "msfast: internal: mixed source dtypes");
      TORCH_CHECK_VALUE(t.src.device().is_cpu(), "msfast: expected CPU tensors, got one on ", t.src.device());
    }
  }
  with_type(st, [&](auto s) {
    with_type(dt, [&](auto d) {
      using S = decltype(s);
      using D = decltype(d);
      if constexpr (std::is_same_v<D, uint8_t>) {
        TORCH_CHECK_TYPE(false, "msfast: uint8 output is not supported");
      } else {
        // Accumulate in float32, or float64 when either side is float64.
        using A = std::conditional_t<std::is_same_v<S, double> || std::is_same_v<D, double>, double, float>;
        run_typed<S, D, A>(jobs);
      }
    });
  });
}

}  // namespace
}  // namespace msfast

TORCH_LIBRARY_IMPL(msfast, CPU, m) { msfast::Kernels<msfast::run_cpu>::register_all(m); }
