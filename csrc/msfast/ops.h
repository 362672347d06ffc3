// The device-independent half of every operator: argument checks, output allocation and a
// list of jobs that says what each output is made of. A backend (CPU or CUDA) only has to
// run jobs; it never sees the operator that asked for them.
#pragma once

#include <ATen/ATen.h>

#include <map>
#include <mutex>
#include <optional>
#include <tuple>
#include <utility>
#include <string>
#include <vector>

#include "msfast/plan.h"

namespace msfast {

// dst += resize(src) along two axes; `adjoint` runs the transpose of the resize (a gradient).
struct Term {
  at::Tensor src;
  Axis h, w;
  bool adjoint = false;
};

// dst = (sum of its terms, in order) * scale[c] + shift[c]. Every term of a job and its dst
// share one layout (`channels_last`), so planes and pixels line up.
struct Job {
  at::Tensor dst;
  std::vector<Term> terms;
  bool channels_last = false;
  std::vector<double> scale, shift;  // per channel of dst; empty when there is no affine
};

using Runner = void (*)(const std::vector<Job>& jobs);

// The tap table of one axis (transposed for a gradient), from a small process-wide cache:
// building it, one axis_taps per output index, took about a tenth of a one-image 224x224
// pyramid call. The key is everything the table depends on; the cache holds at most
// kTableCacheBytes of tables and starts over when full.
template <typename T>
Table<T> cached_table(const Axis& a, bool adjoint) {
  constexpr size_t kTableCacheBytes = size_t{8} << 20;
  using Key = std::tuple<int, bool, bool, int64_t, int64_t, double, int, bool>;
  const Key key{a.mode, a.antialias, a.align_corners, a.in, a.out, a.scale_opt, a.nearest, adjoint};
  static std::mutex mu;
  static std::map<Key, Table<T>> cache;
  static size_t bytes = 0;
  {
    std::lock_guard<std::mutex> g(mu);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  Table<T> t = adjoint ? adjoint_table(forward_table<T>(a)) : forward_table<T>(a);
  const size_t size = t.start.size() * sizeof(int64_t) + t.w.size() * sizeof(T);
  std::lock_guard<std::mutex> g(mu);
  if (bytes + size > kTableCacheBytes) {
    cache.clear();
    bytes = 0;
  }
  if (size <= kTableCacheBytes && cache.emplace(key, t).second) bytes += size;
  return t;
}

// The tap tables (vertical, horizontal) of a term, in the accumulation type. A gradient runs
// the forward axis (in -> out) transposed: it maps out -> in.
template <typename T>
std::pair<Table<T>, Table<T>> term_tables(const Term& t) {
  return {cached_table<T>(t.h, t.adjoint), cached_table<T>(t.w, t.adjoint)};
}

// What a backend checks before running jobs: every tensor on its device type, one source
// dtype and one destination dtype. Returns (source dtype, destination dtype).
std::pair<at::ScalarType, at::ScalarType> check_jobs(const std::vector<Job>& jobs, c10::DeviceType device);

// An output tensor: on the CPU large ones come from msfast's cache of page-faulted-in
// blocks (csrc/cpu/out_cache.cpp), elsewhere from at::empty.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& opts, bool channels_last);
void empty_cpu_cache();

std::vector<at::Tensor> pyramid_impl(const at::Tensor& x, at::IntArrayRef sizes,
                                     at::ArrayRef<double> scales, const std::string& mode,
                                     bool antialias, bool align_corners,
                                     std::optional<at::ArrayRef<double>> mean,
                                     std::optional<at::ArrayRef<double>> std,
                                     std::optional<at::ScalarType> out_dtype, Runner run);

at::Tensor pyramid_backward_impl(const std::vector<std::optional<at::Tensor>>& grads,
                                 at::IntArrayRef input_shape,
                                 at::ArrayRef<double> scales, const std::string& mode,
                                 bool antialias, bool align_corners,
                                 std::optional<at::ArrayRef<double>> std, at::ScalarType dtype,
                                 bool channels_last, bool nearest_channels_last, Runner run);

at::Tensor upsample_concat_impl(const std::vector<at::Tensor>& features, at::IntArrayRef size,
                                const std::string& mode, bool align_corners,
                                std::optional<at::Tensor> out, Runner run);

std::vector<at::Tensor> upsample_concat_backward_impl(const at::Tensor& grad,
                                                      at::IntArrayRef feature_shapes,
                                                      const std::string& mode, bool align_corners,
                                                      bool channels_last,
                                                      const c10::List<bool>& nearest_channels_last, Runner run);

}  // namespace msfast

#include <torch/library.h>

namespace msfast {

// The kernels a backend registers: the operator bodies above bound to its Runner. Both
// backends register through this one template, so their signatures cannot differ.
template <Runner run>
struct Kernels {
  static std::vector<at::Tensor> pyramid(const at::Tensor& x, at::IntArrayRef sizes,
                                         std::optional<at::ArrayRef<double>> scales,
                                         std::string mode, bool antialias, bool align_corners,
                                         std::optional<at::ArrayRef<double>> mean,
                                         std::optional<at::ArrayRef<double>> std,
                                         std::optional<at::ScalarType> out_dtype) {
    return pyramid_impl(x, sizes, scales.value_or(at::ArrayRef<double>{}), mode, antialias, align_corners, mean,
                        std, out_dtype, run);
  }
  static at::Tensor pyramid_backward(const c10::List<std::optional<at::Tensor>>& grads, at::IntArrayRef input_shape,
                                     std::optional<at::ArrayRef<double>> scales, std::string mode,
                                     bool antialias, bool align_corners, std::optional<at::ArrayRef<double>> std,
                                     at::ScalarType dtype, bool channels_last, bool nearest_channels_last) {
    std::vector<std::optional<at::Tensor>> g(grads.begin(), grads.end());
    return pyramid_backward_impl(g, input_shape, scales.value_or(at::ArrayRef<double>{}), mode, antialias,
                                 align_corners, std, dtype, channels_last, nearest_channels_last, run);
  }
  // Tensor[] as at::TensorList: the C++ autograd kernels (csrc/autograd.cpp) call these
  // unboxed, and the dispatcher finds the dispatch keys of a TensorList (not of a std::vector).
  static at::Tensor upsample_concat(at::TensorList features, at::IntArrayRef size, std::string mode,
                                    bool align_corners) {
    return upsample_concat_impl(features.vec(), size, mode, align_corners, std::nullopt, run);
  }
  static void upsample_concat_out(at::TensorList features, at::IntArrayRef size, std::string mode,
                                  bool align_corners, at::Tensor& out) {
    upsample_concat_impl(features.vec(), size, mode, align_corners, out, run);
  }
  static std::vector<at::Tensor> upsample_concat_backward(const at::Tensor& grad, at::IntArrayRef feature_shapes,
                                                          std::string mode, bool align_corners, bool channels_last,
                                                          const c10::List<bool>& nearest_channels_last) {
    return upsample_concat_backward_impl(grad, feature_shapes, mode, align_corners, channels_last,
                                         nearest_channels_last, run);
  }
  static void register_all(torch::Library& m) {
    m.impl("pyramid", &pyramid);
    m.impl("pyramid_backward", &pyramid_backward);
    m.impl("upsample_concat", &upsample_concat);
    m.impl("upsample_concat.out", &upsample_concat_out);
    m.impl("upsample_concat_backward", &upsample_concat_backward);
  }
};

}  // namespace msfast
