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

#if MSFAST_CPU_AVX2
constexpr bool kAvx2 = true;
#else
constexpr bool kAvx2 = false;
#endif

// The interior of a horizontal table of a rational scale factor repeats: outputs
// a + P*q + r (q < nq, r < P) read inputs off[r] + S*q + k. Downscaling by f has P = 1,
// S = f; upscaling by f has P = f, S = 1; a factor of 3/4 has P = 3, S = 4; so do their
// adjoints (the backward). The run is found in the table's actual starts: float rounding of
// a fractional scale can break the period, and the stencil then covers the longest exact run.
// Such rows are computed with plain strided loads, which vectorize, instead of one gather per
// output: on this project's AMD EPYC an AVX2 gather row is 3 to 5 times slower. The weights
// are the table's, regrouped by phase (w[(r * K + k) * nq + q]), and each sum runs in the same
// order, so results agree with the gather's (which still computes the border outputs) to
// rounding: the compiler fuses multiply-adds differently in the two loops.
template <typename acc_t>
struct Stencil {
  int P = 0, S = 0;  // P = 0: the table has no such interior, or no kernel for it
  int64_t a = 0, nq = 0;
  std::vector<int64_t> off;
  std::vector<acc_t> w;
  using Fn = void (*)(const acc_t*, const Stencil&, acc_t*);
  Fn assign = nullptr, add = nullptr;  // stencil_row for (P, S, K)
};

template <typename acc_t>
void pick_stencil_kernel(Stencil<acc_t>& s, int64_t K);  // below, next to the kernel

template <typename acc_t>
Stencil<acc_t> make_stencil(const Table<acc_t>& t) {
  Stencil<acc_t> s;
  // A scale of out / in = P / S in lowest terms repeats every P outputs and S inputs.
  const int64_t g = std::gcd(t.in, t.out), P = t.out / g, S = t.in / g;
  if (P > 8 || S > 8) return s;
  // The longest run of outputs o with start[o + P] == start[o] + S.
  int64_t best_a = 0, best_len = 0;
  for (int64_t o = 0; o + P < t.out;) {
    int64_t e = o;
    while (e + P < t.out && t.start[e + P] == t.start[e] + S) ++e;
    if (e - o > best_len) best_a = o, best_len = e - o;
    o = e + 1;
  }
  const int64_t nq = (best_len + P) / P;
  if (nq * P < 8 || nq * P < t.out / 2) return s;  // not worth it: the gather does the row
  s.P = static_cast<int>(P);
  s.S = static_cast<int>(S);
  s.a = best_a;
  s.nq = nq;
  for (int64_t r = 0; r < P; ++r) s.off.push_back(t.start[best_a + r]);
  s.w.resize(P * t.K * nq);
  for (int64_t r = 0; r < P; ++r)
    for (int64_t k = 0; k < t.K; ++k)
      for (int64_t q = 0; q < nq; ++q) s.w[(r * t.K + k) * nq + q] = t.w[(best_a + P * q + r) * t.K + k];
  pick_stencil_kernel(s, t.K);
  if (!s.assign) s.P = 0;
  return s;
}

// Values per pixel from which a channels_last term resamples rows horizontally first.
constexpr int64_t kWidePixel = 16;

template <typename acc_t>
struct TermPlan {
  View v;
  Table<acc_t> th, tw;
  bool h_unit;  // tw is the identity: the horizontal pass is a copy
  bool h_first;  // horizontal pass first, on each source row once (see above)
  // h_first: rows kept, a power of two >= th.K (so a slot is y & (ring - 1)); in the pixel
  // order, enough for a block of output rows (ring_rows).
  int64_t ring;
  // Every weight of th is 0 or at least 2^-20 in magnitude (see blend2_rows_bf16_512).
  bool th_weights_large = false;
  // tw again, for the one-value-per-pixel gather: 32-bit starts and tap-major weights
  // (wk[k * out + ox]), the layout in which the loop over ox vectorizes with gathers. This and
  // the plans below are for rows of one value per pixel: NCHW rows, and the rows that RGB
  // channels_last rows are split into (horizontal_planar).
  std::vector<int32_t> start32;
  std::vector<acc_t> wk;
  Stencil<acc_t> sten;  // the repeating interior of tw, if any
  // AVX2 float NCHW rows whose every 8 consecutive outputs read within 8 consecutive inputs
  // (upscaling; see window_rows): per group of 8 outputs the first of those inputs, and each
  // output's first tap among them. Empty where the table does not fit.
  std::vector<int32_t> win_base, win_idx;
  // AVX2 float NCHW rows of 8 taps or more with no stencil (the 8x upscale's adjoint, large
  // antialiased downscales; see dot_row): per output the first of the dot_k inputs it reads,
  // and its weights placed among them (zeros elsewhere). dot_k = 0 where not used.
  int64_t dot_k = 0;
  std::vector<int32_t> dot_base;
  std::vector<acc_t> dot_w;
  // A term of a small-plane job (see plan_small): the term as one matrix over whole planes,
  // input-major: dense[i * n8 + o] is the weight of input value i (y * W_in + x) in output
  // value o (oy * W_out + ox), n8 = H_out * W_out rounded up to 8 (zeros past it). Outputs
  // 8 c .. 8 c + 7 read only inputs dense_lo[c] .. dense_hi[c] - 1.
  std::vector<acc_t> dense;
  std::vector<int32_t> dense_lo, dense_hi;
};

// The ring an h_first term needs to hold the source rows of any g consecutive output rows.
template <typename acc_t>
int64_t ring_rows(const TermPlan<acc_t>& tp, int64_t g) {
  const Table<acc_t>& t = tp.th;
  int64_t span = t.K, ring = 1;
  for (int64_t oy = 0; oy < t.out; ++oy)
    span = std::max(span, t.start[std::min(oy + g - 1, t.out - 1)] + t.K - t.start[oy]);
  while (ring < span) ring *= 2;
  return ring;
}

// Plans window_rows for a table, when every group of 8 outputs fits in a window of 8 inputs.
template <typename acc_t>
void plan_window(TermPlan<acc_t>& tp) {
  const Table<acc_t>& t = tp.tw;
  const int64_t groups = t.out / 8;
  if (t.K > 8 || groups == 0) return;
  std::vector<int32_t> base(groups), idx(groups * 8);
  for (int64_t g = 0; g < groups; ++g) {
    // rows of fewer than 8 inputs (the 7 of fpn_concat's 8x upscale) load lanes 0 .. in - 1
    const int64_t b = std::max<int64_t>(0, std::min<int64_t>(t.start[8 * g], t.in - 8));
    for (int64_t r = 0; r < 8; ++r) {
      const int64_t d = t.start[8 * g + r] - b;
      if (d < 0 || d + t.K > 8) return;
      idx[8 * g + r] = static_cast<int32_t>(d);
    }
    base[g] = static_cast<int32_t>(b);
  }
  tp.win_base = std::move(base);
  tp.win_idx = std::move(idx);
}

// Plans dot_row for a table of 8 or more taps: the taps rounded up to a multiple of 8, each
// output's window moved left where it would run past the row's end.
template <typename acc_t>
void plan_dot(TermPlan<acc_t>& tp) {
  const Table<acc_t>& t = tp.tw;
  const int64_t Kp = (t.K + 7) / 8 * 8;
  if (t.K < 8 || t.in < Kp) return;
  tp.dot_k = Kp;
  tp.dot_base.resize(t.out);
  tp.dot_w.assign(t.out * Kp, acc_t(0));
  for (int64_t o = 0; o < t.out; ++o) {
    const int64_t b = std::min(t.start[o], t.in - Kp);
    tp.dot_base[o] = static_cast<int32_t>(b);
    for (int64_t k = 0; k < t.K; ++k) tp.dot_w[o * Kp + t.start[o] - b + k] = t.w[o * t.K + k];
  }
}

// Small NCHW planes: ResNet's coarse feature maps (MultiScaleResNet-18 on 128-pixel images
// concatenates 4x4, 2x2 and 1x1 maps of 512 channels at 4x4) and 8x8 digits. Row by row, a
// plane of a few short rows spends its time in the row machinery (rings, gathers, vector
// tails): that concat took 3.0 ms on two threads against eager's 0.85 (float32; 0.68 ms this
// way). Such a term is computed as one matrix over the whole plane (the product of its two
// tables): 8 outputs at a time, summed in registers over the inputs they read, each input
// value times its 8 weights. An output's sum runs over the same inputs in the same order
// whichever rows are computed together (the 8 are always the same 8), so results do not depend
// on the thread count; they agree with the row path's to rounding (another order, the products
// of the two tables' weights rounded once). A weight outside an output's taps is 0, and 0 * inf
// would be NaN where the rows give a number: a plane with a non-finite input value takes the rows.
//
// Which planes: those whose rows are short and whose matrix is not much more work than the
// rows. Nanoseconds per plane, one thread, matrix / rows: 2x2->4x4 31/102, 1x1->7x7 48/307,
// 4x4->8x8 77/146, 3x5->7x9 79/139, 8x8->8x8 (normalized) 81/218, 8x8->4x4 (antialiased)
// 101/195, 6x6->10x10 164/304, 10x10->12x12 252/310, 7x7->14x14 299/428; but 16x16->4x4
// 332/285 and 16x16->8x8 383/312 (downscales whose 8 outputs read many rows), and rows of 16
// or more, which the row path runs at vector speed: 2x2->16x16 150/126, 4x4->16x16 197/160,
// 5x5->20x20 283/229, 2x2->32x32 429/198. The matrix's steps per output value (a step: one
// input times 8 weights, over each 8 outputs' span of inputs) separate those two downscales
// (20 and 7.5) from the rest (at most 5). Planes of fewer than 16 outputs are allowed 16
// outputs' worth: the rows of a plane cost about 100 ns whatever their work (the gradient of
// a 1x1 feature concatenated at 4x4, 16 steps for one value, takes 5 ns as a matrix).
constexpr int64_t kSmallRow = 16;  // output rows shorter than this
constexpr int64_t kSmallWork = 6;  // steps per output value, at most
constexpr int64_t kSmallMatrix = 16384;  // weights (with the output plane rounded up to 8), at most

// 8 values of acc_t as one GCC vector (one ymm register of floats under AVX2): the loops of
// small_rows written with it compile to one broadcast multiply-add per input and plane, which
// GCC did not find in the scalar form.
template <typename acc_t>
struct Vec8 {
  typedef acc_t type __attribute__((vector_size(8 * sizeof(acc_t))));
};

// Builds tp's matrix for a job of `planes` planes; false where it does not pay (see above),
// or where the call is too small to pay for building it: the matrix is built per call, and for
// one 16x16 -> 8x8 RGB image it made the call 17 -> 24 us. So only where the values the rows
// would read and write (planes * (m + n)) are at least as many as the matrix's weights.
template <typename acc_t>
bool plan_small(TermPlan<acc_t>& tp, int64_t planes) {
  const Table<acc_t>&th = tp.th, &tw = tp.tw;
  const int64_t n = th.out * tw.out, n8 = (n + 7) / 8 * 8, m = th.in * tw.in;
  if (m * n8 > kSmallMatrix || planes * (m + n) < m * n8) return false;
  std::vector<double> d(m * n8, 0.0);  // duplicate taps (clamped at a border) summed in double
  std::vector<int32_t> lo(n8 / 8, static_cast<int32_t>(m)), hi(n8 / 8, 0);
  for (int64_t oy = 0; oy < th.out; ++oy)
    for (int64_t kh = 0; kh < th.K; ++kh) {
      const int64_t y = th.start[oy] + kh;
      if (y < 0 || y >= th.in) continue;  // only a table of an empty source points outside
      for (int64_t ox = 0; ox < tw.out; ++ox)
        for (int64_t kw = 0; kw < tw.K; ++kw) {
          const int64_t x = tw.start[ox] + kw, o = oy * tw.out + ox, i = y * tw.in + x;
          if (x < 0 || x >= tw.in) continue;
          d[i * n8 + o] += static_cast<double>(th.w[oy * th.K + kh]) * static_cast<double>(tw.w[ox * tw.K + kw]);
          lo[o / 8] = std::min(lo[o / 8], static_cast<int32_t>(i));
          hi[o / 8] = std::max(hi[o / 8], static_cast<int32_t>(i + 1));
        }
    }
  int64_t steps = 0;
  for (int64_t c = 0; c < n8 / 8; ++c) steps += std::max(0, hi[c] - lo[c]);
  if (steps > kSmallWork * std::max<int64_t>(n, 16)) return false;
  tp.dense.assign(d.begin(), d.end());
  tp.dense_lo = std::move(lo);
  tp.dense_hi = std::move(hi);
  return true;
}

constexpr int64_t kWriteBlock = 2048;  // values of a JobPlan::write_rows block, at most

template <typename acc_t>
struct JobPlan {
  View dst;
  std::vector<TermPlan<acc_t>> terms;
  // The per-channel affine laid out like the longest output run (see for_runs): for
  // channels_last the channel pattern repeated along it, so the write is one vector loop.
  std::vector<acc_t> scale_run, shift_run;
  std::vector<acc_t> scale, shift;
  bool direct = false;  // dst is acc_t with no affine: rows are computed in place
  // One two-tap h_first term whose starts never decrease (an upscale's), no affine:
  // RowMaker::run_rows2 or blend2_rows writes dst.
  bool rows2 = false;
  // One identity term (a scale 1 level, a feature already at the concat's size), no affine,
  // source and destination of one type: rows are copied. (A bfloat16 row would otherwise
  // go to float and back: pyramid's channels_last bfloat16 forward was slower than float32's.)
  bool copy = false;
  bool small = false;  // small NCHW planes: every term has its dense matrix (see plan_small)
  // Rows computed into the accumulator a block at a time and converted (rounded, normalized)
  // by one write_row over the block: packed NCHW rows that are neither direct nor copies nor
  // blends, and read no ring (the ring holds one output row's source rows). Row by row, the
  // write of a bfloat16 pyramid level's 112-value rows cost 7 us of a 50 us call (one
  // 224x224 RGB image, float32 source, one thread), most of it per call.
  int64_t write_rows = 1;
  // Non-temporal stores (AVX2) for this job's rows, which then do not read each destination
  // line into the cache before writing it. Those reads compete with the loads of the ring
  // rows: on this project's EPYC, writing fpn_concat's 192 MB channels_last output as blends
  // of two cached rows took 21 ms with plain stores on one thread and 11.5 ms with
  // non-temporal ones (10 ms for a plain fill); 11.4 and 7.9 ms on two threads.
  // - Only where every byte of the job's output, and of any other job's output sharing its
  //   span (the slices of a concat), is written by a non-temporal store: a line that gets
  //   plain stores too (an unaligned row start, an affine job's slice next to it) is read in
  //   and written back again and again (a bfloat16 copy of 112-byte rows went from 0.45 to
  //   7 ms).
  // - 16-bit NCHW blends (rows of 112 bytes in fpn_concat, which do not start on cache
  //   lines) stream only through a staging buffer (run_rows2_nchw), and only on Intel
  //   processors (staged_rows()). On this project's Intel Xeon (2026-12) that made
  //   fpn_concat's bfloat16 NCHW forward into out= 25% faster (two threads, medians of 25:
  //   8.7 -> 6.5 ms). On the AMD EPYC it had before, written straight it was 10-13% slower,
  //   and staged, its 8x part went from 3.7 to 4.4 ms. 16-bit NCHW copies stream as whole
  //   runs of rows everywhere (see plan_streams).
  // - The rows of every other job (downscales, antialias, normalization, the backwards) are
  //   computed into a staging buffer a run of rows at a time and copied out with
  //   non-temporal stores (run_typed), where the rows of a plane follow each other in the
  //   output (16-bit ones only where blends are staged). On this project's Intel Xeon, a
  //   float32 preprocess of 32 images (41 MB), two threads, each call after an eager one as
  //   in the bench: 4.9-5.6 -> 3.9-4.6 ms; the NCHW float32 pyramid's forward + backward
  //   6.4 -> 5.7-6.0 ms. In a loop that leaves the output in the last-level cache (480 MiB
  //   there) the preprocess went from 3.4 to 3.6-3.8 ms instead.
  // - Only for calls moving more than stream_bytes() (16 MiB) in all, inputs read and output
  //   written: below that, plain stores leave the output in cache for whatever reads it
  //   next. A [1, 0.5, 0.25] pyramid of 32 RGB 224x224 images (44 MB) then copies its first
  //   level with them: 2.2 -> 2.0 ms on two threads, 4.9 -> 4.0 ms on one (the EPYC). The
  //   line was 32 MiB, the EPYC's last-level cache; on the Intel Xeon the bfloat16 calls of
  //   that size (a preprocess of 32 images, 23 MB: 4.2-4.75 -> 3.8-4.1 ms after an eager
  //   call, 3.5-3.8 -> 3.3-3.5 ms in a loop; the pyramid above, 22 MB: 2.3-2.4 -> 2.0-2.2
  //   ms after an eager call, the same in a loop) were faster streamed, and their float32
  //   twins already streamed.
  bool stream = false;
};

// Whether every run of a destination (see for_runs) starts at a multiple of `bytes` and
// spans a multiple of it: then stores of that size cover it exactly.
inline bool runs_aligned(const View& d, int64_t elem, int64_t bytes) {
  const bool packed = d.px == d.cp;
  auto ok = [&](int64_t n) { return (n * elem) % bytes == 0; };
  return reinterpret_cast<uintptr_t>(d.data) % bytes == 0 && ok(packed ? d.W * d.cp : d.cp) && ok(d.row) &&
         (packed || ok(d.px)) && ok(d.s_outer) && ok(d.s_inner);
}

// Whether the rows of each plane follow each other with no gap (NCHW, or channels_last with
// every channel): then a run of rows is one contiguous range of bytes.
inline bool rows_packed(const View& v) { return v.px == v.cp && v.row == v.W * v.cp; }

// A copy job whose rows of a plane are contiguous in source and destination: a run of rows
// is copied in one go (the row order), and streams even in 16-bit NCHW (plan_streams).
template <typename acc_t>
bool copies_row_runs(const JobPlan<acc_t>& p) {
  return p.copy && rows_packed(p.dst) && rows_packed(p.terms[0].v);
}

// Whether a rows2 term's source is packed NCHW planes, which RowMaker::run_rows2 hands to
// run_rows2_nchw: one value a pixel, pixels and rows with no gap (run_rows2_nchw reads a run of
// rows as one row of their pixels). A pixel stride matters even at width 1: a feature of one
// channel and one column, transposed, has rows 1 element apart and a pixel stride of 2, and
// read as a run of pixels its rows came from past its end.
inline bool rows2_nchw_source(const View& v) { return v.cp == 1 && rows_packed(v) && v.H > 0; }

// Rows per run of rows computed into a staging buffer and streamed from there: about
// kStageBytes of whole rows (at least one), a multiple of the rows that span whole cache lines
// where one fits. Runs start at multiples of it in a plane: then, in a plane that starts on a
// line, a run's ends fall on line boundaries, and no line is streamed in two parts.
// fpn_concat bfloat16 NCHW out= (run_rows2_nchw), two threads, medians over processes
// alternated four times: whole planes (6272 bytes) 5.4-6.6 ms, runs of 20 rows (2240 bytes)
// 4.9-5.3; runs of 18 rows (2016 bytes, ending mid-line) 5.2-5.6; runs of 8 or fewer rows
// were slower again. (Short runs let one run's stores drain while the next is computed; this
// is what was measured, not a traced cause.) Rows of other jobs (run_typed): a float32
// [1, 0.75, 0.5, 0.25] preprocess of 32 images, two threads, each call after an eager one,
// runs of one 2688-byte row 3.8 ms, of 16 KB 4.0-4.1 ms.
inline int64_t staged_run_rows(int64_t row_bytes) {
  constexpr int64_t kStageBytes = 2560;
  const int64_t line_rows = 64 / std::gcd<int64_t>(row_bytes, 64);
  int64_t per_run = std::max<int64_t>(1, kStageBytes / row_bytes);
  if (per_run >= line_rows) per_run -= per_run % line_rows;
  return per_run;
}

// The end of the staged run of rows that row oy of a plane is in (runs of per_run rows from
// the plane's first row), cut at `limit`.
inline int64_t staged_run_end(int64_t oy, int64_t per_run, int64_t limit) {
  return std::min(limit, (oy / per_run + 1) * per_run);
}

// A job whose rows are neither two-tap blends, copies nor small planes (downscales,
// antialias, bicubic, a normalization, the backwards): when it streams, run_typed computes its
// rows into a staging buffer (see plan_streams).
template <typename acc_t>
bool other_rows(const JobPlan<acc_t>& p) {
  return !p.rows2 && !p.copy && !p.small;
}

// A two-tap upscale from and into packed NCHW planes (RowMaker::run_rows2_nchw): with 16-bit
// output and non-temporal stores, its runs of rows are computed into a staging buffer and
// streamed from there (see JobPlan::stream).
template <typename acc_t>
bool stages_rows(const JobPlan<acc_t>& p) {
  return p.rows2 && !p.dst.cl && rows_packed(p.dst) && rows2_nchw_source(p.terms[0].v) && staged_rows().load();
}

template <typename acc_t>
bool is_unit(const Table<acc_t>& t) {
  if (t.in != t.out || t.K != 1) return false;
  for (int64_t o = 0; o < t.out; ++o)
    if (t.start[o] != o || t.w[o] != acc_t(1)) return false;
  return true;
}

// A row of W pixels of cp contiguous values, px elements apart (px > cp for a channel slice
// of a channels_last tensor). Loops over a (source, destination) pair of rows run as one
// long vectorizable run when both are packed, else one run per pixel.
struct Row {
  int64_t W, cp, px;
  bool packed() const { return px == cp; }
};
inline Row row_of(const View& v) { return {v.W, v.cp, v.px}; }
inline Row packed_row(int64_t W, int64_t cp) { return {W, cp, cp}; }

// Always inlined, as are the row loops below that call it: when GCC made it a call, the
// NCHW forward (56-value rows) got 25-40% slower on one thread.
#ifndef MSFAST_INLINE
#define MSFAST_INLINE inline __attribute__((always_inline))
#endif

template <typename F>
MSFAST_INLINE void for_runs(const Row& a, const Row& b, F&& f) {
  if (a.packed() && b.packed()) return f(int64_t{0}, int64_t{0}, a.W * a.cp);
  for (int64_t x = 0; x < a.W; ++x) f(x * a.px, x * b.px, a.cp);
}

// src_t -> acc_t; bfloat16 widened with a shift, in a form the loops vectorize.
template <typename acc_t, typename src_t>
inline acc_t to_acc(src_t v) {
  if constexpr (std::is_same_v<src_t, at::BFloat16> && std::is_same_v<acc_t, float>) {
    const uint32_t u = static_cast<uint32_t>(v.x) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
  } else {
    return static_cast<acc_t>(v);
  }
}

// acc_t -> dst_t. bfloat16 is rounded to nearest even here with integer operations and no
// branch (c10::BFloat16's constructor tests for NaN first), so the write loop vectorizes.
template <typename dst_t, typename acc_t>
inline dst_t to_dst(acc_t v) {
  if constexpr (std::is_same_v<dst_t, at::BFloat16> && std::is_same_v<acc_t, float>) {
    uint32_t u;
    std::memcpy(&u, &v, sizeof(u));
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
    return at::BFloat16(static_cast<uint16_t>(nan ? 0x7FC0u : rounded), at::BFloat16::from_bits());
  } else {
    return static_cast<dst_t>(v);
  }
}

#if MSFAST_CPU_AVX2
// 8 source values widened to float, exactly as to_acc widens them.
template <typename src_t>
MSFAST_INLINE __m256 load8(const src_t* p) {
  if constexpr (std::is_same_v<src_t, float>) {
    return _mm256_loadu_ps(p);
  } else if constexpr (std::is_same_v<src_t, at::BFloat16>) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else if constexpr (std::is_same_v<src_t, at::Half>) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  } else if constexpr (std::is_same_v<src_t, double>) {  // float64 input, float32 levels
    return _mm256_set_m128(_mm256_cvtpd_ps(_mm256_loadu_pd(p + 4)), _mm256_cvtpd_ps(_mm256_loadu_pd(p)));
  } else {
    static_assert(std::is_same_v<src_t, uint8_t>, "no vector load for this type");
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
}
#endif

// b[c] = to_acc(a[c]) for c < n. float16 is widened 8 values at a time (vcvtph2ps, exact as
// to_acc): GCC does not vectorize c10's scalar conversion, which was 12% of fpn_concat's
// float16 NCHW forward and made its channels_last backward twice bfloat16's.
template <typename acc_t, typename src_t>
MSFAST_INLINE void widen(const src_t* __restrict__ a, acc_t* __restrict__ b, int64_t n) {
  int64_t c = 0;
#if MSFAST_CPU_AVX2
  if constexpr (std::is_same_v<src_t, at::Half> && std::is_same_v<acc_t, float>)
    for (; c + 8 <= n; c += 8) _mm256_storeu_ps(b + c, load8(a + c));
#endif
  for (; c < n; ++c) b[c] = to_acc<acc_t>(a[c]);
}

// d (+)= w * s, elementwise over a row.
template <bool kAdd, typename src_t, typename acc_t>
inline void axpy(const src_t* s, const Row& rs, acc_t w, acc_t* d, const Row& rd) {
  // A channel slice of a wider channels_last tensor (the gradient of a channels_last concat)
  // is read in runs px values apart, a stride the hardware prefetchers do not follow well:
  // fetch the run kAhead pixels on while this one is computed. (Measured on the fpn_concat
  // gradient, one thread: 2 to 8 pixels ahead alike and best, 12 a little slower, 48 as slow
  // as none.)
  constexpr int64_t kAhead = 4, kLine = 64 / sizeof(src_t);
  const int64_t ahead_end = (rs.W - kAhead) * rs.px;
  for_runs(rs, rd, [&](int64_t so, int64_t dof, int64_t len) {
    if (!rs.packed() && so < ahead_end)
      for (int64_t c = 0; c < len; c += kLine) __builtin_prefetch(s + so + kAhead * rs.px + c);
    const src_t* __restrict__ a = s + so;
    acc_t* __restrict__ b = d + dof;
    if (!kAdd && w == acc_t(1)) return widen(a, b, len);  // a conversion (RowMaker::source_rows)
    for (int64_t c = 0; c < len; ++c) {
      const acc_t v = w * to_acc<acc_t>(a[c]);
      b[c] = kAdd ? b[c] + v : v;
    }
  });
}

#if MSFAST_CPU_AVX2
// 8 floats rounded to bfloat16 as to_dst rounds them, in the low half of each lane.
// kNan = false: the caller knows v holds no NaN, and the NaN test is left out.
template <bool kNan = true>
MSFAST_INLINE __m256i bf16_bits(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  if constexpr (!kNan) return r;
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
}

// 16 floats (x, then y) or 8 (x) as bfloat16, in order.
template <bool kNan = true>
MSFAST_INLINE __m256i bf16x16(__m256 x, __m256 y) {
  return _mm256_permute4x64_epi64(_mm256_packus_epi32(bf16_bits<kNan>(x), bf16_bits<kNan>(y)), 0xD8);
}
template <bool kNan = true>
MSFAST_INLINE __m128i bf16x8(__m256 x) {
  const __m256i r = bf16_bits<kNan>(x);
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

// 8 floats as float16, rounded as to_dst rounds them (c10's conversion: to nearest even, with
// subnormals, and a NaN as 0x7E00 with its sign). vcvtps2ph rounds the same way but keeps a
// NaN's payload, so NaNs are made 0x7FC00000 (with their sign) first, which it writes as
// 0x7E00; kNan = false: v holds no NaN. Before it, a float16 row was written one value at a
// time: fpn_concat float16 NCHW out= took 51 ms on two threads, ten times bfloat16's.
template <bool kNan = true>
MSFAST_INLINE __m128i f16x8(__m256 v) {
  if constexpr (!kNan) return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 quiet = _mm256_or_ps(_mm256_and_ps(v, _mm256_set1_ps(-0.0f)),
                                    _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000)));
  v = _mm256_blendv_ps(v, quiet, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

// Whether the bfloat16 rounding uses AVX-512 BF16 (cpu_isa() "avx512bf16"). The functions
// that do are compiled for it one by one (MSFAST_AVX512BF16), not as a third build.
inline bool avx512bf16() {
  static const bool on = std::strcmp(cpu_isa(), "avx512bf16") == 0;
  return on;
}
#define MSFAST_AVX512BF16 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")))
// vfpclassps classes. vcvt(ne2)ps2bf16 rounds to nearest even as to_dst does, but flushes
// subnormals to zero and writes NaNs of its own: values of those classes take to_dst.
constexpr int kFpNan = 0x01 | 0x80, kFpInf = 0x08 | 0x10, kFpSubnormal = 0x20;

// o[i] = w0 * a[i] + w1 * b[i] for c0 <= i < c1, one value at a time: the arithmetic every
// vector blend below matches, and their path for tails and for values they cannot round.
template <typename out_t>
MSFAST_INLINE void blend_scalar(const float* a, const float* b, float w0, float w1, out_t* o, int64_t c0,
                                int64_t c1) {
  for (int64_t i = c0; i < c1; ++i) o[i] = to_dst<out_t>(std::fma(w1, b[i], w0 * a[i]));
}

// Stores 16 bfloat16 values at p: non-temporal when nt (p 16-byte aligned), 32 bytes at a
// time when nt32 (p 32-byte aligned).
MSFAST_INLINE void store_bf16x16(at::BFloat16* p, __m256i r, bool nt, bool nt32) {
  if (nt32) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), r);
  } else if (nt) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(r));
    _mm_stream_si128(reinterpret_cast<__m128i*>(p + 8), _mm256_extracti128_si256(r, 1));
  } else {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), r);
  }
}

// blend2_avx2 into bfloat16 where the processor has AVX-512 BF16, on 256-bit vectors: the
// rounding of 16 values is one vcvtne2ps2bf16 instead of about 20 integer instructions.
// 16 values holding a NaN or a subnormal take the scalar path. (The 512-bit version was
// slower on these rows: channels_last slices, one call per pixel.)
MSFAST_AVX512BF16 void blend2_bf16_256(
    const float* a, const float* b, int64_t len, float w0, float w1, at::BFloat16* o, bool nt, bool nt32) {
  constexpr int kNanOrSubnormal = kFpNan | kFpSubnormal;
  const __m256 v0 = _mm256_set1_ps(w0), v1 = _mm256_set1_ps(w1);
  int64_t c = 0;
  for (; c + 16 <= len; c += 16) {
    const __m256 x = _mm256_fmadd_ps(v1, _mm256_loadu_ps(b + c), _mm256_mul_ps(v0, _mm256_loadu_ps(a + c)));
    const __m256 y = _mm256_fmadd_ps(v1, _mm256_loadu_ps(b + c + 8), _mm256_mul_ps(v0, _mm256_loadu_ps(a + c + 8)));
    if (_mm256_fpclass_ps_mask(x, kNanOrSubnormal) | _mm256_fpclass_ps_mask(y, kNanOrSubnormal))
      blend_scalar(a, b, w0, w1, o, c, c + 16);
    else
      store_bf16x16(o + c, reinterpret_cast<__m256i>(_mm256_cvtne2ps_pbh(y, x)), nt, nt32);
  }
  blend_scalar(a, b, w0, w1, o, c, len);
}

// o[c] = w0 * a[c] + w1 * b[c] for c < len, in 8-value steps (16 for bfloat16, packed in one
// go) and the same operations as the scalar loop's. GCC vectorizes that loop 16 values a step
// with a 4-wide and a scalar tail: for the 56-value rows of fpn_concat most of the row went to
// its prologue and tails. stream: non-temporal stores, for a run aligned to 8 values (see
// JobPlan::stream); 32 bytes at a time where the run is aligned to them (bfloat16
// channels_last concat, two threads: 4.95-5.17 to 4.62-4.77 ms, against 16-byte stores).
template <typename out_t>
MSFAST_INLINE void blend2_avx2(const float* a, const float* b, int64_t len, float w0, float w1, out_t* o, bool stream) {
  const __m256 v0 = _mm256_set1_ps(w0), v1 = _mm256_set1_ps(w1);
  auto value = [&](int64_t c) {
    return _mm256_fmadd_ps(v1, _mm256_loadu_ps(b + c), _mm256_mul_ps(v0, _mm256_loadu_ps(a + c)));
  };
  const bool nt = stream && reinterpret_cast<uintptr_t>(o) % (8 * sizeof(out_t)) == 0;
  const bool nt32 = nt && reinterpret_cast<uintptr_t>(o) % 32 == 0;
  int64_t c = 0;
  if constexpr (std::is_same_v<out_t, float>) {
    for (; c + 8 <= len; c += 8) nt ? _mm256_stream_ps(o + c, value(c)) : _mm256_storeu_ps(o + c, value(c));
  } else if constexpr (std::is_same_v<out_t, at::Half>) {
    for (; c + 8 <= len; c += 8) {
      __m128i* p = reinterpret_cast<__m128i*>(o + c);
      nt ? _mm_stream_si128(p, f16x8(value(c))) : _mm_storeu_si128(p, f16x8(value(c)));
    }
  } else {
    if (avx512bf16() && len % 16 == 0) return blend2_bf16_256(a, b, len, w0, w1, o, nt, nt32);
    for (; c + 16 <= len; c += 16) store_bf16x16(o + c, bf16x16(value(c), value(c + 8)), nt, nt32);
    if (c + 8 <= len) {
      const __m128i h = bf16x8(value(c));
      __m128i* p = reinterpret_cast<__m128i*>(o + c);
      nt ? _mm_stream_si128(p, h) : _mm_storeu_si128(p, h);
      c += 8;
    }
  }
  blend_scalar(a, b, w0, w1, o, c, len);
}

// blend2_rows16 into bfloat16 where the processor has AVX-512 BF16, 32 values of every row a step:
// vcvtne2ps2bf16 rounds 32 floats in one instruction where the AVX2 rounding takes about 20
// for 16, and the rounding was what bounded these rows. vcvtne2ps2bf16 flushes subnormals and
// writes NaNs of its own, so a row's chunk that is subnormal anywhere, or whose inputs are not
// finite, is written by the scalar path instead; unless kSafe, where the caller has checked
// that neither can happen (blend_inputs_safe). The last chunk of a row is masked: no scalar
// tail. (On 256-bit vectors: 3-5% slower.) kNt: non-temporal stores, where the caller has
// checked that every row starts on a cache line and len is a multiple of 16 (64-byte stores,
// and a 32-byte one for a last 16 values; see blend2_group).
template <bool kSafe, bool kNt = false>
MSFAST_AVX512BF16 void blend2_rows_bf16_512(
    const float* a, const float* b, int64_t len, const float* w, int64_t n, at::BFloat16* o, int64_t stride) {
  constexpr int kNonFinite = kFpNan | kFpInf;
  for (int64_t c = 0; c < len; c += 32) {
    const int64_t m = std::min<int64_t>(len - c, 32);
    const __mmask32 k = m == 32 ? ~__mmask32{0} : (__mmask32{1} << m) - 1;
    const __mmask16 k0 = static_cast<__mmask16>(k), k1 = static_cast<__mmask16>(k >> 16);
    const __m512 a0 = _mm512_maskz_loadu_ps(k0, a + c), a1 = _mm512_maskz_loadu_ps(k1, a + c + 16);
    const __m512 b0 = _mm512_maskz_loadu_ps(k0, b + c), b1 = _mm512_maskz_loadu_ps(k1, b + c + 16);
    unsigned bad = 0;
    if constexpr (!kSafe)
      bad = _mm512_fpclass_ps_mask(a0, kNonFinite) | _mm512_fpclass_ps_mask(a1, kNonFinite) |
            _mm512_fpclass_ps_mask(b0, kNonFinite) | _mm512_fpclass_ps_mask(b1, kNonFinite);
    for (int64_t r = 0; r < n; ++r) {
      const __m512 v0 = _mm512_set1_ps(w[2 * r]), v1 = _mm512_set1_ps(w[2 * r + 1]);
      const __m512 x = _mm512_fmadd_ps(v1, b0, _mm512_mul_ps(v0, a0));
      const __m512 y = _mm512_fmadd_ps(v1, b1, _mm512_mul_ps(v0, a1));
      at::BFloat16* p = o + r * stride + c;
      if constexpr (!kSafe) {
        if (bad | _mm512_fpclass_ps_mask(x, kFpSubnormal) | _mm512_fpclass_ps_mask(y, kFpSubnormal)) {
          // blend_scalar's loop, written out: through the helper GCC laid this function out
          // differently and fpn_concat out= bfloat16 NCHW was 4-5% slower (one thread).
          for (int64_t i = 0; i < m; ++i)
            p[i] = to_dst<at::BFloat16>(std::fma(w[2 * r + 1], b[c + i], w[2 * r] * a[c + i]));
          continue;
        }
      }
      if (kNt && m == 16) {
        _mm256_stream_si256(reinterpret_cast<__m256i*>(p), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x)));
        continue;
      }
      const __m512i h = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(y, x));
      if (kNt)
        _mm512_stream_si512(reinterpret_cast<__m512i*>(p), h);
      else if (m == 32)
        _mm512_storeu_si512(p, h);
      else
        _mm512_mask_storeu_epi16(p, k, h);
    }
  }
}

// 16 values of blend2_flat_bf16_512 from column c of row r on (those of mask k; kFull: all 16).
// The arguments are passed by value: a lambda capturing them by reference had them reloaded
// after every store (an intrinsic's store may alias anything), 30% slower.
template <bool kFull>
MSFAST_AVX512BF16 inline __attribute__((always_inline)) __m512 flat_half(
    const float* block, int64_t W, const int64_t* start, int64_t lo, const float* w, int64_t r, int64_t c,
    __mmask16 k) {
  const float* a = block + (start[r] - lo) * W + c;
  __m512 w0 = _mm512_set1_ps(w[2 * r]), w1 = _mm512_set1_ps(w[2 * r + 1]), x, y;
  if (c + 16 <= W) {
    x = kFull ? _mm512_loadu_ps(a) : _mm512_maskz_loadu_ps(k, a);
    y = kFull ? _mm512_loadu_ps(a + W) : _mm512_maskz_loadu_ps(k, a + W);
  } else {
    const __mmask16 k0 = static_cast<__mmask16>(((1u << (W - c)) - 1) & k), k1 = k & ~k0;
    x = _mm512_maskz_loadu_ps(k0, a);
    y = _mm512_maskz_loadu_ps(k0, a + W);
    if (k1) {  // lanes of row r + 1, from its column 0 (a2 + lane: lanes below W - c not read)
      const float* a2 = block + (start[r + 1] - lo) * W + c - W;
      x = _mm512_mask_loadu_ps(x, k1, a2);
      y = _mm512_mask_loadu_ps(y, k1, a2 + W);
      w0 = _mm512_mask_blend_ps(k1, w0, _mm512_set1_ps(w[2 * r + 2]));
      w1 = _mm512_mask_blend_ps(k1, w1, _mm512_set1_ps(w[2 * r + 3]));
    }
  }
  return _mm512_fmadd_ps(w1, y, _mm512_mul_ps(w0, x));
}

// Output rows r0 .. r1 - 1 of a packed NCHW plane (W >= 16 values each, row r at o + (r - r0) * W)
// blended from `block` (row i: source row lo + i resampled horizontally, W floats), row r as
// w[2r] * block row start[r] - lo + w[2r + 1] * the next one, rounded to bfloat16: the same
// values as blend2_rows_bf16_512<true> row by row, written straight into the output with
// non-temporal stores. Non-temporal stores must fill whole cache lines, which rows of 112
// bytes (fpn_concat's) do not start on; so the rows are taken as one flat run cut at the
// output's lines, 32 values a step, and a step's 16-value half that runs past its row's end
// takes the rest from the next row (masked loads, per-lane weights). The first and last
// lines of the run, when partial, take plain masked stores. Only where the caller has
// checked what blend2_rows_bf16_512<true> needs (blend_inputs_safe, large weights).
// Row by row, these rows went through a stage that copy_run streamed out. Into the stage,
// this flat order was slower than blend2_rows_bf16_512 (fpn_concat bfloat16 NCHW out=, one
// thread: 10.4-10.7 against 9.3-10.1 ms): it loads both rows for every 16 values instead of
// once for all the rows that blend them. Straight to the output it does without the stage's
// stores and loads, and on this project's Intel Xeon a non-temporal store's time adds to the
// work around it rather than hiding under it (a C loop: work on L1 data then 2240-byte runs
// of streaming stores took the sum of the two), so each store the path saves counts.
MSFAST_AVX512BF16 void blend2_flat_bf16_512(const float* block, const int64_t W, const int64_t* start,
                                            const int64_t lo, const float* w, const int64_t r0, const int64_t r1,
                                            at::BFloat16* o) {
  // m < 32 values from flat position f (column c of row r on): the run's partial first and
  // last lines, with masked loads and a masked store.
  const auto part = [=](int64_t r, int64_t c, int64_t f, int64_t m) {
    const __mmask32 k = (__mmask32{1} << m) - 1;
    int64_t r2 = r, c2 = c + 16;
    while (c2 >= W) c2 -= W, ++r2;
    const __m512 x = flat_half<false>(block, W, start, lo, w, r, c, static_cast<__mmask16>(k));
    const __m512 y = m > 16 ? flat_half<false>(block, W, start, lo, w, r2, c2, static_cast<__mmask16>(k >> 16)) : x;
    _mm512_mask_storeu_epi16(o + f, k, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(y, x)));
  };
  const int64_t L = (r1 - r0) * W;
  const int64_t head = std::min<int64_t>(L, (64 - reinterpret_cast<uintptr_t>(o) % 64) % 64 / 2);
  if (head) part(r0, 0, 0, head);
  int64_t r = r0 + head / W, c = head % W, f = head;
  for (; f + 32 <= L; f += 32) {
    const __m512 x = flat_half<true>(block, W, start, lo, w, r, c, 0xFFFF);
    if ((c += 16) >= W) c -= W, ++r;
    const __m512 y = flat_half<true>(block, W, start, lo, w, r, c, 0xFFFF);
    if ((c += 16) >= W) c -= W, ++r;
    _mm512_stream_si512(reinterpret_cast<__m512i*>(o + f), reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(y, x)));
  }
  if (f < L) part(r, c, f, L - f);
}

// Whether the n floats at p are all 0 or normal with a magnitude of at least 2^-56: then
// w0 * a + w1 * b (as blend_scalar computes it) of two such values, with weights 0 or of at
// least 2^-20 (TermPlan::th_weights_large), is 0 or normal. The products are exact multiples
// of 2^-122 (24-bit significands, exponents of at least -20 and -56), the rounded w0 * a too,
// so a nonzero fma is at least 2^-122 in magnitude, far from the subnormals (below 2^-126).
// Checking a block of rows once spares blend2_rows_bf16_512 its checks on every output row:
// fpn_concat's bfloat16 NCHW forward was about 15% faster without them (one or two threads).
MSFAST_AVX512BF16 bool blend_inputs_safe(const float* p, int64_t n) {
  const __m512i sign_off = _mm512_set1_epi32(0x7fffffff), tiny = _mm512_set1_epi32(0x23800000 - 1),
                inf = _mm512_set1_epi32(0x7f800000), one = _mm512_set1_epi32(1);
  auto bad = [&](__m512i v, __mmask16 k) __attribute__((always_inline)) {
    const __m512i u = _mm512_and_si512(v, sign_off);  // |v|'s bits
    // 0 < |v| < 2^-56: u - 1 below 0x23800000 - 1 (0 wraps to the top); or infinite / NaN
    return (_mm512_mask_cmplt_epu32_mask(k, _mm512_sub_epi32(u, one), tiny) |
            _mm512_mask_cmpge_epu32_mask(k, u, inf)) != 0;
  };
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)  // unmasked loads (see write_bf16_step)
    if (bad(_mm512_loadu_si512(p + i), 0xFFFF)) return false;
  const __mmask16 k = static_cast<__mmask16>((1u << (n - i)) - 1);
  return i == n || !bad(_mm512_maskz_loadu_epi32(k, p + i), k);
}

// One step of write_bf16_512: values c .. c + 15 (kFull) or those of mask k. Whole steps load
// and store unmasked: a masked load costs a vector uop besides the load, and with every step
// masked write_bf16_512 took twice as long as float32's write_row (15% of a bfloat16
// preprocess against 7%, one thread).
template <bool kFull>
MSFAST_AVX512BF16 inline __attribute__((always_inline)) void write_bf16_step(
    const float* a, int64_t c, __mmask16 k, bool affine, float m1, float b1, const float* m, const float* b,
    at::BFloat16* o) {
  constexpr int kNotNormal = kFpNan | kFpInf | kFpSubnormal;
  auto load = [k](const float* p) __attribute__((always_inline)) {
    return kFull ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(k, p);
  };
  __m512 v = load(a + c);
  if (m) {
    v = _mm512_fmadd_ps(v, load(m + c), load(b + c));
  } else if (affine) {
    v = _mm512_fmadd_ps(v, _mm512_set1_ps(m1), _mm512_set1_ps(b1));
  }
  if (_mm512_fpclass_ps_mask(v, kNotNormal) & k) {
    for (int64_t i = c; i < c + __builtin_popcount(k); ++i)
      o[i] = to_dst<at::BFloat16>(m ? std::fma(a[i], m[i], b[i]) : affine ? std::fma(a[i], m1, b1) : a[i]);
    return;
  }
  const __m256i h = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
  if constexpr (kFull)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + c), h);
  else
    _mm256_mask_storeu_epi16(o + c, k, h);
}

// write_row's loops into bfloat16 where the processor has AVX-512 BF16: o[c] = round(a[c]),
// round(fma(a[c], m1, b1)) (m, b null) or round(fma(a[c], m[c], b[c])), 16 values a step
// (vcvtneps2bf16), the last step masked; steps holding a non-finite or subnormal value take
// the scalar path. The multiply-adds are fused, as GCC fuses the scalar loop's a * m + b in
// the AVX2 build.
MSFAST_AVX512BF16 void write_bf16_512(
    const float* a, int64_t len, bool affine, float m1, float b1, const float* m, const float* b, at::BFloat16* o) {
  int64_t c = 0;
  for (; c + 16 <= len; c += 16) write_bf16_step<true>(a, c, 0xFFFF, affine, m1, b1, m, b, o);
  if (c < len)
    write_bf16_step<false>(a, c, static_cast<__mmask16>((1u << (len - c)) - 1), affine, m1, b1, m, b, o);
}

// write_row's loops into float16: o[c] = round(a[c]), round(fma(a[c], m1, b1)) (m, b null) or
// round(fma(a[c], m[c], b[c])), 8 values a step (f16x8), the tail one value at a time with the
// same operations. The multiply-adds are fused, as in write_bf16_512.
MSFAST_INLINE void write_f16(const float* a, int64_t len, bool affine, float m1, float b1, const float* m,
                             const float* b, at::Half* o) {
  int64_t c = 0;
  for (; c + 8 <= len; c += 8) {
    __m256 v = _mm256_loadu_ps(a + c);
    if (m) {
      v = _mm256_fmadd_ps(v, _mm256_loadu_ps(m + c), _mm256_loadu_ps(b + c));
    } else if (affine) {
      v = _mm256_fmadd_ps(v, _mm256_set1_ps(m1), _mm256_set1_ps(b1));
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + c), f16x8(v));
  }
  for (; c < len; ++c)
    o[c] = to_dst<at::Half>(m ? std::fma(a[c], m[c], b[c]) : affine ? std::fma(a[c], m1, b1) : a[c]);
}

// n 16-bit rows that blend the same two rows a and b (weights w[2 r], w[2 r + 1]; rows
// `stride` values apart), 16 values of every row at a time: a chunk of a and b is loaded once
// for all rows, and where it holds only finite values (checked once for all rows) no blend of
// it is NaN, so the rounding skips its NaN test. The same values as n calls of blend2_avx2.
// (An 8x upscale's 56-value rows: 8 rows per pair of ring rows.) safe (bfloat16): a and b
// passed blend_inputs_safe and the weights are large (TermPlan::th_weights_large).
template <typename out_t>
MSFAST_INLINE void blend2_rows16(const float* a, const float* b, int64_t len, const float* w, int64_t n, out_t* o,
                                 int64_t stride, bool safe = false) {
  constexpr bool kBf16 = std::is_same_v<out_t, at::BFloat16>;
  if constexpr (kBf16) {
    if (avx512bf16())
      return safe ? blend2_rows_bf16_512<true>(a, b, len, w, n, o, stride)
                  : blend2_rows_bf16_512<false>(a, b, len, w, n, o, stride);
  }
  int64_t c = 0;
  // 16 values of every row (8 for the last ones)
  auto chunk = [&](auto wide) __attribute__((always_inline)) {
    constexpr bool k16 = decltype(wide)::value;
    const __m256 a0 = _mm256_loadu_ps(a + c), b0 = _mm256_loadu_ps(b + c);
    const __m256 a1 = k16 ? _mm256_loadu_ps(a + c + 8) : a0, b1 = k16 ? _mm256_loadu_ps(b + c + 8) : b0;
    auto rows = [&](auto nan) __attribute__((always_inline)) {
      constexpr bool kNan = decltype(nan)::value;
      for (int64_t r = 0; r < n; ++r) {
        const __m256 v0 = _mm256_set1_ps(w[2 * r]), v1 = _mm256_set1_ps(w[2 * r + 1]);
        const __m256 x = _mm256_fmadd_ps(v1, b0, _mm256_mul_ps(v0, a0));
        out_t* p = o + r * stride + c;
        if constexpr (k16) {
          const __m256 y = _mm256_fmadd_ps(v1, b1, _mm256_mul_ps(v0, a1));
          const __m256i h = kBf16 ? bf16x16<kNan>(x, y) : _mm256_set_m128i(f16x8<kNan>(y), f16x8<kNan>(x));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
        } else {
          _mm_storeu_si128(reinterpret_cast<__m128i*>(p), kBf16 ? bf16x8<kNan>(x) : f16x8<kNan>(x));
        }
      }
    };
    // x - x is 0 for a finite x, NaN for an infinity or a NaN; a0 + a1 is finite only when
    // both are.
    const __m256 s0 = _mm256_add_ps(a0, a1), s1 = _mm256_add_ps(b0, b1);
    const __m256 z = _mm256_add_ps(_mm256_sub_ps(s0, s0), _mm256_sub_ps(s1, s1));
    _mm256_movemask_ps(_mm256_cmp_ps(z, z, _CMP_UNORD_Q)) == 0 ? rows(std::false_type{}) : rows(std::true_type{});
    c += k16 ? 16 : 8;
  };
  while (c + 16 <= len) chunk(std::true_type{});
  if (c + 8 <= len) chunk(std::false_type{});
  for (int64_t r = 0; r < n; ++r) blend_scalar(a, b, w[2 * r], w[2 * r + 1], o + r * stride, c, len);
}
#endif

// o[c] = to_dst(a[c]) for c < n (float16: write_f16's vector steps).
template <typename dst_t, typename acc_t>
MSFAST_INLINE void narrow(const acc_t* __restrict__ a, dst_t* __restrict__ o, int64_t n) {
#if MSFAST_CPU_AVX2
  if constexpr (std::is_same_v<dst_t, at::Half> && std::is_same_v<acc_t, float>)
    return write_f16(a, n, false, 0.f, 0.f, nullptr, nullptr, o);
#endif
  for (int64_t c = 0; c < n; ++c) o[c] = to_dst<dst_t>(a[c]);
}

// memcpy, with 32-byte (or 16-byte) non-temporal stores when `stream` and dst is aligned to
// them. (The staged rows of a float32 preprocess, two threads: 4.2-4.4 -> 3.9-4.1 ms with
// 32-byte stores.)
inline void copy_run(void* dst, const void* src, int64_t bytes, bool stream) {
  int64_t c = 0;
#if MSFAST_CPU_AVX2
  if (stream && reinterpret_cast<uintptr_t>(dst) % 32 == 0) {
    for (; c + 32 <= bytes; c += 32)
      _mm256_stream_si256(reinterpret_cast<__m256i*>(static_cast<char*>(dst) + c),
                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const char*>(src) + c)));
  }
  if (stream && reinterpret_cast<uintptr_t>(dst) % 16 == 0) {
    for (; c + 16 <= bytes; c += 16)
      _mm_stream_si128(reinterpret_cast<__m128i*>(static_cast<char*>(dst) + c),
                       _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const char*>(src) + c)));
  }
#endif
  (void)stream;
  std::memcpy(static_cast<char*>(dst) + c, static_cast<const char*>(src) + c, bytes - c);
}

// d (+)= w0 * s0 + w1 * s1, elementwise over a row (s0, s1: packed rows from the cache).
// d may be the destination row itself in another type (assigning only): the conversion
// then happens in this pass instead of a separate one.
template <bool kAdd, typename acc_t, typename out_t>
MSFAST_INLINE void axpy2(const acc_t* s0, const acc_t* s1, const Row& rs, acc_t w0, acc_t w1, out_t* d, const Row& rd,
                  bool stream = false) {
  static_assert(!kAdd || std::is_same_v<out_t, acc_t>, "adding needs an acc_t row");
  for_runs(rs, rd, [&](int64_t so, int64_t dof, int64_t len) __attribute__((always_inline)) {
    const acc_t* __restrict__ a = s0 + so;
    const acc_t* __restrict__ b = s1 + so;
    out_t* __restrict__ o = d + dof;
#if MSFAST_CPU_AVX2
    if constexpr (!kAdd && std::is_same_v<acc_t, float> &&
                  (std::is_same_v<out_t, float> || std::is_same_v<out_t, at::BFloat16> ||
                   std::is_same_v<out_t, at::Half>))
      return blend2_avx2(a, b, len, w0, w1, o, stream);
#endif
    for (int64_t c = 0; c < len; ++c) {
      const acc_t v = w0 * a[c] + w1 * b[c];
      if constexpr (kAdd) {
        o[c] = o[c] + v;
      } else {
        o[c] = to_dst<out_t>(v);
      }
    }
  });
}


// n output rows that blend the same two rows a and b (packed, rr) with weights w[2 r] and
// w[2 r + 1], row r at o + r * stride (pixels of ro): the n rows of an 8x upscale that lie
// between two source rows. Where the rows are written 16 bfloat16 values at a time
// (blend2_rows16, blend2_rows_bf16_512), each chunk of a and b is loaded once for all n rows;
// otherwise row by row (axpy2), and so a lone row of channels_last pixels (blend2_bf16_256 is
// faster than blend2_rows_bf16_512 there). The same values either way. safe: see
// blend2_rows16.
template <typename acc_t, typename out_t>
MSFAST_INLINE void blend2_group(const acc_t* a, const acc_t* b, const Row& rr, const acc_t* w, int64_t n, out_t* o,
                                const Row& ro, int64_t stride, bool stream, bool safe = false) {
#if MSFAST_CPU_AVX2
  if constexpr ((std::is_same_v<out_t, at::BFloat16> || std::is_same_v<out_t, at::Half>) &&
                std::is_same_v<acc_t, float>) {
    if (!stream && ro.packed()) return blend2_rows16(a, b, ro.W * ro.cp, w, n, o, stride, safe);
  }
  if constexpr (std::is_same_v<out_t, at::BFloat16> && std::is_same_v<acc_t, float>) {
    // channels_last pixels (one run each). Streamed, the runs must start on cache lines and
    // hold whole 32-byte steps: the stores are 64 bytes (32 bytes for a last 16 values).
    const auto line = [](int64_t v) { return v * static_cast<int64_t>(sizeof(out_t)) % 64 == 0; };
    if (n > 1 && !ro.packed() && avx512bf16() && (!stream || (line(stride) && line(ro.px) && ro.cp % 16 == 0 &&
                                                      reinterpret_cast<uintptr_t>(o) % 64 == 0))) {
      for_runs(rr, ro, [&](int64_t so, int64_t dof, int64_t len) __attribute__((always_inline)) {
        stream ? blend2_rows_bf16_512<false, true>(a + so, b + so, len, w, n, o + dof, stride)
               : blend2_rows_bf16_512<false>(a + so, b + so, len, w, n, o + dof, stride);
      });
      return;
    }
  }
#endif
  for (int64_t r = 0; r < n; ++r) axpy2<false>(a, b, rr, w[2 * r], w[2 * r + 1], o + r * stride, ro, stream);
}

#if MSFAST_CPU_AVX2
// GCC 12's 512-bit conversions pass _mm512_undefined_*() as their unused merge operand, which
// -Wmaybe-uninitialized reports at each use below.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// 16 source values widened to float as to_acc widens them (load8 on 512-bit vectors); kFull:
// all 16, else those of mask k (a masked load costs a vector uop besides the load).
template <bool kFull, typename src_t>
MSFAST_AVX512BF16 inline __attribute__((always_inline)) __m512 load16(const src_t* p, __mmask16 k) {
  if constexpr (std::is_same_v<src_t, float>) {
    return kFull ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(k, p);
  } else if constexpr (std::is_same_v<src_t, uint8_t>) {
    const __m128i b = kFull ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)) : _mm_maskz_loadu_epi8(k, p);
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b));
  } else {
    const __m256i h = kFull ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)) : _mm256_maskz_loadu_epi16(k, p);
    if constexpr (std::is_same_v<src_t, at::Half>) {
      return _mm512_cvtph_ps(h);
    } else {
      static_assert(std::is_same_v<src_t, at::BFloat16>, "no 512-bit load for this type");
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
  }
}

// o[i] (+)= v[i] for the 16 lanes (kFull) or those of mask k.
template <bool kAdd, bool kFull>
MSFAST_AVX512BF16 inline __attribute__((always_inline)) void put16(float* o, __m512 v, __mmask16 k) {
  if constexpr (kFull) {
    if (kAdd) v = _mm512_add_ps(_mm512_loadu_ps(o), v);
    _mm512_storeu_ps(o, v);
  } else {
    if (kAdd) v = _mm512_add_ps(_mm512_maskz_loadu_ps(k, o), v);
    _mm512_mask_storeu_ps(o, k, v);
  }
}

// taps_run's float loop on 512-bit vectors, where the processor has AVX-512 (cpu_isa()
// "avx512bf16"): per value the same multiply, then multiply-adds in the same order, so the same
// results as the 256-bit loop with half the instructions; the last step is masked. A bfloat16
// source is widened 32 values a step without a shuffle: each 32-bit lane holds two values, the
// even one becomes a float shifted left 16 bits and the odd one with its low half cleared
// (two instructions per 32 values, against four per 16 through load16's zero extension, one of
// them on the shuffle port); the sums are kept in that order and interleaved once, at the store.
// The vertical pass of an antialiased pyramid reads each source value in K / stride output
// rows (2 per level for the 0.5 and 0.25 levels), so it widens each about 4 times.
template <bool kAdd, typename src_t>
MSFAST_AVX512BF16 void taps_run_512(const src_t* s, int64_t stride, const float* w, int64_t K, float* o, int64_t len) {
  int64_t c = 0;
  if constexpr (std::is_same_v<src_t, at::BFloat16>) {
    const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
    const __m512i lo_idx = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i hi_idx = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    // N steps of 32 values: 2N sums (even and odd) in flight.
    auto group = [&](auto n) __attribute__((always_inline)) {
      constexpr int N = decltype(n)::value;
      __m512 e[N], d[N];
      auto take = [&](int64_t k, int i, __m512& ev, __m512& od) __attribute__((always_inline)) {
        const __m512i u = _mm512_loadu_si512(s + k * stride + c + 32 * i);
        ev = _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
        od = _mm512_castsi512_ps(_mm512_and_si512(u, high));
      };
      const __m512 w0 = _mm512_set1_ps(w[0]);
      for (int i = 0; i < N; ++i) {
        take(0, i, e[i], d[i]);
        e[i] = _mm512_mul_ps(w0, e[i]);
        d[i] = _mm512_mul_ps(w0, d[i]);
      }
      for (int64_t k = 1; k < K; ++k) {
        const __m512 wk = _mm512_set1_ps(w[k]);
        for (int i = 0; i < N; ++i) {
          __m512 ev, od;
          take(k, i, ev, od);
          e[i] = _mm512_fmadd_ps(wk, ev, e[i]);
          d[i] = _mm512_fmadd_ps(wk, od, d[i]);
        }
      }
      for (int i = 0; i < N; ++i) {
        put16<kAdd, true>(o + c + 32 * i, _mm512_permutex2var_ps(e[i], lo_idx, d[i]), 0xFFFF);
        put16<kAdd, true>(o + c + 32 * i + 16, _mm512_permutex2var_ps(e[i], hi_idx, d[i]), 0xFFFF);
      }
      c += 32 * N;
    };
    while (c + 64 <= len) group(std::integral_constant<int, 2>{});
    if (c + 32 <= len) group(std::integral_constant<int, 1>{});
  }
  // 16 values a step, N steps at a time; then the last, masked.
  auto steps = [&](auto n, auto full, __mmask16 m) __attribute__((always_inline)) {
    constexpr int N = decltype(n)::value;
    constexpr bool kFull = decltype(full)::value;
    __m512 a[N];
    const __m512 w0 = _mm512_set1_ps(w[0]);
    for (int i = 0; i < N; ++i) a[i] = _mm512_mul_ps(w0, load16<kFull>(s + c + 16 * i, m));
    for (int64_t k = 1; k < K; ++k) {
      const __m512 wk = _mm512_set1_ps(w[k]);
      for (int i = 0; i < N; ++i) a[i] = _mm512_fmadd_ps(wk, load16<kFull>(s + k * stride + c + 16 * i, m), a[i]);
    }
    for (int i = 0; i < N; ++i) put16<kAdd, kFull>(o + c + 16 * i, a[i], m);
    c += 16 * N;
  };
  using Full = std::true_type;
  while (c + 64 <= len) steps(std::integral_constant<int, 4>{}, Full{}, 0xFFFF);
  switch ((len - c) / 16) {
    case 3: steps(std::integral_constant<int, 3>{}, Full{}, 0xFFFF); break;
    case 2: steps(std::integral_constant<int, 2>{}, Full{}, 0xFFFF); break;
    case 1: steps(std::integral_constant<int, 1>{}, Full{}, 0xFFFF); break;
    default: break;
  }
  if (c < len) steps(std::integral_constant<int, 1>{}, std::false_type{}, static_cast<__mmask16>((1u << (len - c)) - 1));
}
#pragma GCC diagnostic pop
#endif

// o[c] (+)= sum_k w[k] * s[k * stride + c] for c < len: all K taps of a value summed in a
// register, then one store. Tap by tap, each tap was a pass that loaded and stored the whole
// accumulator row (and widened a bfloat16 source again), and GCC's loop spent most of a
// 56-value row in its prologue and tails: fpn_concat's NCHW bfloat16 backward, whose 8x
// adjoint sums 16 rows per output row, was slower than float32's. The scalar tail does the
// vector body's operations, so a value does not depend on where a run starts.
template <bool kAdd, typename src_t, typename acc_t>
MSFAST_INLINE void taps_run(const src_t* s, int64_t stride, const acc_t* w, int64_t K, acc_t* o, int64_t len) {
  int64_t c = 0;
#if MSFAST_CPU_AVX2
  constexpr bool kVec = std::is_same_v<acc_t, float>;
  if constexpr (kVec) {
    constexpr bool k512 = std::is_same_v<src_t, float> || std::is_same_v<src_t, at::BFloat16> ||
                          std::is_same_v<src_t, at::Half> || std::is_same_v<src_t, uint8_t>;
    if constexpr (k512)
      if (len >= 16 && avx512bf16()) return taps_run_512<kAdd>(s, stride, w, K, o, len);
    // N runs of 8 values at a time: each sum is a chain of K dependent multiply-adds, and one
    // chain alone waits on the latency of each (16 taps: 64 cycles per 8 values).
    auto group = [&](auto n) __attribute__((always_inline)) {
      constexpr int N = decltype(n)::value;
      __m256 a[N];
      for (int i = 0; i < N; ++i) a[i] = _mm256_mul_ps(_mm256_set1_ps(w[0]), load8(s + c + 8 * i));
      for (int64_t k = 1; k < K; ++k) {
        const __m256 wk = _mm256_set1_ps(w[k]);
        for (int i = 0; i < N; ++i) a[i] = _mm256_fmadd_ps(wk, load8(s + k * stride + c + 8 * i), a[i]);
      }
      for (int i = 0; i < N; ++i) {
        if (kAdd) a[i] = _mm256_add_ps(_mm256_loadu_ps(o + c + 8 * i), a[i]);
        _mm256_storeu_ps(o + c + 8 * i, a[i]);
      }
      c += 8 * N;
    };
    while (c + 32 <= len) group(std::integral_constant<int, 4>{});
    switch ((len - c) / 8) {
      case 3: group(std::integral_constant<int, 3>{}); break;
      case 2: group(std::integral_constant<int, 2>{}); break;
      case 1: group(std::integral_constant<int, 1>{}); break;
      default: break;
    }
  }
#else
  constexpr bool kVec = false;
#endif
  for (; c < len; ++c) {
    acc_t a = w[0] * to_acc<acc_t>(s[c]);
    for (int64_t k = 1; k < K; ++k) {
      const acc_t x = to_acc<acc_t>(s[k * stride + c]);
      a = kVec ? std::fma(w[k], x, a) : a + w[k] * x;
    }
    o[c] = kAdd ? o[c] + a : a;
  }
}

// out (+)= sum_k wh[k] * src_row(y0 + k): the vertical pass of output row oy.
template <typename src_t, typename acc_t>
void vertical(const src_t* plane, const View& v, const Table<acc_t>& th, int64_t oy, bool add, acc_t* out,
              const Row& ro) {
  const Row rs = row_of(v);
  const int64_t K = th.K;
  const src_t* s = plane + th.start[oy] * v.row;
  const acc_t* w = th.w.data() + oy * K;
  constexpr int64_t kAhead = 4, kLine = 64 / sizeof(src_t);
  // A channel slice of a wider channels_last tensor: prefetch each tap's run kAhead pixels
  // on (see axpy).
  const int64_t ahead_end = (rs.W - kAhead) * rs.px;
  for_runs(rs, ro, [&](int64_t so, int64_t dof, int64_t len) __attribute__((always_inline)) {
    if (!rs.packed() && so < ahead_end)
      for (int64_t k = 0; k < K; ++k)
        for (int64_t c = 0; c < len; c += kLine) __builtin_prefetch(s + k * v.row + so + kAhead * rs.px + c);
    add ? taps_run<true>(s + so, v.row, w, K, out + dof, len) : taps_run<false>(s + so, v.row, w, K, out + dof, len);
  });
}

// out[ox] (+)= sum_k ww[k] * tmp[x0 + k] per channel: the horizontal gather. tmp is a packed
// row of cp values per pixel; out pixels are opx apart.
// KW > 0: the table has exactly KW taps (the common 1, 2, 3, 4), so the tap loop unrolls;
// CP > 0: CP values per pixel (1: NCHW, 3: RGB channels_last), so the channel loop unrolls.
template <int KW, int CP, bool kAdd, typename acc_t>
void horizontal_impl(const acc_t* __restrict__ tmp, const Table<acc_t>& tw, int64_t cp, acc_t* __restrict__ out,
                     int64_t opx) {
  const int64_t K = KW > 0 ? KW : tw.K;
  const int64_t n = CP > 0 ? CP : cp;
  const int64_t op = CP == 1 ? 1 : opx;
  const int64_t* __restrict__ start = tw.start.data();
  const acc_t* __restrict__ wt = tw.w.data();
  if constexpr (KW == 0 && CP == 0 && !kAdd) {
    // Many taps, many channels: one pass over the pixel's channels per tap, which vectorizes
    // (the loop below would run the taps innermost, one channel at a time).
    for (int64_t ox = 0; ox < tw.out; ++ox) {
      const acc_t* __restrict__ t = tmp + start[ox] * n;
      const acc_t* __restrict__ w = wt + ox * K;
      acc_t* __restrict__ a = out + ox * op;
      for (int64_t c = 0; c < n; ++c) a[c] = w[0] * t[c];
      for (int64_t k = 1; k < K; ++k)
        for (int64_t c = 0; c < n; ++c) a[c] += w[k] * t[k * n + c];
    }
    return;
  }
  for (int64_t ox = 0; ox < tw.out; ++ox) {
    const acc_t* __restrict__ t = tmp + start[ox] * n;
    const acc_t* __restrict__ w = wt + ox * K;
    acc_t* __restrict__ a = out + ox * op;
    for (int64_t c = 0; c < n; ++c) {
      acc_t s = w[0] * t[c];
      for (int64_t k = 1; k < K; ++k) s += w[k] * t[k * n + c];
      a[c] = kAdd ? a[c] + s : s;
    }
  }
}

// The NCHW gather (one value per pixel, packed output) of outputs lo .. hi - 1, vectorized
// over ox.
template <int KW, bool kAdd, typename acc_t>
void horizontal_gather(const acc_t* __restrict__ tmp, const TermPlan<acc_t>& tp, acc_t* __restrict__ out,
                       int64_t lo, int64_t hi) {
  const int64_t n = tp.tw.out, K = KW > 0 ? KW : tp.tw.K;
  const int32_t* __restrict__ st = tp.start32.data();
  const acc_t* __restrict__ wk = tp.wk.data();
  for (int64_t ox = lo; ox < hi; ++ox) {
    acc_t s = wk[ox] * tmp[st[ox]];
    for (int64_t k = 1; k < K; ++k) s += wk[k * n + ox] * tmp[st[ox] + k];
    out[ox] = kAdd ? out[ox] + s : s;
  }
}

#if MSFAST_CPU_AVX2
// Outputs 0 .. 8 * groups - 1 of `rows` NCHW rows (tmp and out: rows tstride and ostride
// apart) whose groups of 8 outputs read within 8 consecutive inputs (plan_window): one load
// of those inputs per group, and per tap a lane permute instead of a gather (AVX2 gathers are
// slow on AMD; the stencil of an 8x upscale had to assemble each vector from scalars). Same
// weights, same order as the gather. Groups outer, rows inner: a group's lane indices and
// weights are loaded once for all rows (a block of source rows, see run_rows2_nchw).
template <bool kAdd, int KW>
void window_rows(const float* __restrict__ tmp, int64_t tstride, const TermPlan<float>& tp, float* __restrict__ out,
                 int64_t ostride, int64_t rows) {
  const int64_t n = tp.tw.out, K = KW > 0 ? KW : tp.tw.K, groups = static_cast<int64_t>(tp.win_base.size());
  const float* __restrict__ wk = tp.wk.data();
  const __m256i one = _mm256_set1_epi32(1);
  // A row of fewer than 8 inputs (every window at 0): load only those lanes (a masked load
  // does not touch the others).
  const bool short_row = tp.tw.in < 8;
  const __m256i lanes = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(tp.tw.in)),
                                           _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  for (int64_t g = 0; g < groups; ++g) {
    const __m256i idx0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tp.win_idx.data() + 8 * g));
    const __m256 w0 = _mm256_loadu_ps(wk + 8 * g);
    const float* t = short_row ? tmp : tmp + tp.win_base[g];
    for (int64_t r = 0; r < rows; ++r, t += tstride) {
      const __m256 v = short_row ? _mm256_maskload_ps(t, lanes) : _mm256_loadu_ps(t);
      __m256i idx = idx0;
      __m256 s = _mm256_mul_ps(w0, _mm256_permutevar8x32_ps(v, idx));
      for (int64_t k = 1; k < K; ++k) {
        idx = _mm256_add_epi32(idx, one);
        s = _mm256_fmadd_ps(_mm256_loadu_ps(wk + k * n + 8 * g), _mm256_permutevar8x32_ps(v, idx), s);
      }
      float* o = out + r * ostride + 8 * g;
      if (kAdd) s = _mm256_add_ps(_mm256_loadu_ps(o), s);
      _mm256_storeu_ps(o, s);
    }
  }
}

// An NCHW row of 8 or more taps (plan_dot) as dot products: per output, its window of dot_k
// inputs times its weights, 8 at a time, and per 8 outputs the 8 vector sums reduced into one
// vector by pairwise additions. The gather (one scalar multiply-add per tap; 16 taps for the
// 8x adjoint) took as long as the vertical pass of fpn_concat's NCHW backward. Slower than a
// stencil (the 4x adjoint's 8 taps: 4.4 against 5.6 ms), so only where there is none. Sums
// in another order than the gather's: they agree to rounding.
template <bool kAdd>
void dot_row(const float* __restrict__ tmp, const TermPlan<float>& tp, float* __restrict__ out) {
  const int64_t n = tp.tw.out, Kp = tp.dot_k;
  for (int64_t o = 0; o < n; o += 8) {
    const int64_t m = std::min<int64_t>(8, n - o);
    __m256 a[8];
    for (int64_t i = 0; i < 8; ++i) {
      a[i] = _mm256_setzero_ps();
      if (i >= m) continue;
      const float* x = tmp + tp.dot_base[o + i];
      const float* w = tp.dot_w.data() + (o + i) * Kp;
      for (int64_t k = 0; k < Kp; k += 8) a[i] = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a[i]);
    }
    // hadd pairs lanes within each 128-bit half: two rounds leave output i's halves in lane
    // i % 4 of the low and high halves of u[i / 4].
    const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    __m256 r = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
    if (m == 8) {
      if (kAdd) r = _mm256_add_ps(_mm256_loadu_ps(out + o), r);
      _mm256_storeu_ps(out + o, r);
    } else {
      alignas(32) float v[8];
      _mm256_store_ps(v, r);
      for (int64_t i = 0; i < m; ++i) out[o + i] = kAdd ? out[o + i] + v[i] : v[i];
    }
  }
}
#endif

// Steps q0 .. q1 - 1 of the repeating interior of an NCHW row (see Stencil), P outputs per
// step of S inputs.
template <int P, int S, int K, bool kAdd, typename acc_t>
void stencil_steps(const acc_t* __restrict__ tmp, const Stencil<acc_t>& st, acc_t* __restrict__ out, int64_t q0,
                   int64_t q1) {
  const int64_t nq = st.nq;
  int64_t off[P];
  for (int r = 0; r < P; ++r) off[r] = st.off[r];
  const acc_t* __restrict__ w = st.w.data();
  acc_t* __restrict__ o = out + st.a;
  for (int64_t q = q0; q < q1; ++q) {
    for (int r = 0; r < P; ++r) {
      const acc_t* __restrict__ b = tmp + off[r] + S * q;
      const acc_t* __restrict__ wr = w + r * K * nq + q;
      acc_t v = wr[0] * b[0];
      for (int k = 1; k < K; ++k) {
#if MSFAST_CPU_AVX2
        // Fused in this order, as stencil_row_512 does: left to GCC, `v += w * b` was fused
        // as fma(w0, b0, w1 * b1) in the vector loop, so no other loop could match it.
        if constexpr (std::is_same_v<acc_t, float>) {
          v = std::fma(wr[k * nq], b[k], v);
          continue;
        }
#endif
        v += wr[k * nq] * b[k];
      }
      o[P * q + r] = kAdd ? o[P * q + r] + v : v;
    }
  }
}

#if MSFAST_CPU_AVX2
// The stencil of a 1 / S downscale (P = 1) with K = S * M taps, in float on 512-bit vectors
// where the processor has AVX-512 (cpu_isa() "avx512bf16"), 16 outputs a step, the last
// masked. Output q reads tmp[off + S * q + k]: each window of S * 16 values (M of them, S
// apart) holds taps S * m .. S * m + S - 1 of 16 outputs, one phase each, taken out with
// one permute (S = 2) or two levels of two (S = 4). stencil_steps' operations in its order,
// so its results bit for bit. GCC's AVX2 loop for S = 2, K = 4 spent 8 permutes and 4 blends
// per 8 outputs; this one 4 permutes per 16. (The antialiased 0.5 and 0.25 levels of a
// pyramid: a quarter of its time.)
template <int S, int K, bool kAdd>
MSFAST_AVX512BF16 void stencil_row_512(const float* __restrict__ tmp, const Stencil<float>& st,
                                       float* __restrict__ out) {
  static_assert((S == 2 || S == 4) && K % S == 0, "no 512-bit stencil for this (S, K)");
  const int64_t nq = st.nq;
  const float* t = tmp + st.off[0];
  const float* w = st.w.data();
  float* o = out + st.a;
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  for (int64_t q = 0; q < nq; q += 16) {
    const int64_t m = std::min<int64_t>(16, nq - q);
    const __mmask16 km = static_cast<__mmask16>((1u << m) - 1);
    auto load = [&](const float* p, int64_t lanes) __attribute__((always_inline)) {
      if (lanes >= 16) return _mm512_loadu_ps(p);
      return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << std::max<int64_t>(lanes, 0)) - 1), p);
    };
    __m512 v = _mm512_setzero_ps();
    for (int mw = 0; mw < K / S; ++mw) {
      const float* base = t + S * (q + mw);
      __m512 r[S], ph[S];  // the window, S registers; phase j: base[S * i + j]
      for (int i = 0; i < S; ++i) r[i] = load(base + 16 * i, S * m - 16 * i);
      if constexpr (S == 2) {
        ph[0] = _mm512_permutex2var_ps(r[0], even, r[1]);
        ph[1] = _mm512_permutex2var_ps(r[0], odd, r[1]);
      } else {
        const __m512 x0 = _mm512_permutex2var_ps(r[0], even, r[1]), x1 = _mm512_permutex2var_ps(r[0], odd, r[1]);
        const __m512 y0 = _mm512_permutex2var_ps(r[2], even, r[3]), y1 = _mm512_permutex2var_ps(r[2], odd, r[3]);
        ph[0] = _mm512_permutex2var_ps(x0, even, y0);
        ph[1] = _mm512_permutex2var_ps(x1, even, y1);
        ph[2] = _mm512_permutex2var_ps(x0, odd, y0);
        ph[3] = _mm512_permutex2var_ps(x1, odd, y1);
      }
      for (int j = 0; j < S; ++j) {
        const int k = S * mw + j;
        const __m512 wk = load(w + k * nq + q, m);
        v = k == 0 ? _mm512_mul_ps(wk, ph[j]) : _mm512_fmadd_ps(wk, ph[j], v);
      }
    }
    m == 16 ? put16<kAdd, true>(o + q, v, km) : put16<kAdd, false>(o + q, v, km);
  }
}
#endif

#if MSFAST_CPU_AVX2
// P = 3, S = 4 (3/4 downscales) in float, 8 steps of q at a time (below, next to merge_rgb8).
template <int K, bool kAdd>
void stencil_row_34(const float* __restrict__ tmp, const Stencil<float>& st, float* __restrict__ out);
#endif

// The repeating interior of an NCHW row.
template <int P, int S, int K, bool kAdd, typename acc_t>
void stencil_row(const acc_t* __restrict__ tmp, const Stencil<acc_t>& st, acc_t* __restrict__ out) {
#if MSFAST_CPU_AVX2
  if constexpr (P == 3 && S == 4 && std::is_same_v<acc_t, float>) return stencil_row_34<K, kAdd>(tmp, st, out);
#endif
  stencil_steps<P, S, K, kAdd>(tmp, st, out, 0, st.nq);
}

// The (P, S, K) compiled: 2x and 4x downscales with 2, 4 or 8 taps (bilinear, area,
// antialiased bilinear and bicubic), 2x, 4x and 8x upscales with 2 or 4 taps, the adjoints
// of those downscales (the backward), and the common fractional factors 3/4, 2/3, 3/2, 4/3.
// Others keep the gather. (Under AVX2, float upscale rows take window_rows instead.)
template <typename acc_t>
void pick_stencil_kernel(Stencil<acc_t>& s, int64_t K) {
#if MSFAST_CPU_AVX2
#define MSFAST_S512(S_, K_)                                     \
  if (s.P == 1 && s.S == S_ && K == K_) {                       \
    s.assign = &stencil_row_512<S_, K_, false>;                 \
    s.add = &stencil_row_512<S_, K_, true>;                     \
    return;                                                     \
  }
  if constexpr (std::is_same_v<acc_t, float>) {
    if (avx512bf16()) {
      MSFAST_S512(2, 2) MSFAST_S512(2, 4) MSFAST_S512(2, 8) MSFAST_S512(4, 4) MSFAST_S512(4, 8)
    }
  }
#undef MSFAST_S512
#endif
#define MSFAST_S(P_, S_, K_)                                    \
  if (s.P == P_ && s.S == S_ && K == K_) {                      \
    s.assign = &stencil_row<P_, S_, K_, false, acc_t>;          \
    s.add = &stencil_row<P_, S_, K_, true, acc_t>;              \
    return;                                                     \
  }
  MSFAST_S(1, 2, 2) MSFAST_S(1, 2, 4) MSFAST_S(1, 2, 8) MSFAST_S(1, 4, 2) MSFAST_S(1, 4, 4) MSFAST_S(1, 4, 8)
  MSFAST_S(2, 1, 2) MSFAST_S(2, 1, 3) MSFAST_S(2, 1, 4) MSFAST_S(4, 1, 2) MSFAST_S(4, 1, 4) MSFAST_S(8, 1, 2)
  MSFAST_S(8, 1, 4)
  // 3/4 and 2/3 downscales (bilinear, antialiased or not), 3/2 and 4/3 upscales (bilinear, and the
  // adjoint of the 3/4 downscale)
  MSFAST_S(3, 4, 2) MSFAST_S(3, 4, 3) MSFAST_S(3, 4, 4) MSFAST_S(2, 3, 3) MSFAST_S(2, 3, 4) MSFAST_S(3, 2, 2)
  MSFAST_S(4, 3, 2) MSFAST_S(4, 3, 3)
#undef MSFAST_S
}

template <bool kAdd, typename acc_t>
void horizontal_k(const acc_t* tmp, const Table<acc_t>& tw, int64_t cp, acc_t* out, int64_t opx) {
#define MSFAST_H(KW)                                                              \
  if (cp == 1 && opx == 1) return horizontal_impl<KW, 1, kAdd>(tmp, tw, cp, out, opx); \
  if (cp == 3) return horizontal_impl<KW, 3, kAdd>(tmp, tw, cp, out, opx);             \
  return horizontal_impl<KW, 0, kAdd>(tmp, tw, cp, out, opx);
  switch (tw.K) {
    case 1: MSFAST_H(1)
    case 2: MSFAST_H(2)
    case 3: MSFAST_H(3)
    case 4: MSFAST_H(4)
    default: MSFAST_H(0)
  }
#undef MSFAST_H
}

// Pixels of this many values (RGB) take the NCHW row kernels one channel at a time
// (horizontal_planar); others run horizontal_impl.
constexpr int64_t kPlanarPixel = 3;

template <typename acc_t>
void horizontal_planar(const TermPlan<acc_t>& tp, const acc_t* tmp, bool add, acc_t* out, const Row& ro);

template <typename acc_t>
void horizontal(const TermPlan<acc_t>& tp, const acc_t* tmp, bool add, acc_t* out, const Row& ro) {
  if (tp.h_unit) {
    const Row rt = packed_row(ro.W, ro.cp);
    if (add) return axpy<true>(tmp, rt, acc_t(1), out, ro);
    return axpy<false>(tmp, rt, acc_t(1), out, ro);
  }
  if (!tp.start32.empty() && ro.px == 1) {
    const int64_t n = tp.tw.out;
    int64_t lo = n, hi = n;  // outputs the window or the stencil computed
#if MSFAST_CPU_AVX2
    if constexpr (std::is_same_v<acc_t, float>) {
      if (tp.dot_k > 0) return add ? dot_row<true>(tmp, tp, out) : dot_row<false>(tmp, tp, out);
      if (!tp.win_base.empty()) {
        if (tp.tw.K == 2) {  // bilinear: the taps unrolled
          add ? window_rows<true, 2>(tmp, 0, tp, out, 0, 1) : window_rows<false, 2>(tmp, 0, tp, out, 0, 1);
        } else {
          add ? window_rows<true, 0>(tmp, 0, tp, out, 0, 1) : window_rows<false, 0>(tmp, 0, tp, out, 0, 1);
        }
        lo = 0;
        hi = 8 * static_cast<int64_t>(tp.win_base.size());
      }
    }
#endif
    if (tp.sten.P > 0) {
      (add ? tp.sten.add : tp.sten.assign)(tmp, tp.sten, out);
      lo = tp.sten.a;
      hi = lo + tp.sten.P * tp.sten.nq;
    }
    if (lo == 0 && hi == n) return;
#define MSFAST_G(KW)                                                                       \
  if (add) {                                                                               \
    horizontal_gather<KW, true>(tmp, tp, out, 0, lo), horizontal_gather<KW, true>(tmp, tp, out, hi, n);     \
  } else {                                                                                 \
    horizontal_gather<KW, false>(tmp, tp, out, 0, lo), horizontal_gather<KW, false>(tmp, tp, out, hi, n);   \
  }                                                                                        \
  return;
    switch (tp.tw.K) {
      case 2: MSFAST_G(2)
      case 3: MSFAST_G(3)
      case 4: MSFAST_G(4)
      default: MSFAST_G(0)
    }
#undef MSFAST_G
  }
  if (!tp.start32.empty() && ro.cp == kPlanarPixel) return horizontal_planar(tp, tmp, add, out, ro);
  if (add) return horizontal_k<true>(tmp, tp.tw, tp.v.cp, out, ro.px);
  horizontal_k<false>(tmp, tp.tw, tp.v.cp, out, ro.px);
}

// A row of a few values per pixel (RGB channels_last): split into one row per channel, each
// resampled as an NCHW row (window, stencil, dot products: vector loops), and interleaved back.
// horizontal_impl runs such a row's taps one value at a time, and it was half of the
// preprocess case's kernel time (antialiased downscales of 3 to 9 taps); with this, the
// preprocess of 4 images went from 12.1M to 10.6M instructions (callgrind, AVX2 build), and
// to 10.1M with the split and interleave in vectors (split_rgb8, merge_rgb8). Each output
// value sums the same products as there, in the NCHW row's order: they agree to rounding.
#if MSFAST_CPU_AVX2
// 8 RGB pixels as three vectors of whole pixels (x, y, z: r0 g0 b0 r1 g1 b1 r2 g2 | b2 r3 ...)
// and as three vectors of one channel each, in the lane order both directions share: a
// channel's vector blended from x, y and z holds its 8 values permuted, and one lane permute
// puts them in order (the two permutations of r and b are their own inverses, g's are not).
// kBlend1: lanes 1, 4, 7; kBlend2: lanes 2, 5; kBlend0: lanes 0, 3, 6.
constexpr int kBlend0 = 0x49, kBlend1 = 0x92, kBlend2 = 0x24;
MSFAST_INLINE void split_rgb8(const float* p, float* r, float* g, float* b) {
  const __m256 x = _mm256_loadu_ps(p), y = _mm256_loadu_ps(p + 8), z = _mm256_loadu_ps(p + 16);
  const __m256 tr = _mm256_blend_ps(_mm256_blend_ps(x, y, kBlend1), z, kBlend2);
  const __m256 tg = _mm256_blend_ps(_mm256_blend_ps(x, y, kBlend2), z, kBlend0);
  const __m256 tb = _mm256_blend_ps(_mm256_blend_ps(x, y, kBlend0), z, kBlend1);
  _mm256_storeu_ps(r, _mm256_permutevar8x32_ps(tr, _mm256_setr_epi32(0, 3, 6, 1, 4, 7, 2, 5)));
  _mm256_storeu_ps(g, _mm256_permutevar8x32_ps(tg, _mm256_setr_epi32(1, 4, 7, 2, 5, 0, 3, 6)));
  _mm256_storeu_ps(b, _mm256_permutevar8x32_ps(tb, _mm256_setr_epi32(2, 5, 0, 3, 6, 1, 4, 7)));
}

// The inverse: 8 values of each channel to 8 RGB pixels at p, stored or added.
template <bool kAdd>
MSFAST_INLINE void merge_rgb8(const float* r, const float* g, const float* b, float* p) {
  const __m256 tr = _mm256_permutevar8x32_ps(_mm256_loadu_ps(r), _mm256_setr_epi32(0, 3, 6, 1, 4, 7, 2, 5));
  const __m256 tg = _mm256_permutevar8x32_ps(_mm256_loadu_ps(g), _mm256_setr_epi32(5, 0, 3, 6, 1, 4, 7, 2));
  const __m256 tb = _mm256_permutevar8x32_ps(_mm256_loadu_ps(b), _mm256_setr_epi32(2, 5, 0, 3, 6, 1, 4, 7));
  __m256 v[3] = {_mm256_blend_ps(_mm256_blend_ps(tr, tg, kBlend1), tb, kBlend2),
                 _mm256_blend_ps(_mm256_blend_ps(tb, tr, kBlend1), tg, kBlend2),
                 _mm256_blend_ps(_mm256_blend_ps(tg, tb, kBlend1), tr, kBlend2)};
  for (int i = 0; i < 3; ++i) {
    if (kAdd) v[i] = _mm256_add_ps(_mm256_loadu_ps(p + 8 * i), v[i]);
    _mm256_storeu_ps(p + 8 * i, v[i]);
  }
}
#endif

#if MSFAST_CPU_AVX2
// stencil_row for P = 3, S = 4 (the 3/4 level of a pyramid, preprocess's largest scalar part:
// 18% of its instructions at 31f0221). Outputs 3q + r read inputs off[r] + 4q + k: for 8 steps
// of q, the 32 inputs from off[r] + 4q are 8 groups of 4 phases, transposed in 128-bit lanes
// into one vector per phase k (its q in the order 0 2 4 6 1 3 5 7, put back by one permute),
// multiplied by the weights w[(r * K + k) * nq + q] (contiguous in q) in the scalar loop's
// order, and the three phases r interleaved into 24 outputs (merge_rgb8). With K < 4 the
// last input of a step is phase 3, never used: it is not loaded (a masked load), as it can
// lie past the row's end.
template <int K, bool kAdd>
void stencil_row_34(const float* __restrict__ tmp, const Stencil<float>& st, float* __restrict__ out) {
  static_assert(K >= 1 && K <= 4, "a step of q holds 4 phases");
  const int64_t nq = st.nq;
  const float* __restrict__ w = st.w.data();
  float* __restrict__ o = out + st.a;
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const __m256i first7 = _mm256_setr_epi32(-1, -1, -1, -1, -1, -1, -1, 0);
  // Steps q .. q + 7.
  auto block = [&](int64_t q) __attribute__((always_inline)) {
    alignas(32) float v[3][8];
    for (int r = 0; r < 3; ++r) {
      const float* b = tmp + st.off[r] + 4 * q;
      const __m256 a0 = _mm256_loadu_ps(b), a1 = _mm256_loadu_ps(b + 8);
      const __m256 a2 = _mm256_loadu_ps(b + 16);
      const __m256 a3 = K == 4 ? _mm256_loadu_ps(b + 24) : _mm256_maskload_ps(b + 24, first7);
      const __m256 t0 = _mm256_unpacklo_ps(a0, a1), t1 = _mm256_unpackhi_ps(a0, a1);
      const __m256 t2 = _mm256_unpacklo_ps(a2, a3), t3 = _mm256_unpackhi_ps(a2, a3);
      const __m256 d[4] = {_mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0)),
                           _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2)),
                           _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0)),
                           _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2))};
      const float* wr = w + r * K * nq + q;
      __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(wr), _mm256_permutevar8x32_ps(d[0], order));
      for (int k = 1; k < K; ++k)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(wr + k * nq), _mm256_permutevar8x32_ps(d[k], order), acc);
      _mm256_store_ps(v[r], acc);
    }
    merge_rgb8<kAdd>(v[0], v[1], v[2], o + 3 * q);
  };
  int64_t q = 0;
  for (; q + 8 <= nq; q += 8) block(q);
  // A remainder of steps: when storing (not adding), the last 8 steps again, overlapping
  // steps already stored with the same values; when adding, the scalar loop.
  if (!kAdd && q < nq && nq >= 8) {
    block(nq - 8);
    return;
  }
  stencil_steps<3, 4, K, kAdd>(tmp, st, out, q, nq);
}
#endif

template <typename acc_t>
void horizontal_planar(const TermPlan<acc_t>& tp, const acc_t* tmp, bool add, acc_t* out, const Row& ro) {
  constexpr int64_t cp = 3;
  const int64_t in = tp.tw.in, n = tp.tw.out, px = ro.px;
  thread_local std::vector<acc_t> buf;  // the channels' input rows, then their output rows
  if (static_cast<int64_t>(buf.size()) < cp * (in + n)) buf.resize(cp * (in + n));
  acc_t* __restrict__ pin = buf.data();
  acc_t* __restrict__ pout = pin + cp * in;
  int64_t x = 0;
#if MSFAST_CPU_AVX2
  if constexpr (std::is_same_v<acc_t, float>)
    for (; x + 8 <= in; x += 8) split_rgb8(tmp + x * cp, pin + x, pin + in + x, pin + 2 * in + x);
#endif
  for (; x < in; ++x)
    for (int64_t c = 0; c < cp; ++c) pin[c * in + x] = tmp[x * cp + c];
  for (int64_t c = 0; c < cp; ++c) horizontal(tp, pin + c * in, false, pout + c * n, packed_row(n, 1));
  x = 0;
#if MSFAST_CPU_AVX2
  if constexpr (std::is_same_v<acc_t, float>) {
    if (px == cp) {
      for (; x + 8 <= n; x += 8) {
        add ? merge_rgb8<true>(pout + x, pout + n + x, pout + 2 * n + x, out + x * cp)
            : merge_rgb8<false>(pout + x, pout + n + x, pout + 2 * n + x, out + x * cp);
      }
    }
  }
#endif
  for (; x < n; ++x)
    for (int64_t c = 0; c < cp; ++c) {
      acc_t* o = out + x * px + c;
      *o = add ? *o + pout[c * n + x] : pout[c * n + x];
    }
}

// Computes one output row of a term into `out` (pixels ro.px apart), assigning or adding.
template <typename src_t, typename acc_t>
struct RowMaker {
  std::vector<acc_t> tmp;    // one source row in acc_t, packed
  std::vector<acc_t> ring;   // h_first: tp.ring horizontally resampled source rows
  std::vector<int64_t> tag;  // which source row each ring slot holds (-1: none)
  std::vector<acc_t> block;  // run_rows2_nchw: a block of source rows resampled horizontally

  // n source rows from `row` on as packed acc_t rows: the rows themselves when they are
  // already (a float NCHW row: copying it cost 8% of fpn_concat's forward), else converted
  // into tmp in one pass. n > 1 only where the rows follow each other (rows_packed(v)).
  const acc_t* source_rows(const View& v, const src_t* row, int64_t n = 1) {
    if constexpr (std::is_same_v<src_t, acc_t>) {
      if (v.px == v.cp) return row;
    }
    if (static_cast<int64_t>(tmp.size()) < n * v.W * v.cp) tmp.resize(n * v.W * v.cp);
    axpy<false>(row, Row{n * v.W, v.cp, v.px}, acc_t(1), tmp.data(), packed_row(n * v.W, v.cp));
    return tmp.data();
  }

  // ro.W pixels of output row oy from pixel x0 (`out` points at pixel x0), assigning or
  // adding. An h_first term's ring must hold the row's source rows (fill_ring); a term
  // resampled vertically then horizontally is computed a whole row at a time only.
  void pixels(const TermPlan<acc_t>& tp, const src_t* plane, int64_t oy, int64_t x0, bool add, acc_t* out,
              const Row& ro) {
    const View& v = tp.v;
    if (!tp.h_first) {
      if (tp.h_unit) {  // already the output row
        View part = v;
        part.W = ro.W;
        return vertical(plane + x0 * v.px, part, tp.th, oy, add, out, ro);
      }
      TORCH_INTERNAL_ASSERT(x0 == 0 && ro.W == tp.tw.out, "msfast: a vertical-first term is computed by rows");
      if (static_cast<int64_t>(tmp.size()) < v.W * v.cp) tmp.resize(v.W * v.cp);
      vertical(plane, v, tp.th, oy, false, tmp.data(), packed_row(v.W, v.cp));
      return horizontal(tp, tmp.data(), add, out, ro);
    }
    const int64_t K = tp.th.K, y0 = tp.th.start[oy];
    const Row rr = packed_row(ro.W, v.cp);
    const acc_t* w = tp.th.w.data() + oy * K;
    int64_t k = 0;
    if (K >= 2) {  // the first two taps in one pass: one store per output value (upscaling)
      if (add) {
        axpy2<true>(ring_row(tp, y0, x0), ring_row(tp, y0 + 1, x0), rr, w[0], w[1], out, ro);
      } else {
        axpy2<false>(ring_row(tp, y0, x0), ring_row(tp, y0 + 1, x0), rr, w[0], w[1], out, ro);
      }
      k = 2;
    }
    for (; k < K; ++k) {
      if (k == 0 && !add) {
        axpy<false>(ring_row(tp, y0 + k, x0), rr, w[k], out, ro);
      } else {
        axpy<true>(ring_row(tp, y0 + k, x0), rr, w[k], out, ro);
      }
    }
  }

  // Source row y resampled horizontally, from pixel x0 (h_first).
  const acc_t* ring_row(const TermPlan<acc_t>& tp, int64_t y, int64_t x0) const {
    return ring.data() + ((y & (tp.ring - 1)) * tp.tw.out + x0) * tp.v.cp;
  }

  // h_first: makes the ring hold the horizontally resampled source rows output row oy reads.
  void fill_ring(const TermPlan<acc_t>& tp, const src_t* plane, int64_t oy) {
    const View& v = tp.v;
    const int64_t K = tp.th.K, y0 = tp.th.start[oy];
    // (A table of an empty source starts at row -1: the fresh ring's tags of -1 make those
    // rows its zeros.)
    make_ring(tp);
    for (int64_t k = 0; k < K; ++k) {
      const int64_t y = y0 + k;
      if (tag[y & (tp.ring - 1)] == y) continue;
      // A channel slice (the gradient of a channels_last concat): fetch the next row's slice
      // into L2 while this one is read, which the per-pixel prefetch of axpy cannot start early.
      if (v.px != v.cp && y + 1 < v.H) {
        constexpr int64_t kLine = 64 / sizeof(src_t);
        const src_t* next = plane + (y + 1) * v.row;
        for (int64_t x = 0; x < v.W; ++x)
          for (int64_t c = 0; c < v.cp; c += kLine) __builtin_prefetch(next + x * v.px + c, 0, 2);
      }
      put_row(tp, y, source_rows(v, plane + y * v.row));
    }
  }

  // The ring of this term: tp.ring rows of zeros, tagged -1, unless it has one already.
  void make_ring(const TermPlan<acc_t>& tp) {
    const int64_t n = tp.tw.out * tp.v.cp;
    if (static_cast<int64_t>(tag.size()) != tp.ring || static_cast<int64_t>(ring.size()) != tp.ring * n) {
      ring.assign(tp.ring * n, acc_t(0));
      tag.assign(tp.ring, -1);
    }
  }

  // Resamples source row y (`row`: packed acc_t) horizontally into its ring slot.
  void put_row(const TermPlan<acc_t>& tp, int64_t y, const acc_t* row) {
    make_ring(tp);
    const int64_t n = tp.tw.out * tp.v.cp, slot = y & (tp.ring - 1);
    horizontal(tp, row, false, ring.data() + slot * n, packed_row(tp.tw.out, tp.v.cp));
    tag[slot] = y;
  }

  // Output rows oy .. oy_end - 1 of a lone two-tap h_first term, no affine (see blend2_rows).
  // Rows that read the same two source rows (8 in a row for an 8x upscale) share one ring
  // update: a ring update per row cost as much as the row itself for fpn_concat's 56-value
  // NCHW rows.
  template <typename dst_t>
  void run_rows2(const TermPlan<acc_t>& tp, const src_t* plane, int64_t oy, int64_t oy_end, dst_t* out,
                 const View& d, bool stream, std::vector<char>& stage) {
    const View& v = tp.v;
    if (rows2_nchw_source(v)) return run_rows2_nchw(tp, plane, oy, oy_end, out, d, stream, stage);
    while (oy < oy_end) {
      fill_ring(tp, plane, oy);
      const int64_t y0 = tp.th.start[oy];
      oy = blend_rows2(tp, ring_row(tp, y0, 0), ring_row(tp, y0 + 1, 0), oy, oy_end, out, d, stream);
    }
  }

  // run_rows2 for packed NCHW planes: the source rows that rows oy .. oy_end - 1 read, up to
  // kRows2Block at a time, are widened to acc_t in one pass and resampled horizontally one
  // after the other into `block`, and the output rows blend those. The ring's bookkeeping per
  // source row (a tag test and a short row's widening each) cost as much as the horizontal
  // pass for fpn_concat's 2x and 4x NCHW parts. The same operations on the same values as
  // the ring, so the same results. stage: the task's staging buffer (see below).
  template <typename dst_t>
  void run_rows2_nchw(const TermPlan<acc_t>& tp, const src_t* plane, int64_t oy, int64_t oy_end, dst_t* out,
                      const View& d, bool stream, std::vector<char>& stage) {
    constexpr int64_t kRows2Block = 32;
    const View& v = tp.v;
    const int64_t* start = tp.th.start.data();
    const int64_t n = tp.tw.out;
    // 16-bit rows that stream (stages_rows) are blended into `stage`, a run of rows at a time
    // (staged_run_rows), and copied out from there with non-temporal stores: the rows of a
    // plane follow each other in the output. (bfloat16 rows mostly skip the stage: below.)
    const bool staged = sizeof(dst_t) == 2 && stream;
    const int64_t row_bytes = d.row * static_cast<int64_t>(sizeof(dst_t));
    int64_t per_run = 0;  // set when first needed
    while (oy < oy_end) {
      // Output rows oy .. e - 1 read source rows lo .. hi (K = 2: start[r] and start[r] + 1).
      // The starts never decrease (JobPlan::rows2), so e is found by bisection and the rows are
      // lo .. start[e - 1] + 1. (With a running minimum and maximum instead, one thread took
      // 3-6% longer over fpn_concat's bfloat16 NCHW forward; a linear scan was a fifth of this
      // function's samples in a profile of it.)
      const int64_t lo = start[oy];
      const int64_t e = std::upper_bound(start + oy + 1, start + oy_end, lo + kRows2Block - 2) - start;
      const int64_t hi = start[e - 1] + 1;
      const int64_t rows = hi - lo + 1;
      const acc_t* src = source_rows(v, plane + lo * v.row, rows);
      if (static_cast<int64_t>(block.size()) < rows * n) block.resize(rows * n);
      bool resampled = false;
#if MSFAST_CPU_AVX2
      if constexpr (std::is_same_v<acc_t, float>) {
        // The window covers whole rows: all of the block's in one call.
        resampled = tp.tw.K == 2 && 8 * static_cast<int64_t>(tp.win_base.size()) == n;
        if (resampled) window_rows<false, 2>(src, v.W, tp, block.data(), n, rows);
      }
#endif
      for (int64_t r = 0; !resampled && r < rows; ++r)
        horizontal(tp, src + r * v.W, false, block.data() + r * n, packed_row(n, 1));
      bool safe = false;  // no blend of the block's rows can be subnormal or NaN
#if MSFAST_CPU_AVX2
      if constexpr (std::is_same_v<dst_t, at::BFloat16> && std::is_same_v<acc_t, float>) {
        safe = tp.th_weights_large && avx512bf16() && blend_inputs_safe(block.data(), rows * n);
        // Where its checks pass, the block's rows go straight to the output as one flat run
        // of whole cache lines (blend2_flat_bf16_512), with no stage to copy out of.
        // fpn_concat bfloat16 NCHW out=, two threads, each call after an eager one, medians
        // of 12 over six processes each, alternated: 6.06-6.44 ms staged, 5.57-6.05 ms so.
        if (staged && safe && n >= 16) {
          blend2_flat_bf16_512(block.data(), n, start, lo, tp.th.w.data(), oy, e, out + oy * d.row);
          oy = e;
          continue;
        }
      }
#endif
      if (staged) {
        if (!per_run) {
          per_run = staged_run_rows(row_bytes);
          if (static_cast<int64_t>(stage.size()) < per_run * row_bytes) stage.resize(per_run * row_bytes);
        }
        dst_t* rows_out = reinterpret_cast<dst_t*>(stage.data());
        while (oy < e) {
          const int64_t first = oy, last = staged_run_end(oy, per_run, e);
          while (oy < last) {
            const acc_t* a = block.data() + (start[oy] - lo) * n;
            oy = blend_rows2(tp, a, a + n, oy, last, rows_out, d, false, first, safe);
          }
          copy_run(out + first * d.row, rows_out, (last - first) * row_bytes, true);
        }
        continue;
      }
      while (oy < e) {
        const acc_t* a = block.data() + (start[oy] - lo) * n;
        oy = blend_rows2(tp, a, a + n, oy, e, out, d, stream, 0, safe);
      }
    }
  }

  // The first output row after oy, before oy_end, that reads other source rows than oy.
  static int64_t same_rows_end(const TermPlan<acc_t>& tp, int64_t oy, int64_t oy_end) {
    const int64_t* start = tp.th.start.data();
    int64_t e = oy + 1;
    while (e < oy_end && start[e] == start[oy]) ++e;
    return e;
  }

  // Output rows from oy on that read source rows start[oy] and start[oy] + 1 (resampled
  // horizontally: a, b), before oy_end; returns the first row after them. Row y goes to
  // out + (y - out_row0) * d.row. safe: see blend2_rows16.
  template <typename dst_t>
  MSFAST_INLINE int64_t blend_rows2(const TermPlan<acc_t>& tp, const acc_t* a, const acc_t* b, int64_t oy,
                                    int64_t oy_end, dst_t* out, const View& d, bool stream,
                                    int64_t out_row0 = 0, bool safe = false) const {
    const int64_t e = same_rows_end(tp, oy, oy_end);
    blend2_group(a, b, packed_row(d.W, tp.v.cp), tp.th.w.data() + 2 * oy, e - oy, out + (oy - out_row0) * d.row,
                 row_of(d), d.row, stream, safe);
    return e;
  }

  // A lone two-tap h_first term (a bilinear upscale) with no affine: ro.W pixels from x0 of
  // output rows oy .. oy + n - 1, row oy + i at out + i * stride, written straight into the
  // destination, of any type (a bfloat16 row then needs no separate conversion pass over an
  // acc_t row). The rings must hold their source rows. The rows that blend the same two ring
  // rows are written together (blend2_group).
  template <typename dst_t>
  MSFAST_INLINE void blend2_rows(const TermPlan<acc_t>& tp, int64_t oy, int64_t n, int64_t x0, dst_t* out,
                                 const Row& ro, int64_t stride, bool stream) const {
    for (int64_t i = 0; i < n;) {
      const int64_t y0 = tp.th.start[oy + i], e = same_rows_end(tp, oy + i, oy + n) - oy;
      blend2_group(ring_row(tp, y0, x0), ring_row(tp, y0 + 1, x0), packed_row(ro.W, tp.v.cp),
                   tp.th.w.data() + 2 * (oy + i), e - i, out + i * stride, ro, stride, stream);
      i = e;
    }
  }

  // A new plane: the ring's rows belong to the previous one.
  void new_plane() { std::fill(tag.begin(), tag.end(), -1); }
};

// out = cast(acc * scale[c] + shift[c]) over ro.W pixels of a row, acc packed; ch: the
// channel of an NCHW row (the whole row is one channel).
template <typename dst_t, typename acc_t>
void write_row(dst_t* out, const Row& ro, int64_t ch, const acc_t* acc, const JobPlan<acc_t>& j) {
  const bool affine = !j.scale.empty();
  for_runs(packed_row(ro.W, ro.cp), ro, [&](int64_t ao, int64_t oo, int64_t len) {
    dst_t* __restrict__ o = out + oo;
    const acc_t* __restrict__ a = acc + ao;
#if MSFAST_CPU_AVX2
    if constexpr ((std::is_same_v<dst_t, at::BFloat16> || std::is_same_v<dst_t, at::Half>) &&
                  std::is_same_v<acc_t, float>) {
      const bool cl = affine && j.dst.cl;
      const float m1 = affine && !cl ? j.scale[ch] : 0.f, b1 = affine && !cl ? j.shift[ch] : 0.f;
      const float* m = cl ? j.scale_run.data() : nullptr;
      const float* b = cl ? j.shift_run.data() : nullptr;
      if constexpr (std::is_same_v<dst_t, at::Half>) {
        return write_f16(a, len, affine, m1, b1, m, b, o);
      } else if (avx512bf16()) {
        return write_bf16_512(a, len, affine, m1, b1, m, b, o);
      }
    }
#endif
    if (!affine) {
      narrow(a, o, len);
    } else if (!j.dst.cl) {
      const acc_t m = j.scale[ch], b = j.shift[ch];
      for (int64_t c = 0; c < len; ++c) o[c] = to_dst<dst_t>(a[c] * m + b);
    } else {  // channels_last: the channel pattern laid out along the run
      const acc_t* __restrict__ m = j.scale_run.data();
      const acc_t* __restrict__ b = j.shift_run.data();
      for (int64_t c = 0; c < len; ++c) o[c] = to_dst<dst_t>(a[c] * m[c] + b[c]);
    }
  });
}

// Output rows oy .. oy_end - 1 of planes plane .. plane + G - 1 of a small-plane job (see
// plan_small). G planes at a time share each load of the weights and run G independent sums,
// and an output's sum is the same for any G. (With G = 4 and Vec8, one 2x2 -> 4x4 feature of
// 32 x 512 planes, one thread: 0.42-0.45 -> 0.33-0.38 ms.) in: room for G times the largest
// term's input plane; acc: for G output planes rounded up to 8 values.
// False, with nothing written, when an input plane holds a non-finite value.
template <int G, typename src_t, typename dst_t, typename acc_t>
bool small_rows(const JobPlan<acc_t>& p, int64_t plane, int64_t oy, int64_t oy_end, acc_t* __restrict__ acc,
                acc_t* __restrict__ in) {
  const int64_t Wo = p.dst.W, n8 = (p.dst.H * Wo + 7) / 8 * 8, c0 = oy * Wo / 8, c1 = (oy_end * Wo + 7) / 8;
  const int64_t span = (c1 - c0) * 8;  // acc values per plane
  for (size_t t = 0; t < p.terms.size(); ++t) {
    const TermPlan<acc_t>& tp = p.terms[t];
    const View& v = tp.v;
    const int64_t m = v.H * v.W;
    // The plane as one run where its rows follow each other, and the test for non-finite
    // values as an integer or: the loop vectorizes (per row and with std::isfinite it did not,
    // and it was a third of the backward of the 1x1 and 2x2 features' planes).
    const bool packed = v.row == v.W;
    int bad = 0;
    for (int g = 0; g < G; ++g) {
      const src_t* s = static_cast<const src_t*>(v.data) + v.plane_offset(plane + g);
      for (int64_t y = 0; y < (packed ? 1 : v.H); ++y) {
        const src_t* __restrict__ r = s + y * v.row;
        acc_t* __restrict__ b = in + g * m + y * v.W;
        const int64_t n = packed ? m : v.W;
        // (float16 widened apart, in vector steps; the others in the loop, one pass: as two
        // passes the fusion concat was 5-10% slower in float32 and bfloat16.)
        if constexpr (std::is_same_v<src_t, at::Half>) widen(r, b, n);
        for (int64_t x = 0; x < n; ++x) {
          if constexpr (!std::is_same_v<src_t, at::Half>) b[x] = to_acc<acc_t>(r[x]);
          bad |= !(std::fabs(b[x]) <= std::numeric_limits<acc_t>::max());
        }
      }
    }
    if (bad) return false;
    using V = typename Vec8<acc_t>::type;
    for (int64_t c = c0; c < c1; ++c) {
      V a[G];
      for (int g = 0; g < G; ++g) {
        a[g] = V{};
        if (t > 0) std::memcpy(&a[g], acc + g * span + (c - c0) * 8, sizeof(V));
      }
      for (int64_t i = tp.dense_lo[c]; i < tp.dense_hi[c]; ++i) {
        V w;
        std::memcpy(&w, tp.dense.data() + i * n8 + c * 8, sizeof(V));
        for (int g = 0; g < G; ++g) a[g] += in[g * m + i] * w;
      }
      for (int g = 0; g < G; ++g) std::memcpy(acc + g * span + (c - c0) * 8, &a[g], sizeof(V));
    }
  }
  // The rows as one run where they follow each other in dst, else one run per row. With no
  // affine, rounded here: a write_row call was a fifth of a 1x1 -> 4x4 plane's time.
  const bool one = p.dst.row == Wo;
  const int64_t runs = one ? 1 : oy_end - oy, len = one ? (oy_end - oy) * Wo : Wo;
  for (int g = 0; g < G; ++g) {
    dst_t* out = static_cast<dst_t*>(p.dst.data) + p.dst.plane_offset(plane + g) + oy * p.dst.row;
    const acc_t* a = acc + g * span + oy * Wo - c0 * 8;
    for (int64_t r = 0; r < runs; ++r) {
      dst_t* __restrict__ o = out + r * p.dst.row;
      const acc_t* __restrict__ ar = a + r * Wo;
      if (p.scale.empty()) {
        narrow(ar, o, len);
      } else {
        write_row(o, packed_row(len, 1), (plane + g) % p.dst.pdiv, ar, p);
      }
    }
  }
  return true;
}

// Sets JobPlan::stream: for the jobs that can take non-temporal stores, unless a job writing
// into the same span of bytes (another slice of a concat) cannot, in calls moving more than
// stream_bytes() (inputs read once, output written).
template <typename src_t, typename dst_t, typename acc_t>
void plan_streams(std::vector<JobPlan<acc_t>>& plans, int64_t total_values) {
  if (!kAvx2) return;
  int64_t moved = total_values * static_cast<int64_t>(sizeof(dst_t));
  std::vector<const void*> seen;
  for (const auto& p : plans)
    for (const auto& tp : p.terms)
      if (std::find(seen.begin(), seen.end(), tp.v.data) == seen.end()) {
        seen.push_back(tp.v.data);
        moved += tp.v.planes * tp.v.H * tp.v.W * tp.v.cp * static_cast<int64_t>(sizeof(src_t));
      }
  if (moved <= stream_bytes().load()) return;
  std::vector<std::pair<uintptr_t, uintptr_t>> span;  // first and last byte each job writes
  for (const auto& p : plans) {
    const View& d = p.dst;
    const int64_t last = d.plane_offset(d.planes - 1) + (d.H - 1) * d.row + (d.W - 1) * d.px + d.cp;
    const uintptr_t a = reinterpret_cast<uintptr_t>(d.data);
    span.emplace_back(a, a + last * sizeof(dst_t) - 1);
  }
  // 16-bit NCHW rows are short and do not start on cache lines: only copies stream, as whole
  // runs of rows (the row order's copy), which needs the rows of a plane contiguous, and on
  // Intel blends staged as runs of rows (run_rows2_nchw; see JobPlan::stream). The rows of
  // other jobs (downscales, antialias, normalization, backwards) stream through a staging
  // buffer (run_typed), where the rows of a plane are contiguous: in 16-bit types only where
  // blends are staged too.
  auto can = [](const JobPlan<acc_t>& p) {
    const bool rows_ok = sizeof(dst_t) >= 4 || p.dst.cl || copies_row_runs(p) || stages_rows(p);
    const bool other = other_rows(p) && rows_packed(p.dst) && (sizeof(dst_t) >= 4 || staged_rows().load());
    return (((p.rows2 || p.copy) && rows_ok) || other) && runs_aligned(p.dst, sizeof(dst_t), 8 * sizeof(dst_t));
  };
  bool any = false;
  for (size_t j = 0; j < plans.size(); ++j) {
    bool ok = can(plans[j]);
    for (size_t k = 0; ok && k < plans.size(); ++k)
      ok = can(plans[k]) || span[k].second < span[j].first || span[j].second < span[k].first;
    plans[j].stream = ok;
    any = any || ok;
  }
  if (any) streamed_calls().fetch_add(1, std::memory_order_relaxed);
}

// An output row's work in value operations, roughly: the values it writes, and per term the
// products of its vertical and horizontal passes (those of an upscale's horizontal pass spread
// over the output rows that share a source row). Only to balance threads (run_typed).
template <typename acc_t>
int64_t row_cost(const JobPlan<acc_t>& p) {
  const int64_t out = p.dst.W * p.dst.cp;
  int64_t c = out;
  if (p.copy) return c;
  for (const auto& tp : p.terms) {
    const View& v = tp.v;
    if (tp.h_unit) {
      c += tp.th.K * out;
    } else if (tp.h_first) {
      c += tp.th.K * out + (tp.tw.K * out * v.H + p.dst.H - 1) / std::max<int64_t>(p.dst.H, 1);
    } else {
      c += tp.th.K * v.W * v.cp + tp.tw.K * out;
    }
  }
  return std::max<int64_t>(c, 1);
}

template <typename src_t, typename dst_t, typename acc_t>
void run_typed(const std::vector<Job>& jobs) {
  std::vector<JobPlan<acc_t>> plans;
  std::vector<int64_t> first_item{0};  // prefix sums of rows (planes * H_out) per job
  int64_t max_acc = 1, max_small_in = 0, total_values = 0;
  for (const auto& job : jobs) {
    JobPlan<acc_t> p;
    p.dst = make_view(job.dst, job.channels_last);
    for (double v : job.scale) p.scale.push_back(static_cast<acc_t>(v));
    for (double v : job.shift) p.shift.push_back(static_cast<acc_t>(v));
    if (!p.scale.empty() && p.dst.cl) {
      const int64_t len = p.dst.px == p.dst.cp ? p.dst.W * p.dst.cp : p.dst.cp;
      for (int64_t i = 0; i < len; ++i) {
        p.scale_run.push_back(p.scale[i % p.dst.cp]);
        p.shift_run.push_back(p.shift[i % p.dst.cp]);
      }
    }
    for (const auto& t : job.terms) {
      auto [th, tw] = term_tables<acc_t>(t);
      TermPlan<acc_t> tp{make_view(t.src, job.channels_last), std::move(th), std::move(tw), false, false, 1};
      tp.h_unit = is_unit(tp.tw);
      if (!tp.h_unit && (tp.v.cp == 1 || tp.v.cp == kPlanarPixel) && tp.tw.K > 1 && tp.tw.in < (int64_t{1} << 31)) {
        const int64_t n = tp.tw.out, K = tp.tw.K;
        tp.start32.assign(tp.tw.start.begin(), tp.tw.start.end());
        tp.wk.resize(n * K);
        for (int64_t ox = 0; ox < n; ++ox)
          for (int64_t k = 0; k < K; ++k) tp.wk[k * n + ox] = tp.tw.w[ox * K + k];
        // The window where it fits, else the stencil, else dot products for many taps (one of
        // them: the window and dot products cover the row).
        if (cpu_stencil_enabled()) {
#if MSFAST_CPU_AVX2
          if constexpr (std::is_same_v<acc_t, float>) plan_window(tp);
#endif
          if (tp.win_base.empty()) tp.sten = make_stencil(tp.tw);
#if MSFAST_CPU_AVX2
          if constexpr (std::is_same_v<acc_t, float>)
            if (tp.win_base.empty() && tp.sten.P == 0) plan_dot(tp);
#endif
        }
        if (tp.sten.P > 0 || !tp.win_base.empty() || tp.dot_k > 0)
          stencil_terms_planned().fetch_add(1, std::memory_order_relaxed);
      }
      // Fewer source rows than output rows: gather each source row once (see the top).
      // Wide channels_last pixels too: their horizontal pass is a vector loop over channels, as
      // cheap as the vertical one, and resampling each source row once into the ring reads the
      // source once. Vertical first reads each row once per output row that uses it, and with
      // hundreds of channels the rows touched in between exceed L2 (fpn_concat's channels_last
      // backward, one thread: 13% faster this way).
      tp.th_weights_large = std::all_of(tp.th.w.begin(), tp.th.w.end(),
                                        [](acc_t w) { return w == acc_t(0) || std::abs(w) >= acc_t(0x1p-20); });
      tp.h_first = !tp.h_unit && (tp.th.in < tp.th.out || tp.v.cp >= kWidePixel);
      while (tp.ring < tp.th.K) tp.ring *= 2;
      p.terms.push_back(std::move(tp));
    }
    p.direct = std::is_same_v<dst_t, acc_t> && p.scale.empty();
    p.copy = std::is_same_v<src_t, dst_t> && p.scale.empty() && p.terms.size() == 1 && p.terms[0].h_unit &&
             is_unit(p.terms[0].th);
    p.small = !p.copy && !p.dst.cl && p.dst.W < kSmallRow && cpu_small_planes_enabled();
    for (auto& tp : p.terms) p.small = p.small && plan_small(tp, p.dst.planes);
    p.rows2 = !p.small && p.scale.empty() && p.terms.size() == 1 && p.terms[0].h_first && p.terms[0].th.K == 2 &&
              std::is_sorted(p.terms[0].th.start.begin(), p.terms[0].th.start.end());
    bool rings = false;
    for (const auto& tp : p.terms) rings = rings || tp.h_first;
    if (!p.direct && !p.copy && !p.small && !rings && !p.dst.cl && rows_packed(p.dst))
      p.write_rows = std::max<int64_t>(1, kWriteBlock / std::max<int64_t>(p.dst.W, 1));
    max_acc = std::max(max_acc, p.write_rows * p.dst.W * p.dst.cp);
    if (p.small) {
      small_jobs_planned().fetch_add(1, std::memory_order_relaxed);
      max_acc = std::max(max_acc, 4 * ((p.dst.H * p.dst.W + 7) / 8 * 8));
      for (const auto& tp : p.terms) max_small_in = std::max(max_small_in, tp.v.H * tp.v.W);
    }
    total_values += p.dst.planes * p.dst.H * p.dst.W * p.dst.cp;
    first_item.push_back(first_item.back() + p.dst.planes * p.dst.H);
    plans.push_back(std::move(p));
  }
  const int64_t items = first_item.back();
  if (items == 0) return;
  plan_streams<src_t, dst_t>(plans, total_values);
  // Non-temporal stores are weakly ordered: each task fences its own before it ends.
  auto fence = [] {
#if MSFAST_CPU_AVX2
    _mm_sfence();
#endif
  };

  // Pointers of job p's terms and destination at a plane; a fresh plane for its rings.
  auto start_plane = [](const JobPlan<acc_t>& p, int64_t plane, RowMaker<src_t, acc_t>* mk, const src_t** src) {
    for (size_t t = 0; t < p.terms.size(); ++t) {
      src[t] = static_cast<const src_t*>(p.terms[t].v.data) + p.terms[t].v.plane_offset(plane);
      mk[t].new_plane();
    }
    return static_cast<dst_t*>(p.dst.data) + p.dst.plane_offset(plane);
  };
  // Fills the rings output row oy of job p reads.
  auto fill_rings = [](const JobPlan<acc_t>& p, int64_t oy, RowMaker<src_t, acc_t>* mk, const src_t* const* src) {
    for (size_t t = 0; t < p.terms.size(); ++t)
      if (p.terms[t].h_first) mk[t].fill_ring(p.terms[t], src[t], oy);
  };
  // Pixels x0 .. x0 + nx - 1 of output rows oy .. oy + rows - 1 of job p (`row`: row oy, the
  // others p.dst.row apart), their rings filled. A two-tap upscale's rows go together
  // (RowMaker::blend2_rows), the others one at a time.
  auto job_pixels = [](const JobPlan<acc_t>& p, int64_t plane, int64_t oy, int64_t x0, int64_t nx,
                       RowMaker<src_t, acc_t>* mk, const src_t* const* src, dst_t* row, acc_t* acc,
                       int64_t rows = 1) {
    const Row ro{nx, p.dst.cp, p.dst.px};
    dst_t* o = row + x0 * p.dst.px;
    if (p.rows2) return mk[0].blend2_rows(p.terms[0], oy, rows, x0, o, ro, p.dst.row, p.stream);
    if (p.write_rows > 1 && rows > 1) {  // the rows follow each other in `row` and in acc
      const Row rb = packed_row(nx, p.dst.cp);
      for (int64_t i = 0; i < rows; ++i)
        for (size_t t = 0; t < p.terms.size(); ++t)
          mk[t].pixels(p.terms[t], src[t], oy + i, x0, t > 0, acc + i * nx * p.dst.cp, rb);
      return write_row(o, Row{rows * nx, p.dst.cp, p.dst.px}, plane % p.dst.pdiv, acc, p);
    }
    for (int64_t y = oy; y < oy + rows; ++y, o += p.dst.row) {
      if (p.copy) {
        const View& v = p.terms[0].v;
        const src_t* s = src[0] + y * v.row + x0 * v.px;
        for_runs(Row{nx, v.cp, v.px}, ro, [&](int64_t so, int64_t dof, int64_t len) {
          copy_run(o + dof, s + so, len * sizeof(dst_t), p.stream);
        });
        continue;
      }
      // When the row needs no conversion, accumulate straight into the output.
      acc_t* a = p.direct ? reinterpret_cast<acc_t*>(o) : acc;
      const Row ra = p.direct ? ro : packed_row(nx, p.dst.cp);
      for (size_t t = 0; t < p.terms.size(); ++t) mk[t].pixels(p.terms[t], src[t], y, x0, t > 0, a, ra);
      if (!p.direct) write_row(o, ro, plane % p.dst.pdiv, a, p);
    }
  };
  auto grain_of = [&](int64_t n) {
    // About 32K output values per task: enough to amortize the scheduling, small enough to
    // balance two to a few dozen threads.
    return std::max<int64_t>(1, (int64_t{1} << 15) * n / std::max<int64_t>(total_values, 1));
  };

  // Source order: the gradient of a channels_last concat, each job (feature) reading a slice
  // of every pixel. Read job by job, the slices are four strided passes over the gradient;
  // on this project's EPYC reading 192 MB that way took 2.3x as long as reading it in order
  // (one or two threads, with prefetching), and job by job within each row 2x. So when every
  // job reads a slice of the same rows, a task takes whole planes and goes down the source
  // rows: each row's pixels are read in order, every job's slice into its packed row (a copy
  // job writes its output pixel), each job resamples its row into its ring, and then writes
  // every output row whose source rows are all in. Planes are the tasks, so only where there
  // are enough of them for the threads.
  bool source_major = plans.size() > 1 && plans[0].dst.planes >= 2 * at::get_num_threads();
  for (const auto& p : plans) source_major = source_major && p.terms.size() == 1;
  for (size_t j = 0; source_major && j < plans.size(); ++j) {
    const JobPlan<acc_t>& p = plans[j];
    const View &v = p.terms[0].v, &v0 = plans[0].terms[0].v;
    source_major = (p.copy || p.terms[0].h_first) && v.cl && v.px > v.cp && v.planes == v0.planes && v.H == v0.H &&
                   v.W == v0.W && v.row == v0.row && v.px == v0.px && v.s_outer == v0.s_outer;
  }
  if (source_major) {
    const int64_t J = static_cast<int64_t>(plans.size()), Hs = plans[0].terms[0].v.H, Ws = plans[0].terms[0].v.W;
    at::parallel_for(0, plans[0].dst.planes, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(max_acc);
      std::vector<RowMaker<src_t, acc_t>> mk(J);
      std::vector<const src_t*> src(J);
      std::vector<dst_t*> out(J);
      std::vector<int64_t> next(J);  // each job's first output row not written yet
      std::vector<std::vector<acc_t>> rows(J);
      for (int64_t j = 0; j < J; ++j) rows[j].resize(Ws * plans[j].terms[0].v.cp);
      // Writes job j's output rows whose source rows all come up to row y.
      auto write_rows = [&](int64_t j, int64_t plane, int64_t y) {
        const JobPlan<acc_t>& p = plans[j];
        const Table<acc_t>& th = p.terms[0].th;
        for (; next[j] < p.dst.H && th.start[next[j]] + th.K - 1 <= y; ++next[j]) {
          fill_rings(p, next[j], &mk[j], &src[j]);  // no-op but for rows past the last source row
          job_pixels(p, plane, next[j], 0, p.dst.W, &mk[j], &src[j], out[j] + next[j] * p.dst.row, acc.data());
        }
      };
      for (int64_t plane = begin; plane < end; ++plane) {
        for (int64_t j = 0; j < J; ++j) {
          out[j] = start_plane(plans[j], plane, &mk[j], &src[j]);
          next[j] = 0;
        }
        for (int64_t y = 0; y < Hs; ++y) {
          for (int64_t x = 0; x < Ws; ++x) {
            for (int64_t j = 0; j < J; ++j) {
              const JobPlan<acc_t>& p = plans[j];
              const View& v = p.terms[0].v;
              const src_t* __restrict__ a = src[j] + y * v.row + x * v.px;
              if (p.copy) {
                copy_run(out[j] + y * p.dst.row + x * p.dst.px, a, v.cp * sizeof(dst_t), p.stream);
                continue;
              }
              widen(a, rows[j].data() + x * v.cp, v.cp);
            }
          }
          for (int64_t j = 0; j < J; ++j) {
            const JobPlan<acc_t>& p = plans[j];
            if (p.copy) {
              next[j] = y + 1;
              continue;
            }
            mk[j].put_row(p.terms[0], y, rows[j].data());
            write_rows(j, plane, y);
          }
        }
        for (int64_t j = 0; j < J; ++j) write_rows(j, plane, std::numeric_limits<int64_t>::max());
      }
      fence();
    });
    return;
  }

  // Pixel order. The features of a channels_last concat write slices of each output pixel
  // (64 + 128 + 256 + 512 of fpn_concat's 960 channels). Job by job, a row is four strided
  // passes over the output, and on this project's EPYC storing 192 MB in that pattern took
  // 1.8x (2 threads) to 2.4x (1 thread) as long as storing it in order; interleaving the
  // jobs row by row, or 2 to 8 pixels at a time, was little better. So when every job
  // writes a slice of the same rows and its terms can be computed pixel by pixel, a task
  // takes whole output rows, fills every job's rings, then writes each pixel's slices in turn.
  bool pixel_major = plans.size() > 1;
  for (const auto& p : plans) {
    pixel_major = pixel_major && !p.terms.empty() && p.dst.cl && p.dst.px > p.dst.cp &&
                  p.dst.planes == plans[0].dst.planes &&
                  p.dst.H == plans[0].dst.H && p.dst.W == plans[0].dst.W;
    for (const auto& tp : p.terms) pixel_major = pixel_major && (tp.h_first || tp.h_unit);
  }
  if (pixel_major) {
    const int64_t H = plans[0].dst.H, W = plans[0].dst.W, J = static_cast<int64_t>(plans.size());
    // A task goes down its rows G at a time: the rings are filled for all G rows, then each
    // pixel's slices of the G rows are written, and the rows of a two-tap upscale that blend
    // the same two ring rows are written together (RowMaker::blend2_rows), which reads those
    // from L2 once for all of them (8x fewer reads for fpn_concat's 8x feature). Row by row,
    // on this project's Intel Xeon, fpn_concat's channels_last forward went from 5.6 to 4.8
    // ms in bfloat16 (into out=: 6.8 -> 6.2) and from 7.4 to 6.7 ms in float32 (two threads,
    // medians of 7 alternated processes, each call after an eager one). Blocks of 4 rows: 4.9
    // ms, of 16: 5.1. G is halved while the rings would pass kPixelRings bytes (a downscale's
    // ring grows with G by the source rows each output row steps over); fpn_concat's take
    // 0.9 MB at G = 8, against 0.4 MB row by row.
    constexpr int64_t kPixelRows = 8, kPixelRings = int64_t{1} << 20;
    auto ring_bytes = [&](int64_t g) {
      int64_t bytes = 0;
      for (const auto& p : plans)
        for (const auto& tp : p.terms)
          if (tp.h_first) bytes += ring_rows(tp, g) * tp.tw.out * tp.v.cp * static_cast<int64_t>(sizeof(acc_t));
      return bytes;
    };
    int64_t G = kPixelRows;
    while (G > 1 && ring_bytes(G) > kPixelRings) G /= 2;
    for (auto& p : plans)
      for (auto& tp : p.terms)
        if (tp.h_first) tp.ring = std::max(tp.ring, ring_rows(tp, G));
    at::parallel_for(0, plans[0].dst.planes * H, grain_of(plans[0].dst.planes * H), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(max_acc);
      std::vector<std::vector<RowMaker<src_t, acc_t>>> mk(J);
      std::vector<std::vector<const src_t*>> src(J);
      std::vector<dst_t*> out(J);
      for (int64_t j = 0; j < J; ++j) {
        mk[j].resize(plans[j].terms.size());
        src[j].resize(plans[j].terms.size());
      }
      for (int64_t r = begin; r < end;) {
        const int64_t plane = r / H, oy = r % H, g = std::min({G, H - oy, end - r});
        for (int64_t j = 0; j < J; ++j) {
          if (r == begin || oy == 0) out[j] = start_plane(plans[j], plane, mk[j].data(), src[j].data());
          for (int64_t i = 0; i < g; ++i) fill_rings(plans[j], oy + i, mk[j].data(), src[j].data());
        }
        for (int64_t x = 0; x < W; ++x)
          for (int64_t j = 0; j < J; ++j)
            job_pixels(plans[j], plane, oy, x, 1, mk[j].data(), src[j].data(), out[j] + oy * plans[j].dst.row,
                       acc.data(), g);
        r += g;
      }
      fence();
    });
    return;
  }

  // Row order. When every job has as many planes (the levels of a pyramid, the features of
  // a channels_last concat), rows go plane by plane across jobs: the levels of one source
  // plane are computed back to back while it is still in cache, so the input is read from
  // memory once instead of once per level. Otherwise job by job; so too when a job has small
  // planes (JobPlan::small): its source planes are small, and job by job it runs several planes
  // at a time without a segment's bookkeeping between them (the fusion concat above, whose
  // features have 512 channels each, one thread: 1.31-1.37 -> 0.93-1.05 ms).
  bool plane_major = plans.size() > 1;
  for (const auto& p : plans) plane_major = plane_major && p.dst.planes == plans[0].dst.planes && !p.small;
  std::vector<int64_t> first_row{0};  // plane-major: prefix sums of H_out over jobs
  for (const auto& p : plans) first_row.push_back(first_row.back() + p.dst.H);
  // Job by job, tasks take chunks of rows as they go, not one fixed share each as
  // at::parallel_for hands out: rows of different jobs cost different times (fpn_concat's
  // backward). Every other task takes its chunks from the far end: with two threads one
  // starts on the last job while the other does the first (the 8x upscale, bound by its
  // stores, next to the copy and the 2x rows, bound by arithmetic), as the fixed halves did,
  // which kept the forward faster than both threads going down the jobs together. The
  // plane-major order keeps the fixed shares: its chunks would split planes.
  const int64_t grain = grain_of(items), chunks = (items + grain - 1) / grain;
  std::atomic<uint64_t> ends{static_cast<uint64_t>(chunks) << 32};  // first and one past the last chunk left
  auto take = [&](bool back) -> int64_t {
    uint64_t cur = ends.load(std::memory_order_relaxed);
    for (;;) {
      const uint64_t f = cur & 0xFFFFFFFFu, e = cur >> 32;
      if (f >= e) return -1;
      const uint64_t next = back ? ((e - 1) << 32 | f) : (e << 32 | (f + 1));
      if (ends.compare_exchange_weak(cur, next, std::memory_order_relaxed))
        return static_cast<int64_t>(back ? e - 1 : f);
    }
  };
  // Plane-major tasks, one per thread, take equal shares of the rows' estimated cost (row_cost),
  // not of their count: a pyramid's rows cost more the more taps they have, and a copied
  // level's rows little. One 224x224 RGB image at scales 1, 0.5, 0.25 (antialiased), split by
  // count on two threads: one thread got plane 0 and most of plane 1's copied rows, the other
  // the downscaled rows of planes 1 and 2, twice the first's arithmetic.
  std::vector<int64_t> cost;  // per job, of one output row (plane-major calls only)
  int64_t plane_cost = 0;
  for (size_t j = 0; plane_major && j < plans.size(); ++j) {
    cost.push_back(row_cost(plans[j]));
    plane_cost += plans[j].dst.H * cost.back();
  }
  // The first row (item) after a share of c cost units of rows.
  auto row_at = [&](int64_t c) {
    const int64_t plane = c / plane_cost;
    if (plane >= plans[0].dst.planes) return items;
    int64_t rem = c - plane * plane_cost;
    size_t j = 0;
    for (; rem >= plans[j].dst.H * cost[j]; ++j) rem -= plans[j].dst.H * cost[j];  // rem < plane_cost
    return plane * first_row.back() + first_row[j] + (rem + cost[j] - 1) / cost[j];
  };
  const int64_t shares = std::min<int64_t>(at::get_num_threads(), (items + grain - 1) / grain);
  const __int128 total_cost = static_cast<__int128>(plane_cost) * plans[0].dst.planes;
  auto share_row = [&](int64_t t) { return row_at(static_cast<int64_t>(total_cost * t / shares)); };
  // Plane-major calls whose first job copies its plane (a pyramid's scale-1 level): that copy
  // reads the plane from memory while the other jobs' rows, which read it from L2, wait on
  // nothing but arithmetic. So each of their rows prefetches a share of the next plane's lines
  // into L2. The NCHW float32 pyramid forward (32 images, two threads, each call after an
  // eager one, processes alternated with and without): 2.17 -> 2.03, 2.25 -> 2.13 ms;
  // channels_last 2.47 -> 2.38; bfloat16 the same (1.86-1.93 ms), its levels bound by work.
  int64_t ahead_lines = 0, plane_lines = 0;  // per row of the other jobs; of a plane
  if (plane_major && plans[0].copy) {
    const View& v = plans[0].terms[0].v;
    plane_lines = (v.H * v.row * static_cast<int64_t>(sizeof(src_t)) + 63) / 64;
    const int64_t other = first_row.back() - first_row[1];
    if (other > 0 && v.s_inner == v.H * v.row) ahead_lines = (plane_lines + other - 1) / other;
  }
  at::parallel_for(0, plane_major ? shares : chunks, 1, [&](int64_t range_begin, int64_t range_end) {
    std::vector<acc_t> acc(max_acc), small_in(4 * max_small_in);
    // Rows on their way to non-temporal stores: staged 16-bit blends (run_rows2_nchw) and the
    // rows of other jobs (below).
    std::vector<char> stage;
    std::vector<RowMaker<src_t, acc_t>> makers;
    std::vector<const src_t*> src;
    // Output rows begin .. end - 1 of the call (items, in the row order).
    auto run_rows = [&](int64_t begin, int64_t end) {
      // Position of row `begin`: job j, plane, row oy.
      size_t j;
      int64_t plane, oy;
      if (plane_major) {
        const int64_t R = first_row.back();
        plane = begin / R;
        j = std::upper_bound(first_row.begin(), first_row.end(), begin % R) - first_row.begin() - 1;
        oy = begin % R - first_row[j];
      } else {
        j = std::upper_bound(first_item.begin(), first_item.end(), begin) - first_item.begin() - 1;
        plane = (begin - first_item[j]) / plans[j].dst.H;
        oy = (begin - first_item[j]) % plans[j].dst.H;
      }
      for (int64_t item = begin; item < end;) {
        // One (job, plane) segment: pointers are computed once for its rows.
        const JobPlan<acc_t>& p = plans[j];
        src.resize(p.terms.size());
        if (makers.size() < p.terms.size()) makers.resize(p.terms.size());
        dst_t* out = start_plane(p, plane, makers.data(), src.data());
        int64_t rows_end = std::min<int64_t>(p.dst.H, oy + (end - item));
        if (p.small) {
          // Plane after plane of this job while the range lasts (a call with a small job goes
          // job by job), four at a time where whole, with none of a segment's bookkeeping in
          // between: a plane is a few dozen values. A plane small_rows leaves (a non-finite
          // input) goes to the rows below.
          const int64_t H = p.dst.H, first = plane;
          for (;;) {
            const int64_t whole = oy == 0 ? std::min(p.dst.planes - plane, (end - item) / H) : 0;
            int64_t n = 4;
            if (whole < 4 || !small_rows<4, src_t, dst_t>(p, plane, 0, H, acc.data(), small_in.data())) {
              if (!small_rows<1, src_t, dst_t>(p, plane, oy, rows_end, acc.data(), small_in.data())) break;
              n = 1;
            }
            item += (n - 1) * H + rows_end - oy;
            plane += n - 1;
            oy = rows_end;
            if (oy < H || item == end || plane + 1 == p.dst.planes) break;
            ++plane;
            oy = 0;
            rows_end = std::min<int64_t>(H, end - item);
          }
          if (plane != first) out = start_plane(p, plane, makers.data(), src.data());
        } else if (p.rows2) {
          makers[0].run_rows2(p.terms[0], src[0], oy, rows_end, out, p.dst, p.stream, stage);
          item += rows_end - oy;
          oy = rows_end;
        } else if (copies_row_runs(p)) {  // the rows in one go
          // Job by job, the whole planes after this one that follow it in both tensors too: the
          // 4x4 feature of the fusion concat (JobPlan::small) was 16384 copies of 64 bytes.
          const View& v = p.terms[0].v;
          int64_t n = 1;  // planes
          if (!plane_major && oy == 0 && rows_end == p.dst.H && v.pdiv == p.dst.pdiv) {
            auto run = [&](const View& w) {  // planes from this one on, back to back in w
              if (w.s_inner != w.H * w.row) return int64_t{1};
              return w.s_outer == w.pdiv * w.s_inner ? w.planes - plane : w.pdiv - plane % w.pdiv;
            };
            n = std::min({run(v), run(p.dst), (end - item) / p.dst.H});
          }
          copy_run(out + oy * p.dst.row, src[0] + oy * v.row, ((n - 1) * v.H + rows_end - oy) * v.row * sizeof(dst_t),
                   p.stream);
          item += (n - 1) * p.dst.H + rows_end - oy;
          plane += n - 1;
          oy = rows_end;
        }
        // Rows of other streaming jobs (plan_streams) are computed into `stage`, a run of rows
        // at a time, and copied out with non-temporal stores.
        const int64_t row_bytes = p.dst.row * static_cast<int64_t>(sizeof(dst_t));
        const int64_t per_run = p.stream && other_rows(p) ? staged_run_rows(row_bytes) : 0;
        if (static_cast<int64_t>(stage.size()) < per_run * row_bytes) stage.resize(per_run * row_bytes);
        dst_t* const rows_out = reinterpret_cast<dst_t*>(stage.data());
        // The next plane's source, which these rows prefetch (ahead_lines).
        const char* next = ahead_lines > 0 && plane + 1 < plans[0].dst.planes
                               ? static_cast<const char*>(plans[0].terms[0].v.data) +
                                     plans[0].terms[0].v.plane_offset(plane + 1) * static_cast<int64_t>(sizeof(src_t))
                               : nullptr;
        while (oy < rows_end) {
          const int64_t first = oy, last = per_run ? staged_run_end(oy, per_run, rows_end) : rows_end;
          for (int64_t n; oy < last; oy += n, item += n) {
            n = std::min(p.write_rows, last - oy);
            if (next) {
              const int64_t r = first_row[j] - first_row[1] + oy;
              for (int64_t l = r * ahead_lines; l < std::min((r + n) * ahead_lines, plane_lines); ++l)
                __builtin_prefetch(next + 64 * l, 0, 2);
            }
            fill_rings(p, oy, makers.data(), src.data());  // (write_rows > 1: none)
            dst_t* o = per_run ? rows_out + (oy - first) * p.dst.row : out + oy * p.dst.row;
            job_pixels(p, plane, oy, 0, p.dst.W, makers.data(), src.data(), o, acc.data(), n);
          }
          if (per_run) copy_run(out + first * p.dst.row, rows_out, (last - first) * row_bytes, true);
        }
        // Next segment.
        oy = 0;
        if (plane_major) {
          if (++j == plans.size()) {
            j = 0;
            ++plane;
          }
        } else if (++plane == p.dst.planes) {
          plane = 0;
          ++j;
        }
      }
    };
    if (plane_major) {
      const int64_t begin = share_row(range_begin), end = share_row(range_end);
      if (begin < end) run_rows(begin, end);
    } else {
      const bool back = at::get_thread_num() % 2 == 1;
      for (int64_t c; (c = take(back)) >= 0;) run_rows(c * grain, std::min(items, (c + 1) * grain));
    }
    fence();
  });
}

}  // namespace

void run_jobs(const std::vector<Job>& jobs, at::ScalarType st, at::ScalarType dt) {
  with_types(st, dt, [&](auto s, auto d, auto a) {
    run_typed<decltype(s), decltype(d), decltype(a)>(jobs);
  });
}

}  // namespace MSFAST_CPU_ISA
}  // namespace msfast
