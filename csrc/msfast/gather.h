// The CUDA kernel's arithmetic, host+device: how one work item (one output position in up to
// kPlanes planes) is computed from the job descriptors and the tap tables. The CUDA kernel
// (csrc/cuda/resample_cuda.cu) calls gather_item for its items; the CPU backend can run the
// very same function over all items (csrc/cpu/gather_cpu.cpp, msfast._C._set_cpu_runner), so
// CPU-only CI checks the CUDA path's indexing, descriptors and tables against the reference.
//
// Work items: item = group * S + s, where s runs over the S = H * W * inner values of one
// plane (NCHW: a plane is an image's channel, inner = 1; channels_last: a plane is an image,
// inner = C, so s = (oy * W + ox) * C + c) and group over kPlanes consecutive planes. So the
// 32 threads of a warp take 32 consecutive values of the same planes: every load and store
// of a warp is one contiguous run (the first GPU run, with 4 consecutive values per thread,
// spent its time on uncoalesced loads of tables and inputs). A thread reads its position's
// tables (start, weights) once for its kPlanes planes, which the sums share.
// Tables are tap-major (weight k of output o at k * out + o), so that a warp's weight loads
// are contiguous too.
//
// Index type I: int32_t when every offset of the call fits (the common case: 32-bit
// arithmetic and multiply-shift division are several times cheaper on a GPU than 64-bit),
// int64_t otherwise.
#pragma once

#include <stdint.h>

#include <type_traits>

#include "msfast/index_math.h"

namespace msfast {

constexpr int kPlanes = 4;

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
  Divider<I> spatial, inner, W, pdiv;  // S = H * W * inner; inner = C (channels_last) or 1
  I H, planes;
  std::make_unsigned_t<I> first_item;  // prefix sum of items over jobs
  int32_t first_term, n_terms;
  I affine;  // offset of scale[C], shift[C] in weights[], or -1
  I channels;
  bool cl;
};

template <typename T>
MSFAST_HD T load_table(const T* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(p);  // read-only path: tables are small and read by every item
#else
  return *p;
#endif
}

// Adds one term to the sums of the group's planes: sum_ky wy * (sum_kx wx * src). KY, KX: the
// tap counts where known at compile time (1 and 2: copies, nearest, bilinear upsampling; the
// loops unroll), 0 where read from the term (any count).
template <int KY, int KX, typename src_t, typename acc_t, typename I>
MSFAST_HD void add_term(acc_t (&acc)[kPlanes], const GTerm<I>& tm, const I (&pn)[kPlanes], const I (&pc)[kPlanes],
                        const int32_t* starts, const acc_t* weights, I oy, I ox, I ch, I H, I W) {
  const int32_t ky_n = KY ? KY : tm.Ky, kx_n = KX ? KX : tm.Kx;
  const I y0 = load_table(starts + tm.ys + oy), x0 = load_table(starts + tm.xs + ox);
  const src_t* src = static_cast<const src_t*>(tm.src) + (y0 * tm.row + x0 * tm.px + ch);
  I poff[kPlanes];  // offsets, not pointers: half the registers
#pragma unroll
  for (int p = 0; p < kPlanes; ++p) poff[p] = pn[p] * tm.s_outer + pc[p] * tm.s_inner;
#pragma unroll
  for (int32_t ky = 0; ky < ky_n; ++ky) {
    const acc_t wy = load_table(weights + tm.yw + ky * H + oy);
    acc_t s[kPlanes];
#pragma unroll
    for (int p = 0; p < kPlanes; ++p) s[p] = acc_t(0);
#pragma unroll
    for (int32_t kx = 0; kx < kx_n; ++kx) {
      const acc_t wx = load_table(weights + tm.xw + kx * W + ox);
      const I off = ky * tm.row + kx * tm.px;
#pragma unroll
      for (int p = 0; p < kPlanes; ++p) s[p] += wx * static_cast<acc_t>(src[poff[p] + off]);
    }
#pragma unroll
    for (int p = 0; p < kPlanes; ++p) acc[p] += wy * s[p];
  }
}

// Computes and stores one output value in each of up to kPlanes planes. Each value is
// sum over terms of sum_ky wy * (sum_kx wx * src), in that order: the same arithmetic for
// every plane, thread count and grid.
template <typename src_t, typename dst_t, typename acc_t, typename I>
MSFAST_HD void gather_item(const GJob<I>* jobs, int n_jobs, const GTerm<I>* terms, const int32_t* starts,
                           const acc_t* weights, std::make_unsigned_t<I> item) {
  // The job of this item: jobs are few, a binary search over their prefix sums.
  int lo = 0, hi = n_jobs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (jobs[mid].first_item <= item) lo = mid; else hi = mid - 1;
  }
  const GJob<I>& j = jobs[lo];
  const auto g = j.spatial.divmod(item - j.first_item);
  auto pix = g.mod;
  I ch = 0;  // channels_last: the channel
  if (j.cl) {
    const auto c = j.inner.divmod(pix);
    ch = static_cast<I>(c.mod);
    pix = c.div;
  }
  const auto xy = j.W.divmod(pix);
  const I ox = static_cast<I>(xy.mod), oy = static_cast<I>(xy.div), W = static_cast<I>(j.W.d);
  // The group's planes as (image, channel); past the last plane a slot repeats it (valid
  // reads, no store), so the loops below need no bounds.
  const I p0 = static_cast<I>(g.div) * kPlanes;
  const int np = j.planes - p0 < kPlanes ? static_cast<int>(j.planes - p0) : kPlanes;
  I pn[kPlanes], pc[kPlanes];
#pragma unroll
  for (int p = 0; p < kPlanes; ++p) {
    const auto q = j.pdiv.divmod(static_cast<std::make_unsigned_t<I>>(p < np ? p0 + p : p0 + np - 1));
    pn[p] = static_cast<I>(q.div);
    pc[p] = static_cast<I>(q.mod);
  }
  acc_t acc[kPlanes];
#pragma unroll
  for (int p = 0; p < kPlanes; ++p) acc[p] = acc_t(0);
  for (int t = 0; t < j.n_terms; ++t) {
    const GTerm<I>& tm = terms[j.first_term + t];
    if (tm.Ky == 1 && tm.Kx == 1)
      add_term<1, 1, src_t>(acc, tm, pn, pc, starts, weights, oy, ox, ch, j.H, W);
    else if (tm.Ky == 2 && tm.Kx == 2)
      add_term<2, 2, src_t>(acc, tm, pn, pc, starts, weights, oy, ox, ch, j.H, W);
    else
      add_term<0, 0, src_t>(acc, tm, pn, pc, starts, weights, oy, ox, ch, j.H, W);
  }
#pragma unroll
  for (int p = 0; p < kPlanes; ++p) {
    if (p < np) {
      acc_t v = acc[p];
      if (j.affine >= 0) {
        const I c = j.cl ? ch : pc[p];
        v = v * load_table(weights + j.affine + c) + load_table(weights + j.affine + j.channels + c);
      }
      static_cast<dst_t*>(j.dst)[pn[p] * j.s_outer + pc[p] * j.s_inner + oy * j.row + ox * j.px + ch] =
          static_cast<dst_t>(v);
    }
  }
}

}  // namespace msfast
