// Autograd for the four operators, in C++ and registered for the Autograd key of every
// backend. (The formulas were Python, through torch.library.register_autograd: that costs
// about 100 us per call in grad mode, more than a small call's kernel.) Each operator is
// linear in its tensor inputs, so each backward is another msfast operator:
//   pyramid           -> pyramid_backward (the adjoint of every level, summed, / std)
//   pyramid_backward  -> pyramid of the incoming gradient (scaled by 1 / std, no mean)
//   upsample_concat   -> upsample_concat_backward (the adjoint of each feature's resize)
//   upsample_concat_backward -> upsample_concat
// and the backward of a backward is the forward again; an output's forward-mode tangent is
// the operator applied to the inputs' tangents (without the mean, which is not linear). Calls
// go through the dispatcher, so that torch.compile traces them with the fake kernels of
// msfast/_ops.py, a backward run with create_graph records the next one, and torch.func's
// transforms see every call. Sizes stay SymInt throughout for dynamic shapes.
//
// Each operator's formulas are one struct (Pyramid, PyramidBackward, UpsampleConcat,
// UpsampleConcatBackward): `forward` runs the call below autograd and keeps what the other
// two need in a map of IValues, `backward` and `tangent` read it. Two kinds of node carry them:
// - a torch::autograd::Function (`Fn`: PyramidFn, ...) for plain autograd: compiled autograd traces it
//   (it keeps the map in ctx->saved_data);
// - a node of our own (`TransformNode`) under torch.func's transforms, which refuse a C++
//   Function ("cannot use C++ torch::autograd::Function with functorch transforms"), and
//   wherever an input carries a forward-mode tangent (a C++ Function has no forward mode).
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>  // set_history
#include <torch/library.h>

#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "msfast/dispatch.h"
#include "msfast/plan.h"  // is_channels_last, resize_layouts, dense_in

namespace msfast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Saved = decltype(AutogradContext::saved_data);

// Optional float lists, kept for the backward: IValue holds them as a list or None.
c10::IValue keep(const OptDoubles& v) { return v ? c10::IValue(v->vec()) : c10::IValue(); }
std::optional<std::vector<double>> unkeep(const c10::IValue& v) {
  if (v.isNone()) return std::nullopt;
  return v.toDoubleVector();
}

// The first defined tensor of ts, or nullptr.
const at::Tensor* first_defined(const variable_list& ts) {
  for (const auto& t : ts)
    if (t.defined()) return &t;
  return nullptr;
}

// Each feature's tensor (a tangent or a gradient), zeros where it has none ([N] + its [C, H,
// W] from shapes), dense in the layout whose nearest formulas its feature took: upsample_concat
// takes each feature's formulas from the feature (plan.h: resize_layouts), so this stays the
// forward's adjoint (or its derivative), with a copy only where the layouts differ.
std::vector<at::Tensor> zero_filled(const variable_list& ts, const std::vector<c10::SymInt>& shapes,
                                    const c10::List<bool>& near_cl) {
  const at::Tensor* ref = first_defined(ts);
  std::vector<at::Tensor> out;
  for (size_t i = 0; i < ts.size(); ++i) {
    const at::Tensor t = ts[i].defined() ? ts[i]
                                         : ref->new_zeros_symint({ref->sym_size(0), shapes[3 * i], shapes[3 * i + 1],
                                                                  shapes[3 * i + 2]});
    out.push_back(dense_in(t, near_cl.get(i)));
  }
  return out;
}

// An output without a gradient (a pyramid level the loss does not use) reaches `backward` as an
// undefined tensor rather than a tensor of zeros that would be allocated, filled and then
// resampled for nothing (the Functions set_materialize_grads(false)); an input without a
// tangent reaches `tangent` undefined. Each returns one tensor per tensor input (backward) or
// output (tangent), undefined where there is none.
struct Pyramid {
  static constexpr const char* name = "msfast::PyramidBackward";
  static constexpr int other_args = 8;  // the forward's arguments after x
  static variable_list forward(Saved& d, const at::Tensor& x, c10::SymIntArrayRef sizes, OptDoubles scales,
                               const std::string& mode, bool antialias, bool align_corners, OptDoubles mean,
                               OptDoubles std, std::optional<at::ScalarType> out_dtype) {
    variable_list outs;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      outs = pyramid_op().call(x, sizes, scales, mode, antialias, align_corners, mean, std, out_dtype);
    }
    d["shape"] = c10::IValue(x.sym_sizes().vec());
    d["sizes"] = c10::IValue(sizes.vec());
    d["scales"] = keep(scales);
    d["mode"] = mode;
    d["antialias"] = antialias;
    d["align_corners"] = align_corners;
    d["std"] = keep(std);
    d["dtype"] = x.scalar_type();
    d["level_dtype"] = outs[0].scalar_type();
    const auto layouts =
        resize_layouts(x, pyramid_normalizes(x.scalar_type(), outs[0].scalar_type(), mean.has_value(), std.has_value()));
    d["cl"] = layouts.channels_last;  // the levels' layout, which the gradient is written in
    d["near_cl"] = layouts.nearest_channels_last;
    return outs;
  }
  static variable_list backward(Saved& d, const variable_list& grads) {
    c10::List<std::optional<at::Tensor>> g;
    for (const auto& t : grads) g.push_back(t.defined() ? std::optional<at::Tensor>(t) : std::nullopt);
    if (!first_defined(grads)) return variable_list(1);
    const auto scales = unkeep(d["scales"]), std = unkeep(d["std"]);
    // An empty scales list (a raw call that gave sizes) is passed on as None.
    return {pyramid_backward_op().call(g, d["shape"].toSymIntVector(),
                                       scales && !scales->empty() ? view(scales) : std::nullopt,
                                       d["mode"].toStringRef(), d["antialias"].toBool(), d["align_corners"].toBool(),
                                       view(std), d["dtype"].toScalarType(), d["cl"].toBool(), d["near_cl"].toBool())};
  }
  static variable_list tangent(Saved& d, const variable_list& tangents) {
    const auto scales = unkeep(d["scales"]), std = unkeep(d["std"]);
    // pyramid takes its nearest formulas from its input: the tangent, dense in the layout x's
    // resize saw, takes the same ones.
    return pyramid_op().call(dense_in(tangents[0], d["near_cl"].toBool()), d["sizes"].toSymIntVector(),
                             view(scales), d["mode"].toStringRef(), d["antialias"].toBool(),
                             d["align_corners"].toBool(), std::nullopt, view(std), d["level_dtype"].toScalarType());
  }
};

// Its tensor inputs are the levels that have a gradient (`live`: where they sit among the n
// levels): autograd tracks the tensors of a TensorList, but not undefined ones.
struct PyramidBackward {
  static constexpr const char* name = "msfast::PyramidBackwardBackward";
  static constexpr int other_args = 11;
  static c10::List<std::optional<at::Tensor>> placed(at::TensorList live_grads, const std::vector<int64_t>& live,
                                                     int64_t n) {
    c10::List<std::optional<at::Tensor>> g;
    for (int64_t k = 0; k < n; ++k) g.push_back(std::nullopt);
    for (size_t i = 0; i < live.size(); ++i)
      if (live_grads[i].defined()) g.set(live[i], live_grads[i]);
    return g;
  }
  static variable_list forward(Saved& d, at::TensorList live_grads, const std::vector<int64_t>& live, int64_t n,
                               c10::SymIntArrayRef input_shape, OptDoubles scales, const std::string& mode,
                               bool antialias, bool align_corners, OptDoubles std, at::ScalarType dtype,
                               bool channels_last, bool nearest_channels_last) {
    at::Tensor gx;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      gx = pyramid_backward_op().call(placed(live_grads, live, n), input_shape, scales, mode, antialias,
                                      align_corners, std, dtype, channels_last, nearest_channels_last);
    }
    std::vector<c10::SymInt> hw;  // the levels' sizes (checked 4-D by the call): the backward makes them again
    for (const auto& t : live_grads) {
      hw.push_back(t.sym_size(2));
      hw.push_back(t.sym_size(3));
    }
    d["live"] = c10::IValue(live);
    d["n"] = n;
    d["hw"] = c10::IValue(hw);
    d["level_dtype"] = live.empty() ? dtype : live_grads[0].scalar_type();
    d["shape"] = c10::IValue(input_shape.vec());
    d["scales"] = keep(scales);
    d["mode"] = mode;
    d["antialias"] = antialias;
    d["align_corners"] = align_corners;
    d["std"] = keep(std);
    d["dtype"] = dtype;
    d["cl"] = channels_last;
    d["near_cl"] = nearest_channels_last;
    return {gx};
  }
  static variable_list backward(Saved& d, const variable_list& gg) {
    const auto live = d["live"].toIntVector();
    variable_list out(live.size());
    if (!gg[0].defined() || live.empty()) return out;
    const auto scales = unkeep(d["scales"]), std = unkeep(d["std"]);
    std::optional<std::vector<double>> sc;
    if (scales && !scales->empty()) {
      sc.emplace();
      for (int64_t k : live) sc->push_back((*scales)[k]);
    }
    // pyramid takes its nearest formulas from its input (plan.h: resize_layouts): a dense gg
    // in the layout the forward's resize saw gives it the same ones.
    auto res = pyramid_op().call(dense_in(gg[0], d["near_cl"].toBool()), d["hw"].toSymIntVector(), view(sc),
                                 d["mode"].toStringRef(), d["antialias"].toBool(), d["align_corners"].toBool(),
                                 std::nullopt, view(std), d["level_dtype"].toScalarType());
    for (size_t i = 0; i < live.size(); ++i) out[i] = res[i];
    return out;
  }
  static variable_list tangent(Saved& d, const variable_list& tangents) {
    const auto scales = unkeep(d["scales"]), std = unkeep(d["std"]);
    return {pyramid_backward_op().call(placed(tangents, d["live"].toIntVector(), d["n"].toInt()),
                                       d["shape"].toSymIntVector(), view(scales), d["mode"].toStringRef(),
                                       d["antialias"].toBool(), d["align_corners"].toBool(), view(std),
                                       d["dtype"].toScalarType(), d["cl"].toBool(), d["near_cl"].toBool())};
  }
};

struct UpsampleConcat {
  static constexpr const char* name = "msfast::UpsampleConcatBackward";
  static constexpr int other_args = 3;
  static variable_list forward(Saved& d, at::TensorList features, c10::SymIntArrayRef size, const std::string& mode,
                               bool align_corners) {
    at::Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      out = upsample_concat_op().call(features, size, mode, align_corners);
    }
    std::vector<c10::SymInt> shapes;
    for (const auto& f : features)
      for (int64_t i = 1; i < 4; ++i) shapes.push_back(f.sym_size(i));
    d["shapes"] = c10::IValue(shapes);
    d["size"] = c10::IValue(size.vec());
    d["mode"] = mode;
    d["align_corners"] = align_corners;
    d["cl"] = is_channels_last(out);
    c10::List<bool> near_cl;  // each feature's nearest formulas
    for (const auto& f : features) near_cl.push_back(resize_layouts(f, false).nearest_channels_last);
    d["near_cl"] = near_cl;
    d["n"] = static_cast<int64_t>(features.size());
    return {out};
  }
  static variable_list backward(Saved& d, const variable_list& grads) {
    if (!grads[0].defined()) return variable_list(d["n"].toInt());
    return upsample_concat_backward_op().call(grads[0], d["shapes"].toSymIntVector(), d["mode"].toStringRef(),
                                              d["align_corners"].toBool(), d["cl"].toBool(), d["near_cl"].toBoolList());
  }
  static variable_list tangent(Saved& d, const variable_list& tangents) {
    return {upsample_concat_op().call(zero_filled(tangents, d["shapes"].toSymIntVector(), d["near_cl"].toBoolList()),
                                      d["size"].toSymIntVector(), d["mode"].toStringRef(),
                                      d["align_corners"].toBool())};
  }
};

struct UpsampleConcatBackward {
  static constexpr const char* name = "msfast::UpsampleConcatBackwardBackward";
  static constexpr int other_args = 5;
  static variable_list forward(Saved& d, const at::Tensor& grad, c10::SymIntArrayRef feature_shapes,
                               const std::string& mode, bool align_corners, bool channels_last,
                               const c10::List<bool>& nearest_channels_last) {
    variable_list grads;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      grads = upsample_concat_backward_op().call(grad, feature_shapes, mode, align_corners, channels_last,
                                                 nearest_channels_last);
    }
    d["shapes"] = c10::IValue(feature_shapes.vec());
    d["H"] = grad.sym_size(2);
    d["W"] = grad.sym_size(3);
    d["mode"] = mode;
    d["align_corners"] = align_corners;
    d["cl"] = channels_last;
    d["near_cl"] = nearest_channels_last;
    return grads;
  }
  static variable_list backward(Saved& d, const variable_list& ggs) {
    if (!first_defined(ggs)) return variable_list(1);
    return {upsample_concat_op().call(zero_filled(ggs, d["shapes"].toSymIntVector(), d["near_cl"].toBoolList()),
                                      {d["H"].toSymInt(), d["W"].toSymInt()}, d["mode"].toStringRef(),
                                      d["align_corners"].toBool())};
  }
  static variable_list tangent(Saved& d, const variable_list& tangents) {
    return upsample_concat_backward_op().call(tangents[0], d["shapes"].toSymIntVector(), d["mode"].toStringRef(),
                                              d["align_corners"].toBool(), d["cl"].toBool(),
                                              d["near_cl"].toBoolList());
  }
};

// Plain autograd's node: Op's formulas as a torch::autograd::Function. (Self names the node:
// PyramidFn, say, rather than a template's name.)
template <typename Self, typename OpT>
struct Fn : torch::autograd::Function<Self> {
  using Op = OpT;
  template <typename... Args>
  static variable_list forward(AutogradContext* ctx, Args&&... args) {
    ctx->set_materialize_grads(false);
    return Op::forward(ctx->saved_data, std::forward<Args>(args)...);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list g = Op::backward(ctx->saved_data, grads);
    g.resize(g.size() + Op::other_args);  // none for the non-tensor arguments
    return g;
  }
};

struct PyramidFn : Fn<PyramidFn, Pyramid> {};
struct PyramidBackwardFn : Fn<PyramidBackwardFn, PyramidBackward> {};
struct UpsampleConcatFn : Fn<UpsampleConcatFn, UpsampleConcat> {};
struct UpsampleConcatBackwardFn : Fn<UpsampleConcatBackwardFn, UpsampleConcatBackward> {};

// The node under torch.func's transforms and forward-mode AD: Op's backward, with its saved map.
struct TransformNode : torch::autograd::Node {
  Saved saved;
  variable_list (*backward)(Saved&, const variable_list&) = nullptr;
  const char* op_name = "";
  variable_list apply(variable_list&& grads) override { return backward(saved, grads); }
  std::string name() const override { return op_name; }
};

// The pointer autograd holds its nodes by: std::shared_ptr (made with deleteNode, which frees
// long chains without recursion) up to torch 2.12, c10::intrusive_ptr since.
using NodePtr = std::decay_t<decltype(std::declval<torch::autograd::Edge>().function)>;
template <typename N>
NodePtr make_node() {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>) {
    return std::shared_ptr<N>(new N(), [](N* p) { deleteNode(p); });  // found by ADL
  } else {
    return c10::make_intrusive<N>();
  }
}

// Whether a torch.func transform is active: functorch includes its front-mode key in the
// thread's dispatch keys while its stack of transforms is not empty.
bool transforming() {
  return c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode);
}

// An autograd kernel's call on `args` (its tensor inputs: `inputs`) where an input requires
// grad or carries a forward-mode tangent (`tangent`): F, Op's Function, or under a transform or
// with a tangent a TransformNode around Op::forward, with Op's tangents set on the outputs.
template <typename F, typename... Args>
variable_list record(const variable_list& inputs, bool tangent, Args&&... args) {
  using Op = typename F::Op;
  if (!tangent && !transforming()) return F::apply(args...);
  const NodePtr node = make_node<TransformNode>();
  auto* n = static_cast<TransformNode*>(node.get());
  n->backward = &Op::backward;
  n->op_name = Op::name;
  variable_list outs = Op::forward(n->saved, args...);
  if (torch::autograd::compute_requires_grad(inputs)) {
    node->set_next_edges(torch::autograd::collect_next_edges(inputs));
    torch::autograd::set_history(outs, node);
  }
  if (tangent) {
    variable_list ts;
    for (const auto& t : inputs) ts.push_back(t._fw_grad(/*level=*/0));
    const variable_list touts = Op::tangent(n->saved, ts);
    for (size_t k = 0; k < outs.size(); ++k)
      if (touts[k].defined()) outs[k]._set_fw_grad(touts[k], /*level=*/0, /*is_inplace_op=*/false);
  }
  return outs;
}

// Whether a call needs a node (grad mode on and an input requiring grad), and whether an input
// carries a forward-mode tangent. Where neither, the call goes straight to the kernel: a node
// and its saved data cost a few microseconds of host time in every inference call.
struct Needs {
  bool grad = false, tangent = false;
  explicit Needs(at::TensorList ts) {
    const bool mode = at::GradMode::is_enabled();
    for (const auto& t : ts) {
      if (!t.defined()) continue;
      grad = grad || (mode && t.requires_grad());
      tangent = tangent || t._fw_grad(/*level=*/0).defined();
    }
  }
  bool any() const { return grad || tangent; }
};

std::vector<at::Tensor> pyramid_autograd(const at::Tensor& x, c10::SymIntArrayRef sizes, OptDoubles scales,
                                         std::string mode, bool antialias, bool align_corners,
                                         OptDoubles mean, OptDoubles std, std::optional<at::ScalarType> out_dtype) {
  const Needs needs(x);
  if (!needs.any()) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return pyramid_op().call(x, sizes, scales, mode, antialias, align_corners, mean, std, out_dtype);
  }
  return record<PyramidFn>({x}, needs.tangent, x, sizes, scales, mode, antialias, align_corners, mean, std,
                           out_dtype);
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
  const Needs needs(g);
  if (!needs.any()) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return pyramid_backward_op().call(grads, input_shape, scales, mode, antialias, align_corners, std, dtype,
                                      channels_last, nearest_channels_last);
  }
  const auto n = static_cast<int64_t>(grads.size());
  return record<PyramidBackwardFn>(g, needs.tangent, at::TensorList(g), live, n, input_shape, scales, mode,
                                   antialias, align_corners, std, dtype, channels_last, nearest_channels_last)[0];
}

at::Tensor upsample_concat_autograd(at::TensorList features, c10::SymIntArrayRef size, std::string mode,
                                    bool align_corners) {
  const Needs needs(features);
  if (!needs.any()) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return upsample_concat_op().call(features, size, mode, align_corners);
  }
  return record<UpsampleConcatFn>(features.vec(), needs.tangent, features, size, mode, align_corners)[0];
}

std::vector<at::Tensor> upsample_concat_backward_autograd(const at::Tensor& grad, c10::SymIntArrayRef feature_shapes,
                                                          std::string mode, bool align_corners,
                                                          bool channels_last,
                                                          const c10::List<bool>& nearest_channels_last) {
  const Needs needs(grad);
  if (!needs.any()) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return upsample_concat_backward_op().call(grad, feature_shapes, mode, align_corners, channels_last,
                                              nearest_channels_last);
  }
  return record<UpsampleConcatBackwardFn>({grad}, needs.tangent, grad, feature_shapes, mode, align_corners,
                                          channels_last, nearest_channels_last);
}

}  // namespace
}  // namespace msfast

TORCH_LIBRARY_IMPL(msfast, Autograd, m) {
  m.impl("pyramid", TORCH_FN(msfast::pyramid_autograd));
  m.impl("pyramid_backward", TORCH_FN(msfast::pyramid_backward_autograd));
  m.impl("upsample_concat", TORCH_FN(msfast::upsample_concat_autograd));
  m.impl("upsample_concat_backward", TORCH_FN(msfast::upsample_concat_backward_autograd));
}
