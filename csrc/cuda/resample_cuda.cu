// CUDA backend: runs jobs (see msfast/ops.h) in one kernel launch per call. Its arithmetic
// is gather_item (msfast/gather.h, host+device): one thread computes V values in P
// planes as sum_ky wy * sum_kx wx * src in a fixed order, from the CPU's tap tables
// (msfast/gather_plan.h). A backward (transposed tables) is a gather with no atomics,
// bitwise deterministic. The CPU tests run gather_item too (csrc/cpu/gather_cpu.cpp), so
// what is left to the CUDA files is the launch (cuda/launch.cuh: the descriptors in the
// kernel's parameters, the grid) and, here, the uploads, the device cache of tables, the
// dispatch on the source dtype and the registration.
#include <ATen/cuda/CachingHostAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <atomic>
#include <memory>
#include <mutex>
#include <unordered_map>

#include "cuda/launch.cuh"

namespace msfast {
namespace cuda {

// Built in csrc/cuda/kernels_*.cu, one file per source dtype.
extern template void run_src<uint8_t>(const std::vector<Job>&, at::ScalarType);
extern template void run_src<at::Half>(const std::vector<Job>&, at::ScalarType);
extern template void run_src<at::BFloat16>(const std::vector<Job>&, at::ScalarType);
extern template void run_src<float>(const std::vector<Job>&, at::ScalarType);
extern template void run_src<double>(const std::vector<Job>&, at::ScalarType);

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
// on (GatherTables::key): a training or serving loop calls with the same shapes again and
// again, and a per-call upload (a pinned block, a copy, an event) costs every call host time. The cache holds at most kTableCacheBytes and then stops growing; an
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
at::Tensor device_tables(const std::string& key, const std::function<Blob()>& make, const at::Device& device,
                         cudaStream_t stream, bool capturing) {
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
    return upload(make(), device, stream, true);
  }
  at::Tensor t = upload(make(), device, stream, capturing);
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

}  // namespace cuda

namespace {

void run_cuda(const std::vector<Job>& jobs) {
  if (jobs.empty() || jobs[0].terms.empty()) return;
  const auto [st, dt] = check_jobs(jobs, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(jobs[0].dst.device());
  with_type(st, [&](auto s) { cuda::run_src<decltype(s)>(jobs, dt); });
}

}  // namespace

bool cuda_kernels_built() { return true; }

}  // namespace msfast

TORCH_LIBRARY_IMPL(msfast, CUDA, m) { msfast::Kernels<msfast::run_cuda>::register_all(m); }
