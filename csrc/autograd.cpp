// Autograd for the four operators, in C++ and registered for the Autograd key of every
// backend. (The formulas were Python, through torch.library.register_autograd: that costs
// about 100 us per call in grad mode, more than a small call's kernel.) Each operator is
// linear in its tensor inputs, so each backward is another msfast operator:
//   pyramid           -> pyramid_backward (the adjoint of every level, summed, / std)
//   pyramid_backward  -> pyramid of the incoming gradient (scaled by 1 / std, no mean)
//   upsample_concat   -> upsample_concat_backward (the adjoint of each feature's resize)
//   upsample_concat_backward -> upsample_concat
// and the backward of a backward is the forward again. Calls go through the dispatcher, so
// that torch.compile traces them with the fake kernels of msfast/_ops.py, and a backward run
// with create_graph records the next one. Sizes stay SymInt throughout for dynamic shapes.
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <vector>

#include "msfast/dispatch.h"
#include "msfast/plan.h"  // is_channels_last, resize_layouts, dense_in

namespace msfast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Optional float lists, kept for the backward: IValue holds them as a list or None.
c10::IValue keep(const OptDoubles& v) { return v ? c10::IValue(v->vec()) : c10::IValue(); }
std::optional<std::vector<double>> unkeep(const c10::IValue& v) {
  if (v.isNone()) return std::nullopt;
  return v.toDoubleVector();
}

// Whether a call must go through its autograd Function: grad mode on and an input requiring
// grad, or an input carrying a forward-mode tangent (which Function::apply rejects, so that
// forward AD raises rather than dropping the tangent). Otherwise the call goes straight to the
// kernel: Function::apply builds its node and saved data even where no graph is recorded,
// a few microseconds of host time in every inference call.
bool records(at::TensorList ts) {
  const bool grad = at::GradMode::is_enabled();
  for (const auto& t : ts)
    if (t.defined() && ((grad && t.requires_grad()) || t._fw_grad(/*level=*/0).defined())) return true;
  return false;
}

// Every Function below sets ctx->set_materialize_grads(false), so that
// an output without a gradient (a pyramid level the loss does not use) reaches backward as
// an undefined tensor rather than a tensor of zeros that would be allocated, filled and then
// resampled for nothing. Each backward handles undefined gradients.
struct PyramidFn : torch::autograd::Function<PyramidFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, c10::SymIntArrayRef sizes,
                               OptDoubles scales, std::string mode, bool antialias, bool align_corners,
                               OptDoubles mean, OptDoubles std, std::optional<at::ScalarType> out_dtype) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto outs = pyramid_op().call(x, sizes, scales, mode, antialias, align_corners, mean, std, out_dtype);
    ctx->set_materialize_grads(false);  // see above PyramidFn
    auto& d = ctx->saved_data;
    d["shape"] = c10::IValue(x.sym_sizes().vec());
    d["scales"] = keep(scales);
    d["mode"] = mode;
    d["antialias"] = antialias;
    d["align_corners"] = align_corners;
    d["std"] = keep(std);
    d["dtype"] = x.scalar_type();
    const auto layouts =
        resize_layouts(x, pyramid_normalizes(x.scalar_type(), outs[0].scalar_type(), mean.has_value(), std.has_value()));
    d["cl"] = layouts.channels_last;  // the levels' layout, which the gradient is written in
    d["near_cl"] = layouts.nearest_channels_last;
    return outs;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto& d = ctx->saved_data;
    c10::List<std::optional<at::Tensor>> g;
    bool any = false;
    for (auto& t : grads) {
      g.push_back(t.defined() ? std::optional<at::Tensor>(t) : std::nullopt);
      any = any || t.defined();
    }
    if (!any) return variable_list(9);
    const auto scales = unkeep(d["scales"]), std = unkeep(d["std"]);
    const auto shape = d["shape"].toSymIntVector();
    const std::string mode = d["mode"].toStringRef();
    // An empty scales list (a raw call that gave sizes) is passed on as None.
    auto gx = pyramid_backward_op().call(g, shape, scales && !scales->empty() ? view(scales) : std::nullopt, mode,
                                         d["antialias"].toBool(), d["align_corners"].toBool(), view(std),
                                         d["dtype"].toScalarType(), d["cl"].toBool(), d["near_cl"].toBool());
    return {gx, {}, {}, {}, {}, {}, {}, {}, {}};
  }
};

struct PyramidBackwardFn : torch::autograd::Function<PyramidBackwardFn> {
  // The levels that have a gradient, and where they sit among the n levels: autograd tracks
  // the tensors of a TensorList, but not undefined ones.
  static variable_list forward(AutogradContext* ctx, at::TensorList live_grads, const std::vector<int64_t>& live,
                               int64_t n, c10::SymIntArrayRef input_shape, OptDoubles scales, std::string mode,
                               bool antialias, bool align_corners, OptDoubles std, at::ScalarType dtype,
                               bool channels_last, bool nearest_channels_last) {
    at::AutoDispatchBelowADInplaceOrView guard;
    c10::List<std::optional<at::Tensor>> g;
    for (int64_t k = 0; k < n; ++k) g.push_back(std::nullopt);
    for (size_t i = 0; i < live.size(); ++i) g.set(live[i], live_grads[i]);
    auto gx = pyramid_backward_op().call(g, input_shape, scales, mode, antialias, align_corners, std, dtype,
                                         channels_last, nearest_channels_last);
    std::vector<c10::SymInt> hw;  // the levels' sizes (checked 4-D by the call): the backward makes them again
    for (const auto& t : live_grads) {
      hw.push_back(t.sym_size(2));
      hw.push_back(t.sym_size(3));
    }
    ctx->set_materialize_grads(false);  // see above PyramidFn
    auto& d = ctx->saved_data;
    d["live"] = c10::IValue(live);
    d["hw"] = c10::IValue(hw);
    d["level_dtype"] = live.empty() ? dtype : live_grads[0].scalar_type();
    d["scales"] = keep(scales);
    d["mode"] = mode;
    d["antialias"] = antialias;
    d["align_corners"] = align_corners;
    d["std"] = keep(std);
    d["near_cl"] = nearest_channels_last;
    return {gx};
  }
  static variable_list backward(AutogradContext* ctx, variable_list gg) {
    auto& d = ctx->saved_data;
    const auto live = d["live"].toIntVector();
    variable_list out(live.size() + 11);  // one per live gradient, then the 11 other arguments
    if (gg[0].defined() && !live.empty()) {
      const auto scales = unkeep(d["scales"]), std = unkeep(d["std"]);
      std::optional<std::vector<double>> sc;
      if (scales && !scales->empty()) {
        sc.emplace();
        for (int64_t k : live) sc->push_back((*scales)[k]);
      }
      const std::string mode = d["mode"].toStringRef();
      // pyramid takes its nearest formulas from its input (plan.h: resize_layouts): a dense gg
      // in the layout the forward's resize saw gives it the same ones.
      const at::Tensor gg0 = dense_in(gg[0], d["near_cl"].toBool());
      auto res = pyramid_op().call(gg0, d["hw"].toSymIntVector(), view(sc), mode,
                                   d["antialias"].toBool(), d["align_corners"].toBool(), std::nullopt, view(std),
                                   d["level_dtype"].toScalarType());
      for (size_t i = 0; i < live.size(); ++i) out[i] = res[i];
    }
    return out;
  }
};

struct UpsampleConcatFn : torch::autograd::Function<UpsampleConcatFn> {
  static variable_list forward(AutogradContext* ctx, at::TensorList features, c10::SymIntArrayRef size,
                               std::string mode, bool align_corners) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto out = upsample_concat_op().call(features, size, mode, align_corners);
    std::vector<c10::SymInt> shapes;
    for (const auto& f : features)
      for (int64_t i = 1; i < 4; ++i) shapes.push_back(f.sym_size(i));
    ctx->set_materialize_grads(false);  // see above PyramidFn
    auto& d = ctx->saved_data;
    d["shapes"] = c10::IValue(shapes);
    d["mode"] = mode;
    d["align_corners"] = align_corners;
    d["cl"] = is_channels_last(out);
    c10::List<bool> near_cl;  // each feature's nearest formulas
    for (const auto& f : features) near_cl.push_back(resize_layouts(f, false).nearest_channels_last);
    d["near_cl"] = near_cl;
    d["n"] = static_cast<int64_t>(features.size());
    return {out};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto& d = ctx->saved_data;
    const int64_t n = d["n"].toInt();
    variable_list out(n + 3);
    if (grads[0].defined()) {
      const std::string mode = d["mode"].toStringRef();
      auto g = upsample_concat_backward_op().call(grads[0], d["shapes"].toSymIntVector(), mode,
                                                  d["align_corners"].toBool(), d["cl"].toBool(),
                                                  d["near_cl"].toBoolList());
      for (int64_t i = 0; i < n; ++i) out[i] = g[i];
    }
    return out;
  }
};

struct UpsampleConcatBackwardFn : torch::autograd::Function<UpsampleConcatBackwardFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad, c10::SymIntArrayRef feature_shapes,
                               std::string mode, bool align_corners, bool channels_last,
                               const c10::List<bool>& nearest_channels_last) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto grads = upsample_concat_backward_op().call(grad, feature_shapes, mode, align_corners, channels_last,
                                                    nearest_channels_last);
    ctx->set_materialize_grads(false);  // see above PyramidFn
    auto& d = ctx->saved_data;
    d["shapes"] = c10::IValue(feature_shapes.vec());
    d["H"] = grad.sym_size(2);
    d["W"] = grad.sym_size(3);
    d["mode"] = mode;
    d["align_corners"] = align_corners;
    d["near_cl"] = nearest_channels_last;
    return grads;
  }
  static variable_list backward(AutogradContext* ctx, variable_list ggs) {
    auto& d = ctx->saved_data;
    variable_list out(6);
    const at::Tensor* ref = nullptr;
    for (const auto& g : ggs)
      if (g.defined()) {
        ref = &g;
        break;
      }
    if (!ref) return out;
    const auto shapes = d["shapes"].toSymIntVector();
    const auto near_cl = d["near_cl"].toBoolList();
    std::vector<at::Tensor> feats;
    for (size_t i = 0; i < ggs.size(); ++i) {
      const at::Tensor gg = ggs[i].defined() ? ggs[i]
                                             : ref->new_zeros_symint({ref->sym_size(0), shapes[3 * i],
                                                                      shapes[3 * i + 1], shapes[3 * i + 2]});
      // upsample_concat takes each feature's nearest formulas from the feature (plan.h:
      // resize_layouts): a dense gg in the layout this backward was told gives it the same
      // ones, so that this stays the adjoint (a copy only where the layouts differ).
      feats.push_back(dense_in(gg, near_cl.get(i)));
    }
    const std::string mode = d["mode"].toStringRef();
    out[0] = upsample_concat_op().call(feats, {d["H"].toSymInt(), d["W"].toSymInt()}, mode,
                                       d["align_corners"].toBool());
    return out;
  }
};

std::vector<at::Tensor> pyramid_autograd(const at::Tensor& x, c10::SymIntArrayRef sizes, OptDoubles scales,
                                         std::string mode, bool antialias, bool align_corners,
                                         OptDoubles mean, OptDoubles std, std::optional<at::ScalarType> out_dtype) {
  if (!records(x)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return pyramid_op().call(x, sizes, scales, mode, antialias, align_corners, mean, std, out_dtype);
  }
  return PyramidFn::apply(x, sizes, scales, mode, antialias, align_corners, mean, std, out_dtype);
}

at::Tensor pyramid_backward_autograd(const c10::List<std::optional<at::Tensor>>& grads,
                                     c10::SymIntArrayRef input_shape, OptDoubles scales, std::string mode,
                                     bool antialias, bool align_corners, OptDoubles std, at::ScalarType dtype,
                                     bool channels_last, bool nearest_channels_last) {
  std::vector<at::Tensor> g;
  std::vector<int64_t> live;
  for (size_t i = 0; i < grads.size(); ++i) {
    const std::optional<at::Tensor> t = grads[i];
    if (t.has_value() && t->defined()) {
      g.push_back(*t);
      live.push_back(static_cast<int64_t>(i));
    }
  }
  if (!records(g)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return pyramid_backward_op().call(grads, input_shape, scales, mode, antialias, align_corners, std, dtype,
                                      channels_last, nearest_channels_last);
  }
  return PyramidBackwardFn::apply(at::TensorList(g), live, static_cast<int64_t>(grads.size()), input_shape, scales,
                                  mode, antialias, align_corners, std, dtype, channels_last,
                                  nearest_channels_last)[0];
}

at::Tensor upsample_concat_autograd(at::TensorList features, c10::SymIntArrayRef size, std::string mode,
                                    bool align_corners) {
  if (!records(features)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return upsample_concat_op().call(features, size, mode, align_corners);
  }
  return UpsampleConcatFn::apply(features, size, mode, align_corners)[0];
}

std::vector<at::Tensor> upsample_concat_backward_autograd(const at::Tensor& grad, c10::SymIntArrayRef feature_shapes,
                                                          std::string mode, bool align_corners,
                                                          bool channels_last,
                                                          const c10::List<bool>& nearest_channels_last) {
  if (!records(grad)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return upsample_concat_backward_op().call(grad, feature_shapes, mode, align_corners, channels_last,
                                              nearest_channels_last);
  }
  return UpsampleConcatBackwardFn::apply(grad, feature_shapes, mode, align_corners, channels_last,
                                         nearest_channels_last);
}

}  // namespace
}  // namespace msfast

TORCH_LIBRARY_IMPL(msfast, Autograd, m) {
  m.impl("pyramid", TORCH_FN(msfast::pyramid_autograd));
  m.impl("pyramid_backward", TORCH_FN(msfast::pyramid_backward_autograd));
  m.impl("upsample_concat", TORCH_FN(msfast::upsample_concat_autograd));
  m.impl("upsample_concat_backward", TORCH_FN(msfast::upsample_concat_backward_autograd));
}
