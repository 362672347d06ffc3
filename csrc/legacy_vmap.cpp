// The operators under PyTorch's older vmap (torch._vmap_internals, the Batched dispatch key):
// what torch.autograd.grad(is_grads_batched=True), torch.autograd.functional.jacobian and
// hessian with vectorize=True, and gradcheck's batched checks run the backward under. ATen's
// fallback for an operator without a batching rule there loops over the batch, but not for an
// operator that takes or returns a list of tensors, as all four of msfast's do: this is that
// loop for them (torch.vmap, the newer one, has the batching kernels of msfast/_func.py).
//
// One call per sample, each sample's arguments sliced from the batched ones, so each sample is
// resized exactly as it would be alone (its layout and nearest formulas); the results are
// stacked with each sample's strides. A loop costs a call per sample, which these batched
// gradient APIs accept (they are the older vmap's users, not a hot path).
#include <ATen/ATen.h>
#include <ATen/LegacyBatchedTensorImpl.h>
#include <ATen/LegacyVmapTransforms.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <unordered_map>
#include <vector>

namespace msfast {
namespace {

// A legacy-batched tensor's physical tensor, its batch dimensions (of every level in the call)
// first, size 1 where it lacks a level.
using Physical = std::unordered_map<const c10::TensorImpl*, at::Tensor>;

// The argument with every tensor in it replaced by f(tensor): a tensor, a list of tensors, or a
// list of optional tensors (pyramid_backward's gradients); other arguments as they are.
template <typename F>
c10::IValue map_tensors(const c10::IValue& v, F&& f) {
  if (v.isTensor()) return f(v.toTensor());
  if (v.isTensorList()) {
    c10::List<at::Tensor> out;
    for (const at::Tensor& t : v.toTensorList()) out.push_back(f(t));
    return out;
  }
  if (v.isList() && v.type()->containedType(0)->kind() == c10::TypeKind::OptionalType) {
    c10::List<std::optional<at::Tensor>> out;
    for (const c10::IValue& e : v.toListRef())
      out.push_back(e.isTensor() ? std::optional<at::Tensor>(f(e.toTensor())) : std::nullopt);
    return out;
  }
  return v;
}

// The argument with each batched tensor replaced by its sample `index` (one index per batch
// dimension; a size-1 dimension is shared by every sample).
c10::IValue sample_of(const c10::IValue& v, const Physical& physical, const std::vector<int64_t>& index) {
  return map_tensors(v, [&](const at::Tensor& t) {
    const auto it = physical.find(t.unsafeGetTensorImpl());
    if (it == physical.end()) return t;
    at::Tensor p = it->second;
    for (int64_t i : index) p = p.select(0, p.size(0) == 1 ? 0 : i);
    return p;
  });
}

void legacy_vmap_loop(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const auto& schema = op.schema();
  TORCH_INTERNAL_ASSERT(schema.returns().size() == 1);
  const size_t n_args = schema.arguments().size();
  const std::vector<c10::IValue> args(stack->end() - n_args, stack->end());
  torch::jit::drop(*stack, n_args);

  std::vector<at::Tensor> batched;
  for (const auto& a : args)
    map_tensors(a, [&](const at::Tensor& t) {
      if (at::isBatchedTensor(t)) batched.push_back(t);
      return t;
    });
  TORCH_INTERNAL_ASSERT(!batched.empty());
  const auto views = at::MultiBatchVmapTransform::logicalToPhysical(batched);
  const int64_t dims = views[0].numBatchDims();
  std::vector<int64_t> sizes(dims, 1);
  Physical physical;
  for (size_t i = 0; i < views.size(); ++i) {
    physical.emplace(batched[i].unsafeGetTensorImpl(), views[i].tensor());
    for (int64_t d = 0; d < dims; ++d) sizes[d] = std::max(sizes[d], views[i].tensor().size(d));
  }
  int64_t samples = 1;
  for (int64_t s : sizes) samples *= s;
  TORCH_CHECK(samples > 0, "msfast: ", schema.name(), " under vmap: a batch of size 0 is not supported");

  std::vector<std::vector<at::Tensor>> outs;  // per sample, its result (or results)
  std::vector<int64_t> index(dims);
  for (int64_t s = 0; s < samples; ++s) {
    for (int64_t d = dims - 1, r = s; d >= 0; --d) {
      index[d] = r % sizes[d];
      r /= sizes[d];
    }
    for (const auto& a : args) stack->push_back(sample_of(a, physical, index));
    op.callBoxed(stack);
    const c10::IValue out = torch::jit::pop(*stack);
    outs.push_back(out.isTensor() ? std::vector<at::Tensor>{out.toTensor()} : out.toTensorVector());
  }

  // Each result stacked along the batch dimensions with each sample's strides (a result is a
  // new dense tensor, which spans numel() elements).
  const auto to_logical = views[0].getPhysicalToLogicalMap();
  std::vector<at::Tensor> results;
  for (size_t k = 0; k < outs[0].size(); ++k) {
    const at::Tensor& first = outs[0][k];
    TORCH_INTERNAL_ASSERT(first.is_non_overlapping_and_dense());
    std::vector<int64_t> shape{samples}, strides{first.numel()};
    shape.insert(shape.end(), first.sizes().begin(), first.sizes().end());
    strides.insert(strides.end(), first.strides().begin(), first.strides().end());
    at::Tensor stacked = at::empty_strided(shape, strides, first.options());
    for (int64_t s = 0; s < samples; ++s) stacked.select(0, s).copy_(outs[s][k]);
    std::vector<int64_t> batched_shape(sizes);
    batched_shape.insert(batched_shape.end(), first.sizes().begin(), first.sizes().end());
    results.push_back(to_logical.apply(stacked.view(batched_shape)));
  }
  if (schema.returns()[0].type()->kind() == c10::TypeKind::TensorType) {
    stack->push_back(results[0]);
  } else {
    stack->push_back(c10::List<at::Tensor>(results));
  }
}

}  // namespace
}  // namespace msfast

TORCH_LIBRARY_IMPL(msfast, Batched, m) {
  for (const char* name : {"pyramid", "pyramid_backward", "upsample_concat", "upsample_concat_backward"})
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&msfast::legacy_vmap_loop>());
}
