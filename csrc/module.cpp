// msfast._C: importing it registers the operators (the TORCH_LIBRARY blocks of the other
// translation units run at load time). The Python module answers what was built, and has
// entry points that call the operators through the dispatcher with typed arguments.
#include <torch/extension.h>

#include <atomic>
#include <optional>
#include <string>
#include <vector>

#include "msfast/dispatch.h"
#include "msfast/plan.h"  // resize_layouts
#include "msfast/vmap.h"  // fold, stack_samples

#ifndef MSFAST_TORCH_VERSION
#define MSFAST_TORCH_VERSION "unknown"
#endif
#ifndef MSFAST_CUDA_ARCHS
#define MSFAST_CUDA_ARCHS ""
#endif

namespace msfast {
// Defined by csrc/cuda/*.cu when the CUDA kernels were compiled in.
bool cuda_kernels_built();
const char* cpu_isa();  // csrc/cpu/resample_cpu.cpp
void empty_cpu_cache();  // csrc/cpu/out_cache.cpp
void set_cpu_runner(const std::string& name);  // csrc/cpu/gather_cpu.cpp
std::atomic<int64_t>& stencil_terms_planned();  // csrc/cpu/gather_cpu.cpp
std::atomic<int64_t>& small_jobs_planned();  // csrc/cpu/gather_cpu.cpp
std::atomic<int64_t>& stream_bytes();  // csrc/cpu/gather_cpu.cpp
std::atomic<int64_t>& streamed_calls();  // csrc/cpu/gather_cpu.cpp
std::atomic<bool>& staged_rows();  // csrc/cpu/gather_cpu.cpp
std::atomic<int64_t>& tiled_calls();  // csrc/cpu/gather_cpu.cpp
bool set_cuda_tiles(bool on);  // csrc/cpu/gather_cpu.cpp
bool set_cuda_grid_resident(bool on);  // csrc/cpu/gather_cpu.cpp
std::atomic<bool>& table_cache_check();  // csrc/cpu/gather_cpu.cpp
std::atomic<int64_t>& table_cache_hits();  // csrc/cpu/gather_cpu.cpp
std::atomic<int64_t>& table_cache_misses();  // csrc/cpu/gather_cpu.cpp

namespace {
using Doubles = std::optional<std::vector<double>>;

// The operators called from Python without torch.ops: an OpOverload call converts every
// argument to an IValue by the schema and calls the kernel boxed, about 5 us of a 12 us small
// CPU pyramid call on this project's Xeon. These go through the same dispatcher (autograd,
// the device kernels, torch_dispatch modes); msfast/_ops.py uses them for plain tensors
// outside torch.compile and torch_function modes, and torch.ops otherwise. The GIL is
// released around the call, as torch.ops does.
std::vector<at::Tensor> pyramid_entry(const at::Tensor& x, c10::SymIntArrayRef sizes, const Doubles& scales,
                                      std::string mode, bool antialias, bool align_corners, const Doubles& mean,
                                      const Doubles& std, std::optional<at::ScalarType> out_dtype) {
  return pyramid_op().call(x, sizes, view(scales), std::move(mode), antialias, align_corners, view(mean), view(std),
                           out_dtype);
}
at::Tensor upsample_concat_entry(const std::vector<at::Tensor>& features, c10::SymIntArrayRef size,
                                 std::string mode, bool align_corners) {
  return upsample_concat_op().call(features, size, std::move(mode), align_corners);
}
void upsample_concat_out_entry(const std::vector<at::Tensor>& features, c10::SymIntArrayRef size, std::string mode,
                               bool align_corners, at::Tensor out) {
  upsample_concat_out_op().call(features, size, std::move(mode), align_corners, out);
}
}  // namespace
}  // namespace msfast

PYBIND11_MODULE(_C, m) {
  m.doc() = "msfast compiled kernels";
  using release = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("pyramid", &msfast::pyramid_entry, release(),
        "torch.ops.msfast.pyramid's typed entry point (arguments as in its schema)");
  m.def("upsample_concat", &msfast::upsample_concat_entry, release(),
        "torch.ops.msfast.upsample_concat's typed entry point");
  m.def("upsample_concat_out", &msfast::upsample_concat_out_entry, release(),
        "torch.ops.msfast.upsample_concat.out's typed entry point (out last, positional)");
  m.def("resize_layouts", [](std::vector<int64_t> sizes, std::vector<int64_t> strides, bool normalized) {
        const auto l = msfast::resize_layouts(msfast::strides_only(c10::fromIntArrayRefSlow(sizes),
                                                                   c10::fromIntArrayRefSlow(strides)),
                                              normalized);
        return pybind11::make_tuple(l.channels_last, l.nearest_channels_last);
      },
        "(channels_last, nearest_channels_last) of a resize of a tensor of these sizes and strides, normalized "
        "or not (csrc/msfast/plan.h: resize_layouts), for the fake kernels of msfast/_ops.py");
  m.def("fold", &msfast::fold,
        "fold(xb, normalized): xb [B, N, C, H, W] as [B * N, C, H, W] resized as each sample alone, or None "
        "(csrc/msfast/vmap.h), for the batching kernels of msfast/_func.py");
  m.def("stack_samples", &msfast::stack_samples,
        "Per-sample results stacked along a new first dimension, each keeping its layout (csrc/msfast/vmap.h)");
  m.def("cuda_built", &msfast::cuda_kernels_built, "True when the CUDA kernels were compiled in");
  m.def("empty_cpu_cache", &msfast::empty_cpu_cache, "Free the idle blocks of the CPU output cache");
  m.def("_set_cpu_runner", &msfast::set_cpu_runner,
        "Testing hook: run CPU calls with the CPU kernels ('native', the default; 'no-stencil' without "
        "their row stencil and window for integer and short-period factors and upscales; 'no-small' without "
        "their small-plane path) or with the CUDA kernel's code ('gather'; 'gather64' forces its 64-bit index "
        "path; 'tiles' and 'tiles64' the CUDA tiled path's code where a call fits it, the gather's "
        "otherwise)");
  m.def("_tiled_calls", []() { return msfast::tiled_calls().load(); },
        "Testing hook: how many calls have run on the tiled path (CUDA, or the CPU runner 'tiles')");
  m.def("_set_cuda_tiles", &msfast::set_cuda_tiles,
        "Whether CUDA calls that fit the tiled path take it (default: on when MSFAST_CUDA_TILES=1, off "
        "otherwise, as it has not yet run on a GPU); returns the previous setting");
  m.def("_set_cuda_grid_resident", &msfast::set_cuda_grid_resident,
        "Whether the CUDA gather kernel's grid is as many blocks as fit at once instead of 32 an SM "
        "(default: on when MSFAST_CUDA_GRID=resident, off otherwise, as it has not yet run on a GPU); "
        "returns the previous setting");
  m.def("_table_cache", []() {
        return pybind11::make_tuple(msfast::table_cache_hits().load(), msfast::table_cache_misses().load());
      },
        "Testing hook: (hits, misses) of the gather path's cache of tap tables (CUDA, or the CPU runners "
        "'gather' and 'tiles')");
  m.def("_set_table_cache_check", [](bool on) { return msfast::table_cache_check().exchange(on); },
        "Testing hook: whether every hit of the tap-table cache is compared with tables built afresh (an "
        "internal error where they differ); returns the previous setting");
  m.def("_small_plane_jobs", []() { return msfast::small_jobs_planned().load(); },
        "Testing hook: how many NCHW jobs the CPU kernels have run with the small-plane path");
  m.def("_stencil_terms", []() { return msfast::stencil_terms_planned().load(); },
        "Testing hook: how many NCHW terms the CPU kernels have run with the row stencil or window");
  m.def("_set_stream_bytes", [](int64_t n) { return msfast::stream_bytes().exchange(n); },
        "Testing hook: CPU calls moving more bytes than this (inputs read and output written) use "
        "non-temporal stores where every byte of an output can take one (default 16 MiB); returns the "
        "previous value");
  m.def("_set_staged_rows", [](bool on) { return msfast::staged_rows().exchange(on); },
        "Testing hook: whether 16-bit NCHW blended rows may take non-temporal stores through a staging "
        "buffer (default: on Intel processors); returns the previous value");
  m.def("_streamed_calls", []() { return msfast::streamed_calls().load(); },
        "Testing hook: how many CPU calls have used non-temporal stores");
  m.def("build_info", []() {
    pybind11::dict d;
    d["torch_version"] = MSFAST_TORCH_VERSION;
#ifdef MSFAST_WITH_CUDA
    d["cuda"] = true;
#else
    d["cuda"] = false;
#endif
    d["cuda_archs"] = MSFAST_CUDA_ARCHS;
    d["cpu_isa"] = msfast::cpu_isa();
#ifdef _OPENMP
    d["openmp"] = true;
#else
    d["openmp"] = false;
#endif
    return d;
  });
}
