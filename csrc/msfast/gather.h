// The CUDA kernel's arithmetic, host+device: how one work item (V values in each of up to
// P planes) is computed from the job descriptors and the tap tables. The CUDA kernel
// (csrc/cuda/resample_cuda.cu) calls gather_item for its items; the CPU backend can run the
// very same function over all items (csrc/cpu/gather_cpu.cpp, msfast._C._set_cpu_runner), so
// CPU-only CI checks the CUDA path's indexing, descriptors and tables against the reference.
//
// Work items: a plane is an image's channel (NCHW) or an image (channels_last); a job's
// planes go in groups of P, and an item's values (V in each plane) share their planes, so
// what a thread decodes (its job, planes, pointers) and each table load serve P values.
// (P, V) is the call's ItemShape (gather_plan.h: UpscaleShape, GeneralShape). Within a
// group, items take (gather_plan.h: group_items)
//  - large NCHW planes, where the shape allows: lane-strided chunks, the 32 lanes of a warp
//    on 32 consecutive values of a plane, V times (see gather_item);
//  - other NCHW planes: V consecutive pixels of a row, each with its own horizontal taps;
//  - channels_last: V consecutive channels of a pixel, sharing its taps (one vector load
//    per tap and plane on a GPU).
// The kernels before these, with one value in four planes per item, were bound by
// instruction issue (about 90 instructions per value); the README's GPU history gives the
// runs that led to the two shapes.
// Tables are tap-major (weight k of output o at k * out + o), so that a warp's weight loads
// are contiguous.
//
// Index type I: int32_t when every offset of the call fits (the common case: 32-bit
// arithmetic and multiply-shift division are several times cheaper on a GPU than 64-bit),
// int64_t otherwise.
#pragma once

#include <stdint.h>

#include <type_traits>

#include "msfast/index_math.h"

namespace msfast {

template <typename U>
struct QuotRem {
  U div, mod;
};

// Division by a divisor fixed for the whole call. 64-bit: plain division.
template <typename U>
struct FixedDivider {
  U d = 1;
  FixedDivider() = default;
  explicit FixedDivider(U divisor) : d(divisor) {}
  MSFAST_HD QuotRem<U> divmod(U n) const { return {n / d, n % d}; }
};

// 32-bit: multiply-shift (Granlund and Montgomery): with s = ceil(log2 d) and
// m = floor(2^32 (2^s - d) / d) + 1, n / d = (mulhi(n, m) + n) >> s for every n < 2^31 (the
// sum then fits 32 bits), a few instructions instead of a division's dozens.
template <>
struct FixedDivider<uint32_t> {
  uint32_t d = 1, m = 1, s = 0;
  FixedDivider() = default;
  explicit FixedDivider(uint32_t divisor) : d(divisor) {
    while (s < 32 && (uint64_t{1} << s) < d) ++s;
    m = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << s) - d)) / d + 1);
  }
  MSFAST_HD QuotRem<uint32_t> divmod(uint32_t n) const {
#if defined(__CUDA_ARCH__)
    const uint32_t hi = __umulhi(n, m);
#else
    const uint32_t hi = static_cast<uint32_t>((static_cast<uint64_t>(n) * m) >> 32);
#endif
    const uint32_t q = (hi + n) >> s;
    return {q, n - q * d};
  }
};

template <typename I>
using Divider = FixedDivider<std::make_unsigned_t<I>>;

// The shape of a work item: P planes x V values, whether large NCHW planes run lane-strided,
// and whether every term has 1 or 2 taps per axis (then the kernel holds no loop over a
// run-time tap count, and needs far fewer registers). gather_plan.h picks one per call.
template <int P_, int V_, bool kLanes_, bool kShortTaps_>
struct ItemShape {
  static constexpr int P = P_, V = V_;
  static constexpr bool kLanes = kLanes_, kShortTaps = kShortTaps_;
};

// One input of an output job: its strides (a View's) and where its tap tables sit in the
// starts[] (int32) and weights[] (acc_t) arrays.
template <typename I>
struct GTerm {
  const void* src;
  I s_outer, s_inner, row, px;
  I ys, xs;  // offsets of the vertical / horizontal start[] in starts[]
  I yw, xw;  // offsets of their weights in weights[]
  int32_t Ky, Kx;
};

template <typename I>
struct GJob {
  void* dst;
  I s_outer, s_inner, row, px;
  Divider<I> group;   // items of a plane group (see job_items in gather_plan.h)
  Divider<I> chunks;  // consecutive chunks: items of a row, ceil(W / V) or W * ceil(C / V)
  Divider<I> cchunks; // channels_last: items of a pixel, ceil(C / V)
  Divider<I> pdiv;    // plane p is (image p / pdiv, channel p % pdiv)
  Divider<I> W;       // output width
  I H, HW, planes, groups;
  std::make_unsigned_t<I> first_item;  // prefix sum of items over jobs
  int32_t first_term, n_terms;
  I affine;  // offset of scale[C], shift[C] in weights[], or -1
  I channels;
  bool cl;
  bool lanes;  // NCHW, large planes: lane-strided values (see gather_item)
};

template <typename T>
MSFAST_HD T load_table(const T* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(p);  // read-only path: tables are small and read by every item
#else
  return *p;
#endif
}

// Where a work item writes and reads: the output pixel of each of its V values (NCHW) or
// the pixel and first channel of its chunk (channels_last), which of its values exist (a
// missing one is computed from clamped, valid reads and not stored), and its planes as
// (image, channel).
template <typename I, int P, int V>
struct GPos {
  I oy[V], ox[V];    // channels_last: the pixel, in [0]
  I c0;              // channels_last: channels c0 .. c0 + n - 1
  int n;             // consecutive chunks: values that exist
  bool ok[V];        // values that exist
  bool consecutive;  // the values are n consecutive elements of one row (NCHW) or pixel
  I pn[P], pc[P];
  int np;  // planes of the group that exist
};

// Adds one NCHW term: value v (pixel oy[v], ox[v]) gets sum_ky wy * (sum_kx wx * src).
// KY, KX: the tap counts where known at compile time (1 and 2: copies, nearest, bilinear
// upsampling; the loops unroll), 0 where read from the term (any count).
template <int P, int V, int KY, int KX, typename src_t, typename acc_t, typename I>
MSFAST_HD void add_term_rows(acc_t (&acc)[P][V], const GTerm<I>& tm, const GPos<I, P, V>& q,
                             const int32_t* starts, const acc_t* weights, I H, I W) {
  const int32_t ky_n = KY ? KY : tm.Ky, kx_n = KX ? KX : tm.Kx;
  I off[V];  // each value's first source tap, from its plane's start
#pragma unroll
  for (int v = 0; v < V; ++v)
    off[v] = load_table(starts + tm.ys + q.oy[v]) * tm.row + load_table(starts + tm.xs + q.ox[v]);
  // One pointer per plane: a load is then pointer + 32-bit offset.
  const src_t* base[P];
#pragma unroll
  for (int p = 0; p < P; ++p)
    base[p] = static_cast<const src_t*>(tm.src) + (q.pn[p] * tm.s_outer + q.pc[p] * tm.s_inner);
#pragma unroll
  for (int32_t ky = 0; ky < ky_n; ++ky) {
    const I r = ky * tm.row;
    // Taps outer, values and planes inner: the P * V loads of a tap are independent,
    // so a long filter (a downscale, a gradient) is a chain of Kx steps, not of V * Kx;
    // a known tap count (1 or 2) unrolls fully; a run-time one is not unrolled (registers).
    acc_t s[P][V];
#pragma unroll
    for (int p = 0; p < P; ++p)
#pragma unroll
      for (int v = 0; v < V; ++v) s[p][v] = acc_t(0);
#pragma unroll(KX > 0 ? KX : 1)
    for (int32_t kx = 0; kx < kx_n; ++kx) {
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const acc_t wx = load_table(weights + tm.xw + kx * W + q.ox[v]);
#pragma unroll
        for (int p = 0; p < P; ++p) s[p][v] += wx * static_cast<acc_t>(base[p][off[v] + r + kx]);
      }
    }
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const acc_t wy = load_table(weights + tm.yw + ky * H + q.oy[v]);
#pragma unroll
      for (int p = 0; p < P; ++p) acc[p][v] += wy * s[p][v];
    }
  }
}

// V consecutive values as one aligned unit: one vector load or store on a GPU.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// Adds one channels_last term: the V channels of a pixel share its taps, and each tap's
// values are consecutive in memory: on a GPU one vector load per tap and plane where the
// chunk is whole and every tap's address aligned (1 / V of the load instructions).
template <int P, int V, int KY, int KX, typename src_t, typename acc_t, typename I>
MSFAST_HD void add_term_pixel(acc_t (&acc)[P][V], const GTerm<I>& tm, const GPos<I, P, V>& q,
                              const int32_t* starts, const acc_t* weights, I H, I W) {
  const int32_t ky_n = KY ? KY : tm.Ky, kx_n = KX ? KX : tm.Kx;
  const I y0 = load_table(starts + tm.ys + q.oy[0]), x0 = load_table(starts + tm.xs + q.ox[0]);
  I c[V];  // channel offsets, clamped in a partial chunk
#pragma unroll
  for (int v = 0; v < V; ++v) c[v] = v < q.n ? v : q.n - 1;
  const src_t* base[P];
  bool vec = q.n == V && tm.row % V == 0 && tm.px % V == 0;
#pragma unroll
  for (int p = 0; p < P; ++p) {
    base[p] = static_cast<const src_t*>(tm.src) + (q.pn[p] * tm.s_outer + y0 * tm.row + x0 * tm.px + q.c0);
    vec = vec && reinterpret_cast<uintptr_t>(base[p]) % sizeof(Pack<src_t, V>) == 0;
  }
#if !defined(__CUDA_ARCH__)
  vec = false;  // (the host reads value by value: no type punning)
#endif
#pragma unroll
  for (int32_t ky = 0; ky < ky_n; ++ky) {
    const acc_t wy = load_table(weights + tm.yw + ky * H + q.oy[0]);
    acc_t s[P][V];
#pragma unroll
    for (int p = 0; p < P; ++p)
#pragma unroll
      for (int v = 0; v < V; ++v) s[p][v] = acc_t(0);
#pragma unroll(KX > 0 ? KX : 1)
    for (int32_t kx = 0; kx < kx_n; ++kx) {
      const acc_t wx = load_table(weights + tm.xw + kx * W + q.ox[0]);
      const I off = ky * tm.row + kx * tm.px;
#pragma unroll
      for (int p = 0; p < P; ++p) {
        src_t x[V];
        if (vec) {
          const Pack<src_t, V> pk = *reinterpret_cast<const Pack<src_t, V>*>(base[p] + off);
#pragma unroll
          for (int v = 0; v < V; ++v) x[v] = pk.v[v];
        } else {
#pragma unroll
          for (int v = 0; v < V; ++v) x[v] = base[p][off + c[v]];
        }
#pragma unroll
        for (int v = 0; v < V; ++v) s[p][v] += wx * static_cast<acc_t>(x[v]);
      }
    }
#pragma unroll
    for (int p = 0; p < P; ++p)
#pragma unroll
      for (int v = 0; v < V; ++v) acc[p][v] += wy * s[p][v];
  }
}

// Stores the first n of V consecutive values; on a GPU, one vector store where the chunk
// is whole and aligned.
template <int V, typename T>
MSFAST_HD void store_values(T* dst, const T (&v)[V], int n) {
#if defined(__CUDA_ARCH__)
  if (n == V && reinterpret_cast<uintptr_t>(dst) % sizeof(Pack<T, V>) == 0) {
    Pack<T, V> pk;
#pragma unroll
    for (int i = 0; i < V; ++i) pk.v[i] = v[i];
    *reinterpret_cast<Pack<T, V>*>(dst) = pk;
    return;
  }
#endif
#pragma unroll
  for (int i = 0; i < V; ++i)
    if (i < n) dst[i] = v[i];
}

// One term, in the job's layout, with KY x KX taps (0: read from the term).
template <int P, int V, int KY, int KX, typename src_t, typename acc_t, typename I>
MSFAST_HD void add_term(bool cl, acc_t (&acc)[P][V], const GTerm<I>& tm, const GPos<I, P, V>& q,
                        const int32_t* starts, const acc_t* weights, I H, I W) {
  if (cl) add_term_pixel<P, V, KY, KX, src_t>(acc, tm, q, starts, weights, H, W);
  else add_term_rows<P, V, KY, KX, src_t>(acc, tm, q, starts, weights, H, W);
}

// Computes and stores one work item: each value is the sum over terms of
// sum_ky wy * (sum_kx wx * src), in that order, whatever the plane, thread count and grid.
template <typename Shape, typename src_t, typename dst_t, typename acc_t, typename I>
MSFAST_HD void gather_item(const GJob<I>* jobs, int n_jobs, const GTerm<I>* terms, const int32_t* starts,
                           const acc_t* weights, std::make_unsigned_t<I> item) {
  using U = std::make_unsigned_t<I>;
  constexpr int P = Shape::P, V = Shape::V;
  // The job of this item: jobs are few, a binary search over their prefix sums.
  int lo = 0, hi = n_jobs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (jobs[mid].first_item <= item) lo = mid; else hi = mid - 1;
  }
  const GJob<I>& j = jobs[lo];
  const auto g = j.group.divmod(item - j.first_item);
  if (static_cast<I>(g.div) >= j.groups) return;  // padding before a lane-strided job
  GPos<I, P, V> q;
  q.c0 = 0;
  q.n = V;
  const bool lanes = Shape::kLanes && j.lanes;
  q.consecutive = !lanes;
  if (lanes) {
    // Large NCHW planes: the 32 lanes of a warp take 32 consecutive values of the plane
    // group, V times (value v of lane l in chunk w: w * 32 * V + 32 * v + l). Every
    // load of a table or source row and every store of a warp is then one contiguous run,
    // where V consecutive values per lane make V runs V values apart. (What that gains on
    // its own has not been measured apart from the other changes of its run.)
    const U w = g.mod >> 5, lane = g.mod & 31;
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const U f = w * (32 * V) + 32 * v + lane;
      q.ok[v] = f < static_cast<U>(j.HW);
      const auto yx = j.W.divmod(q.ok[v] ? f : static_cast<U>(j.HW - 1));
      q.oy[v] = static_cast<I>(yx.div);
      q.ox[v] = static_cast<I>(yx.mod);
    }
  } else {
    // Consecutive chunks: V consecutive pixels of a row (NCHW, small planes) or channels
    // of a pixel (channels_last), the last chunk of a row or pixel possibly partial.
    const auto r = j.chunks.divmod(g.mod);
    I oy = static_cast<I>(r.div), ox;
    if (j.cl) {
      const auto c = j.cchunks.divmod(r.mod);
      ox = static_cast<I>(c.div);
      q.c0 = static_cast<I>(c.mod) * V;
      q.n = static_cast<int>(msf_min<I>(V, j.channels - q.c0));
    } else {
      ox = static_cast<I>(r.mod) * V;
      q.n = static_cast<int>(msf_min<I>(V, static_cast<I>(j.W.d) - ox));
    }
#pragma unroll
    for (int v = 0; v < V; ++v) {
      q.ok[v] = v < q.n;
      q.oy[v] = oy;
      q.ox[v] = j.cl ? ox : ox + (v < q.n ? v : q.n - 1);
    }
  }
  // Past the last plane a slot repeats it (valid reads, no store), so the loops below need
  // no bounds.
  const I p0 = static_cast<I>(g.div) * P;
  q.np = j.planes - p0 < P ? static_cast<int>(j.planes - p0) : P;
#pragma unroll
  for (int p = 0; p < P; ++p) {
    const auto d = j.pdiv.divmod(static_cast<U>(p < q.np ? p0 + p : p0 + q.np - 1));
    q.pn[p] = static_cast<I>(d.div);
    q.pc[p] = static_cast<I>(d.mod);
  }
  acc_t acc[P][V];
#pragma unroll
  for (int p = 0; p < P; ++p)
#pragma unroll
    for (int v = 0; v < V; ++v) acc[p][v] = acc_t(0);
  const I W = static_cast<I>(j.W.d);
  for (int t = 0; t < j.n_terms; ++t) {
    const GTerm<I>& tm = terms[j.first_term + t];
    if constexpr (Shape::kShortTaps) {
      if (tm.Ky == 1) {
        if (tm.Kx == 1) add_term<P, V, 1, 1, src_t>(j.cl, acc, tm, q, starts, weights, j.H, W);
        else add_term<P, V, 1, 2, src_t>(j.cl, acc, tm, q, starts, weights, j.H, W);
      } else {
        if (tm.Kx == 1) add_term<P, V, 2, 1, src_t>(j.cl, acc, tm, q, starts, weights, j.H, W);
        else add_term<P, V, 2, 2, src_t>(j.cl, acc, tm, q, starts, weights, j.H, W);
      }
    } else {
      if (tm.Ky == 1 && tm.Kx == 1) add_term<P, V, 1, 1, src_t>(j.cl, acc, tm, q, starts, weights, j.H, W);
      else if (tm.Ky == 2 && tm.Kx == 2) add_term<P, V, 2, 2, src_t>(j.cl, acc, tm, q, starts, weights, j.H, W);
      else add_term<P, V, 0, 0, src_t>(j.cl, acc, tm, q, starts, weights, j.H, W);
    }
  }
#pragma unroll
  for (int p = 0; p < P; ++p) {
    if (p < q.np) {
      dst_t out[V];
#pragma unroll
      for (int v = 0; v < V; ++v) {
        acc_t x = acc[p][v];
        if (j.affine >= 0) {
          const I c = j.cl ? q.c0 + (v < q.n ? v : 0) : q.pc[p];
          x = x * load_table(weights + j.affine + c) + load_table(weights + j.affine + j.channels + c);
        }
        out[v] = static_cast<dst_t>(x);
      }
      dst_t* d = static_cast<dst_t*>(j.dst) + (q.pn[p] * j.s_outer + q.pc[p] * j.s_inner);
      if (q.consecutive) {
        store_values(d + (q.oy[0] * j.row + q.ox[0] * j.px + q.c0), out, q.n);
      } else {
#pragma unroll
        for (int v = 0; v < V; ++v)
          if (q.ok[v]) d[q.oy[v] * j.row + q.ox[v]] = out[v];
      }
    }
  }
}

// ------------------------------------------------------------------------------ tiles
// The tiled path (experimental on CUDA, see gather_plan.h: make_tile_plan): for calls whose
// jobs are NCHW, one term each, 1 or 2 taps per axis, with starts that never decrease
// (fpn_concat's forward: upscales and a copy). A CUDA block takes one tile of an output plane
// (up to 128 columns, rows for up to about 4096 values: fpn_concat's 56x56 planes are one
// tile) at a time. It first copies the source window the tile reads (rows and columns between
// its first and last taps) into shared memory as acc_t, with coalesced loads, several in
// flight per thread. Then each thread takes one column of the tile and walks down its rows:
// the column's horizontal taps are loaded once, and per value there are only the row's taps
// (one address for the lanes of a warp on the same row), the window's values and one store,
// coalesced across the warp. The gather kernel's work items each wait on their own chain of table and source
// loads, and load the horizontal taps again for every value; they left fpn_concat's forward
// at 40% of the copy roofline on an H200. The sums are gather_item's, term by term in the
// same order: sum_ky wy * (sum_kx wx * src).

// Per job, beside its GJob: the tile grid.
template <typename I>
struct TileJob {
  I tr, tc;               // tile rows, columns
  Divider<I> col_tiles;   // tiles across a row
  Divider<I> plane_tiles; // tiles per plane
  std::make_unsigned_t<I> first_tile;  // prefix sum of tiles over jobs
};

// One tile: its plane (image pn, channel pc), its output rows [oy0, oy0 + th) and columns
// [ox0, ox0 + tw), and the source window [r0, r0 + nr) x [c0, c0 + nc) its taps read.
template <typename I>
struct TilePos {
  int job;
  I pn, pc, oy0, ox0, th, tw, r0, nr, c0, nc;
};

// Threads of a CUDA block of the tiled path: thread t stages the window's elements t,
// t + kTileThreads, ... and computes one column of the tile (the CPU runner runs them in the
// same way, thread by thread).
constexpr int kTileThreads = 128;

template <typename I>
MSFAST_HD TilePos<I> tile_pos(const TileJob<I>* tjobs, const GJob<I>* jobs, int n_jobs, const GTerm<I>* terms,
                              const int32_t* starts, std::make_unsigned_t<I> tile) {
  int lo = 0, hi = n_jobs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (tjobs[mid].first_tile <= tile) lo = mid; else hi = mid - 1;
  }
  const TileJob<I>& t = tjobs[lo];
  const GJob<I>& j = jobs[lo];
  const GTerm<I>& tm = terms[j.first_term];
  TilePos<I> p;
  p.job = lo;
  const auto pl = t.plane_tiles.divmod(tile - t.first_tile);
  const auto rc = t.col_tiles.divmod(pl.mod);
  const auto nc = j.pdiv.divmod(pl.div);
  p.pn = static_cast<I>(nc.div);
  p.pc = static_cast<I>(nc.mod);
  p.oy0 = static_cast<I>(rc.div) * t.tr;
  p.ox0 = static_cast<I>(rc.mod) * t.tc;
  const I W = static_cast<I>(j.W.d);
  p.th = msf_min<I>(t.tr, j.H - p.oy0);
  p.tw = msf_min<I>(t.tc, W - p.ox0);
  // Starts never decrease (make_tile_plan checks): the window spans the first row's first tap
  // to the last row's last.
  p.r0 = load_table(starts + tm.ys + p.oy0);
  p.nr = load_table(starts + tm.ys + p.oy0 + p.th - 1) + tm.Ky - p.r0;
  p.c0 = load_table(starts + tm.xs + p.ox0);
  p.nc = load_table(starts + tm.xs + p.ox0 + p.tw - 1) + tm.Kx - p.c0;
  return p;
}

// Walks a row-major grid of `cols` columns from index `first` in steps of `step`, with no
// division per step: (r, c) advance by (step / cols, step % cols) and carry.
template <typename I>
struct GridWalk {
  I r, c, dr, dc, cols;
  MSFAST_HD GridWalk(I first, I step, I cols_) : cols(cols_) {
    r = first / cols;
    c = first - r * cols;
    dr = step / cols;
    dc = step - dr * cols;
  }
  MSFAST_HD void next() {
    r += dr;
    c += dc;
    if (c >= cols) {
      c -= cols;
      ++r;
    }
  }
};

// Thread t's share of the tile: the block's threads form floor(threads / tw) groups of tw,
// group g takes rows g, g + groups, ..., and thread t the tile's column t % tw (threads past
// the last whole group idle: 16 of 128 for fpn_concat's 56 columns). KY, KX: the tap counts,
// as template arguments so that the loops unroll.
template <int KY, int KX, typename dst_t, typename acc_t, typename I>
MSFAST_HD void tile_column_taps(const GJob<I>& j, const GTerm<I>& tm, const TilePos<I>& p, const int32_t* starts,
                                const acc_t* weights, const acc_t* win, I t, I threads) {
  const I groups = threads / p.tw, g = t / p.tw, x = t - g * p.tw;
  if (g >= groups) return;
  // Everything the row loop needs, in locals: the descriptors sit in shared memory, and with
  // the loop's store (through a pointer that could be shared memory, for all the compiler
  // knows) between two reads, an earlier build read them again for every value (its SASS:
  // 46 instructions a value).
  const I H = j.H, row = j.row, nc = p.nc, r0 = p.r0, ox = p.ox0 + x;
  const I xo = load_table(starts + tm.xs + ox) - p.c0;  // the column's first tap, in the window
  acc_t wx[KX];
#pragma unroll
  for (int kx = 0; kx < KX; ++kx) wx[kx] = load_table(weights + tm.xw + kx * static_cast<I>(j.W.d) + ox);
  const bool affine = j.affine >= 0;
  acc_t scale = acc_t(1), shift = acc_t(0);
  if (affine) {
    scale = load_table(weights + j.affine + p.pc);
    shift = load_table(weights + j.affine + j.channels + p.pc);
  }
  const I first = p.oy0 + g;
  const int32_t* ys = starts + tm.ys + first;  // the row's first tap, then its weights
  const acc_t* wy = weights + tm.yw + first;
  dst_t* d = static_cast<dst_t*>(j.dst) + (p.pn * j.s_outer + p.pc * j.s_inner + first * row + ox);
  // The pointers step to the next row only when there is one (never past the end): 64-bit
  // addresses recomputed from a 32-bit row index took about 10 of an earlier build's 39
  // instructions a value.
  const I step = groups * row;
  for (I r = g; r < p.th;) {
    const acc_t* w0 = win + ((load_table(ys) - r0) * nc + xo);
    acc_t acc = acc_t(0);
#pragma unroll
    for (int ky = 0; ky < KY; ++ky) {
      acc_t s = acc_t(0);
#pragma unroll
      for (int kx = 0; kx < KX; ++kx) s += wx[kx] * w0[ky * nc + kx];
      acc += load_table(wy + ky * H) * s;
    }
    if (affine) acc = acc * scale + shift;
    *d = static_cast<dst_t>(acc);
    r += groups;
    if (r >= p.th) break;
    ys += groups;
    wy += groups;
    d += step;
  }
}

template <typename dst_t, typename acc_t, typename I>
MSFAST_HD void tile_column(const GJob<I>& j, const GTerm<I>& tm, const TilePos<I>& p, const int32_t* starts,
                           const acc_t* weights, const acc_t* win, I t, I threads) {
  if (tm.Ky == 1) {
    if (tm.Kx == 1) tile_column_taps<1, 1, dst_t>(j, tm, p, starts, weights, win, t, threads);
    else tile_column_taps<1, 2, dst_t>(j, tm, p, starts, weights, win, t, threads);
  } else {
    if (tm.Kx == 1) tile_column_taps<2, 1, dst_t>(j, tm, p, starts, weights, win, t, threads);
    else tile_column_taps<2, 2, dst_t>(j, tm, p, starts, weights, win, t, threads);
  }
}

// Copies the window's elements first, first + step, ... into win (row-major, nc a row),
// kTileBatch loads at a time, all issued before their stores: a load that follows a store to
// shared memory must wait for it (a generic source pointer may alias it), and one element at
// a time left each thread with a single load in flight (seen in an earlier build's SASS).
constexpr int kTileBatch = 8;

template <typename src_t, typename acc_t, typename I>
MSFAST_HD void tile_stage(const GTerm<I>& tm, const TilePos<I>& p, acc_t* win, I first, I step) {
  const src_t* s = static_cast<const src_t*>(tm.src) + (p.pn * tm.s_outer + p.pc * tm.s_inner + p.r0 * tm.row + p.c0);
  for (GridWalk<I> g(first, step, p.nc); g.r < p.nr;) {
    acc_t v[kTileBatch];
    I at[kTileBatch];  // window index, -1 past its end
#pragma unroll
    for (int b = 0; b < kTileBatch; ++b) {
      const bool ok = g.r < p.nr;
      at[b] = ok ? g.r * p.nc + g.c : I(-1);
      v[b] = ok ? static_cast<acc_t>(s[g.r * tm.row + g.c]) : acc_t(0);
      g.next();
    }
#pragma unroll
    for (int b = 0; b < kTileBatch; ++b)
      if (at[b] >= 0) win[at[b]] = v[b];
  }
}

}  // namespace msfast
