// Typed handles of the operators declared in csrc/ops.cpp, looked up once. The autograd
// kernels (csrc/autograd.cpp) call them below or through the autograd layer, and msfast._C's
// entry points (csrc/module.cpp) call them from Python; each signature must match its schema
// (findSchemaOrThrow checks the name, the dispatcher the types on the first call).
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <string>
#include <vector>

namespace msfast {

using OptDoubles = std::optional<at::ArrayRef<double>>;

// An optional list of floats as the operators take it (a view of v, which must outlive it).
inline OptDoubles view(const std::optional<std::vector<double>>& v) {
  return v ? OptDoubles(at::ArrayRef<double>(*v)) : std::nullopt;
}

inline auto pyramid_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("msfast::pyramid", "")
                       .typed<std::vector<at::Tensor>(const at::Tensor&, c10::SymIntArrayRef, OptDoubles,
                                                      std::string, bool, bool, OptDoubles, OptDoubles,
                                                      std::optional<at::ScalarType>)>();
  return op;
}
inline auto pyramid_backward_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("msfast::pyramid_backward", "")
                       .typed<at::Tensor(const c10::List<std::optional<at::Tensor>>&, c10::SymIntArrayRef,
                                         OptDoubles, std::string, bool, bool, OptDoubles, at::ScalarType,
                                         bool, bool)>();
  return op;
}
inline auto upsample_concat_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("msfast::upsample_concat", "")
                       .typed<at::Tensor(at::TensorList, c10::SymIntArrayRef, std::string, bool)>();
  return op;
}
inline auto upsample_concat_out_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("msfast::upsample_concat", "out")
                       .typed<void(at::TensorList, c10::SymIntArrayRef, std::string, bool, at::Tensor&)>();
  return op;
}
inline auto upsample_concat_backward_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("msfast::upsample_concat_backward", "")
                       .typed<std::vector<at::Tensor>(const at::Tensor&, c10::SymIntArrayRef, std::string,
                                                      bool, bool, const c10::List<bool>&)>();
  return op;
}

}  // namespace msfast
