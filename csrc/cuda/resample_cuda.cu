// CUDA backend: runs jobs (see msfast/ops.h) in one kernel launch per call. Its arithmetic
// is gather_item (msfast/gather.h, host+device): one thread computes kVec consecutive values
// in kPlanes planes as sum_ky wy * sum_kx wx * src in a fixed order, from the CPU's tap
// tables (msfast/gather_plan.h). A backward (transposed tables) is a gather with no atomics,
// bitwise deterministic. The CPU tests run gather_item too (csrc/cpu/gather_cpu.cpp), so
// what is left to this file is the launch: the descriptors (in the kernel's parameters),
// the tables (cached on the device), the grid.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CachingHostAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <cstring>
#include <vector>

#include "msfast/gather_plan.h"

namespace msfast {
namespace {

constexpr int kThreads = 128;

// The job and term descriptors travel in the kernel's parameters when they fit (nearly
// every call: about 170 bytes per output): no upload, nothing to allocate, and a CUDA graph
// records them with the launch. 3840 bytes keeps every parameter within the classic 4 KiB.
constexpr int kParamDescBytes = 3840;
struct DescParam {
  int4 data[kParamDescBytes / 16];
};

// Descriptors (jobs, then terms) are copied to shared memory once per block: every item
// reads them, and from global memory their chain of dependent loads would dominate. They
// come from the parameters, or from desc_global where they did not fit there.
// Blocks of 128 threads, and for the float32 kernels at most 128 registers a thread: a work
// item's chain of dependent loads (descriptors, tables, sources) is long, so the kernel needs
// many items in flight. They take 95 registers (CUDA 13, sm_90, no spill), so 20 warps fit an
// SM in blocks of 128 where blocks of 256 fit 16; a bound of 96 made the compiler spill.
// The float64 kernels need more and are left unconstrained.
template <typename acc_t, typename I>
constexpr int kMinBlocks = sizeof(acc_t) == 4 ? 4 : 1;

template <typename src_t, typename dst_t, typename acc_t, typename I>
__global__ void __launch_bounds__(kThreads, kMinBlocks<acc_t, I>)
resample_kernel(const __grid_constant__ DescParam pd, const int4* __restrict__ desc_global, int desc_bytes,
                int n_jobs, int terms_off, const int32_t* __restrict__ starts, const acc_t* __restrict__ weights,
                std::make_unsigned_t<I> total) {
  using U = std::make_unsigned_t<I>;
  extern __shared__ int4 smem[];
  if (desc_global) {
    for (int i = threadIdx.x; i < desc_bytes / 16; i += kThreads) smem[i] = desc_global[i];
  } else {
    for (int i = threadIdx.x; i < desc_bytes / 16; i += kThreads) smem[i] = pd.data[i];
  }
  __syncthreads();
  const auto* jobs = reinterpret_cast<const GJob<I>*>(smem);
  const auto* terms = reinterpret_cast<const GTerm<I>*>(reinterpret_cast<const char*>(smem) + terms_off);
  const U stride = static_cast<U>(gridDim.x) * kThreads;
  for (U item = static_cast<U>(blockIdx.x) * kThreads + threadIdx.x; item < total; item += stride)
    gather_item<src_t, dst_t, acc_t, I>(jobs, n_jobs, terms, starts, weights, item);
}

// Copies bytes carried in the kernel's own parameters: under CUDA graph capture the
// parameters are recorded in the graph, so a replay needs no host memory that could have
// been reused since (a pinned host->device copy would read it at replay time).
struct ParamChunk {
  char* dst;
  int n;
  char data[4000];  // kernel parameters are limited to 4 KiB
};
__global__ void upload_kernel(ParamChunk c) {
  for (int i = threadIdx.x; i < c.n; i += blockDim.x) c.dst[i] = c.data[i];
}

// Host-side blob builder: 16-byte aligned appends.
struct Blob {
  std::vector<char> bytes;
  int64_t put(const void* p, size_t n) {
    const size_t off = (bytes.size() + 15) / 16 * 16;
    bytes.resize(off + n);
    if (n) std::memcpy(bytes.data() + off, p, n);
    return static_cast<int64_t>(off);
  }
};

// A blob on the device, copied on `stream`.
at::Tensor upload(const Blob& b, const at::Device& device, cudaStream_t stream, bool capturing) {
  const int64_t n = static_cast<int64_t>(b.bytes.size());
  auto dev = at::empty({n}, at::TensorOptions().dtype(at::kByte).device(device));
  if (!capturing) {
    // A pinned staging block, handed back to the caching host allocator with an event on
    // this stream (what Tensor.to(non_blocking=True) does, minus the aten ops: the copy is
    // msfast's own bookkeeping, not a copy of user data).
    at::HostAllocator* alloc = at::getHostAllocator(at::kCUDA);
    at::DataPtr host = alloc->allocate(n);
    std::memcpy(host.get(), b.bytes.data(), n);
    C10_CUDA_CHECK(cudaMemcpyAsync(dev.data_ptr(), host.get(), n, cudaMemcpyHostToDevice, stream));
    alloc->record_event(host.get(), host.get_context(), at::cuda::getCurrentCUDAStream().unwrap());
    return dev;
  }
  char* d = static_cast<char*>(dev.data_ptr());
  ParamChunk c;
  for (int64_t off = 0; off < n; off += sizeof(c.data)) {
    c.dst = d + off;
    c.n = static_cast<int>(std::min<int64_t>(sizeof(c.data), n - off));
    std::memcpy(c.data, b.bytes.data() + off, c.n);
    upload_kernel<<<1, kThreads, 0, stream>>>(c);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return dev;
}

// The tap tables of a call ([starts][weights]) stay on the device, keyed by what they depend
// on (GatherPlan::key): a training or serving loop calls with the same shapes again and
// again, and a per-call upload (a pinned block, a copy, an event) was a large part of a small
// call's host time. The cache holds at most kTableCacheBytes and then stops growing; an
// entry is never freed, so a CUDA graph that captured its address can always replay.
constexpr int64_t kTableCacheBytes = int64_t{64} << 20;

struct CachedTables {
  at::Tensor t;
  cudaEvent_t copied;  // recorded after the upload, on the stream that made it
  std::atomic<bool> ready{false};
};

struct TableCache {
  std::mutex mu;
  std::unordered_map<std::string, std::shared_ptr<CachedTables>> map;
  int64_t bytes = 0;
};

// Never destroyed: its tensors must not go back to the CUDA allocator after CUDA has shut
// down at exit.
TableCache& table_cache() {
  static auto* c = new TableCache;
  return *c;
}

// The device copy of a call's tables, from the cache or uploaded now. An entry made on one
// stream is used on another only after its copy: once the copy is known complete the entry
// is marked ready; before that a call waits for its event, and a call being captured (where
// that wait cannot be recorded) uploads its own copy instead.
at::Tensor device_tables(const std::string& key, const Blob& b, const at::Device& device, cudaStream_t stream,
                         bool capturing) {
  auto& cache = table_cache();
  std::string k = key;
  key_append(k, device.index());
  std::shared_ptr<CachedTables> e;
  {
    std::lock_guard<std::mutex> g(cache.mu);
    auto it = cache.map.find(k);
    if (it != cache.map.end()) e = it->second;
  }
  if (e) {
    if (e->ready.load()) return e->t;
    if (!capturing) {
      const cudaError_t q = cudaEventQuery(e->copied);
      if (q == cudaSuccess) {
        e->ready.store(true);
      } else {
        if (q != cudaErrorNotReady) C10_CUDA_CHECK(q);
        (void)cudaGetLastError();  // cudaErrorNotReady is not an error to keep
        C10_CUDA_CHECK(cudaStreamWaitEvent(stream, e->copied, 0));
      }
      return e->t;
    }
    return upload(b, device, stream, true);
  }
  at::Tensor t = upload(b, device, stream, capturing);
  const int64_t n = t.numel();
  if (capturing) return t;
  std::lock_guard<std::mutex> g(cache.mu);
  if (cache.bytes + n > kTableCacheBytes || cache.map.count(k)) return t;
  auto entry = std::make_shared<CachedTables>();
  entry->t = t;
  C10_CUDA_CHECK(cudaEventCreateWithFlags(&entry->copied, cudaEventDisableTiming));
  C10_CUDA_CHECK(cudaEventRecord(entry->copied, stream));
  cache.map.emplace(std::move(k), std::move(entry));
  cache.bytes += n;
  return t;
}

template <typename src_t, typename dst_t, typename acc_t, typename Plan>
void launch(const Plan& g, const at::Device& device) {
  using I = typename Plan::index_t;
  if (g.total == 0) return;
  const auto* props = at::cuda::getCurrentDeviceProperties();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  const bool capturing = capture != cudaStreamCaptureStatusNone;
  // [jobs][terms], copied to shared memory by each block.
  Blob desc;
  desc.put(g.jobs.data(), g.jobs.size() * sizeof(GJob<I>));
  const int64_t terms_off = desc.put(g.terms.data(), g.terms.size() * sizeof(GTerm<I>));
  const int64_t desc_bytes = (static_cast<int64_t>(desc.bytes.size()) + 15) / 16 * 16;
  desc.bytes.resize(desc_bytes);
  TORCH_CHECK_VALUE(desc_bytes <= static_cast<int64_t>(props->sharedMemPerBlock),
                    "msfast: too many pyramid levels or features in one call (", g.jobs.size(), " outputs, ",
                    g.terms.size(), " inputs)");
  DescParam pd;
  at::Tensor desc_dev;  // only where the descriptors do not fit the parameters
  if (desc_bytes <= kParamDescBytes) {
    std::memcpy(pd.data, desc.bytes.data(), desc_bytes);
  } else {
    desc_dev = upload(desc, device, stream, capturing);
  }
  // [starts][weights]
  Blob tables;
  tables.put(g.starts.data(), g.starts.size() * sizeof(int32_t));
  const int64_t weights_off = tables.put(g.weights.data(), g.weights.size() * sizeof(acc_t));
  const at::Tensor tab = device_tables(g.key, tables, device, stream, capturing);
  const char* d = static_cast<const char*>(tab.data_ptr());
  const int64_t blocks = std::min<int64_t>((g.total + kThreads - 1) / kThreads, props->multiProcessorCount * 32);
  resample_kernel<src_t, dst_t, acc_t, I><<<blocks, kThreads, desc_bytes, stream>>>(
      pd, desc_dev.defined() ? static_cast<const int4*>(desc_dev.data_ptr()) : nullptr, static_cast<int>(desc_bytes),
      static_cast<int>(g.jobs.size()), static_cast<int>(terms_off), reinterpret_cast<const int32_t*>(d),
      reinterpret_cast<const acc_t*>(d + weights_off), static_cast<std::make_unsigned_t<I>>(g.total));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // `desc_dev` and an uncached `tab` go back to the caching allocator here; it is
  // stream-ordered, so the blocks are not handed out to other work on this stream before the
  // kernel has run.
}

void run_cuda(const std::vector<Job>& jobs) {
  if (jobs.empty() || jobs[0].terms.empty()) return;
  const auto [st, dt] = check_jobs(jobs, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(jobs[0].dst.device());
  with_types(st, dt, [&](auto s, auto d, auto a) {
    using S = decltype(s);
    using D = decltype(d);
    using A = decltype(a);
    with_gather_plan<A>(jobs, [&](const auto& plan) { launch<S, D, A>(plan, jobs[0].dst.device()); });
  });
}

}  // namespace

bool cuda_kernels_built() { return true; }

}  // namespace msfast

TORCH_LIBRARY_IMPL(msfast, CUDA, m) { msfast::Kernels<msfast::run_cuda>::register_all(m); }
