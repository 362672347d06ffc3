// CUDA backend: runs jobs (see msfast/ops.h) in one kernel launch per call. Its arithmetic
// is gather_item (msfast/gather.h, host+device): one thread computes one output position in
// kPlanes planes as sum_ky wy * sum_kx wx * src in a fixed order, from the CPU's tap tables
// (built once per call on the host, msfast/gather_plan.h) copied with the job descriptors in
// one transfer. A backward (transposed tables) is a gather with no atomics, bitwise
// deterministic. The CPU tests run gather_item too (csrc/cpu/gather_cpu.cpp), so what is left
// to this file is the launch: the upload, the descriptors in shared memory, the grid.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CachingHostAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "msfast/gather_plan.h"

namespace msfast {
namespace {

constexpr int kThreads = 256;

// Descriptors (jobs, then terms) are copied to shared memory once per block: every item
// reads them, and from global memory their chain of dependent loads would dominate.
template <typename src_t, typename dst_t, typename acc_t, typename I>
__global__ void __launch_bounds__(kThreads)
resample_kernel(const char* __restrict__ desc, int desc_bytes, int n_jobs, int terms_off,
                const int32_t* __restrict__ starts, const acc_t* __restrict__ weights,
                std::make_unsigned_t<I> total) {
  using U = std::make_unsigned_t<I>;
  extern __shared__ int4 smem[];
  for (int i = threadIdx.x; i < desc_bytes / 16; i += kThreads) smem[i] = reinterpret_cast<const int4*>(desc)[i];
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

// The blob on the device, on the current stream: [jobs][terms][tables and affines].
at::Tensor upload(const Blob& b, const at::Device& device, cudaStream_t stream) {
  const int64_t n = static_cast<int64_t>(b.bytes.size());
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  auto dev = at::empty({n}, at::TensorOptions().dtype(at::kByte).device(device));
  if (capture == cudaStreamCaptureStatusNone) {
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

template <typename src_t, typename dst_t, typename acc_t, typename Plan>
void launch(const Plan& g, const at::Device& device) {
  using I = typename Plan::index_t;
  if (g.total == 0) return;
  // [jobs][terms] (copied to shared memory by each block), then [starts][weights].
  Blob blob;
  blob.put(g.jobs.data(), g.jobs.size() * sizeof(GJob<I>));
  const int64_t terms_off = blob.put(g.terms.data(), g.terms.size() * sizeof(GTerm<I>));
  const int64_t desc_bytes = (static_cast<int64_t>(blob.bytes.size()) + 15) / 16 * 16;
  const int64_t starts_off = blob.put(g.starts.data(), g.starts.size() * sizeof(int32_t));
  const int64_t weights_off = blob.put(g.weights.data(), g.weights.size() * sizeof(acc_t));
  const auto* props = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK_VALUE(desc_bytes <= static_cast<int64_t>(props->sharedMemPerBlock),
                    "msfast: too many pyramid levels or features in one call (", g.jobs.size(), " outputs, ",
                    g.terms.size(), " inputs)");
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor dev = upload(blob, device, stream);
  const char* d = static_cast<const char*>(dev.data_ptr());
  const int64_t blocks = std::min<int64_t>((g.total + kThreads - 1) / kThreads, props->multiProcessorCount * 16);
  resample_kernel<src_t, dst_t, acc_t, I><<<blocks, kThreads, desc_bytes, stream>>>(
      d, static_cast<int>(desc_bytes), static_cast<int>(g.jobs.size()), static_cast<int>(terms_off),
      reinterpret_cast<const int32_t*>(d + starts_off), reinterpret_cast<const acc_t*>(d + weights_off),
      static_cast<std::make_unsigned_t<I>>(g.total));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // `dev` goes back to the caching allocator here; it is stream-ordered, so the block is
  // not handed out to other work on this stream before the kernel has run.
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
