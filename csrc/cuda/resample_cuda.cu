// CUDA backend: runs jobs (see msfast/ops.h) in one kernel launch per call. The tap tables
// are the CPU's (forward_table / adjoint_table from msfast/plan.h over index_math.h), built
// once per call on the host and copied with the job descriptors in one transfer, so both
// backends use the same indices and weights. Every output value is computed by one thread
// as sum_ky wy * sum_kx wx * src, in a fixed order: a backward (transposed tables) is a
// gather with no atomics, bitwise deterministic.
//
// A thread computes kVec consecutive values of one output run (kVec pixels of an NCHW row,
// or kVec channels of a channels_last pixel), so the index arithmetic and the vertical taps
// are shared by kVec outputs and the store is one aligned vector store where it can be.
// Work items are numbered in 32-bit with multiply-shift division whenever they fit (the
// common case: 64-bit division costs dozens of instructions), else in 64-bit.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CachingHostAllocator.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "msfast/ops.h"

namespace msfast {
namespace {

constexpr int kVec = 4;
constexpr int kThreads = 256;

template <typename idx_t>
using Div = at::cuda::detail::IntDivider<idx_t>;

struct DevTable {
  int64_t K, start, w;  // tap count, offsets of start[] (int64) and w[] (acc_t) in the buffer
};
struct DevTerm {
  const void* src;
  int64_t s_outer, s_inner, row, px;  // View strides of the source
  DevTable th, tw;
};
// A job's outputs as work items: item = ((plane * H + oy) * mid + m) * chunks + chunk, where
// a run of `inner` contiguous values is cut into chunks of kVec. NCHW: run = an output row
// (inner = W, mid = 1); channels_last: run = the C channels of pixel m (inner = C, mid = W).
template <typename idx_t>
struct DevJob {
  void* dst;
  int64_t s_outer, s_inner, row, px;  // View strides of the destination
  Div<idx_t> chunks, mid, H, pdiv;
  idx_t inner, first_item;  // first_item: prefix sum of work items over jobs
  int64_t first_term, n_terms;
  int64_t affine;  // offset of scale[C], shift[C] (acc_t) in the buffer, or -1
  int64_t channels;
  bool cl;
};

template <typename T>
struct alignas(sizeof(T) * kVec) Packed {
  T v[kVec];
};

// Descriptors (jobs, then terms) are copied to shared memory once per block: every item
// reads them, and from global memory their chain of dependent loads dominated the run time.
template <typename src_t, typename dst_t, typename acc_t, typename idx_t>
__global__ void __launch_bounds__(kThreads)
resample_kernel(const char* __restrict__ desc, int desc_bytes, int n_jobs, int terms_off,
                const char* __restrict__ buf, idx_t total) {
  extern __shared__ int4 smem[];
  for (int i = threadIdx.x; i < desc_bytes / 16; i += kThreads) smem[i] = reinterpret_cast<const int4*>(desc)[i];
  __syncthreads();
  const DevJob<idx_t>* jobs = reinterpret_cast<const DevJob<idx_t>*>(smem);
  const DevTerm* terms = reinterpret_cast<const DevTerm*>(reinterpret_cast<const char*>(smem) + terms_off);
  const idx_t stride = static_cast<idx_t>(gridDim.x) * kThreads;
  for (idx_t item = static_cast<idx_t>(blockIdx.x) * kThreads + threadIdx.x; item < total; item += stride) {
    // The job of this item: jobs are few, a binary search over their prefix sums.
    int lo = 0, hi = n_jobs - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (jobs[mid].first_item <= item) lo = mid; else hi = mid - 1;
    }
    const DevJob<idx_t>& j = jobs[lo];
    const auto q = j.chunks.divmod(item - j.first_item);
    const auto m = j.mid.divmod(q.div);
    const auto y = j.H.divmod(m.div);
    const auto p = j.pdiv.divmod(y.div);  // NCHW: (n, c); channels_last: (n, 0)
    const int64_t oy = y.mod, n = p.div, pc = p.mod;
    const int64_t i0 = static_cast<int64_t>(q.mod) * kVec;
    const int64_t left = static_cast<int64_t>(j.inner) - i0;
    const int nv = left < kVec ? static_cast<int>(left) : kVec;
    acc_t acc[kVec];
#pragma unroll
    for (int v = 0; v < kVec; ++v) acc[v] = acc_t(0);
    for (int64_t t = 0; t < j.n_terms; ++t) {
      const DevTerm& tm = terms[j.first_term + t];
      const src_t* plane = static_cast<const src_t*>(tm.src) + n * tm.s_outer + pc * tm.s_inner;
      const int64_t Ky = tm.th.K, Kx = tm.tw.K;
      const acc_t* wy = reinterpret_cast<const acc_t*>(buf + tm.th.w) + oy * Ky;
      const int64_t y0 = reinterpret_cast<const int64_t*>(buf + tm.th.start)[oy];
#pragma unroll
      for (int v = 0; v < kVec; ++v) {
        if (v >= nv) break;
        const int64_t ox = j.cl ? static_cast<int64_t>(m.mod) : i0 + v;
        const int64_t ch = j.cl ? i0 + v : 0;
        const acc_t* wx = reinterpret_cast<const acc_t*>(buf + tm.tw.w) + ox * Kx;
        const int64_t x0 = reinterpret_cast<const int64_t*>(buf + tm.tw.start)[ox];
        const src_t* s0 = plane + y0 * tm.row + x0 * tm.px + ch;
        for (int64_t ky = 0; ky < Ky; ++ky) {
          const src_t* r = s0 + ky * tm.row;
          acc_t s = acc_t(0);
          for (int64_t kx = 0; kx < Kx; ++kx) s += wx[kx] * static_cast<acc_t>(r[kx * tm.px]);
          acc[v] += wy[ky] * s;
        }
      }
    }
    if (j.affine >= 0) {
      const acc_t* scale = reinterpret_cast<const acc_t*>(buf + j.affine);
#pragma unroll
      for (int v = 0; v < kVec; ++v) {
        const int64_t c = j.cl ? i0 + v : pc;
        if (v < nv) acc[v] = acc[v] * scale[c] + scale[j.channels + c];
      }
    }
    dst_t* out = static_cast<dst_t*>(j.dst) + n * j.s_outer + pc * j.s_inner + oy * j.row +
                 (j.cl ? static_cast<int64_t>(m.mod) * j.px : 0) + i0;
    if (nv == kVec && reinterpret_cast<uintptr_t>(out) % sizeof(Packed<dst_t>) == 0) {
      Packed<dst_t> pk;
#pragma unroll
      for (int v = 0; v < kVec; ++v) pk.v[v] = static_cast<dst_t>(acc[v]);
      *reinterpret_cast<Packed<dst_t>*>(out) = pk;
    } else {
#pragma unroll
      for (int v = 0; v < kVec; ++v)
        if (v < nv) out[v] = static_cast<dst_t>(acc[v]);
    }
  }
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

template <typename acc_t>
DevTable pack(const Table<acc_t>& t, Blob& b) {
  return {t.K, b.put(t.start.data(), t.start.size() * sizeof(int64_t)), b.put(t.w.data(), t.w.size() * sizeof(acc_t))};
}

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

template <typename src_t, typename dst_t, typename acc_t, typename idx_t>
void run_indexed(const std::vector<Job>& jobs, int64_t total) {
  std::vector<DevJob<idx_t>> djobs;
  std::vector<DevTerm> dterms;
  Blob tables;
  int64_t first = 0;
  auto div = [](int64_t d) { return Div<idx_t>(static_cast<idx_t>(std::max<int64_t>(d, 1))); };
  for (const auto& job : jobs) {
    const View dv = make_view(job.dst, job.channels_last);
    const int64_t inner = dv.cl ? dv.cp : dv.W, mid = dv.cl ? dv.W : 1;
    const int64_t chunks = (inner + kVec - 1) / kVec;
    const int64_t items = dv.planes * dv.H * mid * chunks;
    if (items == 0) continue;
    DevJob<idx_t> dj{job.dst.data_ptr(), dv.s_outer, dv.s_inner, dv.row, dv.px,
                     div(chunks), div(mid), div(dv.H), div(dv.pdiv),
                     static_cast<idx_t>(inner), static_cast<idx_t>(first),
                     static_cast<int64_t>(dterms.size()), static_cast<int64_t>(job.terms.size()),
                     -1, dv.channels, dv.cl};
    for (const auto& t : job.terms) {
      const auto [th, tw] = term_tables<acc_t>(t);
      const View sv = make_view(t.src, job.channels_last);
      dterms.push_back(DevTerm{t.src.data_ptr(), sv.s_outer, sv.s_inner, sv.row, sv.px, pack(th, tables),
                               pack(tw, tables)});
    }
    if (!job.scale.empty()) {
      std::vector<acc_t> affine(job.scale.begin(), job.scale.end());
      affine.insert(affine.end(), job.shift.begin(), job.shift.end());
      dj.affine = tables.put(affine.data(), affine.size() * sizeof(acc_t));
    }
    first += items;
    djobs.push_back(dj);
  }
  TORCH_INTERNAL_ASSERT(first == total);
  if (djobs.empty()) return;
  // [jobs][terms] (copied to shared memory by each block), then [tables and affines].
  Blob blob;
  blob.put(djobs.data(), djobs.size() * sizeof(DevJob<idx_t>));
  const int64_t terms_off = blob.put(dterms.data(), dterms.size() * sizeof(DevTerm));
  const int64_t desc_bytes = (static_cast<int64_t>(blob.bytes.size()) + 15) / 16 * 16;
  const int64_t tables_off = blob.put(tables.bytes.data(), tables.bytes.size());
  const auto device = jobs[0].dst.device();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto* props = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(desc_bytes <= static_cast<int64_t>(props->sharedMemPerBlock),
              "msfast: too many pyramid levels or features in one call (", djobs.size(), " outputs, ",
              dterms.size(), " inputs)");
  const at::Tensor dev = upload(blob, device, stream);
  const char* d = static_cast<const char*>(dev.data_ptr());
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, props->multiProcessorCount * 16);
  resample_kernel<src_t, dst_t, acc_t, idx_t><<<blocks, kThreads, desc_bytes, stream>>>(
      d, static_cast<int>(desc_bytes), static_cast<int>(djobs.size()), static_cast<int>(terms_off),
      d + tables_off, static_cast<idx_t>(total));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // `dev` goes back to the caching allocator here; it is stream-ordered, so the block is
  // not handed out to other work on this stream before the kernel has run.
}

template <typename src_t, typename dst_t, typename acc_t>
void run_typed(const std::vector<Job>& jobs) {
  int64_t total = 0;
  for (const auto& job : jobs) {
    const View dv = make_view(job.dst, job.channels_last);
    const int64_t inner = dv.cl ? dv.cp : dv.W, mid = dv.cl ? dv.W : 1;
    total += dv.planes * dv.H * mid * ((inner + kVec - 1) / kVec);
  }
  if (total == 0) return;
  // 32-bit items need total + grid stride < 2^32 and divisors below 2^31 (IntDivider).
  if (total < std::numeric_limits<int32_t>::max())
    run_indexed<src_t, dst_t, acc_t, uint32_t>(jobs, total);
  else
    run_indexed<src_t, dst_t, acc_t, uint64_t>(jobs, total);
}

void run_cuda(const std::vector<Job>& jobs) {
  if (jobs.empty() || jobs[0].terms.empty()) return;
  const auto [st, dt] = check_jobs(jobs, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(jobs[0].dst.device());
  with_types(st, dt, [&](auto s, auto d, auto a) { run_typed<decltype(s), decltype(d), decltype(a)>(jobs); });
}

}  // namespace

bool cuda_kernels_built() { return true; }

}  // namespace msfast

TORCH_LIBRARY_IMPL(msfast, CUDA, m) { msfast::Kernels<msfast::run_cuda>::register_all(m); }
