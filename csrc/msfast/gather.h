// The CUDA kernel's arithmetic, host+device: how one work item (kVec values in each of up to
// kPlanes planes) is computed from the job descriptors and the tap tables. The CUDA kernel
// (csrc/cuda/resample_cuda.cu) calls gather_item for its items; the CPU backend can run the
// very same function over all items (csrc/cpu/gather_cpu.cpp, msfast._C._set_cpu_runner), so
// CPU-only CI checks the CUDA path's indexing, descriptors and tables against the reference.
//
// Work items: a plane is an image's channel (NCHW) or an image (channels_last); a job's
// planes go in groups of kPlanes, and an item's values share their planes, so what a thread
// decodes (its job, planes, pointers) and each table load serve kPlanes values. Within a
// group, items take (gather_plan.h: group_items)
//  - large NCHW planes: lane-strided chunks, the 32 lanes of a warp on 32 consecutive
//    values of a plane, kVec times (see gather_item);
//  - small NCHW planes: kVec consecutive pixels of a row, each with its own horizontal taps;
//  - channels_last: kVec consecutive channels of a pixel, sharing its taps (one vector load
//    per tap and plane on a GPU).
// The first GPU runs, with one value in four planes per item, were bound by instruction issue
// (about 90 instructions per value); the second, with 4 consecutive pixels of a row in two
// planes, by L1 requests (a warp's loads were four runs 16 bytes apart).
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

constexpr int kPlanes = 4;  // planes per work item
constexpr int kVec = 2;     // consecutive values per plane per work item

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
  Divider<I> chunks;  // consecutive chunks: items of a row, ceil(W / kVec) or W * ceil(C / kVec)
  Divider<I> cchunks; // channels_last: items of a pixel, ceil(C / kVec)
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

// Where a work item writes and reads: the output pixel of each of its kVec values (NCHW) or
// the pixel and first channel of its chunk (channels_last), which of its values exist (a
// missing one is computed from clamped, valid reads and not stored), and its planes as
// (image, channel).
template <typename I>
struct GPos {
  I oy[kVec], ox[kVec];  // channels_last: the pixel, in [0]
  I c0;                  // channels_last: channels c0 .. c0 + n - 1
  int n;                 // consecutive chunks: values that exist
  bool ok[kVec];         // values that exist
  bool consecutive;      // the values are n consecutive elements of one row (NCHW) or pixel
  I pn[kPlanes], pc[kPlanes];
  int np;  // planes of the group that exist
};

// Adds one NCHW term: value v (pixel oy[v], ox[v]) gets sum_ky wy * (sum_kx wx * src).
// KY, KX: the tap counts where known at compile time (1 and 2: copies, nearest, bilinear
// upsampling; the loops unroll), 0 where read from the term (any count).
template <int KY, int KX, typename src_t, typename acc_t, typename I>
MSFAST_HD void add_term_rows(acc_t (&acc)[kPlanes][kVec], const GTerm<I>& tm, const GPos<I>& q,
                             const int32_t* starts, const acc_t* weights, I H, I W) {
  const int32_t ky_n = KY ? KY : tm.Ky, kx_n = KX ? KX : tm.Kx;
  I off[kVec];  // each value's first source tap, from its plane's start
#pragma unroll
  for (int v = 0; v < kVec; ++v)
    off[v] = load_table(starts + tm.ys + q.oy[v]) * tm.row + load_table(starts + tm.xs + q.ox[v]);
  // One pointer per plane: a load is then pointer + 32-bit offset.
  const src_t* base[kPlanes];
#pragma unroll
  for (int p = 0; p < kPlanes; ++p)
    base[p] = static_cast<const src_t*>(tm.src) + (q.pn[p] * tm.s_outer + q.pc[p] * tm.s_inner);
#pragma unroll
  for (int32_t ky = 0; ky < ky_n; ++ky) {
    const I r = ky * tm.row;
    // Taps outer, values and planes inner: the kPlanes * kVec loads of a tap are independent,
    // so a long filter (a downscale, a gradient) is a chain of Kx steps, not of kVec * Kx;
    // unrolled by 2, two taps' loads are in flight at once (a step waits for its loads).
    acc_t s[kPlanes][kVec];
#pragma unroll
    for (int p = 0; p < kPlanes; ++p)
#pragma unroll
      for (int v = 0; v < kVec; ++v) s[p][v] = acc_t(0);
#pragma unroll 1
    for (int32_t kx = 0; kx < kx_n; ++kx) {
#pragma unroll
      for (int v = 0; v < kVec; ++v) {
        const acc_t wx = load_table(weights + tm.xw + kx * W + q.ox[v]);
#pragma unroll
        for (int p = 0; p < kPlanes; ++p) s[p][v] += wx * static_cast<acc_t>(base[p][off[v] + r + kx]);
      }
    }
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      const acc_t wy = load_table(weights + tm.yw + ky * H + q.oy[v]);
#pragma unroll
      for (int p = 0; p < kPlanes; ++p) acc[p][v] += wy * s[p][v];
    }
  }
}

// kVec consecutive values as one aligned unit: one vector load or store on a GPU.
template <typename T>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

// Adds one channels_last term: the kVec channels of a pixel share its taps, and each tap's
// values are consecutive in memory: on a GPU one vector load per tap and plane where the
// chunk is whole and every tap's address aligned (a quarter of the load instructions).
template <int KY, int KX, typename src_t, typename acc_t, typename I>
MSFAST_HD void add_term_pixel(acc_t (&acc)[kPlanes][kVec], const GTerm<I>& tm, const GPos<I>& q,
                              const int32_t* starts, const acc_t* weights, I H, I W) {
  const int32_t ky_n = KY ? KY : tm.Ky, kx_n = KX ? KX : tm.Kx;
  const I y0 = load_table(starts + tm.ys + q.oy[0]), x0 = load_table(starts + tm.xs + q.ox[0]);
  I c[kVec];  // channel offsets, clamped in a partial chunk
#pragma unroll
  for (int v = 0; v < kVec; ++v) c[v] = v < q.n ? v : q.n - 1;
  const src_t* base[kPlanes];
  bool vec = q.n == kVec && tm.row % kVec == 0 && tm.px % kVec == 0;
#pragma unroll
  for (int p = 0; p < kPlanes; ++p) {
    base[p] = static_cast<const src_t*>(tm.src) + (q.pn[p] * tm.s_outer + y0 * tm.row + x0 * tm.px + q.c0);
    vec = vec && reinterpret_cast<uintptr_t>(base[p]) % sizeof(Pack<src_t>) == 0;
  }
#if !defined(__CUDA_ARCH__)
  vec = false;  // (the host reads value by value: no type punning)
#endif
#pragma unroll
  for (int32_t ky = 0; ky < ky_n; ++ky) {
    const acc_t wy = load_table(weights + tm.yw + ky * H + q.oy[0]);
    acc_t s[kPlanes][kVec];
#pragma unroll
    for (int p = 0; p < kPlanes; ++p)
#pragma unroll
      for (int v = 0; v < kVec; ++v) s[p][v] = acc_t(0);
#pragma unroll 1
    for (int32_t kx = 0; kx < kx_n; ++kx) {
      const acc_t wx = load_table(weights + tm.xw + kx * W + q.ox[0]);
      const I off = ky * tm.row + kx * tm.px;
#pragma unroll
      for (int p = 0; p < kPlanes; ++p) {
        src_t x[kVec];
        if (vec) {
          const Pack<src_t> pk = *reinterpret_cast<const Pack<src_t>*>(base[p] + off);
#pragma unroll
          for (int v = 0; v < kVec; ++v) x[v] = pk.v[v];
        } else {
#pragma unroll
          for (int v = 0; v < kVec; ++v) x[v] = base[p][off + c[v]];
        }
#pragma unroll
        for (int v = 0; v < kVec; ++v) s[p][v] += wx * static_cast<acc_t>(x[v]);
      }
    }
#pragma unroll
    for (int p = 0; p < kPlanes; ++p)
#pragma unroll
      for (int v = 0; v < kVec; ++v) acc[p][v] += wy * s[p][v];
  }
}

// Stores the first n of kVec consecutive values; on a GPU, one vector store where the chunk
// is whole and aligned (a warp's stores are then full 16-byte runs).
template <typename T>
MSFAST_HD void store_values(T* dst, const T (&v)[kVec], int n) {
#if defined(__CUDA_ARCH__)
  if (n == kVec && reinterpret_cast<uintptr_t>(dst) % sizeof(Pack<T>) == 0) {
    Pack<T> pk;
#pragma unroll
    for (int i = 0; i < kVec; ++i) pk.v[i] = v[i];
    *reinterpret_cast<Pack<T>*>(dst) = pk;
    return;
  }
#endif
#pragma unroll
  for (int i = 0; i < kVec; ++i)
    if (i < n) dst[i] = v[i];
}

// Computes and stores one work item: each value is the sum over terms of
// sum_ky wy * (sum_kx wx * src), in that order, whatever the plane, thread count and grid.
template <typename src_t, typename dst_t, typename acc_t, typename I>
MSFAST_HD void gather_item(const GJob<I>* jobs, int n_jobs, const GTerm<I>* terms, const int32_t* starts,
                           const acc_t* weights, std::make_unsigned_t<I> item) {
  using U = std::make_unsigned_t<I>;
  // The job of this item: jobs are few, a binary search over their prefix sums.
  int lo = 0, hi = n_jobs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (jobs[mid].first_item <= item) lo = mid; else hi = mid - 1;
  }
  const GJob<I>& j = jobs[lo];
  const auto g = j.group.divmod(item - j.first_item);
  if (static_cast<I>(g.div) >= j.groups) return;  // padding before a lane-strided job
  GPos<I> q;
  q.c0 = 0;
  q.n = kVec;
  q.consecutive = !j.lanes;
  if (j.lanes) {
    // Large NCHW planes: the 32 lanes of a warp take 32 consecutive values of the plane
    // group, kVec times (value v of lane l in chunk w: w * 32 * kVec + 32 * v + l). Every
    // load of a table or source row and every store of a warp is then one contiguous run;
    // with 4 consecutive values per lane (the second GPU run) each was four runs 16 bytes
    // apart, several L1 requests where one does.
    const U w = g.mod >> 5, lane = g.mod & 31;
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      const U f = w * (32 * kVec) + 32 * v + lane;
      q.ok[v] = f < static_cast<U>(j.HW);
      const auto yx = j.W.divmod(q.ok[v] ? f : static_cast<U>(j.HW - 1));
      q.oy[v] = static_cast<I>(yx.div);
      q.ox[v] = static_cast<I>(yx.mod);
    }
  } else {
    // Consecutive chunks: kVec consecutive pixels of a row (NCHW, small planes) or channels
    // of a pixel (channels_last), the last chunk of a row or pixel possibly partial.
    const auto r = j.chunks.divmod(g.mod);
    I oy = static_cast<I>(r.div), ox;
    if (j.cl) {
      const auto c = j.cchunks.divmod(r.mod);
      ox = static_cast<I>(c.div);
      q.c0 = static_cast<I>(c.mod) * kVec;
      q.n = static_cast<int>(msf_min<I>(kVec, j.channels - q.c0));
    } else {
      ox = static_cast<I>(r.mod) * kVec;
      q.n = static_cast<int>(msf_min<I>(kVec, static_cast<I>(j.W.d) - ox));
    }
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      q.ok[v] = v < q.n;
      q.oy[v] = oy;
      q.ox[v] = j.cl ? ox : ox + (v < q.n ? v : q.n - 1);
    }
  }
  // Past the last plane a slot repeats it (valid reads, no store), so the loops below need
  // no bounds.
  const I p0 = static_cast<I>(g.div) * kPlanes;
  q.np = j.planes - p0 < kPlanes ? static_cast<int>(j.planes - p0) : kPlanes;
#pragma unroll
  for (int p = 0; p < kPlanes; ++p) {
    const auto d = j.pdiv.divmod(static_cast<U>(p < q.np ? p0 + p : p0 + q.np - 1));
    q.pn[p] = static_cast<I>(d.div);
    q.pc[p] = static_cast<I>(d.mod);
  }
  acc_t acc[kPlanes][kVec];
#pragma unroll
  for (int p = 0; p < kPlanes; ++p)
#pragma unroll
    for (int v = 0; v < kVec; ++v) acc[p][v] = acc_t(0);
  const I W = static_cast<I>(j.W.d);
  for (int t = 0; t < j.n_terms; ++t) {
    const GTerm<I>& tm = terms[j.first_term + t];
    const bool k11 = tm.Ky == 1 && tm.Kx == 1, k22 = tm.Ky == 2 && tm.Kx == 2;
    if (j.cl) {
      if (k11) add_term_pixel<1, 1, src_t>(acc, tm, q, starts, weights, j.H, W);
      else if (k22) add_term_pixel<2, 2, src_t>(acc, tm, q, starts, weights, j.H, W);
      else add_term_pixel<0, 0, src_t>(acc, tm, q, starts, weights, j.H, W);
    } else {
      if (k11) add_term_rows<1, 1, src_t>(acc, tm, q, starts, weights, j.H, W);
      else if (k22) add_term_rows<2, 2, src_t>(acc, tm, q, starts, weights, j.H, W);
      else add_term_rows<0, 0, src_t>(acc, tm, q, starts, weights, j.H, W);
    }
  }
#pragma unroll
  for (int p = 0; p < kPlanes; ++p) {
    if (p < q.np) {
      dst_t out[kVec];
#pragma unroll
      for (int v = 0; v < kVec; ++v) {
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
        for (int v = 0; v < kVec; ++v)
          if (q.ok[v]) d[q.oy[v] * j.row + q.ox[v]] = out[v];
      }
    }
  }
}

}  // namespace msfast
