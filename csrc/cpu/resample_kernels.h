// CPU kernels: run jobs (see msfast/ops.h). This header is compiled more than once, each
// time into its own namespace MSFAST_CPU_ISA with other target flags (resample_cpu.cpp:
// the baseline, resample_cpu_avx2.cpp: AVX2 + FMA), and resample_cpu.cpp picks one at run
// time, as ATen does with its CPU_CAPABILITY builds. The includes it needs come first in
// each including file, before any target pragma.
//
// One parallel region covers every output row of every job of a call (all pyramid levels,
// all concatenated features), so a call is one "launch". Each output row is computed start
// to finish by one thread in a fixed order, in one of two orders per term:
//   vertical first (the output has fewer rows than the input: downscaling):
//     tmp = sum_k wh[k] * src_row(y0 + k) over the whole row (vectorizes), then the
//     horizontal gather acc[x] = sum_k ww[k] * tmp[x0 + k] (fixed tap count per table);
//   horizontal first (upscaling): each source row is gathered horizontally once into a ring
//     of K rows, and the output row is sum_k wh[k] * ring[y0 + k], vectorized. Gathers are
//     the slow part of an NCHW row, and this order does them once per source row instead of
//     once per output row (8x fewer for an 8x upscale).
// then dst_row = cast(acc * scale[c] + shift[c]). A row's value is the same whichever
// thread computes it, so results do not depend on the number of threads, and the backward
// (the same gather with transposed tables) needs no atomics.
#ifndef MSFAST_CPU_ISA
#error "define MSFAST_CPU_ISA before including resample_kernels.h"
#endif

namespace msfast {
namespace MSFAST_CPU_ISA {
namespace {

template <typename acc_t>
struct TermPlan {
  View v;
  Table<acc_t> th, tw;
  bool h_unit;  // tw is the identity: the horizontal pass is a copy
  bool h_first;  // horizontal pass first, on each source row once (see above)
};

template <typename acc_t>
struct JobPlan {
  View dst;
  std::vector<TermPlan<acc_t>> terms;
  // The per-channel affine laid out like one output run (see RowShape): for channels_last
  // the channel pattern repeated along the row, so the write is one vectorizable loop.
  std::vector<acc_t> scale_run, shift_run;
  std::vector<acc_t> scale, shift;
  bool direct = false;  // dst rows are packed acc_t with no affine: compute in place
};

template <typename acc_t>
bool is_unit(const Table<acc_t>& t) {
  if (t.in != t.out || t.K != 1) return false;
  for (int64_t o = 0; o < t.out; ++o)
    if (t.start[o] != o || t.w[o] != acc_t(1)) return false;
  return true;
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
inline void axpy_row(const src_t* __restrict__ r, const RowShape& s, acc_t w, acc_t* __restrict__ tmp) {
  for (int64_t x = 0; x < s.runs; ++x) {
    const src_t* __restrict__ rr = r + x * s.step;
    acc_t* __restrict__ t = tmp + x * s.len;
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

// KW > 0: the table has exactly KW taps (the common 1, 2, 3, 4), so the tap loop unrolls;
// CP > 0: CP values per pixel (1: NCHW, 3: RGB channels_last), so the channel loop unrolls.
template <int KW, int CP, bool kAdd, typename acc_t>
void horizontal_impl(const acc_t* __restrict__ tmp, const Table<acc_t>& tw, int64_t cp, acc_t* __restrict__ acc) {
  const int64_t K = KW > 0 ? KW : tw.K;
  const int64_t n = CP > 0 ? CP : cp;
  const int64_t* __restrict__ start = tw.start.data();
  const acc_t* __restrict__ wt = tw.w.data();
  for (int64_t ox = 0; ox < tw.out; ++ox) {
    const acc_t* __restrict__ t = tmp + start[ox] * n;
    const acc_t* __restrict__ w = wt + ox * K;
    acc_t* __restrict__ a = acc + ox * n;
    for (int64_t c = 0; c < n; ++c) {
      acc_t s = w[0] * t[c];
      for (int64_t k = 1; k < K; ++k) s += w[k] * t[k * n + c];
      a[c] = kAdd ? a[c] + s : s;
    }
  }
}

template <bool kAdd, typename acc_t>
void horizontal_k(const acc_t* tmp, const Table<acc_t>& tw, int64_t cp, acc_t* acc) {
#define MSFAST_H(KW)                                                 \
  if (cp == 1) return horizontal_impl<KW, 1, kAdd>(tmp, tw, cp, acc); \
  if (cp == 3) return horizontal_impl<KW, 3, kAdd>(tmp, tw, cp, acc); \
  return horizontal_impl<KW, 0, kAdd>(tmp, tw, cp, acc);
  switch (tw.K) {
    case 1: MSFAST_H(1)
    case 2: MSFAST_H(2)
    case 3: MSFAST_H(3)
    case 4: MSFAST_H(4)
    default: MSFAST_H(0)
  }
#undef MSFAST_H
}

template <typename acc_t>
void horizontal(const TermPlan<acc_t>& tp, const acc_t* tmp, bool add, acc_t* acc) {
  if (tp.h_unit) {
    const int64_t n = tp.tw.out * tp.v.cp;
    if (add) {
      for (int64_t i = 0; i < n; ++i) acc[i] += tmp[i];
    } else {
      std::copy(tmp, tmp + n, acc);
    }
    return;
  }
  if (add) return horizontal_k<true>(tmp, tp.tw, tp.v.cp, acc);
  horizontal_k<false>(tmp, tp.tw, tp.v.cp, acc);
}

// One output row of a term, accumulated into acc (or assigned when !add).
template <typename src_t, typename acc_t>
struct RowMaker {
  std::vector<acc_t> tmp;   // one source row in acc_t
  std::vector<acc_t> ring;  // h_first: horizontally resampled source rows, R >= K slots
  std::vector<int64_t> tag;  // which source row each ring slot holds (-1: none)
  int64_t mask = 0;          // R - 1; R is a power of two so a slot is y & mask

  void run(const TermPlan<acc_t>& tp, const src_t* plane, int64_t oy, bool add, acc_t* acc) {
    const View& v = tp.v;
    if (!tp.h_first) {
      if (tp.h_unit && !add) {  // the vertical pass already gives the output row
        vertical(plane, v, tp.th, oy, acc);
        return;
      }
      if (static_cast<int64_t>(tmp.size()) < v.W * v.cp) tmp.resize(v.W * v.cp);
      vertical(plane, v, tp.th, oy, tmp.data());
      horizontal(tp, tmp.data(), add, acc);
      return;
    }
    const int64_t K = tp.th.K, n = tp.tw.out * v.cp, y0 = tp.th.start[oy];
    int64_t R = 1;
    while (R < K) R *= 2;
    if (static_cast<int64_t>(tag.size()) != R || static_cast<int64_t>(ring.size()) != R * n) {
      ring.assign(R * n, acc_t(0));
      tag.assign(R, -1);
      mask = R - 1;
    }
    for (int64_t k = 0; k < K; ++k) {
      const int64_t y = y0 + k, slot = y & mask;
      if (tag[slot] == y) continue;
      if (static_cast<int64_t>(tmp.size()) < v.W * v.cp) tmp.resize(v.W * v.cp);
      axpy_row<false>(plane + y * v.row, row_shape(v), acc_t(1), tmp.data());
      horizontal(tp, tmp.data(), false, ring.data() + slot * n);
      tag[slot] = y;
    }
    const acc_t* w = tp.th.w.data() + oy * K;
    for (int64_t k = 0; k < K; ++k) {
      const acc_t* __restrict__ r = ring.data() + ((y0 + k) & mask) * n;
      const acc_t wk = w[k];
      if (k == 0 && !add) {
        for (int64_t i = 0; i < n; ++i) acc[i] = wk * r[i];
      } else {
        for (int64_t i = 0; i < n; ++i) acc[i] += wk * r[i];
      }
    }
  }
  // A new plane: the ring's rows belong to the previous one.
  void new_plane() { std::fill(tag.begin(), tag.end(), -1); }
};

template <typename dst_t, typename acc_t>
void write_row(dst_t* __restrict__ out, const View& d, int64_t plane, const acc_t* __restrict__ acc,
               const JobPlan<acc_t>& j) {
  const RowShape s = row_shape(d);
  const bool affine = !j.scale.empty();
  for (int64_t x = 0; x < s.runs; ++x) {
    dst_t* __restrict__ o = out + x * s.step;
    const acc_t* __restrict__ a = acc + x * s.len;
    if (!affine) {
      for (int64_t c = 0; c < s.len; ++c) o[c] = static_cast<dst_t>(a[c]);
    } else if (!d.cl) {  // NCHW: the whole row is one channel
      const int64_t ch = plane % d.pdiv;
      const acc_t m = j.scale[ch], b = j.shift[ch];
      for (int64_t c = 0; c < s.len; ++c) o[c] = static_cast<dst_t>(a[c] * m + b);
    } else {  // channels_last: the channel pattern laid out along the run
      const acc_t* __restrict__ m = j.scale_run.data();
      const acc_t* __restrict__ b = j.shift_run.data();
      for (int64_t c = 0; c < s.len; ++c) o[c] = static_cast<dst_t>(a[c] * m[c] + b[c]);
    }
  }
}

template <typename src_t, typename dst_t, typename acc_t>
void run_typed(const std::vector<Job>& jobs) {
  std::vector<JobPlan<acc_t>> plans;
  std::vector<int64_t> first_item{0};  // prefix sums of rows (planes * H_out) per job
  int64_t max_acc = 1, total_values = 0;
  for (const auto& job : jobs) {
    JobPlan<acc_t> p;
    p.dst = make_view(job.dst, job.channels_last);
    for (double v : job.scale) p.scale.push_back(static_cast<acc_t>(v));
    for (double v : job.shift) p.shift.push_back(static_cast<acc_t>(v));
    if (!p.scale.empty() && p.dst.cl) {
      const int64_t len = row_shape(p.dst).len;
      for (int64_t i = 0; i < len; ++i) {
        p.scale_run.push_back(p.scale[i % p.dst.cp]);
        p.shift_run.push_back(p.shift[i % p.dst.cp]);
      }
    }
    for (const auto& t : job.terms) {
      // A gradient runs the forward axis (in -> out) transposed: it maps out -> in.
      auto th = forward_table<acc_t>(t.h), tw = forward_table<acc_t>(t.w);
      if (t.adjoint) {
        th = adjoint_table(th);
        tw = adjoint_table(tw);
      }
      TermPlan<acc_t> tp{make_view(t.src, job.channels_last), std::move(th), std::move(tw), false};
      tp.h_unit = is_unit(tp.tw);
      // Fewer source rows than output rows: gather each source row once (see the top).
      tp.h_first = !tp.h_unit && tp.th.in < tp.th.out;
      p.terms.push_back(std::move(tp));
    }
    p.direct = std::is_same_v<dst_t, acc_t> && p.scale.empty() && row_shape(p.dst).runs == 1;
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
    std::vector<acc_t> acc(max_acc);
    std::vector<RowMaker<src_t, acc_t>> makers;
    std::vector<const src_t*> src;
    size_t j = std::upper_bound(first_item.begin(), first_item.end(), begin) - first_item.begin() - 1;
    int64_t item = begin;
    while (item < end) {
      const JobPlan<acc_t>& p = plans[j];
      const int64_t local = item - first_item[j];
      int64_t plane = local / p.dst.H, oy = local % p.dst.H;
      const int64_t stop = std::min(end, first_item[j + 1]);
      // Walk this job's rows plane by plane; pointers are recomputed once per plane.
      while (item < stop) {
        src.resize(p.terms.size());
        if (makers.size() < p.terms.size()) makers.resize(p.terms.size());
        for (size_t t = 0; t < p.terms.size(); ++t) {
          src[t] = static_cast<const src_t*>(p.terms[t].v.data) + p.terms[t].v.plane_offset(plane);
          makers[t].new_plane();
        }
        dst_t* out = static_cast<dst_t*>(p.dst.data) + p.dst.plane_offset(plane);
        const int64_t rows_end = std::min<int64_t>(p.dst.H, oy + (stop - item));
        for (; oy < rows_end; ++oy, ++item) {
          dst_t* row = out + oy * p.dst.row;
          // When the row needs no conversion, accumulate straight into the output.
          acc_t* a = p.direct ? reinterpret_cast<acc_t*>(row) : acc.data();
          for (size_t t = 0; t < p.terms.size(); ++t) makers[t].run(p.terms[t], src[t], oy, t > 0, a);
          if (!p.direct) write_row(row, p.dst, plane, a, p);
        }
        ++plane;
        oy = 0;
      }
      ++j;
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

}  // namespace

void run_jobs(const std::vector<Job>& jobs, at::ScalarType st, at::ScalarType dt) {
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

}  // namespace MSFAST_CPU_ISA
}  // namespace msfast
