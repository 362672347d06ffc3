// The CUDA kernel's arithmetic, host+device: how one work item (kVec consecutive outputs of
// one output run) is computed from the job descriptors and the tap tables. The CUDA kernel
// (csrc/cuda/resample_cuda.cu) calls gather_item for its items; the CPU backend can run the
// very same function over all items (csrc/cpu/gather_cpu.cpp, msfast._C._set_cpu_runner), so
// CPU-only CI checks the CUDA path's indexing, descriptors and tables against the reference.
//
// Work items: item = ((plane * H + oy) * mid + m) * chunks + chunk. A run of `inner`
// contiguous output values is cut into chunks of kVec: NCHW, a run is an output row
// (inner = W, mid = 1); channels_last, the C channels of pixel m (inner = C, mid = W). A
// thread computes a chunk's kVec values together: the index arithmetic and vertical taps are
// shared, and the store can be one aligned vector store.
//
// Index type I: int32_t when every offset of the call fits (the common case: 32-bit
// arithmetic and multiply-shift division are several times cheaper on a GPU than 64-bit),
// int64_t otherwise.
#pragma once

#include <stdint.h>

#include <type_traits>

#include "msfast/index_math.h"

namespace msfast {

constexpr int kVec = 4;

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
  Divider<I> chunks, mid, H, pdiv;
  std::make_unsigned_t<I> inner, first_item;  // first_item: prefix sum of items over jobs
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

template <typename T>
struct alignas(sizeof(T) * kVec) Packed {
  T v[kVec];
};

// Computes and stores the kVec (or fewer, at a run's end) outputs of one work item.
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
  const auto q = j.chunks.divmod(item - j.first_item);
  const auto m = j.mid.divmod(q.div);
  const auto y = j.H.divmod(m.div);
  const auto p = j.pdiv.divmod(y.div);  // NCHW: (n, c); channels_last: (n, 0)
  const I oy = static_cast<I>(y.mod), n = static_cast<I>(p.div), pc = static_cast<I>(p.mod);
  const I px_cl = static_cast<I>(m.mod);  // channels_last: the output pixel of the run
  const I i0 = static_cast<I>(q.mod) * kVec;
  const I left = static_cast<I>(j.inner) - i0;
  const int nv = left < kVec ? static_cast<int>(left) : kVec;
  acc_t acc[kVec];
#pragma unroll
  for (int v = 0; v < kVec; ++v) acc[v] = acc_t(0);
  for (int t = 0; t < j.n_terms; ++t) {
    const GTerm<I>& tm = terms[j.first_term + t];
    const I y0 = load_table(starts + tm.ys + oy);
    const acc_t* wy = weights + tm.yw + oy * tm.Ky;
    const src_t* rows = static_cast<const src_t*>(tm.src) + (n * tm.s_outer + pc * tm.s_inner + y0 * tm.row);
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      if (v < nv) {
        const I ox = j.cl ? px_cl : i0 + v;
        const I x0 = load_table(starts + tm.xs + ox);
        const acc_t* wx = weights + tm.xw + ox * tm.Kx;
        const src_t* s0 = rows + (x0 * tm.px + (j.cl ? i0 + v : I(0)));
        for (int32_t ky = 0; ky < tm.Ky; ++ky) {
          const src_t* r = s0 + ky * tm.row;
          acc_t s = acc_t(0);
          for (int32_t kx = 0; kx < tm.Kx; ++kx) s += load_table(wx + kx) * static_cast<acc_t>(r[kx * tm.px]);
          acc[v] += load_table(wy + ky) * s;
        }
      }
    }
  }
  if (j.affine >= 0) {
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      const I c = j.cl ? i0 + v : pc;
      if (v < nv) acc[v] = acc[v] * load_table(weights + j.affine + c) + load_table(weights + j.affine + j.channels + c);
    }
  }
  dst_t* out = static_cast<dst_t*>(j.dst) + (n * j.s_outer + pc * j.s_inner + oy * j.row + (j.cl ? px_cl * j.px : I(0)) + i0);
  if (nv == kVec && reinterpret_cast<uintptr_t>(out) % sizeof(Packed<dst_t>) == 0) {
    Packed<dst_t> pk;
#pragma unroll
    for (int v = 0; v < kVec; ++v) pk.v[v] = static_cast<dst_t>(acc[v]);
    *reinterpret_cast<Packed<dst_t>*>(out) = pk;
  } else {
#pragma unroll
    for (int v = 0; v < kVec; ++v)
      if (v < nv) out[v] = static_cast<dst_t>(acc[v]);
  }
}

}  // namespace msfast
