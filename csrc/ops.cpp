// The operators' schemas (the one place they are declared) and their device-independent
// bodies: checks, output allocation, and the jobs a backend runs.
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include <cmath>
#include <utility>

#include "msfast/ops.h"

namespace msfast {
namespace {

bool is_float_type(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

void check_levels(at::IntArrayRef sizes, at::ArrayRef<double> scales, int mode, int64_t H, int64_t W) {
  TORCH_CHECK_VALUE(!sizes.empty() && sizes.size() % 2 == 0,
                    "msfast: sizes must hold one (h, w) pair per level, got ", sizes.size(), " values");
  for (auto s : sizes) TORCH_CHECK_VALUE(s >= 1, "msfast: every output size must be >= 1, got ", sizes);
  const auto levels = static_cast<int64_t>(sizes.size() / 2);
  TORCH_CHECK_VALUE(scales.empty() || static_cast<int64_t>(scales.size()) == levels,
                    "msfast: scales must be empty or hold one value per level (", levels, "), got ",
                    scales.size());
  for (size_t k = 0; k < scales.size(); ++k) {
    const double s = scales[k];
    TORCH_CHECK_VALUE(std::isfinite(s) && s > 0, "msfast: scales must be positive and finite, got ", s);
    // The kernels use the scale for the source index and the size for the extent: the two
    // must agree as F.interpolate makes them (int64(in * scale)), or indices leave the input.
    if (mode == kArea) continue;
    const auto h = static_cast<int64_t>(static_cast<double>(H) * s);
    const auto w = static_cast<int64_t>(static_cast<double>(W) * s);
    TORCH_CHECK_VALUE(sizes[2 * k] == h && sizes[2 * k + 1] == w, "msfast: level ", k, " has size (",
                      sizes[2 * k], ", ", sizes[2 * k + 1], ") but scale ", s, " of a ", H, "x", W,
                      " input gives (", h, ", ", w, ")");
  }
}

void check_mode(int mode, bool antialias) {
  TORCH_CHECK_VALUE(!antialias || mode == kBilinear || mode == kBicubic,
                    "msfast: antialias is only supported with mode 'bilinear' or 'bicubic'");
}

int concat_mode(const std::string& name) {
  const int mode = mode_from_string(name);
  TORCH_CHECK_VALUE(mode == kNearest || mode == kNearestExact || mode == kBilinear || mode == kBicubic,
                    "msfast: upsample_concat supports modes 'bilinear', 'bicubic', 'nearest' and "
                    "'nearest-exact', got '", name, "'");
  return mode;
}

// Which nearest formulas F.interpolate would run (see Axis::nearest): on the CPU, ATen's
// choice of kernel; `cl` is the call's layout.
int nearest_rule(const at::Tensor& t, bool cl, int64_t C, int64_t out_h, int64_t out_w) {
  if (t.is_cuda()) return kNearestCuda;
  return (cl && C > 3) || out_h + out_w <= 128 ? kNearestCpuChannelsLast : kNearestCpuGeneric;
}

// The two axes of a resize of `t` (its device decides the nearest rule) from (H, W) to
// (h, w). Area mode never uses the scale (F.interpolate recomputes the size and calls
// adaptive_avg_pool2d), every other mode uses 1 / scale when one was given (scale <= 0: none).
std::pair<Axis, Axis> axes(const at::Tensor& t, int mode, bool antialias, bool align_corners, bool cl, int64_t C,
                           int64_t H, int64_t W, int64_t h, int64_t w, double scale) {
  const double s = mode == kArea ? 0.0 : scale;
  const int rule = nearest_rule(t, cl, C, h, w);
  return {Axis{mode, antialias, align_corners, H, h, s, rule}, Axis{mode, antialias, align_corners, W, w, s, rule}};
}

std::vector<double> per_channel(std::optional<at::ArrayRef<double>> v, int64_t C, const char* name) {
  if (!v) return {};
  TORCH_CHECK_VALUE(static_cast<int64_t>(v->size()) == C, "msfast: ", name,
                    " must have one value per channel (", C, "), got ", v->size());
  for (double d : *v) TORCH_CHECK_VALUE(std::isfinite(d), "msfast: ", name, " must be finite, got ", d);
  return v->vec();
}

}  // namespace

std::pair<at::ScalarType, at::ScalarType> check_jobs(const std::vector<Job>& jobs, c10::DeviceType device) {
  const auto st = jobs[0].terms[0].src.scalar_type(), dt = jobs[0].dst.scalar_type();
  for (const auto& j : jobs) {
    TORCH_CHECK(j.dst.scalar_type() == dt, "msfast: internal: mixed destination dtypes");
    TORCH_CHECK_VALUE(j.dst.device().type() == device, "msfast: expected ", device, " tensors, got one on ",
                      j.dst.device());
    for (const auto& t : j.terms) {
      TORCH_CHECK(t.src.scalar_type() == st, "msfast: internal: mixed source dtypes");
      TORCH_CHECK_VALUE(t.src.device() == j.dst.device(), "msfast: all tensors must be on one device, got ",
                        t.src.device(), " and ", j.dst.device());
    }
  }
  return {st, dt};
}

std::vector<at::Tensor> pyramid_impl(const at::Tensor& x, at::IntArrayRef sizes,
                                     at::ArrayRef<double> scales, const std::string& mode_name,
                                     bool antialias, bool align_corners,
                                     std::optional<at::ArrayRef<double>> mean,
                                     std::optional<at::ArrayRef<double>> std,
                                     std::optional<at::ScalarType> out_dtype, Runner run) {
  check_4d(x, "x");
  const auto in_t = x.scalar_type();
  TORCH_CHECK_TYPE(in_t == at::kByte || is_float_type(in_t),
                   "msfast: x must be uint8, float16, bfloat16, float32 or float64, got ", in_t);
  TORCH_CHECK_VALUE(x.size(1) >= 1 && x.size(2) >= 1 && x.size(3) >= 1,
                    "msfast: x must have non-empty C, H and W, got shape ", x.sizes());
  const int mode = mode_from_string(mode_name);
  check_mode(mode, antialias);
  check_levels(sizes, scales, mode, x.size(2), x.size(3));
  const auto dt = out_dtype.value_or(in_t == at::kByte ? at::kFloat : in_t);
  TORCH_CHECK_TYPE(is_float_type(dt), "msfast: out_dtype must be a floating dtype, got ", dt);

  const int64_t C = x.size(1);
  auto m = per_channel(mean, C, "mean");
  auto s = per_channel(std, C, "std");
  for (double d : s) TORCH_CHECK_VALUE(d != 0, "msfast: std must not contain zeros");
  // x_norm = ((x / 255 if uint8) - mean) / std, folded into one multiply-add per output
  // (the resize is linear and its weights sum to one, so it commutes with the affine).
  std::vector<double> scale, shift;
  const double u8 = in_t == at::kByte ? 1.0 / 255.0 : 1.0;
  if (in_t == at::kByte || !m.empty() || !s.empty()) {
    scale.assign(C, u8);
    shift.assign(C, 0.0);
    for (int64_t c = 0; c < C; ++c) {
      const double sd = s.empty() ? 1.0 : s[c];
      scale[c] = u8 / sd;
      shift[c] = m.empty() ? 0.0 : -m[c] / sd;
    }
  }

  const auto [cl, near_cl] = resize_layouts(x, pyramid_normalizes(in_t, dt, mean.has_value(), std.has_value()));
  const at::Tensor src = dense_in(x, cl);
  std::vector<at::Tensor> outs;
  std::vector<Job> jobs;
  for (size_t k = 0; k < sizes.size() / 2; ++k) {
    const int64_t h = sizes[2 * k], w = sizes[2 * k + 1];
    auto out = empty_output({x.size(0), C, h, w}, x.options().dtype(dt), cl);
    outs.push_back(out);
    Job j;
    j.dst = out;
    j.channels_last = cl;
    j.scale = scale;
    j.shift = shift;
    const auto [ah, aw] = axes(x, mode, antialias, align_corners, near_cl, C, x.size(2), x.size(3), h, w,
                               scales.empty() ? 0.0 : scales[k]);
    j.terms.push_back(Term{src, ah, aw, false});
    jobs.push_back(std::move(j));
  }
  if (x.size(0) > 0) run(jobs);
  return outs;
}

at::Tensor pyramid_backward_impl(const std::vector<std::optional<at::Tensor>>& grads,
                                 at::IntArrayRef input_shape, at::ArrayRef<double> scales,
                                 const std::string& mode_name, bool antialias, bool align_corners,
                                 std::optional<at::ArrayRef<double>> std, at::ScalarType dtype,
                                 bool channels_last, bool nearest_channels_last, Runner run) {
  TORCH_CHECK_VALUE(input_shape.size() == 4, "msfast: input_shape must have 4 values, got ", input_shape);
  TORCH_CHECK_TYPE(is_float_type(dtype), "msfast: dtype must be a floating dtype, got ", dtype);
  const int mode = mode_from_string(mode_name);
  check_mode(mode, antialias);
  TORCH_CHECK_VALUE(scales.empty() || scales.size() == grads.size(),
                    "msfast: scales must be empty or hold one value per level");
  const int64_t N = input_shape[0], C = input_shape[1], H = input_shape[2], W = input_shape[3];
  TORCH_CHECK_VALUE(N >= 0 && C >= 1 && H >= 1 && W >= 1, "msfast: input_shape must be >= 1 (N >= 0), got ",
                    input_shape);
  auto s = per_channel(std, C, "std");
  Job j;
  j.channels_last = channels_last;
  for (double d : s) {
    TORCH_CHECK_VALUE(d != 0, "msfast: std must not contain zeros");
    j.scale.push_back(1.0 / d);
    j.shift.push_back(0.0);
  }
  std::optional<at::Tensor> any;
  for (size_t k = 0; k < grads.size(); ++k) {
    if (!grads[k].has_value() || !grads[k]->defined()) continue;
    const auto& g = *grads[k];
    check_4d(g, "grads");
    TORCH_CHECK_VALUE(g.size(0) == N && g.size(1) == C, "msfast: grads[", k, "] has shape ", g.sizes(),
                      ", expected N=", N, " and C=", C);
    TORCH_CHECK_TYPE(is_float_type(g.scalar_type()), "msfast: grads must be floating, got ", g.scalar_type());
    if (any) {
      TORCH_CHECK_TYPE(g.scalar_type() == any->scalar_type(), "msfast: all grads must share one dtype");
      TORCH_CHECK(g.device() == any->device(), "msfast: all grads must be on one device");
    }
    if (!scales.empty()) check_levels({g.size(2), g.size(3)}, {scales[k]}, mode, H, W);
    any = g;
    const auto [ah, aw] = axes(g, mode, antialias, align_corners, nearest_channels_last, C, H, W, g.size(2),
                               g.size(3), scales.empty() ? 0.0 : scales[k]);
    j.terms.push_back(Term{dense_in(g, channels_last), ah, aw, true});
  }
  TORCH_CHECK_VALUE(any.has_value(), "msfast: pyramid_backward needs at least one defined grad");
  j.dst = empty_output({N, C, H, W}, any->options().dtype(dtype), channels_last);
  if (N > 0) run({j});
  return j.dst;
}

at::Tensor upsample_concat_impl(const std::vector<at::Tensor>& features, at::IntArrayRef size,
                                const std::string& mode_name, bool align_corners,
                                std::optional<at::Tensor> out, Runner run) {
  TORCH_CHECK_VALUE(!features.empty(), "msfast: features must be a non-empty list of tensors");
  TORCH_CHECK_VALUE(size.size() == 2 && size[0] >= 1 && size[1] >= 1,
                    "msfast: size must be (h, w) with both >= 1, got ", size);
  const int mode = concat_mode(mode_name);
  const auto& f0 = features[0];
  int64_t Ctot = 0;
  for (size_t i = 0; i < features.size(); ++i) {
    const auto& f = features[i];
    check_4d(f, ("features[" + std::to_string(i) + "]").c_str());
    TORCH_CHECK_TYPE(is_float_type(f.scalar_type()), "msfast: features must be floating, got ", f.scalar_type(),
                     " at index ", i);
    TORCH_CHECK_TYPE(f.scalar_type() == f0.scalar_type(), "msfast: features must share one dtype: features[0] is ",
                     f0.scalar_type(), ", features[", i, "] is ", f.scalar_type());
    TORCH_CHECK_VALUE(f.device() == f0.device(), "msfast: features must share one device: features[0] is on ",
                      f0.device(), ", features[", i, "] on ", f.device());
    TORCH_CHECK_VALUE(f.size(0) == f0.size(0), "msfast: features must share the batch size N: features[0] has ",
                      f0.size(0), ", features[", i, "] has ", f.size(0));
    TORCH_CHECK_VALUE(f.size(1) >= 1 && f.size(2) >= 1 && f.size(3) >= 1, "msfast: features[", i,
                      "] must have non-empty C, H and W, got shape ", f.sizes());
    Ctot += f.size(1);
  }
  const int64_t N = f0.size(0), H = size[0], W = size[1];
  bool cl;
  at::Tensor dst;
  if (out.has_value()) {
    dst = *out;
    TORCH_CHECK_VALUE(dst.dim() == 4 && dst.size(0) == N && dst.size(1) == Ctot && dst.size(2) == H &&
                          dst.size(3) == W,
                      "msfast: out must have shape [", N, ", ", Ctot, ", ", H, ", ", W, "], got ", dst.sizes());
    TORCH_CHECK_TYPE(dst.scalar_type() == f0.scalar_type(), "msfast: out must have dtype ", f0.scalar_type(),
                     ", got ", dst.scalar_type());
    TORCH_CHECK_VALUE(dst.device() == f0.device(), "msfast: out must be on ", f0.device(), ", got ", dst.device());
    TORCH_CHECK_VALUE(dst.is_contiguous() || dst.is_contiguous(at::MemoryFormat::ChannelsLast),
                      "msfast: out must be contiguous or channels_last contiguous");
    for (const auto& f : features) at::assert_no_overlap(dst, f);
    cl = !dst.is_contiguous();
  } else {
    cl = is_channels_last(f0);
    dst = empty_output({N, Ctot, H, W}, f0.options(), cl);
  }
  std::vector<Job> jobs;
  int64_t c0 = 0;
  for (const auto& f : features) {
    Job j;
    j.dst = dst.narrow(1, c0, f.size(1));
    j.channels_last = cl;
    // The nearest formulas follow the feature, as in F.interpolate(f), not the call's layout;
    // the data is read (made dense if need be) in the call's layout.
    const auto [ah, aw] = axes(f, mode, false, align_corners, resize_layouts(f, false).nearest_channels_last,
                               f.size(1), f.size(2), f.size(3), H, W, 0.0);
    j.terms.push_back(Term{dense_in(f, cl), ah, aw, false});
    jobs.push_back(std::move(j));
    c0 += f.size(1);
  }
  if (N > 0) run(jobs);
  return dst;
}

std::vector<at::Tensor> upsample_concat_backward_impl(const at::Tensor& grad, at::IntArrayRef feature_shapes,
                                                      const std::string& mode_name, bool align_corners,
                                                      bool channels_last,
                                                      const c10::List<bool>& nearest_channels_last, Runner run) {
  check_4d(grad, "grad");
  TORCH_CHECK_TYPE(is_float_type(grad.scalar_type()), "msfast: grad must be floating, got ", grad.scalar_type());
  TORCH_CHECK_VALUE(!feature_shapes.empty() && feature_shapes.size() % 3 == 0,
                    "msfast: feature_shapes must hold (C, H, W) per feature, got ", feature_shapes);
  const int mode = concat_mode(mode_name);
  const int64_t N = grad.size(0), H = grad.size(2), W = grad.size(3);
  int64_t Ctot = 0;
  for (size_t i = 0; i < feature_shapes.size(); i += 3) Ctot += feature_shapes[i];
  TORCH_CHECK_VALUE(Ctot == grad.size(1), "msfast: grad has ", grad.size(1), " channels, features sum to ", Ctot);
  TORCH_CHECK_VALUE(nearest_channels_last.size() * 3 == feature_shapes.size(),
                    "msfast: nearest_channels_last must hold one flag per feature (", feature_shapes.size() / 3,
                    "), got ", nearest_channels_last.size());
  const at::Tensor g = dense_in(grad, channels_last);
  std::vector<at::Tensor> outs;
  std::vector<Job> jobs;
  int64_t c0 = 0;
  for (size_t i = 0; i < feature_shapes.size(); i += 3) {
    const int64_t C = feature_shapes[i], h = feature_shapes[i + 1], w = feature_shapes[i + 2];
    TORCH_CHECK_VALUE(C >= 1 && h >= 1 && w >= 1, "msfast: feature_shapes must be >= 1, got ", feature_shapes);
    Job j;
    j.dst = empty_output({N, C, h, w}, grad.options(), channels_last);
    j.channels_last = channels_last;
    // The adjoint of the forward's resize, so the same nearest rule: the feature's.
    const auto [ah, aw] = axes(grad, mode, false, align_corners, nearest_channels_last.get(i / 3), C, h, w, H, W,
                               0.0);
    j.terms.push_back(Term{g.narrow(1, c0, C), ah, aw, true});
    outs.push_back(j.dst);
    jobs.push_back(std::move(j));
    c0 += C;
  }
  if (N > 0) run(jobs);
  return outs;
}

}  // namespace msfast

// Schemas. Sizes are SymInt so that torch.compile can trace dynamic shapes; the fake
// kernels are registered from Python (msfast/_ops.py), the autograd formulas in
// csrc/autograd.cpp. In the backward operators, `channels_last` is the layout the gradients
// are written in, and `nearest_channels_last` (one per input of the forward) the forward's
// nearest formulas (plan.h: resize_layouts), which the adjoint must follow.
TORCH_LIBRARY(msfast, m) {
  m.def(
      "pyramid(Tensor x, SymInt[] sizes, float[]? scales, str interpolation, bool antialias, bool align_corners, "
      "float[]? mean, float[]? std, ScalarType? out_dtype) -> Tensor[]");
  m.def(
      "pyramid_backward(Tensor?[] grads, SymInt[] input_shape, float[]? scales, str interpolation, bool antialias, "
      "bool align_corners, float[]? std, ScalarType dtype, bool channels_last, bool nearest_channels_last) -> Tensor");
  m.def("upsample_concat(Tensor[] features, SymInt[] size, str interpolation, bool align_corners) -> Tensor");
  m.def(
      "upsample_concat.out(Tensor[] features, SymInt[] size, str interpolation, bool align_corners, *, "
      "Tensor(a!) out) -> ()");
  m.def(
      "upsample_concat_backward(Tensor grad, SymInt[] feature_shapes, str interpolation, bool align_corners, "
      "bool channels_last, bool[] nearest_channels_last) -> Tensor[]");
}
