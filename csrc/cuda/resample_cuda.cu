// CUDA backend: runs jobs (see msfast/ops.h) in one kernel launch per call. The tap tables
// are the CPU's (forward_table / adjoint_table from msfast/plan.h over index_math.h), built
// once per call on the host and copied with the job descriptors in one transfer, so both
// backends use the same indices and weights. Every output element is computed by one thread
// as sum_ky wy * sum_kx wx * src, in a fixed order: a backward (transposed tables) is a
// gather with no atomics, bitwise deterministic.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "msfast/ops.h"

namespace msfast {
namespace {

// Plain copies of View and Table for the device; tables live in one packed buffer.
struct DevView {
  int64_t pdiv, s_outer, s_inner, H, W, row, px, cp;
  __host__ __device__ int64_t plane_offset(int64_t p) const { return (p / pdiv) * s_outer + (p % pdiv) * s_inner; }
};
struct DevTable {
  int64_t K, start, w;  // tap count, offsets of start[] (int64) and w[] (acc_t) in the buffer
};
struct DevTerm {
  const void* src;
  DevView v;
  DevTable th, tw;
};
struct DevJob {
  void* dst;
  DevView d;
  int64_t first_elem;  // prefix sum of output elements over jobs
  int64_t first_term, n_terms;
  int64_t affine;  // offset of scale[C], shift[C] (acc_t) in the buffer, or -1
  int64_t channels;
  bool cl;
};

DevView dev_view(const View& v) { return {v.pdiv, v.s_outer, v.s_inner, v.H, v.W, v.row, v.px, v.cp}; }

template <typename src_t, typename dst_t, typename acc_t>
__global__ void resample_kernel(const DevJob* jobs, int64_t n_jobs, const DevTerm* terms, const char* buf,
                                int64_t total) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    // The job of element e: jobs are few, a binary search over their prefix sums.
    int64_t lo = 0, hi = n_jobs - 1;
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (jobs[mid].first_elem <= e) lo = mid; else hi = mid - 1;
    }
    const DevJob& j = jobs[lo];
    // Element order: plane, row, pixel, channel (consecutive threads write consecutive memory).
    int64_t r = e - j.first_elem;
    const int64_t c = r % j.d.cp;
    r /= j.d.cp;
    const int64_t ox = r % j.d.W;
    r /= j.d.W;
    const int64_t oy = r % j.d.H;
    const int64_t plane = r / j.d.H;
    acc_t acc = acc_t(0);
    for (int64_t t = 0; t < j.n_terms; ++t) {
      const DevTerm& tm = terms[j.first_term + t];
      const src_t* src = static_cast<const src_t*>(tm.src) + tm.v.plane_offset(plane) + c;
      const acc_t* wy = reinterpret_cast<const acc_t*>(buf + tm.th.w) + oy * tm.th.K;
      const acc_t* wx = reinterpret_cast<const acc_t*>(buf + tm.tw.w) + ox * tm.tw.K;
      const int64_t y0 = reinterpret_cast<const int64_t*>(buf + tm.th.start)[oy];
      const int64_t x0 = reinterpret_cast<const int64_t*>(buf + tm.tw.start)[ox];
      for (int64_t ky = 0; ky < tm.th.K; ++ky) {
        const src_t* row = src + (y0 + ky) * tm.v.row + x0 * tm.v.px;
        acc_t s = acc_t(0);
        for (int64_t kx = 0; kx < tm.tw.K; ++kx) s += wx[kx] * static_cast<acc_t>(row[kx * tm.v.px]);
        acc += wy[ky] * s;
      }
    }
    if (j.affine >= 0) {
      const acc_t* scale = reinterpret_cast<const acc_t*>(buf + j.affine);
      const int64_t ch = j.cl ? c : plane % j.d.pdiv;
      acc = acc * scale[ch] + scale[j.channels + ch];
    }
    dst_t* out = static_cast<dst_t*>(j.dst) + j.d.plane_offset(plane) + oy * j.d.row + ox * j.d.px + c;
    *out = static_cast<dst_t>(acc);
  }
}

// Appends a table's starts and weights to the packed buffer.
template <typename acc_t>
DevTable pack(const Table<acc_t>& t, std::vector<char>& buf) {
  auto put = [&](const void* p, size_t n) {
    const size_t off = (buf.size() + 15) / 16 * 16;
    buf.resize(off + n);
    std::memcpy(buf.data() + off, p, n);
    return static_cast<int64_t>(off);
  };
  DevTable d;
  d.K = t.K;
  d.start = put(t.start.data(), t.start.size() * sizeof(int64_t));
  d.w = put(t.w.data(), t.w.size() * sizeof(acc_t));
  return d;
}

template <typename src_t, typename dst_t, typename acc_t>
void run_typed(const std::vector<Job>& jobs) {
  std::vector<DevJob> djobs;
  std::vector<DevTerm> dterms;
  std::vector<char> buf;
  int64_t total = 0;
  for (const auto& job : jobs) {
    const View dv = make_view(job.dst, job.channels_last);
    DevJob dj{job.dst.data_ptr(), dev_view(dv), total, static_cast<int64_t>(dterms.size()),
              static_cast<int64_t>(job.terms.size()), -1, dv.channels, job.channels_last};
    for (const auto& t : job.terms) {
      const auto [th, tw] = term_tables<acc_t>(t);
      const View sv = make_view(t.src, job.channels_last);
      dterms.push_back(DevTerm{t.src.data_ptr(), dev_view(sv), pack(th, buf), pack(tw, buf)});
    }
    if (!job.scale.empty()) {
      std::vector<acc_t> affine(job.scale.begin(), job.scale.end());
      affine.insert(affine.end(), job.shift.begin(), job.shift.end());
      const size_t off = (buf.size() + 15) / 16 * 16;
      buf.resize(off + affine.size() * sizeof(acc_t));
      std::memcpy(buf.data() + off, affine.data(), affine.size() * sizeof(acc_t));
      dj.affine = static_cast<int64_t>(off);
    }
    total += dv.planes * dv.H * dv.W * dv.cp;
    djobs.push_back(dj);
  }
  if (total == 0) return;
  // One pinned host blob -> one device copy: [jobs][terms][tables and affines].
  const size_t jobs_bytes = djobs.size() * sizeof(DevJob);
  const size_t terms_off = (jobs_bytes + 15) / 16 * 16;
  const size_t buf_off = (terms_off + dterms.size() * sizeof(DevTerm) + 15) / 16 * 16;
  const auto device = jobs[0].dst.device();
  auto host = at::empty({static_cast<int64_t>(buf_off + buf.size())},
                        at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  char* h = static_cast<char*>(host.data_ptr());
  std::memcpy(h, djobs.data(), jobs_bytes);
  std::memcpy(h + terms_off, dterms.data(), dterms.size() * sizeof(DevTerm));
  std::memcpy(h + buf_off, buf.data(), buf.size());
  auto dev = host.to(device, /*non_blocking=*/true);
  const char* d = static_cast<const char*>(dev.data_ptr());
  const int threads = 256;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, sms * 32);
  resample_kernel<src_t, dst_t, acc_t><<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const DevJob*>(d), static_cast<int64_t>(djobs.size()),
      reinterpret_cast<const DevTerm*>(d + terms_off), d + buf_off, total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
