// The fold of torch.vmap's batching kernels (msfast/_func.py, the FuncTorchBatched key): the
// vmapped dimension folded into N, [B, N, C, H, W] as [B * N, C, H, W], so that one call
// resizes every sample as it would be resized alone, with the same layout and nearest formulas
// (plan.h: resize_layouts), and vmap gives what a loop over the samples gives. The fold is a
// view where one keeps them, else a copy made to keep them; where neither does (a size-1
// dimension's stride can decide a sample's layout, and the folded batch has other sizes), the
// kernels loop over the samples and stack them (`stack_samples`). Every step is an
// out-of-place ATen op, so a vmap nested in another batches it too. (The kernels themselves
// are Python: C++ ones would need ATen/functorch's headers, which include nlohmann/json.hpp,
// which torch's wheels do not ship.) The older vmap (the Batched key) is
// csrc/legacy_vmap.cpp.
#include "msfast/vmap.h"

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "msfast/plan.h"

namespace msfast {

std::optional<at::Tensor> fold(const at::Tensor& xb, bool normalized) {
  TORCH_CHECK(xb.dim() == 5, "msfast: fold takes a [B, N, C, H, W] tensor, got ", xb.dim(), "-D");
  const auto sizes = xb.sym_sizes();
  const auto strides = xb.sym_strides();
  if (sizes[0] == 0) return xb.view_symint({0, sizes[2], sizes[3], sizes[4]});
  const Layouts want = resize_layouts(strides_only(sizes.slice(1), strides.slice(1)), normalized);
  const auto keeps = [&](const at::Tensor& folded) {
    const Layouts got = resize_layouts(strides_only(folded), normalized);
    return got.channels_last == want.channels_last && got.nearest_channels_last == want.nearest_channels_last;
  };
  const c10::SymInt bn = sizes[0] * sizes[1];
  // A view merges B and N where N's elements sit stride apart and B's N * stride apart (or
  // either is 1): the condition under which Tensor.view succeeds, tested rather than caught.
  if (sizes[0] == 1 || sizes[1] == 1 || strides[0] == sizes[1] * strides[1]) {
    at::Tensor folded = xb.view_symint({bn, sizes[2], sizes[3], sizes[4]});
    if (keeps(folded)) return folded;
  }
  at::Tensor copy;
  if (!want.channels_last) {
    copy = xb.reshape_symint({bn, sizes[2], sizes[3], sizes[4]}).contiguous();
  } else {
    const at::Tensor nhwc = xb.permute({0, 1, 3, 4, 2});
    if (want.nearest_channels_last) {  // dense channels_last
      copy = nhwc.reshape_symint({bn, sizes[3], sizes[4], sizes[2]}).permute({0, 3, 1, 2});
    } else {
      // Channels_last but not dense (a channels_last batch sliced along C, say): one padding
      // channel per pixel keeps the strides' order and leaves the copy not dense.
      copy = at::constant_pad_nd(nhwc, {0, 1})
                 .reshape_symint({bn, sizes[3], sizes[4], sizes[2] + 1})
                 .slice_symint(3, 0, sizes[2])
                 .permute({0, 3, 1, 2});
    }
  }
  if (keeps(copy)) return copy;
  return std::nullopt;
}

at::Tensor stack_samples(const std::vector<at::Tensor>& samples) {
  TORCH_CHECK(!samples.empty(), "msfast: stack_samples takes at least one tensor");
  const at::Tensor like = strides_only(samples[0]);
  if (!like.is_contiguous(at::MemoryFormat::ChannelsLast) || like.is_contiguous()) return at::stack(samples);
  std::vector<at::Tensor> nhwc;
  for (const auto& t : samples) nhwc.push_back(t.permute({0, 2, 3, 1}));
  return at::stack(nhwc).permute({0, 1, 4, 2, 3});
}

}  // namespace msfast

