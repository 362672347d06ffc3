// Host-side planning shared by the CPU and CUDA kernels: argument checks, the per-axis tap
// tables built once per call from index_math.h, and the description of how a 4-D tensor
// (NCHW or channels_last, possibly a channel slice of a larger tensor) is walked.
#pragma once

#include <ATen/ATen.h>
#include <ATen/LegacyVmapTransforms.h>

#include <string>
#include <type_traits>
#include <vector>

#include "msfast/index_math.h"

namespace msfast {

inline int mode_from_string(const std::string& m) {
  if (m == "nearest") return kNearest;
  if (m == "nearest-exact") return kNearestExact;
  if (m == "bilinear") return kBilinear;
  if (m == "bicubic") return kBicubic;
  if (m == "area") return kArea;
  TORCH_CHECK_VALUE(false, "msfast: mode must be one of 'nearest', 'nearest-exact', 'bilinear', "
                    "'bicubic', 'area', got '", m, "'");
}

// Taps of one axis, padded to the same count K for every output index so that inner loops
// run a fixed trip count: output o reads inputs start[o] .. start[o] + K - 1 with weights
// w[o * K ..]. Padding shifts the window left at the far border and adds zero weights, so
// start[o] + K <= in always holds and nothing is read out of bounds.
template <typename T>
struct Table {
  int64_t in = 0, out = 0, K = 0;
  std::vector<int64_t> start;
  std::vector<T> w;
};

template <typename T>
Table<T> forward_table(const Axis& a) {
  Table<T> t;
  t.in = a.in;
  t.out = a.out;
  const int64_t cap = max_taps<T>(a);
  std::vector<int64_t> first(a.out), count(a.out);
  std::vector<T> raw(a.out * cap);
  int64_t K = 1;
  for (int64_t o = 0; o < a.out; ++o) {
    T* w = raw.data() + o * cap;
    count[o] = axis_taps<T>(a, o, &first[o], w);
    // Drop zero weights at either end (antialias at scale 1 yields taps {1, 0}): the row
    // becomes a copy instead of a two-tap filter. Only 0 * inf = nan could tell them apart.
    while (count[o] > 1 && w[count[o] - 1] == T(0)) --count[o];
    int64_t lead = 0;
    while (lead < count[o] - 1 && w[lead] == T(0)) ++lead;
    if (lead > 0) {
      for (int64_t k = lead; k < count[o]; ++k) w[k - lead] = w[k];
      first[o] += lead;
      count[o] -= lead;
    }
    // Keep every tap inside the input whatever the arguments (the operators check that sizes
    // and scales agree; this makes a disagreement a wrong value, never a wild read).
    if (first[o] < 0 || first[o] + count[o] > a.in) {
      const int64_t lo = std::max<int64_t>(first[o], 0), hi = std::min<int64_t>(first[o] + count[o], a.in);
      if (hi <= lo) {
        first[o] = std::min<int64_t>(std::max<int64_t>(first[o], 0), a.in - 1);
        count[o] = 1;
        w[0] = T(0);
      } else {
        for (int64_t k = lo; k < hi; ++k) w[k - lo] = w[k - first[o]];
        first[o] = lo;
        count[o] = hi - lo;
      }
    }
    K = std::max(K, count[o]);
  }
  t.K = K;
  t.start.resize(a.out);
  t.w.assign(a.out * K, T(0));
  for (int64_t o = 0; o < a.out; ++o) {
    const int64_t s = std::min(first[o], a.in - K);
    const int64_t shift = first[o] - s;
    t.start[o] = s;
    for (int64_t k = 0; k < count[o]; ++k) t.w[o * K + shift + k] = raw[o * cap + k];
  }
  return t;
}

// The transpose of a table: for every input index, the outputs that read it and with which
// weight. The backward is then the same gather as the forward, run with this table: each
// gradient element is written once by one thread, with no atomics, in a fixed order.
template <typename T>
Table<T> adjoint_table(const Table<T>& f) {
  Table<T> t;
  t.in = f.out;
  t.out = f.in;
  std::vector<int64_t> lo(f.in, INT64_MAX), hi(f.in, -1);
  for (int64_t o = 0; o < f.out; ++o) {
    for (int64_t k = 0; k < f.K; ++k) {
      if (f.w[o * f.K + k] == T(0)) continue;  // padding and exact zeros add nothing
      const int64_t i = f.start[o] + k;
      lo[i] = std::min(lo[i], o);
      hi[i] = std::max(hi[i], o);
    }
  }
  int64_t K = 1;
  for (int64_t i = 0; i < f.in; ++i) {
    if (hi[i] < 0) lo[i] = hi[i] = 0;  // input never read: zero gradient
    K = std::max(K, hi[i] - lo[i] + 1);
  }
  t.K = K;
  t.start.resize(f.in);
  t.w.assign(f.in * K, T(0));
  for (int64_t i = 0; i < f.in; ++i) t.start[i] = std::min(lo[i], f.out - K);
  for (int64_t o = 0; o < f.out; ++o) {
    for (int64_t k = 0; k < f.K; ++k) {
      const T v = f.w[o * f.K + k];
      if (v == T(0)) continue;
      const int64_t i = f.start[o] + k;
      t.w[i * K + (o - t.start[i])] += v;
    }
  }
  return t;
}

// How a kernel walks a 4-D tensor [N, C, H, W]: as `planes` independent images of H rows
// of W pixels, each pixel `cp` contiguous values, `px` elements apart. NCHW: one plane per
// (n, c), cp = 1. channels_last: one plane per n, cp = C (a channel slice of a larger
// channels_last tensor has px > cp). Plane p starts at (p / pdiv) * s_outer + (p % pdiv) * s_inner.
struct View {
  void* data = nullptr;
  int64_t planes = 0, pdiv = 1, s_outer = 0, s_inner = 0;
  int64_t H = 0, W = 0, row = 0, px = 0, cp = 0;
  int64_t channels = 0;  // C of the tensor: the channel of an element is needed for mean/std
  bool cl = false;
  // (No division where the planes are evenly spaced: a division per plane showed in the
  // profile of small planes.)
  int64_t plane_offset(int64_t p) const {
    return s_outer == pdiv * s_inner ? p * s_inner : (p / pdiv) * s_outer + (p % pdiv) * s_inner;
  }
};

inline View make_view(const at::Tensor& t, bool channels_last) {
  View v;
  v.data = t.data_ptr();
  v.H = t.size(2);
  v.W = t.size(3);
  v.row = t.stride(2);
  v.channels = t.size(1);
  v.cl = channels_last;
  if (channels_last) {
    TORCH_CHECK(t.stride(1) == 1 || t.size(1) == 1, "msfast: internal: channels_last view needs unit channel stride");
    v.planes = t.size(0);
    v.pdiv = 1;
    v.s_outer = t.stride(0);
    v.px = t.stride(3);
    v.cp = t.size(1);
  } else {
    TORCH_CHECK(t.stride(3) == 1 || t.size(3) == 1, "msfast: internal: NCHW view needs unit width stride");
    v.planes = t.size(0) * t.size(1);
    v.pdiv = t.size(1);
    v.s_outer = t.stride(0);
    v.s_inner = t.stride(1);
    v.px = 1;
    v.cp = 1;
  }
  return v;
}

// A tensor batched by PyTorch's older vmap (the autograd formulas run under it for batched
// gradients: csrc/legacy_vmap.cpp) answers no stride or layout query; one of its samples, a
// plain tensor with the same strides, answers for it.
inline at::Tensor layout_sample(const at::Tensor& t) {
  if (!at::isBatchedTensor(t)) return t;
  at::Tensor p = at::MultiBatchVmapTransform::logicalToPhysical(t).tensor();  // the batch dimensions first
  while (p.dim() > t.dim()) p = p.select(0, 0);
  return p;
}

// The layout rule of every operator (msfast/_args.py:is_channels_last is the same): a call
// runs channels_last when ATen's suggest_memory_format says so, the rule that gives
// F.interpolate's output its memory format. So a channels_last tensor sliced along C or W
// (not dense) runs, and returns, channels_last as it does in F.interpolate.
inline bool is_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && layout_sample(t).suggest_memory_format() == at::MemoryFormat::ChannelsLast;
}

inline bool pyramid_normalizes(at::ScalarType in, at::ScalarType out, bool mean, bool std) {
  return in == at::kByte || in != out || mean || std;
}

// The layouts of one resize, both as F.interpolate takes them from the tensor it resizes:
// `channels_last`, the layout the call runs in and returns (is_channels_last), and
// `nearest_channels_last`, whether that tensor is channels_last contiguous, which picks ATen's
// CPU nearest formulas (index_math.h: NearestRule). The tensor is x itself, or for a normalized
// pyramid (pyramid_normalizes) x_norm: a new tensor with empty_like(x)'s strides, x's where x
// is dense, else dense in x's stride order (infer_dense_strides), which an empty meta tensor
// stands for here. (A symbolic shape is made concrete in that one case.)
struct Layouts {
  bool channels_last;
  bool nearest_channels_last;
};
inline Layouts resize_layouts(const at::Tensor& batched_or_not, bool normalized) {
  const at::Tensor x = layout_sample(batched_or_not);
  if (!normalized || x.is_non_overlapping_and_dense())
    return {is_channels_last(x), x.is_contiguous(at::MemoryFormat::ChannelsLast)};
  std::vector<int64_t> sizes, strides;
  for (const auto& v : x.sym_sizes()) sizes.push_back(v.guard_int(__FILE__, __LINE__));
  for (const auto& v : x.sym_strides()) strides.push_back(v.guard_int(__FILE__, __LINE__));
  const auto like = at::empty_strided(sizes, at::infer_dense_strides(sizes, strides),
                                      at::TensorOptions().dtype(x.dtype()).device(at::kMeta));
  return {is_channels_last(like), like.is_contiguous(at::MemoryFormat::ChannelsLast)};
}

// A stand-in for a tensor of these sizes and strides (an empty meta tensor), which answers
// every layout query: for functorch's batched tensors under torch.vmap, which answer few
// (is_contiguous(channels_last) is "NYI"), and for Python. Symbolic sizes are made concrete.
inline at::Tensor strides_only(c10::SymIntArrayRef sym_sizes, c10::SymIntArrayRef sym_strides) {
  std::vector<int64_t> sizes, strides;
  for (const auto& v : sym_sizes) sizes.push_back(v.guard_int(__FILE__, __LINE__));
  for (const auto& v : sym_strides) strides.push_back(v.guard_int(__FILE__, __LINE__));
  return at::empty_strided(sizes, strides, at::TensorOptions().dtype(at::kByte).device(at::kMeta));
}
inline at::Tensor strides_only(const at::Tensor& t) { return strides_only(t.sym_sizes(), t.sym_strides()); }

inline at::MemoryFormat format_of(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// The operators read NCHW and channels_last strides natively. Anything else (a sliced or
// expanded tensor) is made dense once here, explicitly, in the layout the call runs in.
inline at::Tensor dense_in(const at::Tensor& t, bool channels_last) {
  if (layout_sample(t).is_contiguous(format_of(channels_last))) return t;
  // The older vmap batches contiguous() and permutes, not contiguous(channels_last).
  if (channels_last && at::isBatchedTensor(t)) return t.permute({0, 2, 3, 1}).contiguous().permute({0, 3, 1, 2});
  return t.contiguous(format_of(channels_last));
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

// Calls f(S{}, D{}, A{}) for source dtype st and destination dtype dt, with the accumulation
// type A: float32, or float64 for a float64 destination. Both backends dispatch here.
template <typename F>
void with_types(at::ScalarType st, at::ScalarType dt, F&& f) {
  with_type(st, [&](auto s) {
    with_type(dt, [&](auto d) {
      using S = decltype(s);
      using D = decltype(d);
      if constexpr (std::is_same_v<D, uint8_t>) {
        TORCH_CHECK_TYPE(false, "msfast: uint8 output is not supported");
      } else {
        // The destination's type decides, as in the reference, whose levels are F.interpolate
        // of x converted to their type: a float64 input with float32 levels is resampled in
        // float32 (in float64, its indices and weights differed from F.interpolate's by up to
        // an ulp of a float32 index: 3.5e-5 in 80-pixel rows).
        using A = std::conditional_t<std::is_same_v<D, double>, double, float>;
        f(S{}, D{}, A{});
      }
    });
  });
}

inline void check_4d(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 4, "msfast: ", name, " must be a 4-D [N, C, H, W] tensor, got ",
                    t.dim(), "-D with shape ", t.sizes());
}

}  // namespace msfast
