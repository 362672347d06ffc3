// The one place where msfast decides which source pixels feed an output pixel, and with
// which weights. CPU and CUDA kernels both call these functions (they are host+device), so
// the two backends cannot drift apart, and the CPU tests exercise the arithmetic the GPU runs.
//
// Every mode msfast supports is separable: along one axis, output index `o` is a weighted
// sum over a contiguous range of input indices [first, first + count). The formulas follow
// ATen (aten/src/ATen/native/UpSample.h and the antialias helpers of UpSampleKernel.cpp)
// operation for operation, including their float rounding (floorf on the source index, the
// float `scale` of the nearest modes), because "exact to F.interpolate" is the contract.
#pragma once

#include <stdint.h>

#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MSFAST_HD __host__ __device__ __forceinline__
#else
#define MSFAST_HD inline
#endif

namespace msfast {

// Kept in sync with msfast/_ops.py (_MODES).
enum Mode : int {
  kNearest = 0,       // F.interpolate mode="nearest" (legacy floor(o * scale))
  kNearestExact = 1,  // mode="nearest-exact" (floor((o + 0.5) * scale))
  kBilinear = 2,      // mode="bilinear", antialias on or off
  kBicubic = 3,       // mode="bicubic", antialias on or off
  kArea = 4,          // mode="area" == adaptive_avg_pool2d
};

template <typename T>
MSFAST_HD T msf_min(T a, T b) { return a < b ? a : b; }
template <typename T>
MSFAST_HD T msf_fma(T a, T b, T c) {
#if defined(__CUDA_ARCH__)
  return fma(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}
template <typename T>
MSFAST_HD T msf_max(T a, T b) { return a < b ? b : a; }

// One axis of a resize: everything needed to compute its taps.
// `scale_opt` is the user's scale factor (output / input) when the level was given by
// scale, and <= 0 when it was given by size; ATen uses 1 / scale_factor in that case, not
// in / out, and the two differ (7 * 0.6 -> 4 pixels, ratio 1.667 against 1.75).
//
// `nearest` picks which of ATen's nearest-neighbour formulas to follow; they differ in
// rounding, and msfast follows the one F.interpolate would run, so nearest modes are bitwise
// equal to it:
//   kNearestCpuGeneric: the CPU's generic kernel (the HelperInterpNearest formulas);
//   kNearestCpuChannelsLast: the CPU's channels-last kernel (nearest_idx / nearest_exact_idx),
//     which ATen takes when the input is channels_last with C > 3, or out_h + out_w <= 128;
//   kNearestCuda: the CUDA kernels (nearest_neighbor[_exact]_compute_source_index): the
//     channels-last formulas, with the identity for an axis whose size does not change (in
//     both modes) but no 2x shortcut.
enum NearestRule : int { kNearestCpuGeneric = 0, kNearestCpuChannelsLast = 1, kNearestCuda = 2 };

struct Axis {
  int mode;
  bool antialias;
  bool align_corners;
  int64_t in;
  int64_t out;
  double scale_opt;
  int nearest = kNearestCpuGeneric;
};

// ATen's compute_scales_value.
template <typename T>
MSFAST_HD T scales_value(const Axis& a) {
  return a.scale_opt > 0. ? static_cast<T>(1.0 / a.scale_opt)
                          : static_cast<T>(a.in) / static_cast<T>(a.out);
}

// ATen's area_pixel_compute_scale.
template <typename T>
MSFAST_HD T pixel_scale(const Axis& a) {
  if (a.align_corners) {
    return a.out > 1 ? static_cast<T>(a.in - 1) / static_cast<T>(a.out - 1) : T(0);
  }
  return scales_value<T>(a);
}

// ATen's area_pixel_compute_source_index, with the multiply-add fused as ATen's builds compile
// it: its CPU kernels for AVX2 and AVX-512 (GCC contracts a * b - c into one FMA where the
// target has it) and its CUDA kernels (nvcc does by default). The one rounding moves the index,
// and with it the weights, by an ulp of the index: unfused, float32 bilinear and bicubic
// levels 3000 pixels wide differed from F.interpolate by up to 3.6e-4.
template <typename T>
MSFAST_HD T source_index(T scale, int64_t o, bool align_corners, bool cubic) {
  if (align_corners) return scale * static_cast<T>(o);
  T src = msf_fma<T>(scale, static_cast<T>(o) + T(0.5), T(-0.5));
  return (!cubic && src < T(0)) ? T(0) : src;
}

// ATen's cubic convolution kernels (Keys); A = -0.75 without antialias, -0.5 with it. Each
// product that feeds an addition is fused with it, as in source_index: ((A + 2) * x - (A + 3))
// * x * x + 1 and ((A * x - 5A) * x + 8A) * x - 4A as ATen's FMA builds compute them.
template <typename T>
MSFAST_HD T cubic1(T x, T A) { return msf_fma<T>(msf_fma<T>(A + 2, x, -(A + 3)) * x, x, T(1)); }
template <typename T>
MSFAST_HD T cubic2(T x, T A) { return msf_fma<T>(msf_fma<T>(msf_fma<T>(A, x, -5 * A), x, 8 * A), x, -4 * A); }

template <typename T>
MSFAST_HD T aa_filter(int mode, T x) {
  x = x < T(0) ? -x : x;
  if (mode == kBilinear) return x < T(1) ? T(1) - x : T(0);
  // bicubic
  if (x < T(1)) return cubic1<T>(x, T(-0.5));
  if (x < T(2)) return cubic2<T>(x, T(-0.5));
  return T(0);
}

// Upper bound on the taps of one output index along this axis (ATen's max_interp_size for
// antialias; the exact count is returned by axis_taps).
template <typename T>
MSFAST_HD int64_t max_taps(const Axis& a) {
  switch (a.mode) {
    case kNearest:
    case kNearestExact:
      return 1;
    case kArea:
      // adaptive pooling windows span at most ceil(in / out) + 1 inputs
      return msf_min<int64_t>(a.in, (a.in + a.out - 1) / a.out + 1);
    default:
      break;
  }
  const int interp = a.mode == kBilinear ? 2 : 4;
  if (!a.antialias) return msf_min<int64_t>(a.in, interp);
  const T scale = pixel_scale<T>(a);
  const T support = scale >= T(1) ? T(interp) * T(0.5) * scale : T(interp) * T(0.5);
  return msf_min<int64_t>(a.in, static_cast<int64_t>(ceil(support)) * 2 + 1);
}

// The taps of output index `o`: writes the first input index to *first and the weights of
// inputs first, first+1, ... to w[0..count), returns count (>= 1, <= max_taps(a)). Where
// ATen reads the same clamped input twice (bilinear at the last pixel, bicubic near the
// borders) the weights are merged into one tap, so the range stays contiguous.
template <typename T>
MSFAST_HD int64_t axis_taps(const Axis& a, int64_t o, int64_t* first, T* w) {
  const int64_t last = a.in - 1;
  if (a.mode == kNearest || a.mode == kNearestExact) {
    float f;
    if (a.nearest != kNearestCpuGeneric) {
      // nearest_idx / nearest_exact_idx: a float scale, shortcuts for 1x and 2x (see
      // NearestRule), and (o + 0.5) * s in double for nearest-exact; floorf rounds to float
      // first. The CUDA kernels compute (o + 0.5f) * s in float: the same value, since the
      // exact product of two floats fits a double, which then rounds to float as the float
      // product does.
      const float s = scales_value<float>(a);
      const bool cpu = a.nearest == kNearestCpuChannelsLast;
      if (a.out == a.in && (!cpu || a.mode == kNearest)) {
        f = static_cast<float>(o);
      } else if (cpu && a.mode == kNearest && a.out == 2 * a.in) {
        f = static_cast<float>(o >> 1);
      } else {
        f = a.mode == kNearest ? static_cast<float>(o) * s
                               : static_cast<float>((static_cast<double>(o) + 0.5) * s);
      }
    } else {
      // HelperInterpNearest(Exact): the scale in the op type; exact rounds src + 0.5.
      const T s = scales_value<T>(a);
      if (a.mode == kNearest) {
        f = static_cast<float>(s * static_cast<T>(o));
      } else {
        // s * (o + 0.5) - 0.5, fused as ATen's FMA builds compile it: the one rounding
        // decides ties such as row 20 of 2 -> 41 rows (20.5 * 2 / 41 == 1 exactly).
        T src = msf_fma<T>(s, static_cast<T>(o) + T(0.5), T(-0.5));
        src = src < T(0) ? T(0) : src;
        f = static_cast<float>(static_cast<double>(src) + 0.5);
      }
    }
    *first = msf_min<int64_t>(static_cast<int64_t>(floorf(f)), last);
    w[0] = T(1);
    return 1;
  }
  if (a.mode == kArea) {
    // ATen's adaptive pooling start_index / end_index, in integer arithmetic.
    const int64_t start = (o * a.in) / a.out;
    const int64_t end = ((o + 1) * a.in + a.out - 1) / a.out;
    const T inv = T(1) / static_cast<T>(end - start);
    for (int64_t k = 0; k < end - start; ++k) w[k] = inv;
    *first = start;
    return end - start;
  }
  const T scale = pixel_scale<T>(a);
  if (a.antialias) {
    // ATen's _compute_indices_min_size_weights_aa (float input: align_corners_delta = 0).
    const int interp = a.mode == kBilinear ? 2 : 4;
    const T support = scale >= T(1) ? T(interp) * T(0.5) * scale : T(interp) * T(0.5);
    const T center = scale * (static_cast<T>(o) + T(0.5));
    const T invscale = scale >= T(1) ? T(1) / scale : T(1);
    const int64_t xmin = msf_max<int64_t>(static_cast<int64_t>(center - support + T(0.5)), 0);
    int64_t xsize = msf_min<int64_t>(static_cast<int64_t>(center + support + T(0.5)), a.in) - xmin;
    xsize = msf_max<int64_t>(msf_min<int64_t>(xsize, max_taps<T>(a)), 0);
    T total = T(0);
    for (int64_t k = 0; k < xsize; ++k) {
      const T v = aa_filter<T>(a.mode, (static_cast<T>(k + xmin) - center + T(0.5)) * invscale);
      w[k] = v;
      total += v;
    }
    if (total != T(0)) {
      for (int64_t k = 0; k < xsize; ++k) w[k] /= total;
    }
    if (xsize == 0) {  // cannot happen for in >= 1; keeps the contract count >= 1
      w[0] = T(0);
      xsize = 1;
    }
    *first = xmin;
    return xsize;
  }
  if (a.mode == kBilinear) {
    // ATen's compute_source_index_and_lambda.
    if (a.out == a.in) {
      *first = o;
      w[0] = T(1);
      return 1;
    }
    const T real = source_index<T>(scale, o, a.align_corners, false);
    const int64_t i0 = msf_min<int64_t>(static_cast<int64_t>(floorf(static_cast<float>(real))), last);
    const T l1 = msf_min<T>(msf_max<T>(real - static_cast<T>(i0), T(0)), T(1));
    const T l0 = T(1) - l1;
    *first = i0;
    if (i0 < last) {
      w[0] = l0;
      w[1] = l1;
      return 2;
    }
    w[0] = l0 + l1;
    return 1;
  }
  // bicubic without antialias: 4 taps around floor(real), indices clamped to the image.
  const T real = source_index<T>(scale, o, a.align_corners, true);
  const int64_t i0 = msf_min<int64_t>(static_cast<int64_t>(floorf(static_cast<float>(real))), last);
  const T t = msf_min<T>(msf_max<T>(real - static_cast<T>(i0), T(0)), T(1));
  const T c[4] = {cubic2<T>(t + T(1), T(-0.75)), cubic1<T>(t, T(-0.75)),
                  cubic1<T>(T(1) - t, T(-0.75)), cubic2<T>((T(1) - t) + T(1), T(-0.75))};
  const int64_t lo = msf_max<int64_t>(i0 - 1, 0);
  const int64_t hi = msf_min<int64_t>(i0 + 2, last);
  for (int64_t k = 0; k <= hi - lo; ++k) w[k] = T(0);
  for (int k = 0; k < 4; ++k) {
    const int64_t i = msf_min<int64_t>(msf_max<int64_t>(i0 - 1 + k, 0), last);
    w[i - lo] += c[k];
  }
  *first = lo;
  return hi - lo + 1;
}

}  // namespace msfast
