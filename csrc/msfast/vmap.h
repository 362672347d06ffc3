// The fold of torch.vmap's batching kernels (msfast/_func.py, through msfast._C; csrc/vmap.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace msfast {

// xb [B, N, C, H, W] as one batch [B * N, C, H, W] that an operator resizes as it resizes each
// xb[b] alone (the same resize_layouts, normalized or not): a view, or a copy, or nullopt where
// neither keeps them and the caller must loop over the samples.
std::optional<at::Tensor> fold(const at::Tensor& xb, bool normalized);

// Per-sample results (new dense 4-D tensors) stacked along a new first dimension, each
// keeping its layout.
at::Tensor stack_samples(const std::vector<at::Tensor>& samples);

}  // namespace msfast
