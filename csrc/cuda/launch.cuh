// The CUDA launch, included by one file per source dtype (csrc/cuda/kernels_*.cu) so that
// the kernels build in parallel: the kernel template, the launch of a call's plan, and
// run_src<S>, which runs a call whose inputs are of type S. The upload and the device table
// cache, shared by all, are in resample_cuda.cu.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <functional>
#include <string>
#include <type_traits>
#include <vector>

#include "msfast/gather_plan.h"

namespace msfast {
namespace cuda {

constexpr int kThreads = 128;

// The job and term descriptors travel in the kernel's parameters when they fit (nearly
// every call: about 170 bytes per output): no upload, nothing to allocate, and a CUDA graph
// records them with the launch. 3840 bytes keeps every parameter within the classic 4 KiB.
constexpr int kParamDescBytes = 3840;
struct DescParam {
  int4 data[kParamDescBytes / 16];
};

// Blocks of 128 threads, and a register bound per float32 kernel: a work item's chain of
// dependent loads (descriptors, tables, sources) is long, so the kernel needs many items in
// flight. CUDA 13, sm_90: the upscale kernel fits 80 registers (24 warps per SM; 24 bytes
// spilled), the general one 96 (20 warps; none spilled, where 128 would leave 16 warps).
// The float64 kernels need more and are left unconstrained.
template <typename Shape, typename acc_t>
constexpr int kMinBlocks = sizeof(acc_t) != 4 ? 1 : Shape::kShortTaps ? 6 : 5;

// Descriptors are copied to shared memory once per block, each kernel's first step: every
// work item reads them, and from global memory their chain of dependent loads would dominate.
// They come from the parameters, or from desc_global where they did not fit there.
__device__ __forceinline__ void load_descriptors(int4* smem, const DescParam& pd, const int4* desc_global,
                                                 int desc_bytes) {
  if (desc_global) {
    for (int i = threadIdx.x; i < desc_bytes / 16; i += kThreads) smem[i] = desc_global[i];
  } else {
    for (int i = threadIdx.x; i < desc_bytes / 16; i += kThreads) smem[i] = pd.data[i];
  }
  __syncthreads();
}

// The gather: descriptors [jobs][terms], one work item per thread at a time.
template <typename Shape, typename src_t, typename dst_t, typename acc_t, typename I>
__global__ void __launch_bounds__(kThreads, kMinBlocks<Shape, acc_t>)
resample_kernel(const __grid_constant__ DescParam pd, const int4* __restrict__ desc_global, int desc_bytes,
                int n_jobs, int terms_off, const int32_t* __restrict__ starts, const acc_t* __restrict__ weights,
                std::make_unsigned_t<I> total) {
  using U = std::make_unsigned_t<I>;
  extern __shared__ int4 smem[];
  load_descriptors(smem, pd, desc_global, desc_bytes);
  const auto* jobs = reinterpret_cast<const GJob<I>*>(smem);
  const auto* terms = reinterpret_cast<const GTerm<I>*>(reinterpret_cast<const char*>(smem) + terms_off);
  const U stride = static_cast<U>(gridDim.x) * kThreads;
  for (U item = static_cast<U>(blockIdx.x) * kThreads + threadIdx.x; item < total; item += stride)
    gather_item<Shape, src_t, dst_t, acc_t, I>(jobs, n_jobs, terms, starts, weights, item);
}

// A blob on the device, copied on `stream` (resample_cuda.cu).
at::Tensor upload(const Blob& b, const at::Device& device, cudaStream_t stream, bool capturing);

// The device copy of a call's tables, from the cache or uploaded now (resample_cuda.cu);
// `make` builds the host blob, only where an upload is needed.
at::Tensor device_tables(const std::string& key, const std::function<Blob()>& make, const at::Device& device,
                         cudaStream_t stream, bool capturing);

inline bool stream_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  return capture != cudaStreamCaptureStatusNone;
}

// A call's descriptors and tables where its kernel reads them: the descriptors in the kernel's
// parameters, or uploaded where they do not fit; [starts][weights] from the device cache.
// Holding the tensors keeps them until the launch: they go back to the caching allocator
// after it, which is stream-ordered, so their blocks are not handed out to other work on
// this stream before the kernel has run.
template <typename acc_t>
struct CallData {
  DescParam pd;
  at::Tensor desc_dev, tab;  // desc_dev: only where the descriptors do not fit the parameters
  int64_t weights_off = 0;
  const int4* desc_global() const {
    return desc_dev.defined() ? static_cast<const int4*>(desc_dev.data_ptr()) : nullptr;
  }
  const int32_t* starts() const { return static_cast<const int32_t*>(tab.data_ptr()); }
  const acc_t* weights() const {
    return reinterpret_cast<const acc_t*>(static_cast<const char*>(tab.data_ptr()) + weights_off);
  }
};

template <typename acc_t, typename Plan>
CallData<acc_t> call_data(const Plan& g, const Descriptors& d, const at::Device& device, cudaStream_t stream,
                          bool capturing) {
  CallData<acc_t> c;
  if (d.bytes <= kParamDescBytes) {
    std::memcpy(c.pd.data, d.blob.bytes.data(), d.bytes);
  } else {
    c.desc_dev = upload(d.blob, device, stream, capturing);
  }
  // The tables from the device cache; the host blob to upload them is built only where the
  // cache has no copy yet.
  const GatherTables<acc_t>& t = *g.tab;
  c.weights_off = weights_offset(t);
  c.tab = device_tables(t.key, [&] { return tables_blob(t); }, device, stream, capturing);
  return c;
}

// Blocks of `kernel` (kThreads threads) that run at once on an SM with `smem` bytes of dynamic
// shared memory, asked of CUDA once per kernel, size and device (a call of the same shape asks
// nothing). A kernel whose blocks loop over their work runs best with as many blocks as fit:
// with more, the extra blocks wait for the first ones to end and then run their whole share.
template <auto kernel>
int resident_blocks(int64_t smem, int device) {
  static std::atomic<int64_t> last{-1};  // ((smem * 256 + device) << 8) | blocks
  const int64_t key = smem * 256 + (device & 255);
  const int64_t seen = last.load();
  if (seen >= 0 && (seen >> 8) == key) return static_cast<int>(seen & 255);
  int n = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, static_cast<size_t>(smem)));
  last.store((key << 8) | std::min(n, 255));
  return n;
}

template <typename src_t, typename dst_t, typename acc_t, typename Plan>
void launch(const Plan& g, const at::Device& device) {
  using I = typename Plan::index_t;
  if (g.total == 0) return;
  const auto* props = at::cuda::getCurrentDeviceProperties();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // [jobs][terms], copied to shared memory by each block (the jobs at its start).
  const Descriptors desc = describe(g);
  const int64_t desc_bytes = desc.bytes;
  TORCH_CHECK_VALUE(desc_bytes <= static_cast<int64_t>(props->sharedMemPerBlock),
                    "msfast: too many pyramid levels or features in one call (", g.jobs.size(), " outputs, ",
                    g.terms.size(), " inputs)");
  const auto c = call_data<acc_t>(g, desc, device, stream, stream_capturing(stream));
  // 32 blocks an SM, where 5 or 6 of the float32 kernels' fit (the grid that ran on the H200);
  // MSFAST_CUDA_GRID=resident (opt-in until measured on a GPU): as many as fit, without the
  // tail of 32 / 6 = 5.3 rounds of shares taking 6.
  constexpr auto kernel = resample_kernel<typename Plan::Shape, src_t, dst_t, acc_t, I>;
  const int64_t per_sm = cuda_grid_resident() ? std::max(1, resident_blocks<kernel>(desc_bytes, device.index())) : 32;
  const int64_t blocks = std::min<int64_t>((g.total + kThreads - 1) / kThreads, props->multiProcessorCount * per_sm);
  kernel<<<blocks, kThreads, desc_bytes, stream>>>(c.pd, c.desc_global(), static_cast<int>(desc_bytes),
                                                  static_cast<int>(g.jobs.size()), static_cast<int>(desc.terms_off),
                                                  c.starts(), c.weights(),
                                                  static_cast<std::make_unsigned_t<I>>(g.total));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The tiled path (gather.h: TileJob; opt-in while it has not run on a GPU, see
// cuda_tiles_enabled): a block takes tiles in turn, copies each one's source window into
// shared memory after the descriptors, and computes the tile from there, a column per thread.
// The descriptors are [tile jobs][jobs][terms].
static_assert(kTileThreads == kThreads, "load_descriptors and resident_blocks take blocks of kThreads");

template <typename src_t, typename dst_t, typename acc_t, typename I>
__global__ void __launch_bounds__(kTileThreads)
tile_kernel(const __grid_constant__ DescParam pd, const int4* __restrict__ desc_global, int desc_bytes, int n_jobs,
            int jobs_off, int terms_off, const int32_t* __restrict__ starts, const acc_t* __restrict__ weights,
            std::make_unsigned_t<I> tiles) {
  using U = std::make_unsigned_t<I>;
  extern __shared__ int4 smem[];
  load_descriptors(smem, pd, desc_global, desc_bytes);
  const char* base = reinterpret_cast<const char*>(smem);
  const auto* tjobs = reinterpret_cast<const TileJob<I>*>(base);
  const auto* jobs = reinterpret_cast<const GJob<I>*>(base + jobs_off);
  const auto* terms = reinterpret_cast<const GTerm<I>*>(base + terms_off);
  acc_t* win = reinterpret_cast<acc_t*>(reinterpret_cast<char*>(smem) + desc_bytes);
  // A tile's position is decoded once per block, by thread 0, for the next tile while the
  // block computes this one (not in every thread: 128 copies of a binary search, divisions
  // and table loads per tile): every thread reads it before the first barrier of an
  // iteration, thread 0 overwrites it after that barrier, and the last barrier publishes it.
  __shared__ TilePos<I> next;
  U tile = blockIdx.x;
  if (threadIdx.x == 0 && tile < tiles) next = tile_pos<I>(tjobs, jobs, n_jobs, terms, starts, tile);
  __syncthreads();
  for (; tile < tiles; tile += gridDim.x) {
    const TilePos<I> p = next;
    const GJob<I>& j = jobs[p.job];
    const GTerm<I>& tm = terms[j.first_term];
    tile_stage<src_t, acc_t, I>(tm, p, win, static_cast<I>(threadIdx.x), I{kTileThreads});
    __syncthreads();
    if (threadIdx.x == 0 && tile + gridDim.x < tiles)
      next = tile_pos<I>(tjobs, jobs, n_jobs, terms, starts, tile + gridDim.x);
    tile_column<dst_t, acc_t, I>(j, tm, p, starts, weights, win, static_cast<I>(threadIdx.x), I{kTileThreads});
    __syncthreads();  // the window is rewritten, and `next` read, in the next iteration
  }
}

// Launches a call's tiles; false (nothing launched) where the descriptors and the largest
// window do not fit a block's shared memory, which leaves the call to the gather kernel.
template <typename src_t, typename dst_t, typename acc_t, typename Plan>
bool launch_tiles(const Plan& g, const TilePlan<typename Plan::index_t>& tp, const at::Device& device) {
  using I = typename Plan::index_t;
  const auto* props = at::cuda::getCurrentDeviceProperties();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Descriptors desc = describe(g, &tp);
  const int64_t desc_bytes = desc.bytes;
  const int64_t smem = desc_bytes + tp.window * static_cast<int64_t>(sizeof(acc_t));
  if (smem + static_cast<int64_t>(sizeof(TilePos<I>)) > static_cast<int64_t>(props->sharedMemPerBlock)) return false;
  // As many blocks as run at once, each looping over tiles (16 blocks an SM, 1.6 times the 10
  // that fit at 46 registers, would take 2 rounds of shares where 1.6 do).
  const int per_sm = resident_blocks<tile_kernel<src_t, dst_t, acc_t, I>>(smem, device.index());
  if (per_sm < 1) return false;
  const auto c = call_data<acc_t>(g, desc, device, stream, stream_capturing(stream));
  const int64_t blocks = std::min<int64_t>(tp.tiles, int64_t{per_sm} * props->multiProcessorCount);
  tile_kernel<src_t, dst_t, acc_t, I><<<blocks, kTileThreads, smem, stream>>>(
      c.pd, c.desc_global(), static_cast<int>(desc_bytes), static_cast<int>(g.jobs.size()),
      static_cast<int>(desc.jobs_off), static_cast<int>(desc.terms_off), c.starts(), c.weights(),
      static_cast<std::make_unsigned_t<I>>(tp.tiles));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  tiled_calls().fetch_add(1);
  return true;
}

// Runs a call whose inputs have type S (its outputs: dst_type), in its item shape and the
// narrowest index type it fits. Instantiated once per S, each in its own file.
template <typename S>
void run_src(const std::vector<Job>& jobs, at::ScalarType dst_type) {
  with_types(c10::CppTypeToScalarType<S>::value, dst_type, [&](auto, auto d, auto a) {
    using D = decltype(d);
    using A = decltype(a);
    with_gather_plan<A>(jobs, [&](const auto& plan) {
      if constexpr (std::is_same_v<typename std::decay_t<decltype(plan)>::Shape, UpscaleShape>) {
        if (cuda_tiles_enabled()) {
          const auto tp = make_tile_plan<A>(jobs, plan);
          if (tp.tiles > 0 && launch_tiles<S, D, A>(plan, tp, jobs[0].dst.device())) return;
        }
      }
      launch<S, D, A>(plan, jobs[0].dst.device());
    });
  });
}

}  // namespace cuda
}  // namespace msfast
